"""Whole-model checkpoints of a fine-tune, written in the layout the model came in.

* A single file in (`.safetensors` or `.ckpt`, the family's original layout: LDM, SGM, SAI, BFL) gives a single
  file out. The input file is the template: the trained parts are converted to its names by the family
  (`checkpoint_pieces`), every other tensor of the input (the frozen VAE, untrained text encoders, keys the
  loader never reads such as an EMA copy) is copied from it unchanged, so the key set is the input's and the
  untouched tensors are byte for byte the input's (their dtype is kept unless --save_precision says otherwise).
  A trained part the input lacked (SD3 text encoders given as files of their own) is added.
* A diffusers folder in gives a diffusers folder out: the input folder is reproduced (hard links where
  possible, else copies) and each trained component's weights file is rewritten with the input file's keys.
* Crossing layouts (a folder to a single file, or back) goes through the family's own writers
  (`save_single_file` / `save_folder`) with the weights as they are in memory.

safetensors files are streamed (`checkpoint_io.write_safetensors_streaming`): the header is planned from a
first pass over the pieces, then the pieces are converted and written one at a time, so saving holds one piece
(a block of a transformer) beside the model, never a second copy of it. Every write goes to a staging name and
is renamed into place (`lorakit.atomic`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from lorakit.atomic import staged_file, staged_folder
from lorakit.checkpoint_io import _SAFETENSORS_DTYPES, read_checkpoint, write_safetensors_streaming, write_torch_atomic
from lorakit.errors import CheckpointError
from lorakit.families.base import Components, ModelFamily, part_modules

DTYPE_OF_NAME = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")


@dataclass(frozen=True)
class ModelLayout:
    """How the base model came in: a single file of `kind` (`safetensors`, `ckpt`) or a `folder`."""

    path: Path
    kind: str

    @classmethod
    def of(cls, path: str) -> "ModelLayout":
        source = Path(path)
        if source.is_dir():
            return cls(source, "folder")
        return cls(source, "ckpt" if source.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin") else "safetensors")


def output_kind(save_model_as: str | None, source: ModelLayout) -> str:
    """`safetensors`, `ckpt` or `folder`: as --save_model_as says, else the layout the model came in."""
    if save_model_as in ("diffusers", "diffusers_safetensors"):
        return "folder"
    return save_model_as or source.kind


class TemplateFile:
    """The input single file read lazily: names, shapes and dtypes from its header, a tensor when asked."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix.lower() == ".safetensors" or _is_safetensors(path):
            self._handle = safe_open(str(path), framework="pt", device="cpu")
            self.metadata = dict(self._handle.metadata() or {})
            self.layout = {k: (torch.Size(self._handle.get_slice(k).get_shape()), DTYPE_OF_NAME[self._handle.get_slice(k).get_dtype()])
                           for k in self._handle.keys()}
            self.tensor = self._handle.get_tensor
        else:
            loaded = read_checkpoint(path)
            self.metadata = loaded.metadata
            self.layout = {k: (v.shape, v.dtype) for k, v in loaded.state_dict.items()}
            self.tensor = loaded.state_dict.__getitem__


def _is_safetensors(path: Path) -> bool:
    from lorakit.checkpoint_io import sniff_format

    return sniff_format(path) == "safetensors"


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.detach().to("cpu", dtype=dtype).contiguous()


def _out_dtype(key: str, tensor_dtype: torch.dtype, template: TemplateFile | None, save_dtype: torch.dtype | None) -> torch.dtype:
    if not tensor_dtype.is_floating_point:
        return tensor_dtype
    if save_dtype is not None:
        return save_dtype
    if template is not None and key in template.layout and template.layout[key][1].is_floating_point:
        return template.layout[key][1]
    return tensor_dtype


def single_file_plan(family: ModelFamily, comps: Components, trained: tuple[str, ...], template: TemplateFile | None,
                     save_dtype: torch.dtype | None) -> tuple[dict[str, tuple[torch.Size, torch.dtype]], Iterable[dict[str, torch.Tensor]]]:
    """The file's header (name -> shape, dtype) and its pieces, for the trained parts over the template (or,
    without one, every part the family's file holds)."""
    parts = trained if template is not None else family.checkpoint_parts(comps)
    layout: dict[str, tuple[torch.Size, torch.dtype]] = {}
    for piece in family.checkpoint_pieces(comps, parts):  # first pass: names, shapes, dtypes
        for key, value in piece.items():
            layout[key] = (value.shape, _out_dtype(key, value.dtype, template, save_dtype))
    copied = [k for k in (template.layout if template is not None else {}) if k not in layout]
    for key in copied:
        shape, dtype = template.layout[key]
        layout[key] = (shape, _out_dtype(key, dtype, template, save_dtype))

    def pieces() -> Iterator[dict[str, torch.Tensor]]:
        for piece in family.checkpoint_pieces(comps, parts):
            yield {k: _cast(v, layout[k][1]) for k, v in piece.items()}
        for key in copied:  # one tensor at a time from the memory-mapped input
            yield {key: _cast(template.tensor(key), layout[key][1])}

    return layout, pieces()


