"""Resize by a score recipe measured against the base model: `--score_recipes fro_ckpt=1,thr=-3.55`.

This is the recipe syntax of the `resize_lora` tool (elias-gaeros/resize_lora), which its users run as
`resize_lora.py -r fro_ckpt=1,thr=-3.55 model.safetensors lora.safetensors`. Unlike sd-scripts' dynamic methods,
which compare a module's singular values with each other, a recipe compares them with the base layer they
modify, so a module whose change is negligible next to its layer loses ranks, or disappears altogether.

For each LoRA module, with σ_i the singular values of ΔW = (alpha/rank)·up·down (i = 0 the largest) and W the
base model's weight of the same layer (convs flattened to out x in·kh·kw), every component i gets the score

    score_i = log10(σ_i · rescale) − Σ_k w_k · log10(ref_k),

where the weights w_k are the recipe's score keys divided by their sum (so `fro_ckpt=1` and `fro_ckpt=2` mean
the same) and the references are

* `fro_ckpt`: ‖W‖_F;   `spn_ckpt`: ‖W‖₂ (W's largest singular value);
* `fro_lora`: ‖ΔW‖_F = √Σσ²;   `spn_lora`: σ_0 (alone this is sd-scripts' `sv_ratio`);
* `params`: out + in·kh·kw, the number of values one rank costs;
* `subspace`: |u_iᵀ W v_i|, how much W itself stretches the component's own directions (per component).

A component is kept when score_i > thr (`thr`, a log10 value), or, with `size=MiB` instead of `thr`, the
threshold is chosen so that the kept components fit in that many MiB at the save precision (components taken
in decreasing score over the whole file). A module keeps its kept components at the same scale alpha/rank
(alpha = scale · kept rank) and is left out of the file when none is kept; an all-zero module is left out too.
`rescale=x` multiplies every ΔW by x before scoring.

So `fro_ckpt=1,thr=-3.55` keeps exactly the components with σ_i > 10^-3.55 · ‖W‖_F ≈ 2.8e-4 · ‖W‖_F: each
kept rank-1 term of ΔW changes its layer by more than 0.028 % of the layer's own Frobenius norm.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from lorakit.errors import CheckpointError, ConfigError
from lorakit.tools.lora_state import LoraFactors
from lorakit.tools.resize import ResizeReport
from lorakit.tools.svd import MIN_SINGULAR_VALUE, factorise_product

__all__ = ["SCORE_KEYS", "ScoreRecipe", "parse_recipe", "resize_by_recipe"]

logger = logging.getLogger("lorakit.tools")

SCORE_KEYS = ("fro_ckpt", "spn_ckpt", "subspace", "fro_lora", "spn_lora", "params")
OPTION = "--score_recipes"


@dataclass(frozen=True)
class ScoreRecipe:
    """Normalised score weights and either a log10 threshold or a target size in MiB."""

    text: str
    weights: dict[str, float]
    threshold: float | None = None
    size_mib: float | None = None
    rescale: float = 1.0

    @property
    def needs_base(self) -> bool:
        return any(self.weights[k] for k in ("fro_ckpt", "spn_ckpt", "subspace"))


def parse_recipe(text: str) -> ScoreRecipe:
    """`fro_ckpt=1,thr=-3.55` -> a recipe; every mistake in the text is reported at once."""
    if ":" in text:
        raise ConfigError([f"{OPTION} {text}: one recipe per run (':' separates several; run once per recipe)"])
    weights = dict.fromkeys(SCORE_KEYS, 0.0)
    settings: dict[str, float] = {}
    problems: list[str] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, has_value, value = part.partition("=")
        try:
            number = float(value) if has_value else None
        except ValueError:
            problems.append(f"{OPTION} {text}: {key}={value} is not a number")
            continue
        if key in weights:
            weights[key] = 1.0 if number is None else number  # a bare score key weighs 1
        elif key in ("thr", "size", "rescale") and number is not None:
            settings[key] = number
        else:
            known = ", ".join((*SCORE_KEYS, "thr", "size", "rescale"))
            problems.append(f"{OPTION} {text}: unknown or valueless key {part!r} (keys: {known})")
    total = sum(weights.values())
    if not problems and total == 0.0:
        problems.append(f"{OPTION} {text}: give at least one score key ({', '.join(SCORE_KEYS)})")
    if not problems and ("thr" in settings) == ("size" in settings):
        problems.append(f"{OPTION} {text}: give exactly one of thr=<log10 threshold> or size=<MiB>")
    if settings.get("rescale", 1.0) <= 0.0 or settings.get("size", 1.0) <= 0.0:
        problems.append(f"{OPTION} {text}: rescale and size must be positive")
    if problems:
        raise ConfigError(problems)
    return ScoreRecipe(
        text, {k: v / total for k, v in weights.items()}, settings.get("thr"), settings.get("size"), settings.get("rescale", 1.0)
    )


# ---------------------------------------------------------------------------------------------- scores


@dataclass
class _Decomposed:
    """One module's SVD: U·S as `up`, Vᵀ as `down` (LoRA layouts), σ of ΔW, and the module's scale."""

    module: LoraFactors
    up: torch.Tensor
    down: torch.Tensor
    sigma: torch.Tensor
    scores: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    @property
    def values_per_rank(self) -> int:
        return int(self.up.shape[0] + self.down[0].numel())


def _decompose(module: LoraFactors) -> _Decomposed:
    result = factorise_product(module.down, module.up, module.rank)
    sigma = result.singular_values[: result.rank] * module.scale
    return _Decomposed(module, result.up, result.down, sigma)


def _base_matrix(name: str, base: torch.Tensor | None, part: _Decomposed) -> torch.Tensor:
    if base is None:
        raise CheckpointError(f"--base_model has no layer for key {name}.lora_down.weight; is it the model this LoRA was trained on?")
    matrix = base.detach().reshape(base.shape[0], -1).float()
    expected = (part.up.shape[0], part.down[0].numel())
    if tuple(matrix.shape) != expected:
        raise CheckpointError(
            f"--base_model: layer of key {name}.lora_down.weight has shape {tuple(base.shape)}, the LoRA adapts {expected}"
        )
    return matrix


def _spectral_norm(matrix: torch.Tensor) -> float:
    """‖W‖₂ from the Gram matrix of the smaller side (exact, in float64; much cheaper than a full SVD)."""
    m = matrix.double()
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0.0).sqrt())


def _scores(part: _Decomposed, base: torch.Tensor | None, recipe: ScoreRecipe) -> torch.Tensor:
    """log10 score of every component of one module (see the module docstring)."""
    w = recipe.weights
    sigma = part.sigma.double()
    scores = torch.log10(sigma) + math.log10(recipe.rescale)
    if w["fro_lora"]:
        scores -= w["fro_lora"] * torch.log10(torch.linalg.vector_norm(sigma))
    if w["spn_lora"]:
        scores -= w["spn_lora"] * torch.log10(sigma[0])
    if w["params"]:
        scores -= w["params"] * math.log10(part.values_per_rank)
    if recipe.needs_base:
        matrix = _base_matrix(part.module.name, base, part)
        if w["fro_ckpt"]:
            scores -= w["fro_ckpt"] * math.log10(float(torch.linalg.matrix_norm(matrix, "fro")))
        if w["spn_ckpt"]:
            scores -= w["spn_ckpt"] * math.log10(_spectral_norm(matrix))
        if w["subspace"]:
            # u_i = up_i / s_i (up = U·S before the scale), v_i = down_i: the stretch u_iᵀ W v_i
            singular = part.up.reshape(part.up.shape[0], -1).norm(dim=0)
            u = part.up.reshape(part.up.shape[0], -1) / singular
            stretch = torch.einsum("oi,or,ri->r", matrix, u, part.down.reshape(part.down.shape[0], -1))
            scores -= w["subspace"] * torch.log10(stretch.abs().double())
    return scores


def _size_threshold(parts: list[_Decomposed], size_mib: float, element_size: int) -> float:
    """The score above which the components, taken best first over the whole file, fit in `size_mib`."""
    scores = torch.cat([p.scores for p in parts])
    costs = torch.cat([torch.full((p.scores.numel(),), p.values_per_rank * element_size, dtype=torch.float64) for p in parts])
    order = torch.argsort(scores, descending=True)
    cumulative = torch.cumsum(costs[order], 0)
    fitting = int(torch.searchsorted(cumulative, torch.tensor(size_mib * 2**20, dtype=torch.float64), right=True))
    if fitting >= scores.numel():
        return -math.inf
    # components strictly above the first one that does not fit are kept
    return float(scores[order[fitting]])


# ---------------------------------------------------------------------------------------------- resize


def resize_by_recipe(
    modules: Mapping[str, LoraFactors],
    recipe: ScoreRecipe,
    base_weights: Mapping[str, torch.Tensor] | None,
    *,
    max_rank: int | None = None,
    element_size: int = 4,
) -> tuple[dict[str, LoraFactors], ResizeReport, float]:
    """The modules the recipe keeps (float32, CPU), a report (removed modules have new rank 0) and the
    threshold used. `base_weights` maps module names to the base model's weights (needed by the `*_ckpt` and
    `subspace` scores); `max_rank` caps every module's rank (keeping its best-scoring components)."""
    parts: list[_Decomposed] = []
    report = ResizeReport()
    for name, module in modules.items():
        part = _decompose(module)
        if float(part.sigma[0]) <= MIN_SINGULAR_VALUE:
            logger.warning("%s is all zeros; it is left out", name)
            report.ranks[name], report.fro_retained[name] = (module.rank, 0), 1.0
            continue
        part.scores = _scores(part, None if base_weights is None else base_weights.get(name), recipe)
        parts.append(part)
    threshold = recipe.threshold if recipe.size_mib is None else _size_threshold(parts, recipe.size_mib, element_size)
    resized: dict[str, LoraFactors] = {}
    for part in parts:
        name, module = part.module.name, part.module
        kept = torch.nonzero(part.scores > threshold).flatten()
        if max_rank is not None and kept.numel() > max_rank:
            kept = kept[torch.argsort(part.scores[kept], descending=True)[:max_rank]].sort().values
        total = float(part.sigma.square().sum().sqrt())
        report.ranks[name] = (module.rank, int(kept.numel()))
        report.fro_retained[name] = float(part.sigma[kept].square().sum().sqrt()) / total
        if kept.numel() == 0:
            logger.info("%s: no component scores above %.3f; the module is left out", name, threshold)
            continue
        # alpha' = scale · r' keeps the scale, so ΔW' = scale · up'·down' = rescale · (kept part of ΔW)
        up = part.up[:, kept] * recipe.rescale
        resized[name] = LoraFactors(name, part.down[kept].contiguous(), up.contiguous(), module.scale * int(kept.numel()))
    return resized, report, threshold
