"""The training loop. It talks to a `ModelFamily` and never asks which family it is."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from lorakit.adapters.formats import save_lora_file
from lorakit.adapters.factory import build_network
from lorakit.adapters.network import LoRANetwork
from lorakit.data.batch import Batch
from lorakit.data.masks import mask_to_latent
from lorakit.data.dataset import build_train_dataset
from lorakit.data.summary import format_summary
from lorakit.families.base import Components, ModelFamily
from lorakit.families.registry import resolve_family
from lorakit.training import metadata as md
from lorakit.training.optim import build_optimizer
from lorakit.training.plan import TrainingPlan, format_plan, make_plan
from lorakit.training.saving import SavePolicy, epoch_file_name, final_file_name, output_path, save_dtype, step_file_name
from lorakit.training.schedulers import build_lr_scheduler
from lorakit.training.trackers import logging_dir, read_tracker_init_kwargs, tracker_config, tracker_names

log = logging.getLogger("lorakit")

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    plan: TrainingPlan
    saved_files: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


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


def train(cfg: Any) -> TrainResult:
    """Run (or with --dry_run only plan) one LoRA training described by `cfg`."""
    family = resolve_family(cfg)
    seed = cfg.seed if cfg.seed is not None else random.randint(0, 2**31 - 1)
    dataset = build_train_dataset(cfg, seed)  # data problems surface before any model loads
    plan = make_plan(cfg, family.name, len(dataset), num_processes=_num_processes())
    dataset.set_training_length(plan.max_train_steps, cfg.gradient_accumulation_steps)
    print(format_plan(cfg, plan, format_summary(dataset.summary())), flush=True)
    if cfg.dry_run:
        return TrainResult(plan)

    accelerator = _make_accelerator(cfg)
    set_seed(seed)
    session = _setup(cfg, family, accelerator)
    if cfg.cache_latents or cfg.cache_latents_to_disk:
        disk = {"to_disk": True, "latent_format": family.name, "vae_id": str(cfg.vae or cfg.pretrained_model_name_or_path), "skip_check": cfg.skip_cache_check} if cfg.cache_latents_to_disk else {}
        with torch.no_grad():
            dataset.cache_latents(lambda images: family.encode_images(session.comps, images), cfg.vae_batch_size or 1, True, **disk)
    return _run(session, dataset, plan, seed)


def _num_processes() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def _make_accelerator(cfg: Any) -> Accelerator:
    precision = cfg.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        log.warning("--mixed_precision fp16 needs a CUDA GPU; training in bf16 on this machine instead")
        precision = "bf16"
    trackers = tracker_names(cfg)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision=precision,
        log_with=trackers or None, project_dir=logging_dir(cfg),
    )
    if trackers:
        init_kwargs = {}
        if cfg.log_tracker_config:
            init_kwargs = read_tracker_init_kwargs(cfg.log_tracker_config)
        accelerator.init_trackers(cfg.log_tracker_name or "network_train", config=tracker_config(cfg), init_kwargs=init_kwargs)
    return accelerator


def _setup(cfg: Any, family: ModelFamily, accelerator: Accelerator) -> Session:
    comps = family.load(cfg)
    weight_dtype = WEIGHT_DTYPES[accelerator.mixed_precision]
    device = accelerator.device
    for module in [comps.denoiser, comps.vae, *comps.text_encoders]:
        module.requires_grad_(False)
        module.eval()
        _move(module, device, weight_dtype)
    train_text_encoder = bool(family.text_encoders_to_train(comps, cfg))
    if cfg.gradient_checkpointing:
        family.enable_gradient_checkpointing(comps, train_text_encoder)
    network = build_network(cfg, family, comps, device)
    if train_text_encoder:
        for encoder in family.text_encoders_to_train(comps, cfg):
            encoder.train()  # LoRA dropout acts only in train mode; the frozen weights have no dropout of their own
    comps.denoiser.train()
    return Session(cfg, family, comps, network, family.objective(cfg, comps), accelerator, weight_dtype, train_text_encoder)


def _move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move a frozen module; cast only when the dtype changes (diffusers warns on every cast)."""
    current = next(module.parameters()).dtype
    module.to(device=device) if current == dtype else module.to(device=device, dtype=dtype)


