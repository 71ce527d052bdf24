"""The toy world: deterministic captioned scenes, the held-out concept split, the dataset layout, the scorer's
calibration and a smoke run of the base-model pretraining."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.toy import world
from lorakit.toy.score import concept_score, hsv

BASE_COLORS = world.DEFAULT_SPEC.shape_colors
CONCEPT = world.DEFAULT_SPEC.concept_color


def _scenes(n: int, *, concept: bool, seed: int) -> list[world.Scene]:
    rng = random.Random(seed)
    return [world.sample_scene(rng, concept=concept) for _ in range(n)]


def test_generation_is_deterministic_for_a_seed():
    first, second = _scenes(20, concept=False, seed=7), _scenes(20, concept=False, seed=7)
    assert first == second
    assert [world.caption(s) for s in first] == [world.caption(s) for s in second]
    for a, b in zip(first[:5], second[:5]):
        assert np.array_equal(np.asarray(world.render(a)), np.asarray(world.render(b)))
    assert first != _scenes(20, concept=False, seed=8)


@pytest.mark.parametrize("size", [32, 64])
def test_caption_names_the_colour_at_the_shape_centre(size):
    for scene in _scenes(60, concept=False, seed=1) + _scenes(20, concept=True, seed=2):
        image = world.render(scene, size)
        assert image.size == (size, size) and image.mode == "RGB"
        x, y = (int(scene.center[0] * size), int(scene.center[1] * size))
        pixel = np.asarray(image)[y, x].astype(int)
        nearest = min(world.PALETTE, key=lambda name: np.abs(pixel - world.PALETTE[name]).sum())
        words = world.caption(scene).split()
        assert words[words.index(scene.shape) - 1] == nearest  # the word just before the shape is its colour
        assert f"on a {scene.background[0]}" in world.caption(scene)
        corner = np.asarray(image)[0, 0].astype(int)  # the top-left corner is always the first background colour
        assert np.abs(corner - world.PALETTE[scene.background[0]]).max() <= 1


def test_caption_grammar():
    scene = world.Scene("circle", "red", "large", (0.5, 0.5), 0.27, ("white", "gray"))
    assert world.caption(scene) == "a large red circle on a white and gray background"
    assert world.caption(scene, spec=world.WorldSpec(size_words=False)) == "a red circle on a white and gray background"


def test_held_out_concept_never_appears_in_the_base_world():
    for scene in _scenes(2000, concept=False, seed=3):
        assert CONCEPT not in world.caption(scene)
        assert scene.color in BASE_COLORS and CONCEPT not in scene.background
    assert all(CONCEPT not in p for p in world.base_prompts())
    assert all(CONCEPT in p for p in world.concept_prompts())
    assert all(scene.color == CONCEPT for scene in _scenes(50, concept=True, seed=4))
    with pytest.raises(ValueError):
        world.WorldSpec(shape_colors=("red", "magenta"))


def test_base_pixels_hold_no_concept_hue():
    # Hue 300 +- 25 (magenta) with real saturation never occurs in base images, edges included.
    for scene in _scenes(200, concept=False, seed=5):
        hue, saturation, value = hsv(np.asarray(world.render(scene, 64), dtype=np.float32) / 255)
        near = (np.abs(hue - 300) <= 25) & (saturation >= 0.4) & (value >= 0.3)
        assert near.sum() == 0


def test_make_dataset_writes_sd_scripts_layout(tmp_path: Path):
    root = world.make_dataset(tmp_path / "train", 6, concept=True, seed=11, size=32, repeats=10)
    assert root == tmp_path / "train"
    subsets = [p.name for p in root.iterdir()]
    assert subsets == ["10_magenta"]
    folder = root / "10_magenta"
    images = sorted(folder.glob("*.png"))
    assert [p.name for p in images] == [f"img_{i:04d}.png" for i in range(6)]
    expected = world.sample_items(6, concept=True, seed=11)
    for path, (scene, text) in zip(images, expected):
        assert path.with_suffix(".caption").read_text(encoding="utf-8").strip() == text
        assert re.fullmatch(r"a (small|medium|large) magenta \w+ on a [\w ]+ background", text)
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(world.render(scene, 32)))
    base = world.make_dataset(tmp_path / "base", 3, concept=False, seed=0, repeats=2)
    assert [p.name for p in base.iterdir()] == ["2_shapes"]


def _rendered(n: int, *, concept: bool, seed: int, size: int) -> list[Image.Image]:
    return [world.render(scene, size) for scene, _ in world.sample_items(n, concept=concept, seed=seed)]


@pytest.mark.parametrize("size", [32, 64])
def test_scorer_calibration_on_rendered_images(size):
    assert concept_score(_rendered(100, concept=True, seed=21, size=size)) >= 0.95
    assert concept_score(_rendered(200, concept=False, seed=22, size=size)) <= 0.05


def test_scorer_rejects_noise_grey_and_colour_washes():
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(40)]
    assert concept_score(noise) <= 0.05
    assert concept_score([Image.new("RGB", (64, 64), (128, 128, 128))]) == 0.0
    assert concept_score([Image.new("RGB", (64, 64), world.PALETTE[CONCEPT])]) == 0.0  # a wash, not a shape
    assert concept_score(torch.randn(20, 3, 64, 64).clamp(-1, 1), value_range=(-1, 1)) <= 0.05
    assert concept_score([]) == 0.0


def test_scorer_counts_the_fraction_and_accepts_tensors():
    concept = _rendered(3, concept=True, seed=31, size=64)
    base = _rendered(1, concept=False, seed=32, size=64)
    assert concept_score(concept + base) == pytest.approx(0.75)
    batch = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in concept + base])
    assert concept_score(batch) == pytest.approx(0.75)
    assert concept_score(batch * 2 - 1, value_range=(-1, 1)) == pytest.approx(0.75)


def test_short_pretrain_writes_a_loadable_pipeline(tmp_path: Path):
    from diffusers import StableDiffusionPipeline

    from lorakit.toy.pretrain import PretrainConfig, pretrain

    torch.set_num_threads(1)
    out = tmp_path / "toy_base"
    pretrain(PretrainConfig(out=out, vae_steps=2, unet_steps=2, pool_size=16, vae_batch=4, unet_batch=4))
    for part in ("unet", "vae", "text_encoder"):
        assert list((out / part).glob("*.safetensors")), part
    assert (out / "model_index.json").exists() and list((out / "tokenizer").iterdir())
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.vae.config.scaling_factor > 0 and pipe.vae.config.scaling_factor != 0.18215
    ids = pipe.tokenizer("a red circle").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407  # the real CLIP BPE start/end tokens
    image = pipe("a red circle on a white background", num_inference_steps=1, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
