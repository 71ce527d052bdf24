"""The SD 1.x/2.x ControlNet: diffusers' `ControlNetModel` beside the U-Net (sd-scripts' `train_control_net.py`).

A new ControlNet is initialised from the U-Net (its encoder half and time embedding copied, the zero convolutions
and the hint encoder new), or read from `--controlnet_model_name_or_path` (a diffusers folder, or a single file in
the original layout). Its residuals are added to the U-Net's skip connections and middle block in `predict`.

Files: the original (LDM) ControlNet layout sd-scripts writes (`input_blocks.*`, `input_hint_block.*`,
`zero_convs.*`, `middle_block_out.*`), which ComfyUI, A1111 and diffusers' `ControlNetModel.from_single_file` read,
and for the last file also the diffusers folder `ControlNetModel.from_pretrained` reads.

The control image goes in as diffusers' pipelines, ComfyUI and A1111 give it, in [0, 1]. sd-scripts trains on
[-1, 1] and samples with [0, 1]; training on what the readers give is what makes the file work in them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.adapters.formats import load_lora_file, save_lora_file
from lorakit.families.base import Components
from lorakit.families.common.controlnet_files import (
    DiffusersControlNet,
    controlnet_file_problems,
    diffusers_control_inputs,
    misfit_error,
    place_for_generation,
    place_for_training,
)
from lorakit.families.common.ldm_keys import UNET_RESNET, UNET_TOP_LEVEL, _rename_inner, _rename_prefix, unet_block_prefixes

def _extra_prefixes(config: dict[str, Any]) -> dict[str, str]:
    """The ControlNet-only parts, diffusers prefix -> original prefix (the hint encoder's convolutions sit at the
    even indices of `input_hint_block`, between its activations)."""
    hint_blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    table = {"controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
             "controlnet_cond_embedding.conv_out.": f"input_hint_block.{2 * (hint_blocks + 1)}.",
             "controlnet_mid_block.": "middle_block_out.0."}
    table.update({f"controlnet_cond_embedding.blocks.{i}.": f"input_hint_block.{2 * (i + 1)}." for i in range(hint_blocks)})
    zero_convs = 1 + len(config["down_block_types"]) * (config["layers_per_block"] + 1) - 1
    table.update({f"controlnet_down_blocks.{i}.": f"zero_convs.{i}.0." for i in range(zero_convs)})
    return table


def controlnet_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers ControlNetModel weights -> the original layout (no prefix, as sd-scripts writes it)."""
    blocks = unet_block_prefixes({**config, "up_block_types": []})
    extra = _extra_prefixes(config)
    out = {}
    for key, value in state.items():
        renamed = _rename_prefix(key, extra) or _rename_prefix(key, UNET_TOP_LEVEL)
        if renamed is None:
            prefix, ldm, kind = next(b for b in blocks if key.startswith(b[0]))
            rest = key[len(prefix):]
            renamed = ldm + (_rename_inner(rest, UNET_RESNET) if kind == "resnet" else rest)
        out[renamed] = value
    return out


def ldm_to_controlnet(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """An original-layout ControlNet file's weights -> diffusers names (diffusers' own converter)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    return convert_controlnet_checkpoint(state, dict(config))


class UNetControlNet(DiffusersControlNet):
    """A diffusers ControlNetModel beside an SD 1.x/2.x U-Net."""

    title = "ControlNet"
    modelspec_kind = "controlnet"

    def build(self, cfg: Any, comps: Components, device: torch.device) -> nn.Module:
        from diffusers import ControlNetModel

        source = cfg.controlnet_model_name_or_path
        if source and Path(source).is_dir():
            module = ControlNetModel.from_pretrained(source, local_files_only=True)
        else:
            module = ControlNetModel.from_unet(comps.denoiser)
            if source:
                state, _ = load_lora_file(source)
                module.load_state_dict(ldm_to_controlnet(state, module.config))
        return place_for_training(module, comps, device)

    def save(self, module: nn.Module, path: Path, metadata: dict[str, str], save_dtype: torch.dtype | None,
             model_format: str) -> None:
        state = controlnet_to_ldm(module.state_dict(), dict(module.config))
        save_lora_file(state, path, metadata, save_dtype=save_dtype, model_format=model_format)

    def pipeline(self, comps: Components, module: nn.Module | list[nn.Module], sampler: str | None,
                 task: str = "text") -> Any:
        """diffusers' ControlNet pipeline for the task over these very modules (several ControlNets: diffusers'
        MultiControlNetModel, which adds their residuals)."""
        import diffusers

        from lorakit.objectives.samplers import build_sampler

        if isinstance(module, list) and len(module) == 1:
            module = module[0]
        return getattr(diffusers, _PIPELINES[task])(
            vae=comps.vae, text_encoder=comps.text_encoders[0], tokenizer=comps.tokenizers[0], unet=comps.denoiser,
            controlnet=module, scheduler=build_sampler(sampler or "ddim", comps.extras.get("prediction_type", "epsilon")),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    def sample_inputs(self, image: Any) -> dict[str, Any]:
        return {"image": image}

    # -- lorakit generate ---------------------------------------------------------------------------------

    generate_option = "control_net_models"

    def file_problems(self, path: str) -> list[str]:
        return controlnet_file_problems(path, "ControlNetModel", ("input_hint_block.0.weight", "zero_convs.0.0.weight"),
                                        "an SD 1.x/2.x ControlNet (input_hint_block.*, zero_convs.*)")

    def load(self, path: str, comps: Components, device: torch.device, dtype: torch.dtype) -> nn.Module:
        from diffusers import ControlNetModel

        if Path(path).is_dir():
            module = ControlNetModel.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        else:
            module = ControlNetModel.from_unet(comps.denoiser, load_weights_from_unet=False)
            state = {k.removeprefix("control_model."): v for k, v in load_lora_file(path)[0].items()}
            try:
                module.load_state_dict(ldm_to_controlnet(state, module.config))
            except (RuntimeError, KeyError, StopIteration) as exc:
                raise misfit_error(path, exc) from None
        return place_for_generation(module, device, dtype)

    def generation_inputs(self, task: str, images: list[list[Any]], multipliers: list[float], kept_steps: list[int],
                          denoising_steps: int) -> dict[str, Any]:
        # diffusers' text pipeline reads several ControlNets' images nested per image, its image tasks per ControlNet
        return diffusers_control_inputs("image" if task == "text" else "control_image", images, multipliers,
                                        kept_steps, denoising_steps, per_image=task == "text")


_PIPELINES = {"text": "StableDiffusionControlNetPipeline", "img2img": "StableDiffusionControlNetImg2ImgPipeline",
              "inpaint": "StableDiffusionControlNetInpaintPipeline"}


def controlnet_residuals(comps: Components, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                         batch: Any) -> dict[str, Any]:
    """The U-Net's extra inputs from an attached ControlNet and the batch's conditioning images (none without)."""
    module = comps.extras.get("controlnet")
    images = getattr(batch, "conditioning_images", None)
    if module is None or images is None:
        return {}
    control = images.to(device=noisy.device, dtype=noisy.dtype).add(1.0).mul(0.5)  # [-1, 1] -> [0, 1]
    down, mid = module(noisy, timesteps, encoder_hidden_states=context, controlnet_cond=control, return_dict=False)
    return {"down_block_additional_residuals": [d.to(noisy.dtype) for d in down],
            "mid_block_additional_residual": mid.to(noisy.dtype)}