def save_single_file(family: ModelFamily, comps: Components, trained: tuple[str, ...], source: ModelLayout, path: Path,
                     kind: str, metadata: dict[str, str], save_dtype: torch.dtype | None) -> None:
    template = TemplateFile(source.path) if source.kind != "folder" else None
    meta = {**(template.metadata if template is not None else {}), **metadata}
    layout, pieces = single_file_plan(family, comps, trained, template, save_dtype)
    if kind == "ckpt":
        state = {k: v for piece in pieces for k, v in piece.items()}
        strings = {k: v for k, v in meta.items() if not k.startswith("modelspec.")}
        write_torch_atomic({"state_dict": state, **strings}, path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path) as tmp:
        write_safetensors_streaming(tmp, layout, pieces, meta)


def save_model_folder(family: ModelFamily, comps: Components, trained: tuple[str, ...], source: ModelLayout, path: Path,
                      metadata: dict[str, str], save_dtype: torch.dtype | None) -> None:
    """A diffusers folder: the input folder with each trained component's weights rewritten."""
    if source.kind != "folder":
        family.save_folder(comps, path)  # crossing layouts: the family's own pipeline writer
        return
    modules = part_modules(comps)
    subfolders = component_folders(family, comps)
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_folder(path) as staging:
        shutil.copytree(source.path, staging, dirs_exist_ok=True, copy_function=_link_or_copy)
        for part in trained:
            folder = staging / subfolders[part]
            _write_component(modules[part], folder, source.path / subfolders[part], metadata, save_dtype)


def component_folders(family: ModelFamily, comps: Components) -> dict[str, str]:
    """Part name -> its subfolder in a diffusers folder (the pipeline's component name)."""
    pipeline = family.pipeline(comps)
    by_identity = {id(module): name for name, module in pipeline.components.items() if module is not None}
    return {part: by_identity[id(module)] for part, module in part_modules(comps).items() if id(module) in by_identity}


def _link_or_copy(source: str, target: str) -> str:
    """Hard links for the files that do not change (no disk space, no time), a copy across file systems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return target


def _write_component(module: torch.nn.Module, folder: Path, original: Path, metadata: dict[str, str],
                     save_dtype: torch.dtype | None) -> None:
    files = [f for f in original.iterdir() if f.name.endswith(WEIGHT_SUFFIXES) and not f.name.startswith(".")]
    template = _folder_template(files)
    name = "model.safetensors" if any(f.name.startswith("model") for f in files) else "diffusion_pytorch_model.safetensors"
    for file in files:
        (folder / file.name).unlink()  # a link to the input: unlinking leaves the input alone
    state = module.state_dict()
    keys = list(template) if template else list(state)
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{original}: {len(missing)} weights are not in the trained model (e.g. {missing[0]})")
    layout = {k: (state[k].shape, _out_dtype(k, state[k].dtype, None, save_dtype) if not template
                  else _folder_dtype(state[k].dtype, template[k], save_dtype)) for k in keys}
    pieces = ({k: _cast(state[k], layout[k][1])} for k in keys)
    write_safetensors_streaming(folder / name, layout, pieces, {"format": "pt", **metadata})


def _folder_dtype(dtype: torch.dtype, template_dtype: torch.dtype, save_dtype: torch.dtype | None) -> torch.dtype:
    if not dtype.is_floating_point:
        return dtype
    return save_dtype or template_dtype


def _folder_template(files: list[Path]) -> dict[str, torch.dtype]:
    """Names and dtypes of a component's safetensors files (shards included); empty for .bin weights."""
    found: dict[str, torch.dtype] = {}
    for file in files:
        if file.suffix != ".safetensors":
            continue
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                found[key] = DTYPE_OF_NAME[handle.get_slice(key).get_dtype()]
    return found


def save_checkpoint(family: ModelFamily, comps: Components, trained: tuple[str, ...], source: ModelLayout, path: Path,
                    kind: str, metadata: dict[str, str], save_dtype: torch.dtype | None) -> None:
    """The whole model at `path` in `kind` (`safetensors`, `ckpt`, `folder`), the `trained` parts as they are now."""
    if kind == "folder":
        save_model_folder(family, comps, trained, source, path, metadata, save_dtype)
    else:
        save_single_file(family, comps, trained, source, path, kind, metadata, save_dtype)
