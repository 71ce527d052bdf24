"""Building a family's modules from local files, shared by every loader.

Diffusers/transformers folders are opened with `from_pretrained` on local files only; single files become
modules built on the meta device whose parameters are then assigned from the file's tensors, so loading holds
one copy of the weights. The JSON and `lorakit.configs` metadata readers live here too. Every failure is a
`CheckpointError` that names the file.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, Sequence

import torch
from torch import nn

from lorakit.checkpoint_io import LoadedCheckpoint, first_line
from lorakit.errors import CheckpointError

__all__ = [
    "CONFIGS_CKPT_KEY",
    "CONFIGS_METADATA_KEY",
    "assign_weights",
    "embedded_config",
    "embedded_configs",
    "first_line",
    "from_pretrained",
    "read_json",
    "reject_checkpoint",
    "skip_weight_init",
]

CONFIGS_METADATA_KEY = "lorakit.configs"  # safetensors metadata: {"<component>": diffusers/transformers config}
CONFIGS_CKPT_KEY = "lorakit_configs"  # the same, as a top-level entry of a .ckpt beside "state_dict"


# ---------------------------------------------------------------------------------------------------------
# Folders and JSON
# ---------------------------------------------------------------------------------------------------------


def from_pretrained(cls, folder: Path, subfolder: str, *, what: str | None = None, **kwargs) -> nn.Module:
    """`cls.from_pretrained` on local files; `what` names the part in the error (default: the subfolder)."""
    try:
        return cls.from_pretrained(str(folder), subfolder=subfolder, local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        name = subfolder if what is None else what
        raise CheckpointError(f"{folder / subfolder}: cannot load the {name} ({first_line(exc)})") from None


def read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({first_line(exc)})") from None


# ---------------------------------------------------------------------------------------------------------
# Configs lorakit embeds in its own files
# ---------------------------------------------------------------------------------------------------------


def embedded_config(checkpoint: LoadedCheckpoint, component: str) -> dict[str, Any] | None:
    """One component's config from the file's `lorakit.configs` metadata, if the file has it."""
    raw = checkpoint.metadata.get(CONFIGS_METADATA_KEY)
    if raw is None:
        return None
    try:
        return json.loads(raw).get(component)
    except (ValueError, AttributeError):
        raise CheckpointError(f"{checkpoint.path}: its '{CONFIGS_METADATA_KEY}' metadata is damaged") from None


def embedded_configs(checkpoint: LoadedCheckpoint, names: Sequence[str]) -> dict[str, Any] | None:
    """All of `names`' configs from lorakit's metadata (safetensors) or `.ckpt` entry, marked `_embedded`;
    None if the file has none, an error if some are missing."""
    raw = checkpoint.metadata.get(CONFIGS_METADATA_KEY) or checkpoint.metadata.get(CONFIGS_CKPT_KEY)
    if raw is None:
        return None
    try:
        configs = json.loads(raw)
        missing = [name for name in names if not isinstance(configs.get(name), dict)]
        if missing:
            raise ValueError(f"no {', '.join(missing)} entries")
    except ValueError as exc:
        raise CheckpointError(
            f"{checkpoint.path}: its '{CONFIGS_METADATA_KEY}' metadata is damaged ({first_line(exc)})"
        ) from None
    return {**configs, "_embedded": True}


# ---------------------------------------------------------------------------------------------------------
# Meta-device modules filled from a state dict
# ---------------------------------------------------------------------------------------------------------

# The torch.nn.init functions layers call from reset_parameters(); random init of meta tensors is wasted work
# (and slow: each call goes through a Python decomposition), since every weight is replaced from the file.
_INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "zeros_", "ones_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
)


@contextmanager
def skip_weight_init():
    """Make torch.nn.init's initialisers no-ops while empty modules are built."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    for name in _INIT_FUNCTIONS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def assign_weights(
    module: nn.Module,
    weights: dict[str, torch.Tensor],
    *,
    file: str,
    component: str,
    dtype: torch.dtype,
    hint: str = "",
    extra_ok: bool = False,
    fit_unit_dims: bool = False,
) -> None:
    """Move `weights` into `module` (built on meta) after checking every name and shape matches.

    Weights are popped as they are placed, so the loaded module ends up owning the only copy. `hint` is
    appended to name and shape errors; `extra_ok` allows tensors the module does not have; `fit_unit_dims`
    accepts shapes that only differ by trailing unit dims (1x1 conv vs linear).
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights and expected[k].is_meta]
    if missing:
        raise CheckpointError(
            f"{file}: the {component} weights are incomplete: {len(missing)} missing (e.g. {missing[0]}).{hint}"
        )
    if not extra_ok:
        unexpected = [k for k in weights if k not in expected]
        if unexpected:
            raise CheckpointError(f"{file}: unexpected {component} weights (e.g. {unexpected[0]}); is this the right file?")
    placed: dict[str, torch.Tensor] = {}
    for key, target in expected.items():
        if key not in weights:
            placed[key] = target  # a real (non-meta) buffer the file does not store; keep its value
            continue
        value = weights.pop(key)
        fitted = _fit_shape(value, tuple(target.shape)) if fit_unit_dims else value
        if fitted is None or tuple(fitted.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{file}: the {component} weight {key} has shape {tuple(value.shape)} but the architecture "
                f"needs {tuple(target.shape)}.{hint}"
            )
        placed[key] = fitted.to(dtype) if fitted.is_floating_point() else fitted
    module.load_state_dict(placed, strict=True, assign=True)
    for name, buffer in module.named_buffers():
        if buffer.is_meta:
            raise CheckpointError(f"{name}: buffer left uninitialised while loading")


def _fit_shape(value: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The value as `shape` if it only differs by trailing unit dims (1x1 conv vs linear: SD 2.x
    proj_in/proj_out written by other tools, LDM VAE attention); None for a real mismatch."""
    if tuple(value.shape) == shape:
        return value
    if _without_unit_tail(tuple(value.shape)) == _without_unit_tail(shape):
        return value.reshape(shape)
    return None


