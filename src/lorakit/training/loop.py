"""The epoch/step loop: accumulation, optimizer steps, max-norm, logging, saving, sampling and resume.

It works on a `Session` built by `setup.py`: a model family and a `Trainable`, and never asks which family or
which kind of training it runs.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from lorakit.training import distributed
from lorakit.training import metadata as md
from lorakit.training.checkpoints import Checkpointer
from lorakit.training.loss_log import LossLog, any_process, require_finite_weights
from lorakit.training.optim import build_optimizer
from lorakit.training.plan import TrainingPlan, start_position
from lorakit.training.sample_events import Sampler
from lorakit.training.saving import SavePolicy, save_every_n_epochs
from lorakit.training.schedulers import build_lr_scheduler
from lorakit.training.session import TrainResult
from lorakit.training.trackers import log_at_epoch
from lorakit.training.resume_options import saved_options
from lorakit.training.state import TrainingState, load_state
from lorakit.training.step import ends_accumulation, set_sync_gradients, step_loss
from lorakit.training.updates import build_updates
from lorakit.training.validation import ValidationRecord, Validator

log = logging.getLogger("lorakit")

LOG_EVERY = 5  # reading the loss forces a device sync, so the progress bar and trackers update every few steps


class Trainer:
    """One run from its start position (fresh, --initial_step or --resume) to max_train_steps."""

    def __init__(self, session: Any, dataset: Any, plan: TrainingPlan, seed: int):
        cfg, accelerator = session.cfg, session.accelerator
        self.session, self.dataset, self.plan, self.cfg, self.accelerator = session, dataset, plan, cfg, accelerator
        trainable = session.trainable
        groups, self.group_names = trainable.parameter_groups(cfg)
        self.handle = build_optimizer(cfg, groups)
        self.lr_scheduler = build_lr_scheduler(cfg, self.handle, plan.max_train_steps)
        self.optimizer = distributed.prepare_optimizer(accelerator, trainable.module, self.handle.optimizer)
        session.noise_generator = torch.Generator(device=accelerator.device).manual_seed(seed + accelerator.process_index)
        self.live = TrainingState(trainable.module, self.optimizer, self.lr_scheduler, session.noise_generator,
                                  getattr(accelerator, "scaler", None))
        self.params = trainable.trainable_parameters()
        names = {param: name for name, param in trainable.module.named_parameters()}
        self.updates = build_updates(cfg, accelerator, self.optimizer, self.params, names, trainable.steps_during_backward)
        self.policy = SavePolicy(save_every_n_epochs(cfg, plan.num_epochs), cfg.save_every_n_steps, plan.num_epochs)
        self.seed = seed
        self.step_losses: list[torch.Tensor] = []
        self.step_end_times: list[float] = []  # perf_counter after each optimizer step (for `lorakit bench`)
        self.loss_log = LossLog(plan.steps_per_epoch, any_process(accelerator))  # its average is part of a state
        self.live.loss_average = self.loss_log.average
        self.live.run_options = saved_options(cfg)
        self.epoch = 0
        self.logged: list[float] = []
        self.global_step = 0
        self.validator = Validator(session, getattr(dataset, "validation", None), self.handle, seed)
        self.validations: list[ValidationRecord] = []

    # ------------------------------------------------------------------ run

    def run(self) -> TrainResult:
        resumed = load_state(self.cfg.resume, self.live).step if self.cfg.resume else None
        start = start_position(self.cfg, self.plan, resumed)
        self.global_step = start.global_step
        # building these reads no RNG, so they may come after the restored state
        checkpoints = Checkpointer(self.session, self.handle, self.live, self._metadata(), self.plan.num_epochs)
        self.loss_log.last_saved = lambda: checkpoints.saved[-1] if checkpoints.saved else None
        checkpoints.before_save = self._before_save
        sampler = Sampler(self.session, self.handle)
        loader = self.dataset.make_loader(self.cfg.max_data_loader_n_workers, self.cfg.persistent_data_loader_workers)
        self.progress = tqdm(total=self.plan.max_train_steps, initial=self.global_step, desc="steps", dynamic_ncols=True,
                             disable=not self.accelerator.is_main_process)
        sampler.at_first(self.global_step)
        epoch = start.epoch
        for epoch in range(start.epoch, self.plan.num_epochs + 1):
            done = self._epoch(loader, epoch, start.skip_batches if epoch == start.epoch else 0, checkpoints, sampler)
            self._end_of_epoch(epoch)
            if self.policy.after_epoch(epoch):
                checkpoints.epoch(epoch, self.global_step)
            sampler.after_epoch(epoch, self.global_step)
            if done:
                break
        self.progress.close()
        checkpoints.final(epoch, self.global_step)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()  # last: it also destroys the process group the final save waits on
        losses = torch.stack(self.step_losses).float().tolist() if self.step_losses else []
        result = TrainResult(self.plan, saved_files=checkpoints.saved, losses=self.logged, step_losses=losses,
                             start_step=start.global_step, sample_files=sampler.written,
                             step_end_times=self.step_end_times, validations=self.validations)
        return result

    def _epoch(self, loader: Any, epoch: int, skip: int, checkpoints: Checkpointer, sampler: Sampler) -> bool:
        """Train one epoch from batch `skip`; True when max_train_steps is reached."""
        self.epoch = epoch
        self.dataset.set_epoch(epoch)
        if skip:
            self.dataset.skip_batches(skip)
        batches = len(self.dataset)
        # the DataLoader iterator draws a base seed from the global RNG; keep that out of the training RNG so
        # a run resumed mid-epoch draws the same numbers as one that went through the epoch boundary
        with torch.random.fork_rng(devices=[]):
            iterator = iter(loader)
        micro: list[torch.Tensor] = []
        for index, batch in enumerate(iterator, start=skip):
            sync = ends_accumulation(index, batches, self.cfg.gradient_accumulation_steps)
            micro.append(self._micro_step(batch, sync))
            if not sync:
                continue
            self._after_update(torch.stack(micro).mean(), epoch, checkpoints, sampler)
            micro = []
            if self.global_step >= self.plan.max_train_steps:
                return True
        return False

    def _micro_step(self, batch: Any, sync: bool) -> torch.Tensor:
        set_sync_gradients(self.accelerator, sync)
        self.session.trainable.before_step(self.global_step)
        loss = step_loss(self.session, batch)
        self.accelerator.backward(loss)
        self.updates.after_backward(sync)  # reduce, clip and step (or, fused, what the hooks left)
        return loss.detach()

    def _after_update(self, loss: torch.Tensor, epoch: int, checkpoints: Checkpointer, sampler: Sampler) -> None:
        self.lr_scheduler.step()
        self.global_step += 1
        step = self.global_step
        self.step_losses.append(loss)
        self.loss_log.add(step, epoch, loss, self.lr_scheduler.get_last_lr())
        logs = self.session.trainable.after_optimizer_step(self.cfg)
        self.progress.update(1)
        if step % LOG_EVERY == 0 or step == self.plan.max_train_steps:
            self._log(epoch, logs)
        if self.validator.after_step(step):
            self._validate("step", step, epoch)
        sampler.after_step(step)
        if self.policy.after_step(step) and step < self.plan.max_train_steps:
            checkpoints.step(epoch, step)
        self.step_end_times.append(time.perf_counter())

    # ------------------------------------------------------------------ validation

    def _end_of_epoch(self, epoch: int) -> None:
        """sd-scripts' end of an epoch: the epoch's validation, then `loss/epoch_average` (at the epoch number)."""
        if self.validator.after_epoch(epoch):
            self._validate("epoch", epoch, epoch)
        self._log(epoch, {})
        if self.accelerator.trackers:
            log_at_epoch(self.accelerator, {"loss/epoch_average": self.loss_log.average.average}, epoch,
                         self.global_step)

    def _validate(self, kind: str, number: int, epoch: int) -> None:
        """Score the held-out images; log the average and its divergence from the training loss's moving
        average; feed a plateau schedule."""
        loss = self.validator.loss()
        self._log(epoch, {})  # the moving average must include every step so far
        record = ValidationRecord(kind, number, loss, loss - self.loss_log.average.average)
        self.validations.append(record)
        if self.accelerator.is_main_process:
            log.info("validation after %s %d: loss %.4f (divergence %+.4f)", kind, number, loss, record.divergence)
        if self.accelerator.trackers:
            if kind == "step":
                self.accelerator.log(record.logs(), step=number)
            else:
                log_at_epoch(self.accelerator, record.logs(), number, self.global_step)
        report = getattr(self.lr_scheduler, "report_validation_loss", None)
        if report is not None:
            report(loss)

    # ------------------------------------------------------------------ helpers

    def _log(self, epoch: int, extra: dict[str, float]) -> None:
        """Every step since the last call, each at its own step number (one device sync for all of them)."""
        records = self.loss_log.flush()  # stops the run at a NaN or infinite loss
        if not records:
            return
        self.logged.append(sum(r.loss for r in records) / len(records))
        postfix = {"loss": f"{records[-1].average:.4f}", "epoch": epoch, "lr": f"{records[-1].lrs[0]:.2e}"}
        if extra:
            postfix["keys_scaled"] = extra["max_norm/keys_scaled"]
        self.progress.set_postfix(postfix)
        if self.accelerator.trackers:
            for record in records:
                logs = {"loss/current": record.loss, "loss/average": record.average,
                        **self.handle.lr_logs(record.lrs, self.group_names)}
                self.accelerator.log({**logs, **(extra if record is records[-1] else {})}, step=record.step)

    def _before_save(self, step: int) -> None:
        """No file from a spoiled run: the waiting losses are checked (and logged), then the weights."""
        self._log(self.epoch, {})
        require_finite_weights(self.params, step, self.loss_log.last_saved())

    def _metadata(self) -> dict[str, str]:
        summary = self.dataset.summary()
        facts = md.RunFacts(
            summary.num_train_images, summary.num_reg_images, self.plan.batches_per_epoch, self.plan.num_epochs,
            self.plan.max_train_steps, self.plan.warmup_steps, self.handle.description, self.seed,
            len(self.validator.dataset.images) if self.validator.dataset is not None else 0,
        )
        return md.base_metadata(self.session, summary, facts)
