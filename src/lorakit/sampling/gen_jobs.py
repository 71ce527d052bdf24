"""`lorakit generate`'s plan: prompt lines with sd-scripts' `gen_img.py` options, seeds, images and batches.

Prompt lines (`--prompt`, or one per line of `--from_file`; empty lines and `#` comments skipped) take
gen_img.py's options after ` --`: `--n` negative prompt, `--w`/`--h` size, `--s` steps, `--d` seeds
(comma-separated, one per image), `--l` CFG scale, `--nl` negative scale, `--t` img2img strength, `--am`
multipliers of the networks (comma-separated), `--c` a CLIP prompt (kept in the PNG text), `--f` the file name,
plus training's `--g` (embedded guidance), `--ss` (sampler) and `--cn` (the control image: one path, or one per
ControlNet separated by commas; `gen_control.py`). Seeds follow gen_img.py: `--seed` alone with
one image is that seed; otherwise each image's seed is drawn from a generator seeded with `--seed` (random
without it), the same one for a whole pass with `--iter_same_seed`, or taken from the line's `--d`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError

#: gen_img.py's prompt options: flag -> (field, converter)
_LINE_OPTIONS: dict[str, tuple[str, Any]] = {
    "n": ("negative_prompt", str), "w": ("width", int), "h": ("height", int), "s": ("steps", int),
    "d": ("seeds", lambda v: [int(x) for x in v.split(",") if x.strip()]), "l": ("scale", float),
    "nl": ("negative_scale", lambda v: None if v.lower() == "none" else float(v)), "t": ("strength", float),
    "am": ("network_muls", lambda v: [float(x) for x in v.split(",") if x.strip()]), "c": ("clip_prompt", str),
    "f": ("filename", str), "g": ("guidance", float), "ss": ("sampler", str),
    "cn": ("control_images", lambda v: tuple(x.strip() for x in v.split(",") if x.strip())),
}
#: gen_img.py options this command reads but does not act on: said once, never silently
_WITHOUT_EFFECT = {"ow", "oh", "nw", "nh", "ct", "cl", "dsd1", "dst1", "dsd2", "dst2", "dsr", "glt", "glr", "gle", "gls",
                   "glsn", "glus"}


@dataclass(frozen=True)
class PromptSettings:
    """One prompt line with every value filled in."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    scale: float | None  # None: the family's default (the pipeline decides what the scale guides)
    guidance: float | None = None
    negative_scale: float | None = None
    strength: float | None = None
    seeds: tuple[int, ...] | None = None
    network_muls: tuple[float, ...] | None = None
    clip_prompt: str | None = None
    filename: str | None = None
    sampler: str | None = None
    control_images: tuple[str, ...] | None = None
    raw: str = ""
    where: str = ""


@dataclass(frozen=True)
class ImageJob:
    """One image to make: its prompt's settings and its seed; `number` counts images from 1 (file names)."""

    settings: PromptSettings
    seed: int
    number: int
    init_image: str | None = None
    mask_image: str | None = None
    control_images: tuple[str, ...] | None = None  # one per ControlNet


@dataclass
class LineDefaults:
    width: int
    height: int
    steps: int
    scale: float | None
    guidance: float | None
    negative_prompt: str = ""
    strength: float | None = None
    negative_scale: float | None = None
    sampler: str | None = None
    unused: set[str] = field(default_factory=set)  # options read without effect, reported once


