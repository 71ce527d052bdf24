"""ControlNet-LLLite for SDXL (sd-scripts' `sdxl_train_control_net_lllite.py`, `networks/control_net_lllite*.py`).

LLLite is a small module on each of the U-Net's attention projections that read the image (self-attention's
`to_q`, `to_k`, `to_v` and cross-attention's `to_q`, in the down and middle blocks): it embeds the conditioning
image down to the layer's resolution (`conditioning1`), reduces the layer's input (`down`), mixes both (`mid`) and
adds the result, projected back (`up`, zero-initialised), to the layer's input.

The file layout is sd-scripts' (what its loaders and the ComfyUI LLLite node read): one module per layer, named
`lllite_unet_` + the layer's SGM path with `_` for `.` (e.g. `lllite_unet_input_blocks_4_1_transformer_blocks_0_
attn1_to_q`), holding `conditioning1.0` (a 4x4 stride-4 convolution from RGB to `cond_emb_dim / 2` channels),
`conditioning1.2` and for the deepest layers `conditioning1.4` (further stride-2 or stride-4 convolutions to
`cond_emb_dim` channels, ReLU between), `down.0`, `mid.0` and `up.0` (linear layers of `network_dim` units),
each `.weight` and `.bias`. The "depth" (1, 2, 3) that sizes `conditioning1` is the resolution level of the layer:
its embedding must reach the layer's token grid (1/8, 1/16 or 1/32 of the image).

The conditioning image goes in as the batch holds it, in [-1, 1], as sd-scripts trains and its samplers feed it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lorakit.adapters.formats import load_lora_file, save_lora_file
from lorakit.errors import CheckpointError
from lorakit.families.base import Components

PREFIX = "lllite_unet_"
#: the layers LLLite attaches to, by diffusers module path: (level or None for the middle block, path)
_TARGET = re.compile(r"^(?:down_blocks\.(\d+)|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+\."
                     r"(?:attn1\.to_[qkv]|attn2\.to_q)$")
#: the key layout of a file (documented above)
KEY_PATTERN = re.compile(r"^lllite_unet_(?:input_blocks_\d+_1|middle_block_1)_transformer_blocks_\d+_"
                         r"(?:attn1_to_[qkv]|attn2_to_q)\.(?:conditioning1\.[024]|down\.0|mid\.0|up\.0)\.(?:weight|bias)$")


class LLLiteModule(nn.Module):
    """One layer's LLLite: conditioning embedding, down, mid and up."""

    def __init__(self, in_dim: int, depth: int, cond_emb_dim: int, mlp_dim: int, dropout: float | None = None):
        super().__init__()
        half = cond_emb_dim // 2
        layers: list[nn.Module] = [nn.Conv2d(3, half, kernel_size=4, stride=4)]  # to the latent grid (1/8 after the next)
        if depth == 1:
            layers += [nn.ReLU(), nn.Conv2d(half, cond_emb_dim, kernel_size=2, stride=2)]
        elif depth == 2:
            layers += [nn.ReLU(), nn.Conv2d(half, cond_emb_dim, kernel_size=4, stride=4)]
        else:
            layers += [nn.ReLU(), nn.Conv2d(half, half, kernel_size=4, stride=4), nn.ReLU(),
                       nn.Conv2d(half, cond_emb_dim, kernel_size=2, stride=2)]
        self.conditioning1 = nn.Sequential(*layers)
        self.down = nn.Sequential(nn.Linear(in_dim, mlp_dim), nn.ReLU())
        self.mid = nn.Sequential(nn.Linear(mlp_dim + cond_emb_dim, mlp_dim), nn.ReLU())
        self.up = nn.Sequential(nn.Linear(mlp_dim, in_dim))
        nn.init.zeros_(self.up[0].weight)  # starts as no change to the U-Net
        self.dropout = dropout

    def residual(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """What is added to the layer's input `x` (B, tokens, in_dim) for conditioning images (b, 3, H, W)."""
        cx = self.conditioning1(image.to(dtype=self.up[0].weight.dtype))
        cx = cx.flatten(2).transpose(1, 2)  # (b, h*w, c), the token order of the attention input
        if x.shape[0] != cx.shape[0]:  # classifier-free guidance runs the batch twice
            cx = cx.repeat(x.shape[0] // cx.shape[0], 1, 1)
        cx = self.mid(torch.cat([cx, self.down(x.to(cx.dtype))], dim=2))
        if self.dropout and self.training:
            cx = nn.functional.dropout(cx, p=self.dropout)
        return self.up(cx).to(x.dtype)


class ControlNetLLLite(nn.Module):
    """Every layer's LLLite under its file name; hooks add them to the U-Net's layers while an image is set."""

    def __init__(self, unet: nn.Module, cond_emb_dim: int, mlp_dim: int, dropout: float | None = None):
        super().__init__()
        from lorakit.families.sdxl.sgm_keys import SgmUnetNames

        names = SgmUnetNames(dict(unet.config))
        levels = len(unet.config.block_out_channels)
        self.lllite = nn.ModuleDict()
        self._layers: dict[str, nn.Module] = {}
        for path, layer in unet.named_modules():
            match = _TARGET.match(path)
            if match is None or not isinstance(layer, nn.Linear):
                continue
            depth = int(match.group(1)) + 1 if match.group(1) is not None else levels
            name = PREFIX + names.module(path).replace(".", "_")
            self.lllite[name] = LLLiteModule(layer.in_features, min(depth, 3), cond_emb_dim, mlp_dim, dropout)
            self._layers[name] = layer
        self.image: torch.Tensor | None = None
        self._handles = [layer.register_forward_pre_hook(self._hook(name)) for name, layer in self._layers.items()]

    def _hook(self, name: str):
        def add_residual(layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
            if self.image is None:
                return None
            x = inputs[0]
            return (x + self.lllite[name].residual(x, self.image), *inputs[1:])
        return add_residual

    def set_cond_image(self, image: torch.Tensor | None) -> None:
        self.image = image

    def state_dict_file(self) -> dict[str, torch.Tensor]:
        """The file's tensors: `<module name>.<part>.<index>.<weight|bias>` (the ModuleDict level dropped)."""
        return {key.removeprefix("lllite."): value for key, value in self.state_dict().items()}

    def load_file_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        missing = self.load_state_dict({f"lllite.{k}": v for k, v in state.items()}, strict=False)
        problems = list(missing.missing_keys) + list(missing.unexpected_keys)
        if problems:
            raise CheckpointError(f"{source} does not fit this model's ControlNet-LLLite (different layers or sizes): "
                                  + ", ".join(sorted(problems)[:5]) + (" ..." if len(problems) > 5 else ""))


class LLLitePipeline:
    """The SDXL pipeline with the LLLite fed a control image for the length of one call."""

    def __init__(self, pipe: Any, lllite: ControlNetLLLite):
        import inspect

        self.pipe, self.lllite = pipe, lllite
        self.accepted_inputs = {*inspect.signature(pipe.__call__).parameters, "control_image"}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def __call__(self, *, control_image: Any = None, **kwargs: Any) -> Any:
        width, height = kwargs.get("width") or 1024, kwargs.get("height") or 1024
        tensor = None
        if control_image is not None:
            array = np.asarray(control_image.convert("RGB").resize((width, height)), dtype=np.float32) / 127.5 - 1.0
            tensor = torch.from_numpy(array).permute(2, 0, 1)[None].to(self.pipe.unet.device)
        self.lllite.set_cond_image(tensor)
        try:
            return self.pipe(**kwargs)
        finally:
            self.lllite.set_cond_image(None)


class SdxlLLLite:
    """ControlNet-LLLite as `lorakit controlnet` trains it on SDXL."""

    title = "ControlNet-LLLite"
    modelspec_kind = "control-net-lllite"  # sd-scripts' ModelSpec suffix for these files

    def __init__(self, base_pipeline: Any):
        self.base_pipeline = base_pipeline  # the family's own pipeline builder

    def option_problems(self, cfg: Any) -> list[str]:
        source = cfg.controlnet_model_name_or_path or cfg.network_weights
        problems = []
        if cfg.controlnet_model_name_or_path and cfg.network_weights:
            problems.append("--controlnet_model_name_or_path and --network_weights both name LLLite weights; give one")
        if source and not Path(source).is_file():
            problems.append(f"LLLite weights {source} do not exist")
        return problems

    def build(self, cfg: Any, comps: Components, device: torch.device) -> nn.Module:
        module = ControlNetLLLite(comps.denoiser, cfg.cond_emb_dim or 32, cfg.network_dim or 64, cfg.network_dropout)
        source = cfg.controlnet_model_name_or_path or cfg.network_weights
        if source:
            module.load_file_state(load_lora_file(source)[0], source)
        module.to(device)
        comps.extras["controlnet"] = module
        return module

    def save(self, module: nn.Module, path: Path, metadata: dict[str, str], save_dtype: torch.dtype | None,
             model_format: str) -> None:
        save_lora_file(module.state_dict_file(), path, metadata, save_dtype=save_dtype, model_format=model_format)

    def save_folder(self, module: nn.Module, folder: Path) -> bool:
        return False  # LLLite has no diffusers layout

    def pipeline(self, comps: Components, module: nn.Module, sampler: str) -> Any:
        return LLLitePipeline(self.base_pipeline(comps, sampler), module)

    def sample_inputs(self, image: Any) -> dict[str, Any]:
        return {"control_image": image}


def attach_condition(comps: Components, batch: Any) -> None:
    """Give an attached LLLite the batch's conditioning images (or none) before the U-Net runs."""
    module = comps.extras.get("controlnet")
    if module is not None:
        images = getattr(batch, "conditioning_images", None)
        module.set_cond_image(None if images is None else images.to(comps.denoiser.device))
