"""`lorakit caption`: write a caption file beside every image with BLIP, GIT or Qwen2(.5)-VL (sd-scripts
`finetune/make_captions.py` and `finetune/make_captions_by_git.py`).

Images that already have a caption file are left alone unless `overwrite` is set (sd-scripts always
overwrites); they are filtered out before the model loads, so a finished folder costs nothing. Captions are
written on one line: the trainer reads only the first line of a caption file.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from lorakit.prep.caption_models import CaptionSettings, load_captioner
from lorakit.prep.files import caption_path, find_images, one_line, write_text
from lorakit.prep.loading import iterate_batches

logger = logging.getLogger("lorakit.prep")

# `--remove_words` (GIT, after sd-scripts): phrases that describe text written in the image, which the trained
# model would otherwise learn to draw. Each pattern is tried in turn and removed wherever it matches.
_QUOTED_OR_WORD = r"(?:\"[^\"]*\"?|'[^']*'?|\w+)"
_TEXT_PHRASES = [
    re.compile(rf"\b(?:has|with|and) the (?:words?|letters?|name) {_QUOTED_OR_WORD}"
               r"(?: (?:is )?(?:on|in) (?:the |her |his |their |him )?\w+)?"),
    re.compile(rf"(?:\bwith a sign )?\bthat says ?{_QUOTED_OR_WORD}(?: on it)?"),
    re.compile(r"\bwith the number \d+ on (?:it|\w+ \w+)"),
    re.compile(r"\bword \w+ on it"),
]


def remove_text_phrases(caption: str) -> str:
    """The caption without phrases like `with the words "sale"` or `that says hello on it`."""
    for pattern in _TEXT_PHRASES:
        caption = pattern.sub("", caption)
    caption = re.sub(r"\s+([,.])", r"\1", caption)
    return one_line(caption)


@dataclass(frozen=True)
class CaptionRequest:
    """Everything `lorakit caption` was asked to do, already checked."""

    train_data_dir: Path
    model_folder: Path | None  # None until a hub model is downloaded
    settings: CaptionSettings
    caption_extension: str = ".caption"
    recursive: bool = False
    overwrite: bool = False
    remove_words: bool = False
    seed: int = 42
    batch_size: int = 1
    workers: int | None = None
    debug: bool = False


def images_to_caption(request: CaptionRequest) -> tuple[list[Path], int]:
    """The images to caption and how many were left out because they already have a caption file."""
    images = find_images(request.train_data_dir, request.recursive)
    if request.overwrite:
        return images, 0
    todo = [image for image in images if not caption_path(image, request.caption_extension).exists()]
    return todo, len(images) - len(todo)


def load_rgb(path: Path):
    from lorakit.data.images import load_image

    return load_image(path)


def run_captioning(request: CaptionRequest, images: list[Path]) -> dict[Path, str]:
    """Caption `images` in batches; returns the caption written for each."""
    import torch

    captioner = load_captioner(request.model_folder, request.settings)
    torch.manual_seed(request.seed)
    written: dict[Path, str] = {}
    for batch in iterate_batches(images, request.batch_size, load_rgb, request.workers, "captioning"):
        captions = captioner.caption([image for _, image in batch])
        for (path, _), text in zip(batch, captions):
            text = remove_text_phrases(text) if request.remove_words else one_line(text)
            write_text(caption_path(path, request.caption_extension), text + "\n")
            written[path] = text
            if request.debug:
                logger.info("%s: %s", path, text)
    return written
