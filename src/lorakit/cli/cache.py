"""`lorakit cache`: sd-scripts' `cache_latents.py` and `cache_text_encoder_outputs.py` in one command.

It takes the train command's options and writes the cache files a run with the same options reads: latents
(`*_<W>x<H>_<family>.npz`) always, text-encoder outputs (`*_te_outputs.npz`, `*_sd3_te.npz`, `*_flux_te.npz`, …)
with `--cache_text_encoder_outputs(_to_disk)`. Valid files are kept; nothing is trained. The text encoders load
only when some caption's file is missing or stale.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from lorakit.precision import WEIGHT_DTYPES, effective_mixed_precision

log = logging.getLogger("lorakit")


def parse_cache_options(argv: list[str]) -> tuple[Any, list[str]]:
    """The train command's options and their warnings; `--output_dir` may be left out, as the cache files go
    beside the images (sd-scripts' cache scripts have no such option)."""
    from lorakit.config import read_train_args
    from lorakit.errors import ConfigError

    from lorakit.config.rules import cross_field_warnings

    parsed = read_train_args(argv)
    problems = [p for p in parsed.problems if not p.startswith("--output_dir is required")]
    if parsed.config is None or problems:
        raise ConfigError(problems)
    if parsed.problems:  # the options' warnings wait for a problem-free parse; the one left out is not a problem here
        return parsed.config, parsed.warnings + cross_field_warnings(parsed.config)
    return parsed.config, parsed.warnings


def cache_files(cfg: Any) -> int:
    """Write the cache files of the run `cfg` (the parsed train options) describes."""
    from lorakit.data.build import build_train_dataset
    from lorakit.data.cache import run_cache, vae_identity
    from lorakit.families.registry import resolve_family

    family = resolve_family(cfg)
    dataset = build_train_dataset(cfg)
    text_cache = _plan_text(cfg, family, dataset)
    comps = family.load(cfg, text_cache=text_cache)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    comps.vae.to(device)
    with torch.no_grad():
        report = run_cache(cfg, lambda images: family.encode_images(comps, images), latent_format=family.latent_format,
                           vae_id=vae_identity(cfg), dataset=dataset)
    print(f"latent cache: {report.encoded} encoded now, {report.reused} already cached and valid")
    if text_cache is not None:
        _write_text(cfg, family, comps, text_cache, device)
    return 0


def _plan_text(cfg: Any, family: Any, dataset: Any) -> Any:
    """The text cache's files when the options ask for cached text-encoder outputs (None otherwise)."""
    from lorakit.data.text_cache import caches_text, plan_text_cache, text_cache_problems
    from lorakit.errors import ConfigError

    if not caches_text(cfg):
        return None
    problems = text_cache_problems(cfg, dataset)
    if problems:
        raise ConfigError(problems)
    return plan_text_cache(cfg, dataset, family.text_cache_format, to_disk=True)


def _write_text(cfg: Any, family: Any, comps: Any, text_cache: Any, device: torch.device) -> None:
    valid, todo = len(text_cache.files), len(text_cache.pending)
    for encoder in comps.text_encoders:
        encoder.to(device)
    batch = cfg.text_encoder_batch_size or cfg.train_batch_size
    precision = effective_mixed_precision(cfg)
    # as a training step would encode (fp8 weights compute in the autocast dtype)
    with torch.autocast(device.type, dtype=WEIGHT_DTYPES[precision], enabled=precision != "no"):
        text_cache.write_pending(lambda captions: family.text_encoder_outputs(comps, captions, cfg.clip_skip), batch, True)
    suffix = family.text_cache_format.suffix
    print(f"text-encoder cache (*{suffix}): {todo} written now, {valid} captions already cached and valid"
          + ("" if todo else "; the text encoders were not loaded"))
