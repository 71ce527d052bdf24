"""Tokenizers loaded from files bundled with lorakit, so nothing is ever fetched from a model hub."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer, T5Tokenizer

from lorakit.checkpoint_io import first_line
from lorakit.errors import CheckpointError

# OpenAI's CLIP BPE vocabulary (49,408 tokens): vocab.json + merges.txt.
_CLIP_TOKENIZER_DIR = resources.files("lorakit") / "assets" / "clip_tokenizer"

# The pad token each text-encoder lineage was trained with: OpenAI CLIP (SD 1.x) pads with the end token,
# OpenCLIP (SD 2.x, SDXL's second encoder) pads with "!" (id 0).
CLIP_PAD_END = "<|endoftext|>"
CLIP_PAD_OPENCLIP = "!"

# The files a saved T5 (SentencePiece) tokenizer is read from: either one will do.
T5_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def bundled_clip_tokenizer(pad_token: str = CLIP_PAD_END, max_length: int = 77) -> CLIPTokenizer:
    """The CLIP BPE tokenizer from lorakit's own files, padding with `pad_token` to `max_length`."""
    return CLIPTokenizer.from_pretrained(
        str(_CLIP_TOKENIZER_DIR), model_max_length=max_length, pad_token=pad_token, local_files_only=True
    )


def folder_clip_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """A CLIP tokenizer saved in a diffusers pipeline's `tokenizer/` folder."""
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: cannot read the tokenizer in this folder ({exc})") from None


def t5_tokenizer_in(folder: Path) -> T5Tokenizer | None:
    """The T5 tokenizer saved in `folder`, or None if the folder holds no T5 tokenizer files."""
    if not any((folder / name).is_file() for name in T5_TOKENIZER_FILES):
        return None
    try:
        return T5Tokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: cannot read the T5 tokenizer in this folder ({first_line(exc)})") from None


def find_t5_tokenizer(anchors: list[Path], subfolders: tuple[str, ...], missing: str) -> T5Tokenizer:
    """The T5 tokenizer in a folder beside one of `anchors` (a model folder, the checkpoint or the --t5xxl
    file): the anchor's own folder ("") or one of `subfolders` there, in order; else `missing` names the fix."""
    for anchor in anchors:
        base = anchor if anchor.is_dir() else anchor.parent
        for sub in subfolders:
            tokenizer = t5_tokenizer_in(base / sub if sub else base)
            if tokenizer is not None:
                return tokenizer
    raise CheckpointError(f"{anchors[0]}: {missing}")
