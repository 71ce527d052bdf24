"""One training run from its options: the plan, every check before a model loads, then setup and the loop.

Nothing here asks which model family or which kind of training it runs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from lorakit.data.cache import vae_identity
from lorakit.data.text_cache import CaptionCache
from lorakit.precision import effective_mixed_precision
from lorakit.training import distributed
from lorakit.training import metadata as md
from lorakit.training.locks import hold_output
from lorakit.training.network_trainable import NETWORK
from lorakit.training.loop import Trainer
from lorakit.training.plan import TrainingPlan
from lorakit.training.memory_plan import measured_line
from lorakit.training.preflight import check_run
from lorakit.training.session import Session, TrainResult
from lorakit.training.setup import setup_session
from lorakit.training.trackers import logging_dir, tracker_config, tracker_init_kwargs, tracker_names, wandb_login
from lorakit.training.trainable import TrainingType

log = logging.getLogger("lorakit")


def train(cfg: Any, kind: TrainingType = NETWORK, option_problems: list[str] | tuple[str, ...] = ()) -> TrainResult:
    """Run (or with --dry_run only plan) one training of the given type (LoRA by default) described by `cfg`.
    `option_problems` are what the option parser found: they are reported with every other problem, before any
    model loads."""
    checked = check_run(cfg, option_problems, kind)
    if cfg.dry_run:
        return TrainResult(checked.plan)
    if cfg.debug_dataset:
        from lorakit.training.debug_dataset import debug_dataset

        debug_dataset(cfg, checked.dataset)
        return TrainResult(checked.plan)
    with hold_output(cfg, distributed.rank_from_env() == 0):  # a second run on this output name stops here
        return _train_with_models(cfg, checked.family, checked.spec, checked.dataset, checked.plan, checked.seed,
                                  checked.text_cache, kind)


def _train_with_models(cfg: Any, family: Any, spec: Any, dataset: Any, plan: TrainingPlan, seed: int,
                       text_cache: CaptionCache | None, kind: TrainingType) -> TrainResult:
    accelerator = make_accelerator(cfg)
    # only the main process writes files, so only it reads the whole base model for their metadata
    hashes = md.BaseModelHashes(cfg if accelerator.is_main_process else None)
    distributed.shard_dataset(dataset, accelerator)
    set_seed(seed)
    session = setup_session(cfg, family, accelerator, spec, kind, text_cache)
    session.base_hashes = hashes
    if cfg.cache_latents or cfg.cache_latents_to_disk:
        disk = {"to_disk": True, "latent_format": family.latent_format, "vae_id": vae_identity(cfg),
                "skip_check": cfg.skip_cache_check} if cfg.cache_latents_to_disk else {}
        with torch.no_grad():
            distributed.cache_latents(dataset, accelerator, lambda images: family.encode_images(session.comps, images), cfg.vae_batch_size or 1, **disk)
    return _run(session, dataset, plan, seed)


def make_accelerator(cfg: Any) -> Accelerator:
    precision = effective_mixed_precision(cfg, warn=True)
    trackers = tracker_names(cfg)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision=precision,
        log_with=trackers or None, project_dir=logging_dir(cfg), **distributed.accelerator_kwargs(cfg),
    )
    distributed.check_process_count(accelerator)
    if trackers:
        wandb_login(cfg)
        accelerator.init_trackers(cfg.log_tracker_name or "network_train", config=tracker_config(cfg), init_kwargs=tracker_init_kwargs(cfg))
    return accelerator


def _run(session: Session, dataset: Any, plan: TrainingPlan, seed: int) -> TrainResult:
    result = Trainer(session, dataset, plan, seed).run()
    compiled = session.comps.extras.get("compiled")
    if compiled is not None:
        log.info(compiled.report())
    log.info(measured_line(session.accelerator.device))  # beside the plan's "memory (estimate)" line
    return result
