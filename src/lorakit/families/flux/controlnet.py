"""The FLUX.1 ControlNet (sd-scripts' `flux_train_control_net.py`), as diffusers' `FluxControlNetModel` with a hint
encoder (the XLabs design sd-scripts trains): the control image, in [-1, 1], is encoded to the latent grid by
`input_hint_block` (8 convolutions, three of stride 2), packed in 2x2 patches and added to the image tokens; the
ControlNet's double (and single) blocks give residuals that the transformer adds after its blocks, repeating them
over the transformer's blocks (`controlnet_blocks_repeat`, what diffusers' FLUX ControlNet pipeline does for this
design and sd-scripts' `block_idx % depth`).

A new ControlNet has `--controlnet_double_blocks` (2) double and `--controlnet_single_blocks` (0) single blocks,
initialised from the transformer's first blocks and embedders (sd-scripts starts them from random weights; a copy
of the model's own blocks is the usual ControlNet start and trains faster); `--controlnet_model_name_or_path` reads
a diffusers folder or a file in sd-scripts' layout.

Files: sd-scripts' layout (BFL names: `double_blocks.N.img_attn.qkv`, `controlnet_blocks.N`,
`controlnet_blocks_for_single.N`, `pos_embed_input`, `input_hint_block.{0,2,...,14}`), which sd-scripts and the
XLabs-style loaders read, and for the last file the diffusers folder `FluxControlNetModel.from_pretrained` reads.
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
from lorakit.families.flux.bfl_keys import bfl_to_diffusers, diffusers_to_bfl

HINT_CHANNELS = 16  # the hint encoder's output: 16 channels, packed 2x2 into the transformer's 64 inputs
_HINT_CONVS = 8


def _own_parts() -> dict[str, str]:
    """The ControlNet's own layers, diffusers prefix -> sd-scripts prefix."""
    table = {"controlnet_x_embedder.": "pos_embed_input.", "input_hint_block.conv_in.": "input_hint_block.0.",
             "input_hint_block.conv_out.": f"input_hint_block.{2 * (_HINT_CONVS - 1)}.",
             "controlnet_single_blocks.": "controlnet_blocks_for_single.", "controlnet_blocks.": "controlnet_blocks."}
    table.update({f"input_hint_block.blocks.{i}.": f"input_hint_block.{2 * (i + 1)}." for i in range(_HINT_CONVS - 2)})
    return table


def controlnet_to_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers FluxControlNetModel weights -> sd-scripts' ControlNetFlux names."""
    table = _own_parts()
    own, rest = {}, {}
    for key, value in state.items():
        prefix = next((p for p in table if key.startswith(p)), None)
        if prefix is None:
            rest[key] = value
        else:
            own[table[prefix] + key[len(prefix):]] = value
    return {**diffusers_to_bfl(rest), **own}