def _without_unit_tail(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


# ---------------------------------------------------------------------------------------------------------
# Recognising what a file is
# ---------------------------------------------------------------------------------------------------------


#: Key fragments of files that are not the base model a loader wants, the family (or kind) of file they mark,
#: and what to tell the user; checked in order, each family's loader skipping its own entry.
OTHER_FILE_HINTS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("lora", ("lora_unet_", "lora_te", ".lora_down.", ".lora_A.", "hada_w1", "lokr_w1", "oft_blocks"),
     "this is a LoRA/adapter file, not a base model (pass base models with --pretrained_model_name_or_path "
     "and LoRA files with --network_weights)"),
    ("sdxl", ("conditioner.embedders.",), "this is an SDXL checkpoint (use --family sdxl)"),
    ("sd", ("cond_stage_model.",), "this is an SD 1.x/2.x checkpoint (use --family sd)"),
    ("sd3", ("joint_blocks.",), "this is an SD3 checkpoint (use --family sd3)"),
    ("flux", ("double_blocks.", "single_blocks."), "this is a FLUX checkpoint (use --family flux)"),
    ("vae", ("encoder.down.", "decoder.up."), "this holds only an autoencoder (pass it with --vae, or --ae for FLUX)"),
    ("diffusers", ("down_blocks.", "transformer_blocks."), "these are diffusers-layout weights; pass the whole diffusers folder"),
)


def reject_checkpoint(checkpoint: LoadedCheckpoint, family: str, expected: str) -> NoReturn:
    """Raise the error for a file that is not the `family` base model wanted: the first of `OTHER_FILE_HINTS`
    (another family's) that matches a tensor name, else an unrecognised-names error; `expected` closes it."""
    keys = list(checkpoint.state_dict)
    if not keys:
        raise CheckpointError(f"{checkpoint.path}: the file holds no tensors; {expected}")
    for kind, fragments, hint in OTHER_FILE_HINTS:
        if kind != family and any(fragment in key for key in keys for fragment in fragments):
            raise CheckpointError(f"{checkpoint.path}: {hint}; {expected}")
    raise CheckpointError(f"{checkpoint.path}: unrecognised tensor names (e.g. {keys[0]}); {expected}")
