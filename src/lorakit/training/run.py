"""One training run from its options: the plan, every check before a model loads, then setup and the loop.

Nothing here asks which model family or which kind of training it runs.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from lorakit.data.build import build_train_dataset
from lorakit.data.cache import vae_identity
from lorakit.data.summary import format_summary
from lorakit.errors import ConfigError, DataError
from lorakit.families.common.text_cache import caches_text
from lorakit.families.registry import resolve_family
from lorakit.precision import effective_mixed_precision
from lorakit.training import distributed
from lorakit.training import metadata as md
from lorakit.training.destination import destination_problems
from lorakit.training.locks import hold_output
from lorakit.training.loop import Trainer
from lorakit.training.plan import TrainingPlan, format_plan, initial_step_problem, make_plan
from lorakit.training.session import Session, TrainResult
from lorakit.training.setup import NetworkKind, TrainableKind, setup_session
from lorakit.training.trackers import logging_dir, tracker_config, tracker_init_kwargs, tracker_names, wandb_login

log = logging.getLogger("lorakit")


def train(cfg: Any, kind: TrainableKind | None = None) -> TrainResult:
    """Run (or with --dry_run only plan) one training described by `cfg`: of what `kind` trains (the adapter
    network when None; `FinetuneKind` the model's own weights)."""
    kind = kind or NetworkKind()
    family = resolve_family(cfg)
    checks = kind.checks(cfg, family)
    if cfg.family == "auto":  # a given --family's warnings came with the other option warnings
        for warning in checks.warnings:
            log.warning(warning)
    seed = cfg.seed if cfg.seed is not None else random.randint(0, 2**31 - 1)
    try:
        dataset = build_train_dataset(cfg, seed)  # data problems surface before any model loads
    except (ConfigError, DataError) as error:
        if not checks.problems:
            raise
        found = error.problems if isinstance(error, ConfigError) else [str(error)]
        raise ConfigError(checks.problems + found) from None
    if caches_text(cfg) and dataset.captions_vary():
        checks.problems.append("--cache_text_encoder_outputs: a dataset subset changes its captions per step (shuffle, "
                               "dropout, tag dropout, token warm-up or wildcards); remove one or the other")
    plan = make_plan(cfg, family.name, len(dataset), num_processes=distributed.world_size_from_env())
    dataset.set_training_length(plan.max_train_steps, cfg.gradient_accumulation_steps)
    if distributed.rank_from_env() == 0:
        batch = distributed.effective_batch_message(dataset, plan.num_processes, cfg.gradient_accumulation_steps)
        print(format_plan(cfg, plan, format_summary(dataset.summary())) + "\n" + batch, flush=True)
    plan = distributed.per_process_plan(plan)  # resume positions count this process's batches
    check_before_loading(cfg, plan, checks.problems)
    if cfg.dry_run:
        return TrainResult(plan)
    with hold_output(cfg, distributed.rank_from_env() == 0):  # a second run on this output name stops here
        return _train_with_models(cfg, family, checks.spec, dataset, plan, seed, kind)


def _train_with_models(cfg: Any, family: Any, spec: Any, dataset: Any, plan: TrainingPlan, seed: int,
                       kind: TrainableKind) -> TrainResult:
    accelerator = make_accelerator(cfg)
    # only the main process writes files, so only it reads the whole base model for their metadata
    hashes = md.BaseModelHashes(cfg if accelerator.is_main_process else None)
    distributed.shard_dataset(dataset, accelerator)
    set_seed(seed)
    session = setup_session(cfg, family, accelerator, spec, kind)
    session.base_hashes = hashes
    if cfg.cache_latents or cfg.cache_latents_to_disk:
        disk = {"to_disk": True, "latent_format": family.latent_format, "vae_id": vae_identity(cfg),
                "skip_check": cfg.skip_cache_check} if cfg.cache_latents_to_disk else {}
        with torch.no_grad():
            distributed.cache_latents(dataset, accelerator, lambda images: family.encode_images(session.comps, images), cfg.vae_batch_size or 1, **disk)
    return _run(session, dataset, plan, seed)


def check_before_loading(cfg: Any, plan: TrainingPlan, problems: list[str] | None = None) -> None:
    """Resume folder, start step, sample prompts and the places files go, with the problems found so far: every
    problem at once, before any model loads."""
    from lorakit.sampling.prompts import read_sample_prompts
    from lorakit.training.state import check_state_folder, read_train_state

    problems = list(problems or []) + distributed.config_problems(cfg) + destination_problems(cfg)
    resumed_step = None
    if cfg.resume:
        state_problems = check_state_folder(cfg.resume)
        problems += state_problems
        if not state_problems:
            resumed_step = read_train_state(cfg.resume).step
    if not problems:
        message = initial_step_problem(cfg, plan, resumed_step)
        problems += [message] if message else []
    if cfg.sample_prompts:
        from lorakit.training.sample_events import sampling_problems

        try:
            problems += sampling_problems(cfg, read_sample_prompts(cfg.sample_prompts))
        except ConfigError as error:
            problems += error.problems
    if problems:
        raise ConfigError(problems)


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
    return Trainer(session, dataset, plan, seed).run()
