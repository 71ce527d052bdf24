"""A deterministic synthetic world of captioned shape images for the `lorakit demo`.

Each image shows one coloured shape (circle, square, triangle or cross) of one of three sizes on a plain or
two-tone background, and its caption names what is drawn: "a large red circle on a white background".

The vocabulary is split in two:
- the BASE world (what the toy base model is pretrained on): shapes in red, green, blue or yellow;
- the HELD-OUT concept (what a LoRA learns in the demo): the colour "magenta", never drawn and never written in
  the base world.

Why magenta, and why this background palette: magenta (hue 300 degrees) is 60-70 degrees of hue away from every
base colour, so `toy.score` can detect it from pixels alone. A blend of two base colours could still pass through
magenta (a red shape's blurred edge on a blue background is purple), so the background palette holds no red and no
blue: every shape/background blend then keeps a hue far from 300 degrees, and a base image never contains a
magenta pixel, however blurry the model that drew it. All the words are single tokens of the CLIP BPE vocabulary.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

# Display colours (sRGB). Saturated and far apart in hue so that a tiny model's output stays recognisable.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "magenta": (220, 40, 220),
}
CONCEPT_COLOR = "magenta"

# Half-extent of a shape as a fraction of the image side, per size word.
SIZE_FRACTIONS: dict[str, float] = {"small": 0.12, "medium": 0.19, "large": 0.27}

SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down, for anti-aliased edges


@dataclass(frozen=True)
class WorldSpec:
    """The vocabulary of the world and how scenes vary."""

    shapes: tuple[str, ...] = ("circle", "square", "triangle", "cross")
    shape_colors: tuple[str, ...] = ("red", "green", "blue", "yellow")
    background_colors: tuple[str, ...] = ("white", "black", "gray", "green", "yellow")
    sizes: tuple[str, ...] = ("small", "medium", "large")
    concept_color: str = CONCEPT_COLOR
    two_tone_probability: float = 0.2
    color_jitter: int = 10  # +- per RGB channel, so that colours are not one exact value
    size_words: bool = True

    def __post_init__(self) -> None:
        if self.concept_color in self.shape_colors or self.concept_color in self.background_colors:
            raise ValueError(f"the held-out colour {self.concept_color!r} must not be part of the base world")
        unknown = {*self.shape_colors, *self.background_colors, self.concept_color} - PALETTE.keys()
        if unknown:
            raise ValueError(f"colours without an RGB value in PALETTE: {sorted(unknown)}")


DEFAULT_SPEC = WorldSpec()


@dataclass(frozen=True)
class Scene:
    """One image's content; `render` and `caption` are pure functions of it.

    `center` and `extent` are fractions of the image side; `background` has one colour (plain) or two (two-tone,
    split along `split`); `jitter` is the RGB offset added to the shape colour.
    """

    shape: str
    color: str
    size: str
    center: tuple[float, float]
    extent: float
    background: tuple[str, ...]
    split: str = "vertical"
    jitter: tuple[int, int, int] = (0, 0, 0)

    @property
    def rgb(self) -> tuple[int, int, int]:
        """The shape's drawn colour, jitter included."""
        return _jittered(PALETTE[self.color], self.jitter)


def _jittered(rgb: tuple[int, int, int], jitter: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + j)) for c, j in zip(rgb, jitter))  # type: ignore[return-value]


def sample_scene(rng: random.Random, *, concept: bool = False, spec: WorldSpec = DEFAULT_SPEC) -> Scene:
    """Draw one scene; `concept=True` paints the shape in the held-out colour, otherwise in a base colour."""
    shape = rng.choice(spec.shapes)
    color = spec.concept_color if concept else rng.choice(spec.shape_colors)
    size = rng.choice(spec.sizes)
    extent = SIZE_FRACTIONS[size] * rng.uniform(0.9, 1.1)
    margin = extent + 0.04  # keep the whole shape inside the frame
    center = (rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin))
    choices = [c for c in spec.background_colors if c != color]
    if rng.random() < spec.two_tone_probability:
        background = tuple(rng.sample(choices, 2))
    else:
        background = (rng.choice(choices),)
    split = rng.choice(("vertical", "horizontal"))
    jitter = tuple(rng.randint(-spec.color_jitter, spec.color_jitter) for _ in range(3))
    return Scene(shape, color, size, center, extent, background, split, jitter)  # type: ignore[arg-type]


