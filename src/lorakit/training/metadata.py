"""The `ss_*` and `modelspec.*` keys written into every LoRA file (sd-scripts' train_network names).

Downstream tools (A1111/Forge's metadata viewers, civitai, LoRA managers) read these keys, so names and
value formats follow the reference; every value is a string.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lorakit
from lorakit.precision import effective_mixed_precision

# Kept by --no_metadata, as sd-scripts does (the modelspec keys are always added).
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")


@dataclass
class RunFacts:
    """Numbers known only once training is set up."""

    num_train_images: int
    num_reg_images: int
    num_batches_per_epoch: int
    num_epochs: int
    max_train_steps: int
    warmup_steps: int
    optimizer: str
    seed: int
    num_validation_images: int = 0
    session_id: str = field(default_factory=lambda: str(uuid.uuid4().int % 2**31))
    started_at: float = field(default_factory=time.time)


def _s(value: Any) -> str:
    return "None" if value is None else str(value)


def training_metadata(cfg: Any, facts: RunFacts) -> dict[str, str]:
    """Keys that do not change between saves of one run."""
    te_lr = cfg.text_encoder_lr[0] if cfg.text_encoder_lr else cfg.text_encoder_lr
    meta = {
        "ss_session_id": facts.session_id,
        "ss_training_started_at": _s(facts.started_at),
        "ss_output_name": _s(cfg.output_name),
        "ss_learning_rate": _s(cfg.learning_rate),
        "ss_text_encoder_lr": _s(te_lr),
        "ss_unet_lr": _s(cfg.unet_lr),
        "ss_num_train_images": _s(facts.num_train_images),
        "ss_num_validation_images": _s(facts.num_validation_images),
        "ss_num_reg_images": _s(facts.num_reg_images),
        "ss_num_batches_per_epoch": _s(facts.num_batches_per_epoch),
        "ss_num_epochs": _s(facts.num_epochs),
        "ss_gradient_checkpointing": _s(cfg.gradient_checkpointing),
        "ss_gradient_accumulation_steps": _s(cfg.gradient_accumulation_steps),
        "ss_max_train_steps": _s(facts.max_train_steps),
        "ss_lr_warmup_steps": _s(facts.warmup_steps),
        "ss_lr_scheduler": _s(cfg.lr_scheduler),
        "ss_mixed_precision": _s(effective_mixed_precision(cfg)),  # what ran: fp16 without a GPU runs fp32
        "ss_full_fp16": _s(cfg.full_fp16),
        "ss_clip_skip": _s(cfg.clip_skip),
        "ss_max_token_length": _s(cfg.max_token_length),
        "ss_cache_latents": _s(cfg.cache_latents),
        "ss_seed": _s(facts.seed),
        "ss_lowram": _s(cfg.lowram),
        "ss_noise_offset": _s(cfg.noise_offset),
        "ss_multires_noise_iterations": _s(cfg.multires_noise_iterations),
        "ss_multires_noise_discount": _s(cfg.multires_noise_discount),
        "ss_adaptive_noise_scale": _s(cfg.adaptive_noise_scale),
        "ss_zero_terminal_snr": _s(cfg.zero_terminal_snr),
        "ss_training_comment": _s(cfg.training_comment),
        "ss_sd_scripts_commit_hash": f"lorakit-{lorakit.__version__}",
        "ss_optimizer": facts.optimizer,
        "ss_max_grad_norm": _s(cfg.max_grad_norm),
        "ss_caption_dropout_rate": _s(cfg.caption_dropout_rate),
        "ss_caption_dropout_every_n_epochs": _s(cfg.caption_dropout_every_n_epochs),
        "ss_caption_tag_dropout_rate": _s(cfg.caption_tag_dropout_rate),
        "ss_face_crop_aug_range": _s(cfg.face_crop_aug_range),
        "ss_prior_loss_weight": _s(cfg.prior_loss_weight),
        "ss_min_snr_gamma": _s(cfg.min_snr_gamma),
        "ss_scale_weight_norms": _s(cfg.scale_weight_norms),
        "ss_ip_noise_gamma": _s(cfg.ip_noise_gamma),
        "ss_debiased_estimation": _s(cfg.debiased_estimation_loss),
        "ss_noise_offset_random_strength": _s(cfg.noise_offset_random_strength),
        "ss_ip_noise_gamma_random_strength": _s(cfg.ip_noise_gamma_random_strength),
        "ss_loss_type": _s(cfg.loss_type),
        "ss_huber_schedule": _s(cfg.huber_schedule),
        "ss_huber_scale": _s(cfg.huber_scale),
        "ss_huber_c": _s(cfg.huber_c),
        "ss_fp8_base": _s(cfg.fp8_base),
        "ss_fp8_base_unet": _s(cfg.fp8_base_unet),
        "ss_validation_seed": _s(cfg.validation_seed),
        "ss_validation_split": _s(cfg.validation_split),
        "ss_max_validation_steps": _s(cfg.max_validation_steps),
        "ss_validate_every_n_epochs": _s(cfg.validate_every_n_epochs),
        "ss_validate_every_n_steps": _s(cfg.validate_every_n_steps),
        "ss_resize_interpolation": _s(cfg.resize_interpolation),
    }
    return meta


class BaseModelHashes:
    """`ss_sd_model_hash`, `ss_new_sd_model_hash` and `ss_sd_model_name` (and the `--vae` file's), computed in a
    background thread from the start of the run.

    The SHA-256 reads the whole base-model file — 12 s for a 4 GB SD 1.5 file on a 2-core CPU, a minute or more for
    FLUX.1's 23 GB — and is first needed when a file is saved, so it need not delay the first step (sd-scripts
    computes it before training starts). hashlib releases the GIL while it hashes, so the thread runs beside
    model loading and latent caching; a read error surfaces at the first save. With --no_metadata nothing is read.
    """

    def __init__(self, cfg: Any | None = None) -> None:
        self._future: Future[dict[str, str]] | None = None
        if cfg is None or getattr(cfg, "no_metadata", False):
            return
        files = [(cfg.pretrained_model_name_or_path, "sd_model"), (getattr(cfg, "vae", None), "vae")]
        future: Future[dict[str, str]] = Future()

        def compute() -> None:
            future.set_running_or_notify_cancel()
            try:
                future.set_result({k: v for path, kind in files for k, v in base_model_hashes(path, kind).items()})
            except BaseException as exc:  # handed to whoever asks for the result
                future.set_exception(exc)

        # a daemon thread: a run that stops early (an error, Ctrl+C) exits at once instead of finishing the hash
        threading.Thread(target=compute, name="lorakit-model-hash", daemon=True).start()
        self._future = future

    def result(self) -> dict[str, str]:
        """The keys (waiting for the hashing to finish); empty with --no_metadata."""
        return self._future.result() if self._future is not None else {}


def base_model_hashes(path: str | None, kind: str) -> dict[str, str]:
    """`ss_<kind>_hash`, `ss_new_<kind>_hash` and `ss_<kind>_name` when the model is a single file."""
    from lorakit.adapters.formats import file_hashes_for_base_model

    if not path:
        return {}
    file = Path(path)
    meta = {f"ss_{kind}_name": file.name}
    if file.is_file():
        hashes = file_hashes_for_base_model(file)
        meta[f"ss_{kind}_hash"] = hashes["legacy"]
        meta[f"ss_new_{kind}_hash"] = hashes["sha256"]
    return meta


def per_save_metadata(base: dict[str, str], *, epoch: int, step: int) -> dict[str, str]:
    meta = dict(base)
    meta.update({"ss_training_finished_at": _s(time.time()), "ss_steps": _s(step), "ss_epoch": _s(epoch)})
    return meta


def restrict_to_minimum(meta: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in meta.items() if k in MINIMUM_KEYS or k.startswith("modelspec.")}


def base_metadata(session: Any, summary: Any, facts: RunFacts) -> dict[str, str]:
    """The metadata every saved file shares; `summary` is the (sharded) dataset's `summary()`.

    The trained file's own keys come from the `Trainable` (`ss_network_*` for an adapter network), the base
    model's from the family (`ss_base_model_version`, its ModelSpec architecture and prediction type: the same
    facts the tools write)."""
    from lorakit.adapters.modelspec import build_modelspec
    from lorakit.data.metadata import dataset_metadata

    cfg, family = session.cfg, session.family
    meta = training_metadata(cfg, facts)
    meta.update(dataset_metadata(summary, cfg, num_processes=session.accelerator.num_processes, gradient_accumulation_steps=cfg.gradient_accumulation_steps))
    meta.update(session.trainable.metadata(cfg))
    meta.update(family.metadata(cfg))
    base = family.trained_base_model(cfg, session.comps)
    resolution = tuple(cfg.resolution) if cfg.resolution else base.resolution
    extra = {key: getattr(cfg, f"metadata_{key}") for key in MODELSPEC_EXTRAS if getattr(cfg, f"metadata_{key}", None)}
    title = cfg.metadata_title or cfg.output_name or None
    kind = session.trainable.modelspec_kind  # "" for a whole model
    spec = build_modelspec(
        f"{base.architecture}/{kind}" if kind else base.architecture, base.implementation, title or "", resolution,
        base.prediction_type, clip_skip=cfg.clip_skip, extra=extra, adapter=bool(kind),
    )
    if cfg.no_metadata:
        meta = restrict_to_minimum(meta)
    meta.update(spec)
    return meta


MODELSPEC_EXTRAS = ("author", "description", "license", "tags", "usage_hint", "thumbnail", "merged_from", "trigger_phrase", "preprocessor", "is_negative_embedding")