def parse_line(raw: str, defaults: LineDefaults, where: str) -> PromptSettings:
    """A prompt line: the prompt, then ` --flag value` options (gen_img.py's splitting on ' --')."""
    pieces = raw.strip().split(" --")
    values: dict[str, Any] = {}
    for piece in pieces[1:]:
        flag, _, value = piece.strip().partition(" ")
        flag = flag.lower()
        if flag in _WITHOUT_EFFECT:
            defaults.unused.add(flag)
            continue
        if flag not in _LINE_OPTIONS:
            raise ConfigError([f"{where}: unknown prompt option --{flag} (known: {', '.join('--' + f for f in _LINE_OPTIONS)})"])
        name, convert = _LINE_OPTIONS[flag]
        if not value.strip():
            raise ConfigError([f"{where}: --{flag} needs a value"])
        try:
            values[name] = convert(value.strip())
        except ValueError:
            raise ConfigError([f"{where}: --{flag} {value.strip()!r} is not a valid value"]) from None
    prompt = pieces[0].strip()
    if not prompt:
        raise ConfigError([f"{where}: the line has no prompt"])
    settings = PromptSettings(
        prompt=prompt, negative_prompt=values.get("negative_prompt", defaults.negative_prompt),
        width=_size(values.get("width", defaults.width)), height=_size(values.get("height", defaults.height)),
        steps=max(1, min(1000, values.get("steps", defaults.steps))), scale=values.get("scale", defaults.scale),
        guidance=values.get("guidance", defaults.guidance), negative_scale=values.get("negative_scale", defaults.negative_scale),
        strength=values.get("strength", defaults.strength), clip_prompt=values.get("clip_prompt"), filename=values.get("filename"),
        sampler=values.get("sampler", defaults.sampler), control_images=values.get("control_images") or None,
        raw=raw.strip(), where=where,
    )
    seeds, muls = values.get("seeds"), values.get("network_muls")
    return replace(settings, seeds=tuple(seeds) if seeds else None, network_muls=tuple(muls) if muls else None)


def _size(value: int) -> int:
    return max(64, int(value) // 8 * 8)


def read_lines(prompt: str | None, from_file: str | None) -> list[tuple[str, str]]:
    """(line, where) of the command line's prompt or of the prompt file."""
    if prompt is not None:
        return [(prompt, "--prompt")]
    path = Path(from_file or "")
    lines = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip() and not line.strip().startswith("#"):
            lines.append((line, f"{path}:{number}"))
    if not lines:
        raise ConfigError([f"--from_file {from_file}: holds no prompts"])
    return lines


def image_jobs(prompts: list[PromptSettings], *, images_per_prompt: int, n_iter: int, seed: int | None,
               iter_same_seed: bool, init_images: list[str], mask_images: list[str]) -> list[ImageJob]:
    """Every image of the run in order, with its seed (gen_img.py's rules, module docstring)."""
    single = len(prompts) == 1 and images_per_prompt == 1 and n_iter == 1
    draw = random.Random(seed)
    jobs: list[ImageJob] = []
    for _ in range(n_iter):
        pass_seed = draw.randint(0, 2**32 - 1) if iter_same_seed else None
        for settings in prompts:
            given = list(settings.seeds or ())
            for _ in range(images_per_prompt):
                if given:
                    image_seed = given.pop(0)
                elif single and seed is not None:
                    image_seed = seed
                else:
                    image_seed = pass_seed if pass_seed is not None else draw.randint(0, 2**32 - 1)
                index = len(jobs)
                jobs.append(ImageJob(settings, image_seed, index + 1,
                                     init_images[index % len(init_images)] if init_images else None,
                                     mask_images[index % len(mask_images)] if mask_images else None))
    return jobs


def batches(jobs: list[ImageJob], batch_size: int) -> list[list[ImageJob]]:
    """Consecutive images that can share one pipeline call (same size, steps, scales, strength, multipliers,
    sampler, negative scale), at most `batch_size` each, as gen_img.py groups them."""
    groups: list[list[ImageJob]] = []
    for job in jobs:
        if groups and len(groups[-1]) < batch_size and _key(groups[-1][0]) == _key(job):
            groups[-1].append(job)
        else:
            groups.append([job])
    return groups


def _key(job: ImageJob) -> tuple:
    s = job.settings
    return (s.width, s.height, s.steps, s.scale, s.guidance, s.negative_scale, s.strength, s.network_muls, s.sampler,
            job.init_image is None, job.mask_image is None)


def image_files(path: str | None, option: str) -> list[str]:
    """An image file, or every image of a folder (sorted), for --image_path / --mask_path."""
    if path is None:
        return []
    source = Path(path)
    if source.is_dir():
        files = sorted(str(f) for f in source.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        if not files:
            raise ConfigError([f"{option} {path}: the folder holds no images"])
        return files
    if not source.is_file():
        raise ConfigError([f"{option} {path}: file not found"])
    return [str(source)]


_SAFE_NAME = re.compile(r"[^\w.\-]+")


def safe_file_name(name: str) -> str:
    """A `--f` file name kept inside the output folder (no folders, no odd characters)."""
    cleaned = _SAFE_NAME.sub("_", Path(name).name)
    return cleaned if cleaned.lower().endswith(".png") else cleaned + ".png"