def caption(scene: Scene, *, spec: WorldSpec = DEFAULT_SPEC) -> str:
    """Plain-English caption: "a [size] <colour> <shape> on a <colour>[ and <colour>] background"."""
    size = f"{scene.size} " if spec.size_words else ""
    return f"a {size}{scene.color} {scene.shape} on a {' and '.join(scene.background)} background"


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw the scene as a `size` x `size` RGB image (anti-aliased by supersampling)."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), PALETTE[scene.background[0]])
    draw = ImageDraw.Draw(image)
    if len(scene.background) == 2:
        second = PALETTE[scene.background[1]]
        box = (big // 2, 0, big, big) if scene.split == "vertical" else (0, big // 2, big, big)
        draw.rectangle(box, fill=second)
    _draw_shape(draw, scene.shape, scene.center[0] * big, scene.center[1] * big, scene.extent * big, scene.rgb)
    return image.resize((size, size), Image.Resampling.BOX)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rgb: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    elif shape == "square":
        half = r * 0.85  # a square of the same half-extent looks much bigger than the circle
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=rgb)
    elif shape == "cross":
        arm = r * 0.38  # half-width of each bar: thick enough to survive blur at 32 px
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=rgb)
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def sample_items(n: int, *, concept: bool, seed: int, spec: WorldSpec = DEFAULT_SPEC) -> list[tuple[Scene, str]]:
    """`n` (scene, caption) pairs, the same for the same seed."""
    rng = random.Random(seed)
    scenes = [sample_scene(rng, concept=concept, spec=spec) for _ in range(n)]
    return [(s, caption(s, spec=spec)) for s in scenes]


def make_dataset(
    folder: str | Path,
    n_images: int,
    *,
    concept: bool,
    seed: int,
    size: int = 64,
    repeats: int = 10,
    name: str | None = None,
    spec: WorldSpec = DEFAULT_SPEC,
) -> Path:
    """Write an sd-scripts DreamBooth-style dataset and return `folder` (the `--train_data_dir`).

    Layout: `<folder>/<repeats>_<name>/img_0000.png` with its caption in `img_0000.caption` (so train with
    `--caption_extension .caption`). `name` defaults to the concept colour or "shapes".
    """
    root = Path(folder)
    subset = root / f"{repeats}_{name or (spec.concept_color if concept else 'shapes')}"
    subset.mkdir(parents=True, exist_ok=True)
    for index, (scene, text) in enumerate(sample_items(n_images, concept=concept, seed=seed, spec=spec)):
        render(scene, size).save(subset / f"img_{index:04d}.png")
        (subset / f"img_{index:04d}.caption").write_text(text + "\n", encoding="utf-8")
    return root


def _prompt_grid(colors: tuple[str, ...], spec: WorldSpec) -> list[str]:
    """One prompt per shape, cycling through colours and backgrounds so every word appears."""
    backgrounds = spec.background_colors
    prompts = []
    for i, shape in enumerate(spec.shapes * 2):
        color = colors[i % len(colors)]
        background = next(b for b in backgrounds[i % len(backgrounds):] + backgrounds if b != color)
        scene = Scene(shape, color, "large", (0.5, 0.5), 0.27, (background,))
        prompts.append(caption(scene, spec=spec))
    return prompts


def concept_prompts(spec: WorldSpec = DEFAULT_SPEC) -> list[str]:
    """Prompts that ask for the held-out concept (8 of them, every shape twice)."""
    return _prompt_grid((spec.concept_color,), spec)


def base_prompts(spec: WorldSpec = DEFAULT_SPEC) -> list[str]:
    """Prompts within the base world (8 of them, every shape twice, every base colour)."""
    return _prompt_grid(spec.shape_colors, spec)
