"""The training loop. It talks to a `ModelFamily` and never asks which family it is."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from lorakit.adapters.factory import build_network
from lorakit.adapters.network import LoRANetwork
from lorakit.data.cache import vae_identity
from lorakit.data.dataset import build_train_dataset
from lorakit.data.summary import format_summary
from lorakit.errors import ConfigError
from lorakit.families.base import Components, ModelFamily
from lorakit.families.common.text_cache import caches_text
from lorakit.families.registry import resolve_family
from lorakit.precision import WEIGHT_DTYPES, effective_mixed_precision
from lorakit.training import distributed
from lorakit.training import metadata as md
from lorakit.training.plan import TrainingPlan, format_plan, initial_step_problem, make_plan
from lorakit.training.trackers import logging_dir, tracker_config, tracker_init_kwargs, tracker_names, wandb_login

log = logging.getLogger("lorakit")


@dataclass
class TrainResult:
    plan: TrainingPlan
    saved_files: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # mean loss over each logging interval
    step_losses: list[float] = field(default_factory=list)  # one per optimizer step run by this process
    start_step: int = 0  # the global step the run started from (non-zero when resumed)
    sample_files: list[Path] = field(default_factory=list)
    step_end_times: list[float] = field(default_factory=list)  # perf_counter after each optimizer step


@dataclass
class Session:
    """Everything the step function needs; built once by `setup`."""

    cfg: Any
    family: ModelFamily
    comps: Components
    network: LoRANetwork
    objective: Any
    accelerator: Accelerator
    weight_dtype: torch.dtype
    train_text_encoder: bool
    noise_generator: torch.Generator | None = None  # set by the trainer; draws training noise and timesteps
    base_hashes: md.BaseModelHashes = field(default_factory=md.BaseModelHashes)  # the base model's metadata hashes


def train(cfg: Any) -> TrainResult:
    """Run (or with --dry_run only plan) one LoRA training described by `cfg`."""
    family = resolve_family(cfg)
    seed = cfg.seed if cfg.seed is not None else random.randint(0, 2**31 - 1)
    dataset = build_train_dataset(cfg, seed)  # data problems surface before any model loads
    if caches_text(cfg) and dataset.captions_vary():
        raise ConfigError(["--cache_text_encoder_outputs: a dataset subset changes its captions per step (shuffle, "
                           "dropout, tag dropout, token warm-up or wildcards); remove one or the other"])
    plan = make_plan(cfg, family.name, len(dataset), num_processes=distributed.world_size_from_env())
    dataset.set_training_length(plan.max_train_steps, cfg.gradient_accumulation_steps)
    if distributed.rank_from_env() == 0:
        batch = distributed.effective_batch_message(dataset, plan.num_processes, cfg.gradient_accumulation_steps)
        print(format_plan(cfg, plan, format_summary(dataset.summary())) + "\n" + batch, flush=True)
    plan = distributed.per_process_plan(plan)  # resume positions count this process's batches
    check_before_loading(cfg, plan)
    if cfg.dry_run:
        return TrainResult(plan)

    accelerator = _make_accelerator(cfg)
    # only the main process writes files, so only it reads the whole base model for their metadata
    hashes = md.BaseModelHashes(cfg if accelerator.is_main_process else None)
    distributed.shard_dataset(dataset, accelerator)
    set_seed(seed)
    session = _setup(cfg, family, accelerator)
    session.base_hashes = hashes
    if cfg.cache_latents or cfg.cache_latents_to_disk:
        disk = {"to_disk": True, "latent_format": family.name, "vae_id": vae_identity(cfg),
                "skip_check": cfg.skip_cache_check} if cfg.cache_latents_to_disk else {}
        with torch.no_grad():
            distributed.cache_latents(dataset, accelerator, lambda images: family.encode_images(session.comps, images), cfg.vae_batch_size or 1, **disk)
    return _run(session, dataset, plan, seed)


def check_before_loading(cfg: Any, plan: TrainingPlan) -> None:
    """Resume folder, start step and sample prompts: every problem at once, before any model loads."""
    from lorakit.sampling.prompts import read_sample_prompts
    from lorakit.training.state import check_state_folder, read_train_state

    problems: list[str] = distributed.config_problems(cfg)
    resumed_step = None
    if cfg.resume:
        problems += check_state_folder(cfg.resume)
        if not problems:
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


def _make_accelerator(cfg: Any) -> Accelerator:
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


def _setup(cfg: Any, family: ModelFamily, accelerator: Accelerator) -> Session:
    if getattr(cfg, "save_format", "kohya") != "kohya" and not hasattr(family, "lora_file_state"):
        raise ConfigError([f"--save_format {cfg.save_format}: the {family.name} family writes the kohya layout only "
                           "(convert afterwards with `lorakit lora convert --to diffusers`)"])
    comps = family.load(cfg)
    weight_dtype = WEIGHT_DTYPES[accelerator.mixed_precision]
    device = accelerator.device
    swap_blocks = bool(getattr(cfg, "blocks_to_swap", None)) and hasattr(family, "prepare_block_swap")
    for module in [comps.denoiser, comps.vae, *comps.text_encoders]:
        module.requires_grad_(False)
        module.eval()
        # with --blocks_to_swap the denoiser never goes to the device whole: the family places it, keeping the
        # swapped blocks' weights on the CPU, so loading needs no more device memory than training
        dtype = torch.float32 if module is comps.vae and cfg.no_half_vae else weight_dtype
        _move(module, torch.device("cpu") if swap_blocks and module is comps.denoiser else device, dtype)
    if swap_blocks:
        family.prepare_block_swap(comps, cfg, device)
    train_text_encoder = bool(family.text_encoders_to_train(comps, cfg))
    if cfg.gradient_checkpointing:
        family.enable_gradient_checkpointing(comps, train_text_encoder)
    network = build_network(cfg, family, comps, device)
    _full_precision_network(cfg, network, accelerator)
    _list_modules(cfg, network)
    if train_text_encoder:
        for encoder in family.text_encoders_to_train(comps, cfg):
            encoder.train()  # LoRA dropout acts only in train mode; the frozen weights have no dropout of their own
    comps.denoiser.train()
    return Session(cfg, family, comps, network, family.objective(cfg, comps), accelerator, weight_dtype, train_text_encoder)


def _full_precision_network(cfg: Any, network: torch.nn.Module, accelerator: Accelerator) -> None:
    """--full_bf16 / --full_fp16: the adapter weights themselves in half precision (less memory, less exact)."""
    if cfg.full_bf16:
        network.to(dtype=torch.bfloat16)
    elif cfg.full_fp16:
        network.to(dtype=torch.float16)
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None:
            # the gradient scaler refuses to unscale fp16 gradients unless told that they are meant to be fp16
            original = scaler._unscale_grads_
            scaler._unscale_grads_ = lambda optimizer, inv_scale, found_inf, allow_fp16: original(optimizer, inv_scale, found_inf, True)


def _move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move a frozen module; cast only when the dtype changes (diffusers warns on every cast)."""
    current = next(module.parameters()).dtype
    module.to(device=device) if current == dtype else module.to(device=device, dtype=dtype)


