"""`lorakit generate`'s ControlNets: gen_img.py's `--control_net_models` / `--control_net_lllite_models`,
`--control_net_multipliers` (`--control_net_weights`), `--control_net_ratios`, `--control_net_preps` and
`--guide_image_path`.

What a ControlNet is for the model, which option names its files, how a file loads and which pipeline inputs it
takes is the family's `controlnet(None)` (`FamilyControlNet`). This module checks the options and files before
anything loads, gives each image its control images and makes them for a batch:

* each image's control images are its prompt line's `--cn` (one path for every ControlNet, or one per ControlNet
  separated by commas), else taken from `--guide_image_path` (files, or folders of images) as gen_img.py does: image
  n (counted from 0 over the run) takes the group p = n mod (guides // c) of c consecutive guides, c the number of
  ControlNets, one guide per ControlNet;
* a control image is read as RGB, resized to the image's size (LANCZOS) and, with a `canny_LOW_HIGH` prep, turned
  into its Canny edges (white on black, `lorakit dataset canny`'s algorithm);
* `--control_net_ratios r`: the ControlNet guides step i (from 0) of the N steps denoised while i / N <= r.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lorakit.families.base import FamilyControlNet, ModelFamily

log = logging.getLogger("lorakit")

_OPTIONS = ("control_net_models", "control_net_lllite_models")


@dataclass(frozen=True)
class ControlSpec:
    """One ControlNet of the run, with gen_img.py's per-model values (default 1.0 and no preprocessing)."""

    path: str
    multiplier: float = 1.0
    ratio: float = 1.0
    canny: tuple[int, int] | None = None


@dataclass
class ControlPlan:
    control: FamilyControlNet
    specs: list[ControlSpec]
    guide_images: list[str]


def control_plan(options: Any, family: ModelFamily, problems: list[str]) -> ControlPlan | None:
    """The run's ControlNets checked (files from their headers); problems are added to `problems`."""
    given = {name: list(getattr(options, name) or []) for name in _OPTIONS}
    used = [name for name in _OPTIONS if given[name]]
    extras = {name: getattr(options, name) for name in ("control_net_multipliers", "control_net_ratios", "control_net_preps")}
    if not used:
        for name, value in extras.items():
            if value:
                log.warning("--%s has no effect without --control_net_models or --control_net_lllite_models", name)
        if options.guide_image_path:
            problems.append("--guide_image_path: no ControlNet to guide (give --control_net_models or "
                            "--control_net_lllite_models)")
        return None
    if len(used) == 2:
        problems.append("--control_net_models and --control_net_lllite_models: ControlNet and ControlNet-LLLite "
                        "cannot be used at the same time")
    control = family.controlnet(None)
    if control is None:
        problems.append(f"--{used[0]}: {family.title} models take no ControlNet")
        return None
    if control.generate_option not in used:
        problems.append(f"--{used[0]}: {family.title} models take {control.title} files; give them with "
                        f"--{control.generate_option}")
        return None
    paths = given[control.generate_option]
    for path in paths:
        if not Path(path).exists():
            problems.append(f"--{control.generate_option} {path}: file or folder not found")
        else:
            problems += control.file_problems(path)
    specs = _specs(paths, extras, problems)
    return ControlPlan(control, specs, _guide_images(options.guide_image_path or [], problems))


def _specs(paths: list[str], extras: dict[str, Any], problems: list[str]) -> list[ControlSpec]:
    for name, values in extras.items():
        if values and len(values) > len(paths):
            problems.append(f"--{name}: {len(values)} values for {len(paths)} ControlNet models")
    multipliers, ratios, preps = (list(extras[name] or []) for name in extras)
    specs = []
    for index, path in enumerate(paths):
        prep = preps[index] if index < len(preps) else None
        specs.append(ControlSpec(path, multipliers[index] if index < len(multipliers) else 1.0,
                                 ratios[index] if index < len(ratios) else 1.0, _canny(prep, problems)))
    return specs