def _run(session: Session, dataset: Any, plan: TrainingPlan, seed: int) -> TrainResult:
    cfg, accelerator, network = session.cfg, session.accelerator, session.network
    te_lr = cfg.text_encoder_lr[0] if cfg.text_encoder_lr else None
    groups, group_names = network.prepare_optimizer_params(te_lr, cfg.unet_lr, cfg.learning_rate)
    handle = build_optimizer(cfg, groups)
    lr_scheduler = build_lr_scheduler(cfg, handle, plan.max_train_steps)
    optimizer, optimizer_text = accelerator.prepare(handle.optimizer), handle.description
    loader = dataset.make_loader(cfg.max_data_loader_n_workers, cfg.persistent_data_loader_workers)

    summary = dataset.summary()
    facts = md.RunFacts(
        summary.num_train_images, summary.num_reg_images, plan.batches_per_epoch, plan.num_epochs,
        plan.max_train_steps, plan.warmup_steps, optimizer_text, seed,
    )
    base_meta = _base_metadata(session, dataset, facts)
    policy = SavePolicy(cfg.save_every_n_epochs, cfg.save_every_n_steps, plan.num_epochs)
    result = TrainResult(plan)
    params = network.trainable_parameters()

    progress = tqdm(total=plan.max_train_steps, desc="steps", dynamic_ncols=True, disable=not accelerator.is_main_process)
    global_step, epoch = 0, 0
    running = RunningLoss()
    for epoch in range(1, plan.num_epochs + 1):
        dataset.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate():
                loss = _step_loss(session, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    _all_reduce_gradients(accelerator, params)
                    if cfg.max_grad_norm:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            running.add(loss.detach())
            if not accelerator.sync_gradients:
                continue
            lr_scheduler.step()
            global_step += 1
            progress.update(1)
            if global_step % 5 == 0 or global_step == plan.max_train_steps:
                # reading the loss forces a device sync, so only every few steps
                result.losses.append(running.mean())
                progress.set_postfix(loss=f"{result.losses[-1]:.4f}", epoch=epoch, lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
                if accelerator.trackers:
                    logs = {"loss/average": result.losses[-1]}
                    logs.update(handle.lr_logs(lr_scheduler.get_last_lr(), group_names))
                    accelerator.log(logs, step=global_step)
            if policy.after_step(global_step) and global_step < plan.max_train_steps:
                result.saved_files.append(_save(session, handle, base_meta, step_file_name(cfg.output_name, global_step, cfg.save_model_as), epoch, global_step))
            if global_step >= plan.max_train_steps:
                break
        if policy.after_epoch(epoch):
            result.saved_files.append(_save(session, handle, base_meta, epoch_file_name(cfg.output_name, epoch, cfg.save_model_as), epoch, global_step))
        if global_step >= plan.max_train_steps:
            break
    progress.close()
    accelerator.end_training()
    result.saved_files.append(_save(session, handle, base_meta, final_file_name(cfg.output_name, cfg.save_model_as), epoch, global_step))
    accelerator.wait_for_everyone()
    return result


def _step_loss(session: Session, batch: Batch) -> torch.Tensor:
    """Encode, noise, predict and compare: the loss of one micro-batch, weighted per sample."""
    family, comps, accelerator = session.family, session.comps, session.accelerator
    device = accelerator.device
    with torch.no_grad():
        if batch.latents is not None:
            latents = batch.latents.to(device=device, dtype=session.weight_dtype)
        else:
            latents = family.encode_images(comps, batch.images.to(device)).to(session.weight_dtype)
    with torch.set_grad_enabled(session.train_text_encoder), accelerator.autocast():
        text = family.encode_text(comps, batch.captions, session.cfg.clip_skip)
    noised = session.objective.noise(latents)
    with accelerator.autocast():
        prediction = family.predict(comps, noised.noisy, noised.timesteps, text, batch)
    elementwise = session.objective.elementwise_loss(prediction.float(), noised.target.float(), noised.timesteps)
    if batch.masks is not None:
        # --masked_loss / alpha_mask: weight each latent pixel by the mask, area-averaged to latent size
        elementwise = elementwise * mask_to_latent(batch.masks.to(device), tuple(elementwise.shape[-2:]))
    per_sample = elementwise.mean(dim=tuple(range(1, elementwise.ndim)))
    weights = batch.loss_weights.to(device=device, dtype=per_sample.dtype)
    timestep_weights = session.objective.loss_weights(noised.timesteps)
    if timestep_weights is not None:
        weights = weights * timestep_weights
    return (per_sample * weights).mean()


def _all_reduce_gradients(accelerator: Accelerator, params: list[torch.nn.Parameter]) -> None:
    """The LoRA modules live inside the frozen model, outside any DDP wrapper, so gradients are averaged here."""
    if accelerator.num_processes <= 1:
        return
    for param in params:
        if param.grad is not None:
            param.grad = accelerator.reduce(param.grad, reduction="mean")


class RunningLoss:
    """Loss values kept on the device and averaged on demand (no sync per step)."""

    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []

    def add(self, value: torch.Tensor) -> None:
        self.values.append(value)

    def mean(self) -> float:
        value = torch.stack(self.values).float().mean().item()
        self.values.clear()
        return value if math.isfinite(value) else float("nan")


def _base_metadata(session: Session, dataset: Any, facts: md.RunFacts) -> dict[str, str]:
    from lorakit.adapters.modelspec import build_modelspec
    from lorakit.data.metadata import dataset_metadata

    cfg, family = session.cfg, session.family
    meta = md.training_metadata(cfg, facts)
    meta.update(dataset_metadata(dataset.summary(), cfg, num_processes=session.accelerator.num_processes, gradient_accumulation_steps=cfg.gradient_accumulation_steps))
    meta.update(family.metadata(cfg))
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


def _save(session: Session, handle: Any, base_meta: dict[str, str], file_name: str, epoch: int, step: int) -> Path:
    accelerator = session.accelerator
    path = output_path(session.cfg, file_name)
    if accelerator.is_main_process:
        meta = md.per_save_metadata(base_meta, epoch=epoch, step=step)
        handle.eval_mode()  # schedule-free optimizers keep the weights to save in their averaged (eval) state
        try:
            save_lora_file(session.network.state_dict_kohya(), path, meta, save_dtype=save_dtype(session.cfg), model_format=session.cfg.save_model_as)
        finally:
            handle.train_mode()
        log.info("saved %s", path)
    return path