def _list_modules(cfg: Any, network: Any) -> None:
    """`--network_args verbose=True`: every module with its rank and alpha (only the literal True counts)."""
    kwargs = cfg.network_kwargs() if cfg.network_args else {}
    if kwargs.get("verbose") != "True":
        return
    for name, module in getattr(network, "lora_modules", {}).items():
        log.info("%s: dim %s, alpha %s", name, getattr(module, "rank", "?"), float(getattr(module, "alpha", 0.0)))


def _run(session: Session, dataset: Any, plan: TrainingPlan, seed: int) -> TrainResult:
    from lorakit.training.trainer import Trainer

    return Trainer(session, dataset, plan, seed).run()


def base_metadata(session: Session, summary: Any, facts: md.RunFacts) -> dict[str, str]:
    """The metadata every saved file shares; `summary` is the (sharded) dataset's `summary()`."""
    from lorakit.adapters.modelspec import build_modelspec
    from lorakit.data.metadata import dataset_metadata

    cfg, family = session.cfg, session.family
    meta = md.training_metadata(cfg, facts)
    meta.update(dataset_metadata(summary, cfg, num_processes=session.accelerator.num_processes, gradient_accumulation_steps=cfg.gradient_accumulation_steps))
    meta.update(family.metadata(cfg))
    # without --network_module the family's sd-scripts module is what the file is (and what readers look for)
    meta["ss_network_module"] = cfg.network_module or family.default_network_module
    architecture, implementation, default_reso = family.modelspec_architecture(cfg)
    resolution = tuple(cfg.resolution) if cfg.resolution else default_reso
    extra = {key: getattr(cfg, f"metadata_{key}") for key in MODELSPEC_EXTRAS if getattr(cfg, f"metadata_{key}", None)}
    title = cfg.metadata_title or cfg.output_name or None
    spec = build_modelspec(
        architecture, implementation, title or "", resolution,
        "v" if cfg.v_parameterization else "epsilon", clip_skip=cfg.clip_skip, extra=extra,
    )
    if cfg.no_metadata:
        meta = md.restrict_to_minimum(meta)
    meta.update(spec)
    return meta


MODELSPEC_EXTRAS = ("author", "description", "license", "tags", "usage_hint", "thumbnail", "merged_from", "trigger_phrase", "preprocessor", "is_negative_embedding")
