"""What the memory planner needs to know about a model, read from its files' headers (nothing is loaded).

`header_facts` reads the tensor names, shapes and dtypes of every weight file a run names (a single file, a
diffusers folder's component files, the parts given in files of their own), sorts them into the model's parts
(denoiser, text encoders, VAE) by folder or key prefix, and counts the denoiser's numbered blocks (what block
swap moves). Safetensors headers and GGUF tensor lists are read; other files (`.ckpt`) are measured by their
size, as one part.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.quantized_files import gguf_tensor_names, is_gguf

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U8": 1, "BOOL": 1}
# single-file key prefixes of the parts other than the denoiser (LDM/SGM/SAI layouts); what matches none is the
# denoiser's
KEY_PARTS = (("first_stage_model.", "vae"), ("vae.", "vae"), ("cond_stage_model.", "text"), ("conditioner.", "text"),
             ("text_encoders.", "text"))
FOLDER_PARTS = (("unet", "denoiser"), ("transformer", "denoiser"), ("text_encoder", "text"), ("vae", "vae"))
FILE_OPTION_PARTS = (("vae", "vae"), ("ae", "vae"))  # other part options name text encoders (clip_l, t5xxl, ...)
# numbered blocks of a denoiser (diffusers, BFL, SAI, LLM-style layer lists): what block swap moves
BLOCK_KEY = re.compile(r"(?:^|\.)((?:single_|double_|joint_|noise_refiner_|context_refiner_|input_|output_|down_|up_)?"
                       r"(?:transformer_)?blocks|layers)\.(\d+)\.|(?:^|\.)(mid_block|middle_block)()\.")


@dataclass
class PartFacts:
    """One model part: `kind` is denoiser, text or vae; `params` its weights; `file_bytes` as stored."""

    name: str
    kind: str
    params: int = 0
    file_bytes: int = 0


@dataclass
class MemoryFacts:
    parts: list[PartFacts] = field(default_factory=list)
    block_params: list[int] = field(default_factory=list)  # the denoiser's numbered blocks, in key order
    linear_shapes: list[tuple[int, int]] = field(default_factory=list)  # (out, in) of the denoiser's 2-D weights
    largest_file_bytes: int = 0
    block_names: dict[str, int] = field(default_factory=dict)  # "list.index" -> position in block_params

    def params(self, kind: str) -> int:
        return sum(p.params for p in self.parts if p.kind == kind)

    def of_kind(self, kind: str) -> list[PartFacts]:
        return [p for p in self.parts if p.kind == kind]


def header_facts(model: str | Path, part_files: dict[str, str]) -> MemoryFacts:
    """The facts of the model at `model` (file or diffusers folder) with `part_files` (option -> file)."""
    facts = MemoryFacts()
    source = Path(model)
    if source.is_dir():
        for folder, kind in FOLDER_PARTS:
            for sub in sorted(p for p in source.iterdir() if p.is_dir() and p.name.startswith(folder)):
                _add_files(facts, sub.name, kind, sorted(sub.glob("*.safetensors")) or sorted(sub.glob("*.bin")))
    elif source.is_file():
        _add_single_file(facts, source)
    for option, path in part_files.items():
        kind = dict(FILE_OPTION_PARTS).get(option, "text")
        facts.parts = [p for p in facts.parts if not (p.kind == kind and p.name == option)]
        _add_files(facts, option, kind, [Path(path)])
    return facts


def _add_files(facts: MemoryFacts, name: str, kind: str, files: list[Path]) -> None:
    part = PartFacts(name, kind)
    for file in files:
        tensors = tensor_table(file)
        facts.largest_file_bytes = max(facts.largest_file_bytes, file.stat().st_size)
        part.file_bytes += file.stat().st_size
        if tensors is None:
            part.params += file.stat().st_size // 2  # an unread format: assume 16-bit weights
            continue
        for key, (shape, dtype_bytes) in tensors.items():
            part.params += _numel(shape)
            if kind == "denoiser":
                _note_denoiser_tensor(facts, key, shape)
    facts.parts.append(part)


def _add_single_file(facts: MemoryFacts, file: Path) -> None:
    tensors = tensor_table(file) or {}
    parts: dict[str, PartFacts] = {}
    facts.largest_file_bytes = max(facts.largest_file_bytes, file.stat().st_size)
    for key, (shape, dtype_bytes) in tensors.items():
        kind = next((k for prefix, k in KEY_PARTS if key.startswith(prefix)), "denoiser")
        part = parts.setdefault(kind, PartFacts(kind, kind))
        part.params += _numel(shape)
        part.file_bytes += _numel(shape) * dtype_bytes
        if kind == "denoiser":
            _note_denoiser_tensor(facts, key, shape)
    if not tensors:
        parts["denoiser"] = PartFacts("denoiser", "denoiser", file.stat().st_size // 2, file.stat().st_size)
    facts.parts.extend(parts.values())


def _note_denoiser_tensor(facts: MemoryFacts, key: str, shape: tuple[int, ...]) -> None:
    match = BLOCK_KEY.search(key)
    if match:
        index = _block_index(facts, match.group(1) or match.group(3), int(match.group(2) or 0))
        while len(facts.block_params) <= index:
            facts.block_params.append(0)
        facts.block_params[index] += _numel(shape)
    if len(shape) == 2 and key.endswith("weight"):
        facts.linear_shapes.append((shape[0], shape[1]))


def _block_index(facts: MemoryFacts, list_name: str, index: int) -> int:
    """A flat index over every block list of the denoiser (lists in the order their keys first appear)."""
    return facts.block_names.setdefault(f"{list_name}.{index}", len(facts.block_names))


def tensor_table(file: Path) -> dict[str, tuple[tuple[int, ...], int]] | None:
    """name -> (shape, bytes per element) from a safetensors header or a GGUF tensor list; None otherwise."""
    if is_gguf(file):
        try:
            return {name: (shape, 4) for name, shape in gguf_tensor_names(file).items()}
        except (ImportError, OSError, ValueError):
            return None
    if file.suffix.lower() != ".safetensors":
        return None
    with open(file, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(size))
    return {k: (tuple(v["shape"]), DTYPE_BYTES.get(v["dtype"], 2)) for k, v in header.items() if k != "__metadata__"}


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for n in shape:
        count *= int(n)
    return count
