"""Captioning models run through transformers' own model classes, loaded from a local folder.

* BLIP (`BlipForConditionalGeneration`; sd-scripts `finetune/make_captions.py`): the original BLIP decoder
  starts every caption with the prompt "a picture of " and cuts it off again; nucleus sampling (top_p, with the
  repetition penalty 1.1 the original decoder uses) unless `--beam_search`. `max_length` and `min_length` count
  the prompt tokens, as there.
* GIT (`GitForCausalLM`; sd-scripts `finetune/make_captions_by_git.py`): greedy decoding up to `max_length`.
* Qwen2-VL / Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`): an
  instruction-following vision-language model asked `--prompt` through its chat template; `max_length` counts
  new tokens. transformers' processor class for these models also builds a video processor, which needs
  torchvision, so the image processor and tokenizer are used directly: each image's `<|image_pad|>`
  placeholder is repeated once per merged vision patch, as that processor does.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from lorakit.errors import DataError

logger = logging.getLogger("lorakit.prep")

MODEL_TYPES = ("blip", "git", "qwen2_5_vl", "qwen2_vl")
BLIP_PROMPT = "a picture of "
VLM_PROMPT = ("Describe this image in one paragraph for a text-to-image training caption: the subject, its "
              "appearance and pose, the setting, the colours and the style.")
# sd-scripts' defaults (BLIP and GIT); the VLM writes longer captions, counted in new tokens
DEFAULT_MAX_LENGTH = {"blip": 75, "git": 50, "qwen2_5_vl": 256, "qwen2_vl": 256}
DEFAULT_MIN_LENGTH = {"blip": 5}
DEFAULT_MODELS = {"blip": "Salesforce/blip-image-captioning-large", "git": "microsoft/git-large-textcaps",
                  "qwen2_5_vl": "Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_vl": "Qwen/Qwen2-VL-2B-Instruct"}


@dataclass(frozen=True)
class CaptionSettings:
    """How captions are decoded (sd-scripts' option names and defaults)."""

    model_type: str
    beam_search: bool = False
    num_beams: int = 1
    top_p: float = 0.9
    max_length: int | None = None  # None: the model type's default
    min_length: int | None = None
    prompt: str | None = None

    def length_limits(self, new_tokens: bool = False) -> dict[str, int]:
        """generate()'s length arguments: total tokens (BLIP, GIT) or new tokens (Qwen-VL)."""
        longest = self.max_length or DEFAULT_MAX_LENGTH[self.model_type]
        shortest = self.min_length if self.min_length is not None else DEFAULT_MIN_LENGTH.get(self.model_type)
        prefix = "max_new_tokens" if new_tokens else "max_length"
        limits = {prefix: longest}
        if shortest is not None:
            limits[prefix.replace("max", "min")] = shortest
        return limits


def folder_model_type(folder: Path) -> str | None:
    """The `model_type` of a transformers model folder's config.json, or None when there is none."""
    try:
        return str(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type"))
    except (OSError, ValueError, AttributeError):
        return None


def _decoding(settings: CaptionSettings, sample_by_default: bool) -> dict:
    if settings.beam_search:
        return {"num_beams": settings.num_beams, "do_sample": False}
    if sample_by_default:
        return {"do_sample": True, "top_p": settings.top_p, "repetition_penalty": 1.1}
    return {"do_sample": False, "num_beams": 1}


def _device_and_dtype(half_on_gpu: bool):
    import torch

    if torch.cuda.is_available():
        dtype = torch.bfloat16 if half_on_gpu and torch.cuda.is_bf16_supported() else torch.float32
        return torch.device("cuda"), dtype
    return torch.device("cpu"), torch.float32


def _load(model_class, folder: Path, dtype):
    try:
        return model_class.from_pretrained(folder, dtype=dtype).eval()
    except (OSError, ValueError) as err:
        raise DataError(f"captioning model {folder} cannot be loaded: {err}") from None


class BlipCaptioner:
    def __init__(self, folder: Path, settings: CaptionSettings):
        from transformers import AutoProcessor, BlipForConditionalGeneration

        self.settings = settings
        self.device, dtype = _device_and_dtype(half_on_gpu=False)
        self.processor = AutoProcessor.from_pretrained(folder)
        self.model = _load(BlipForConditionalGeneration, folder, dtype).to(self.device)
        self.prompt = BLIP_PROMPT if settings.prompt is None else settings.prompt

    def caption(self, images: list[Image.Image]) -> list[str]:
        import torch

        text = [self.prompt.strip()] * len(images) if self.prompt.strip() else None
        inputs = self.processor(images=images, text=text, return_tensors="pt").to(self.device)
        # BLIP replaces [CLS] with its decoder's BOS and drops the trailing [SEP]: the caption starts after them
        start = inputs["input_ids"].shape[1] - 1 if text else 1
        with torch.no_grad():
            output = self.model.generate(**inputs, **self.settings.length_limits(), **_decoding(self.settings, sample_by_default=True))
        return self.processor.batch_decode(output[:, start:], skip_special_tokens=True)


class GitCaptioner:
    def __init__(self, folder: Path, settings: CaptionSettings):
        from transformers import AutoProcessor, GitForCausalLM

        self.settings = settings
        self.device, dtype = _device_and_dtype(half_on_gpu=False)
        self.processor = AutoProcessor.from_pretrained(folder)
        self.model = _load(GitForCausalLM, folder, dtype).to(self.device)

    def caption(self, images: list[Image.Image]) -> list[str]:
        import torch

        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        with torch.no_grad():
            output = self.model.generate(pixel_values=pixels, **self.settings.length_limits(), **_decoding(self.settings, sample_by_default=False))
        return self.processor.batch_decode(output, skip_special_tokens=True)


def _chat_template(tokenizer, folder: Path) -> str:
    """The chat template: the tokenizer's, else the folder's chat_template.jinja or chat_template.json."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text(encoding="utf-8"))["chat_template"]
    raise DataError(f"captioning model {folder} has no chat template (chat_template.jinja or chat_template.json)")


class QwenVLCaptioner:
    IMAGE_TOKEN = "<|image_pad|>"

    def __init__(self, folder: Path, settings: CaptionSettings):
        from transformers import AutoImageProcessor, AutoTokenizer

        model_class = _qwen_class(settings.model_type)
        self.settings = settings
        self.device, dtype = _device_and_dtype(half_on_gpu=True)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.tokenizer.padding_side = "left"  # generation continues every row from its last token
        self.image_processor = AutoImageProcessor.from_pretrained(folder)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": settings.prompt or VLM_PROMPT}]}]
        self.text = self.tokenizer.apply_chat_template(messages, chat_template=_chat_template(self.tokenizer, folder),
                                                       add_generation_prompt=True, tokenize=False)
        if self.text.count(self.IMAGE_TOKEN) != 1:
            raise DataError(f"captioning model {folder}: its chat template does not place one {self.IMAGE_TOKEN} per image")
        self.model = _load(model_class, folder, dtype).to(self.device)

    def caption(self, images: list[Image.Image]) -> list[str]:
        import torch

        vision = self.image_processor(images=images, return_tensors="pt")
        merge = self.image_processor.merge_size ** 2
        texts = [self.text.replace(self.IMAGE_TOKEN, self.IMAGE_TOKEN * int(grid.prod() // merge))
                 for grid in vision["image_grid_thw"]]
        tokens = self.tokenizer(texts, return_tensors="pt", padding=True)
        inputs = {**tokens, **vision}
        with torch.no_grad():
            output = self.model.generate(**{k: v.to(self.device) for k, v in inputs.items()},
                                         **self.settings.length_limits(new_tokens=True),
                                         **_decoding(self.settings, sample_by_default=False))
        return self.tokenizer.batch_decode(output[:, tokens["input_ids"].shape[1]:], skip_special_tokens=True)


def _qwen_class(model_type: str):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration if model_type == "qwen2_5_vl" else Qwen2VLForConditionalGeneration


def load_captioner(folder: Path, settings: CaptionSettings):
    """The captioner for `settings.model_type` with its weights, tokenizer and image processor from `folder`."""
    classes = {"blip": BlipCaptioner, "git": GitCaptioner, "qwen2_5_vl": QwenVLCaptioner, "qwen2_vl": QwenVLCaptioner}
    logger.info("loading the %s captioner from %s", settings.model_type, folder)
    return classes[settings.model_type](folder, settings)