def controlnet_from_file(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """sd-scripts' ControlNetFlux names -> diffusers FluxControlNetModel names."""
    table = {new: old for old, new in _own_parts().items()}
    own, rest = {}, {}
    for key, value in state.items():
        prefix = next((p for p in sorted(table, key=len, reverse=True) if key.startswith(p)), None)
        if prefix is None:
            rest[key] = value
        else:
            own[table[prefix] + key[len(prefix):]] = value
    return {**bfl_to_diffusers(rest, source, final_layer=False), **own}


def new_controlnet(transformer: nn.Module, double_blocks: int, single_blocks: int) -> nn.Module:
    """A FluxControlNetModel with a hint encoder, its embedders and blocks copied from the transformer's."""
    from diffusers import FluxControlNetModel

    keep = ("in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
            "pooled_projection_dim", "guidance_embeds", "axes_dims_rope")
    config = {k: v for k, v in transformer.config.items() if k in keep}
    # patch_size 2: the hint encoder's 1/8 grid is packed 2x2, as the latents are (the transformer's own
    # patch_size 1 counts its already packed tokens); diffusers reads the hint tokens with this value
    module = FluxControlNetModel(**config, patch_size=2, num_layers=double_blocks, num_single_layers=single_blocks,
                                 conditioning_embedding_channels=HINT_CHANNELS)
    for part in ("time_text_embed", "context_embedder", "x_embedder"):
        getattr(module, part).load_state_dict(getattr(transformer, part).state_dict())
    module.transformer_blocks.load_state_dict(transformer.transformer_blocks[:double_blocks].state_dict())
    module.single_transformer_blocks.load_state_dict(transformer.single_transformer_blocks[:single_blocks].state_dict())
    return module


class FluxControlNet(DiffusersControlNet):
    """The FLUX.1 ControlNet as `lorakit controlnet` trains it."""

    title = "ControlNet"
    modelspec_kind = "controlnet"

    def __init__(self, base_pipeline: Any):
        self.base_pipeline = base_pipeline

    def option_problems(self, cfg: Any) -> list[str]:
        problems = super().option_problems(cfg)
        if cfg.controlnet_double_blocks + cfg.controlnet_single_blocks == 0:
            problems.append("--controlnet_double_blocks and --controlnet_single_blocks are both 0: the ControlNet "
                            "would have no block")
        return problems

    def build(self, cfg: Any, comps: Components, device: torch.device) -> nn.Module:
        from diffusers import FluxControlNetModel

        source = cfg.controlnet_model_name_or_path
        if source and Path(source).is_dir():
            module = FluxControlNetModel.from_pretrained(source, local_files_only=True)
        else:
            transformer = comps.denoiser
            double = min(cfg.controlnet_double_blocks, len(transformer.transformer_blocks))
            single = min(cfg.controlnet_single_blocks, len(transformer.single_transformer_blocks))
            module = new_controlnet(transformer, double, single)
            if source:
                module.load_state_dict(controlnet_from_file(load_lora_file(source)[0], source))
        return place_for_training(module, comps, device)

    def save(self, module: nn.Module, path: Path, metadata: dict[str, str], save_dtype: torch.dtype | None,
             model_format: str) -> None:
        save_lora_file(controlnet_to_file(module.state_dict()), path, metadata, save_dtype=save_dtype,
                       model_format=model_format)

    def pipeline(self, comps: Components, module: nn.Module | list[nn.Module], sampler: str | None,
                 task: str = "text") -> Any:
        """diffusers' FLUX ControlNet pipeline (several ControlNets: its FluxMultiControlNetModel, which adds
        their residuals); FLUX.1 has no image tasks."""
        from diffusers import FluxControlNetPipeline, FluxMultiControlNetModel

        base = self.base_pipeline(comps, sampler)
        if isinstance(module, list):
            module = module[0] if len(module) == 1 else FluxMultiControlNetModel(module)
        return FluxControlNetPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=base.text_encoder,
                                      tokenizer=base.tokenizer, text_encoder_2=base.text_encoder_2,
                                      tokenizer_2=base.tokenizer_2, transformer=base.transformer, controlnet=module)

    def sample_inputs(self, image: Any) -> dict[str, Any]:
        return {"control_image": image}

    # -- lorakit generate ---------------------------------------------------------------------------------

    generate_option = "control_net_models"

    def file_problems(self, path: str) -> list[str]:
        return controlnet_file_problems(path, "FluxControlNetModel", ("pos_embed_input.weight", "input_hint_block.0.weight"),
                                        "a FLUX.1 ControlNet file (sd-scripts' layout: pos_embed_input, input_hint_block, "
                                        "controlnet_blocks)")

    def load(self, path: str, comps: Components, device: torch.device, dtype: torch.dtype) -> nn.Module:
        """A diffusers folder, or a file whose block counts are read from its keys."""
        from diffusers import FluxControlNetModel

        if Path(path).is_dir():
            module = FluxControlNetModel.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        else:
            state = controlnet_from_file(load_lora_file(path)[0], path)
            module = new_controlnet(comps.denoiser, _count(state, "transformer_blocks."),
                                    _count(state, "single_transformer_blocks."))
            try:
                module.load_state_dict(state)
            except RuntimeError as exc:
                raise misfit_error(path, exc) from None
        return place_for_generation(module, device, dtype)

    def generation_inputs(self, task: str, images: list[list[Any]], multipliers: list[float], kept_steps: list[int],
                          denoising_steps: int) -> dict[str, Any]:
        return diffusers_control_inputs("control_image", images, multipliers, kept_steps, denoising_steps)


def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    """How many numbered blocks under `prefix` the weights hold."""
    return len({key[len(prefix):].split(".")[0] for key in state if key.startswith(prefix)})


def controlnet_inputs(comps: Components, batch: Any, **model_inputs: Any) -> dict[str, Any]:
    """The transformer's extra inputs from an attached ControlNet and the batch's conditioning images (none
    without); `model_inputs` are the transformer's own inputs, which the ControlNet reads too."""
    module = comps.extras.get("controlnet")
    images = getattr(batch, "conditioning_images", None)
    if module is None or images is None:
        return {}
    tokens = model_inputs["hidden_states"]
    guidance = model_inputs.get("guidance")
    if module.config.guidance_embeds and guidance is None:
        guidance = torch.full((tokens.shape[0],), comps.extras["guidance_scale"], device=tokens.device,
                              dtype=tokens.dtype)
    double, single = module(
        controlnet_cond=images.to(device=tokens.device, dtype=tokens.dtype), return_dict=False,
        **{**model_inputs, "guidance": guidance if module.config.guidance_embeds else None},
    )
    return {"controlnet_block_samples": double, "controlnet_single_block_samples": single,
            "controlnet_blocks_repeat": True}
