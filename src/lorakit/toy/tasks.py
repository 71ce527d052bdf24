"""Two more measurable tasks in the toy world: textual inversion and ControlNet.

* **Textual inversion**: the held-out colour (magenta) is written as a new token (`TOKEN`) in the captions, and
  only the token's vectors train; the base model's U-Net never saw the colour. Score: the concept score of samples
  whose prompts name the token (`toy.score`).
* **ControlNet**: base-world images (shapes in the four base colours) paired with a mask of where the shape is
  (white on black); the ControlNet learns to put the shape where the mask says. Score: the mean IoU between the
  mask and the generated shape (pixels nearer to the prompt's shape colour than to its background colours) on masks
  of held-out scenes. The base model alone places shapes where it likes, so its IoU is low.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lorakit.toy.world import PALETTE, Scene, caption, render, sample_items

TOKEN = "zqx"  # not a word of the CLIP vocabulary: the tokenizer takes it as a new token
SAMPLE_SEED = 1234


# ----- textual inversion -----

def ti_dataset(folder: Path, images: int, seed: int = 7) -> Path:
    """Magenta shapes captioned with the token in place of the colour word (`N_name` folder, .caption files)."""
    subset = Path(folder) / f"1_{TOKEN}"
    subset.mkdir(parents=True, exist_ok=True)
    for index, (scene, _) in enumerate(sample_items(images, concept=True, seed=seed)):
        render(scene, 64).save(subset / f"img_{index:04d}.png")
        (subset / f"img_{index:04d}.caption").write_text(caption(scene).replace(scene.color, TOKEN) + "\n")
    return Path(folder)


def ti_prompts() -> list[str]:
    from lorakit.toy.world import concept_prompts

    return [prompt.replace("magenta", TOKEN) for prompt in concept_prompts()]


def ti_arguments(model: Path, data: Path, output_dir: Path, steps: int) -> list[str]:
    """The `lorakit textual-inversion` command line of the task."""
    return [
        f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", "--caption_extension=.caption",
        "--resolution=64", "--train_batch_size=4", f"--output_dir={output_dir}", "--output_name=toy_embedding",
        f"--token_string={TOKEN}", "--init_word=red", "--num_vectors_per_token=2", "--learning_rate=2e-2",
        "--optimizer_type=AdamW", f"--max_train_steps={steps}", "--cache_latents", "--seed=42",
        "--max_data_loader_n_workers=0",
    ]


def ti_samples(model: Path, embedding: Path | None, steps: int) -> list[Image.Image]:
    """Samples of the token prompts, with the embedding loaded (without it the token is not a word at all)."""
    import torch

    from lorakit.sampling.generate import generate
    from lorakit.toy.evaluate import load_with_lora
    from lorakit.training.textual_inversion import TEXTUAL_INVERSION

    family, comps = load_with_lora(model, None)
    prompts = ti_prompts()
    if embedding is not None:
        cfg = _options(token_string=TOKEN, num_vectors_per_token=2, init_word=None, weights=str(embedding))
        trainable = TEXTUAL_INVERSION.build(cfg, None, family, comps, torch.device("cpu"))
        prompts = [p.replace(TOKEN, " ".join(trainable.tokens)) for p in prompts]
    return generate(family, comps, prompts, seed=SAMPLE_SEED, steps=steps, guidance_scale=4.0, width=64, height=64)


# ----- ControlNet -----

def mask_of(scene: Scene, size: int = 64) -> Image.Image:
    """Where the scene's shape is: the same geometry drawn white on black."""
    return render(replace(scene, color="white", background=("black",), jitter=(0, 0, 0)), size)


def control_dataset(folder: Path, images: int, seed: int = 11) -> tuple[Path, Path]:
    """Base-world images with captions (`images/`) and their shape masks (`masks/`), matched by file name."""
    pictures, masks = Path(folder) / "images", Path(folder) / "masks"
    pictures.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for index, (scene, text) in enumerate(sample_items(images, concept=False, seed=seed)):
        render(scene, 64).save(pictures / f"img_{index:04d}.png")
        (pictures / f"img_{index:04d}.caption").write_text(text + "\n")
        mask_of(scene).save(masks / f"img_{index:04d}.png")
    return pictures, masks


def control_arguments(model: Path, pictures: Path, masks: Path, output_dir: Path, steps: int) -> list[str]:
    """The `lorakit controlnet` command line of the task."""
    return [
        f"--pretrained_model_name_or_path={model}", f"--train_data_dir={pictures}",
        f"--conditioning_data_dir={masks}", "--caption_extension=.caption", "--resolution=64", "--train_batch_size=8",
        f"--output_dir={output_dir}", "--output_name=toy_controlnet", "--learning_rate=5e-4", "--optimizer_type=AdamW",
        f"--max_train_steps={steps}", "--cache_latents", "--seed=42", "--max_data_loader_n_workers=0",
    ]


def held_out_scenes(count: int = 16, seed: int = 555) -> list[Scene]:
    return [scene for scene, _ in sample_items(count, concept=False, seed=seed)]


def shape_pixels(rgb: np.ndarray, scene: Scene) -> np.ndarray:
    """(H, W) bool: pixels nearer to the shape's colour than to every background colour of the scene."""
    pixels = rgb.astype(np.float32)
    def distance(name: str) -> np.ndarray:
        return np.linalg.norm(pixels - np.asarray(PALETTE[name], np.float32), axis=-1)

    shape = distance(scene.color)
    return np.all([shape < distance(b) for b in scene.background], axis=0)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def control_score(model: Path, controlnet: Path | None, steps: int, scenes: list[Scene] | None = None
                  ) -> tuple[float, list[Image.Image]]:
    """Mean IoU of generated shapes with the held-out masks (the base model alone when `controlnet` is None)."""
    import torch

    from lorakit.toy.evaluate import load_with_lora
    from lorakit.training.controlnet import CONTROLNET

    scenes = scenes or held_out_scenes()
    family, comps = load_with_lora(model, None)
    if controlnet is None:
        pipe, inputs = family.pipeline(comps, "ddim"), lambda mask: {}
    else:
        cfg = _options(controlnet_model_name_or_path=str(controlnet), lllite=False, output_name="x")
        trainable = CONTROLNET.build(cfg, None, family, comps, torch.device("cpu"))
        pipe, inputs = trainable.sample_pipeline(family, comps, "ddim"), trainable.control.sample_inputs
    pipe.set_progress_bar_config(disable=True)
    scores, images = [], []
    for index, scene in enumerate(scenes):
        mask = mask_of(scene)
        with torch.no_grad():
            image = pipe(caption(scene), num_inference_steps=steps, guidance_scale=4.0, width=64, height=64,
                         generator=torch.Generator().manual_seed(SAMPLE_SEED + index), **inputs(mask)).images[0]
        images.append(image)
        scores.append(iou(shape_pixels(np.asarray(image), scene), np.asarray(mask.convert("L")) > 127))
    return float(np.mean(scores)), images


def _options(**values: Any) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(**values)