def _canny(prep: str | None, problems: list[str]) -> tuple[int, int] | None:
    """gen_img.py's `canny[_LOW[_HIGH]]` (default 63 and 191), or `none`."""
    if prep is None or prep.lower() == "none":
        return None
    parts = prep.lower().split("_")
    try:
        if parts[0] != "canny" or len(parts) > 3:
            raise ValueError
        low, high = (int(parts[i]) if len(parts) > i else default for i, default in ((1, 63), (2, 191)))
    except ValueError:
        problems.append(f"--control_net_preps {prep}: unknown preprocess (known: canny, canny_LOW_HIGH, none)")
        return None
    return low, high


def _guide_images(paths: list[str], problems: list[str]) -> list[str]:
    from lorakit.errors import ConfigError
    from lorakit.sampling.gen_jobs import image_files

    images = []
    for path in paths:
        try:
            images += image_files(path, "--guide_image_path")
        except ConfigError as exc:
            problems += exc.problems
    return images


def line_problems(plan: ControlPlan | None, prompts: list[Any]) -> list[str]:
    """Each prompt line's `--cn` images exist and fit the ControlNets; without guides every line needs them."""
    problems = []
    count = len(plan.specs) if plan else 0
    for p in prompts:
        if p.control_images is None:
            if plan and len(plan.guide_images) < count:
                problems.append(f"{p.where}: no control image (give --guide_image_path with at least {count} image(s), "
                                "or the line's --cn)")
            continue
        if plan is None:
            problems.append(f"{p.where}: --cn needs a ControlNet (--control_net_models / --control_net_lllite_models)")
            continue
        if len(p.control_images) not in (1, count):
            problems.append(f"{p.where}: --cn gives {len(p.control_images)} images for {count} ControlNets")
        problems += [f"{p.where}: --cn {path}: file not found" for path in p.control_images if not Path(path).is_file()]
    return problems


def job_control_images(plan: ControlPlan | None, settings: Any, index: int) -> tuple[str, ...] | None:
    """The control images of image `index` of the run (one per ControlNet; module docstring)."""
    if plan is None:
        return None
    count = len(plan.specs)
    if settings.control_images is not None:
        given = settings.control_images
        return tuple(given) if len(given) == count else tuple(given) * count
    groups = len(plan.guide_images) // count
    start = (index % groups) * count
    return tuple(plan.guide_images[start:start + count])


def kept_steps(ratio: float, steps: int) -> int:
    """How many of the first `steps` steps a ControlNet with gen_img.py's ratio guides (i / steps <= ratio)."""
    return sum(1 for i in range(steps) if not ratio < i / steps)


def control_inputs(plan: ControlPlan, task: str, jobs: list[Any], width: int, height: int, denoising_steps: int
                   ) -> dict[str, Any]:
    """The pipeline inputs for a batch's control images at this size."""
    images = [[_control_image(job.control_images[index], (width, height), spec.canny) for job in jobs]
              for index, spec in enumerate(plan.specs)]
    return plan.control.generation_inputs(task, images, [s.multiplier for s in plan.specs],
                                          [kept_steps(s.ratio, denoising_steps) for s in plan.specs], denoising_steps)


def _control_image(path: str, size: tuple[int, int], canny: tuple[int, int] | None) -> Image.Image:
    from lorakit.prep.canny import canny as canny_edges

    with Image.open(path) as opened:
        image = opened.convert("RGB")
    if image.size != size:
        image = image.resize(size, resample=Image.LANCZOS)
    if canny is not None:
        image = Image.fromarray(canny_edges(np.asarray(image), *canny), "L").convert("RGB")
    return image


def load_controls(plan: ControlPlan, comps: Any, device: Any, dtype: Any) -> list[Any]:
    modules = []
    for spec in plan.specs:
        modules.append(plan.control.load(spec.path, comps, device, dtype))
        log.info("%s: %s x%g (ratio %g)", plan.control.title, spec.path, spec.multiplier, spec.ratio)
    return modules
