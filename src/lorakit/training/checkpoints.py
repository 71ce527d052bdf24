"""Writing the trained files and training states during a run, and deleting the ones retention lets go."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from lorakit.adapters.formats import lora_file_name, state_dir_name
from lorakit.training import metadata as md
from lorakit.training import saving
from lorakit.training.hub import HubUploader
from lorakit.training.rescue import save_or_rescue
from lorakit.training.state import TrainingState, save_state

log = logging.getLogger("lorakit")


class Checkpointer:
    """Saves at epoch ends, at steps and at the end; with --save_state a state goes with each file."""

    def __init__(self, session: Any, handle: Any, live: TrainingState, base_meta: dict[str, str], num_epochs: int):
        cfg = session.cfg
        self.session, self.handle, self.live, self.base_meta = session, handle, live, base_meta
        self.folder = Path(cfg.output_dir)
        self.keep_files = saving.retention_for(cfg, num_epochs, states=False)
        self.keep_states = saving.retention_for(cfg, num_epochs, states=True)
        self.saved: list[Path] = []
        self.before_save: Callable[[int], None] = lambda step: None  # the loop's check that the weights are good
        self.uploader = HubUploader(cfg)  # --huggingface_repo_id (main process only)

    @property
    def _main(self) -> bool:
        return self.session.accelerator.is_main_process

    def epoch(self, epoch: int, step: int) -> None:
        self._intermediate(epoch, step, epoch=epoch)

    def step(self, epoch: int, step: int) -> None:
        self._intermediate(epoch, step, step=step)

    def _intermediate(self, at_epoch: int, at_step: int, **named: int) -> None:
        """A file (and state) named by `named` (epoch= or step=), then retention pruning of that kind."""
        cfg = self.session.cfg
        self.before_save(at_step)
        suffix = self.session.trainable.file_suffix(cfg)
        self._lora(lora_file_name(cfg.output_name, suffix, **named), at_epoch, at_step)
        self._prune(suffix, self.keep_files, **named)
        if cfg.save_state:
            self._state(state_dir_name(cfg.output_name, **named), at_epoch, at_step)
            self._prune(None, self.keep_states, **named)

    def final(self, epoch: int, step: int) -> None:
        cfg = self.session.cfg
        self.before_save(step)
        self._lora(lora_file_name(cfg.output_name, self.session.trainable.file_suffix(cfg)), epoch, step, last=True)
        if cfg.save_state or cfg.save_state_on_train_end:
            self._state(state_dir_name(cfg.output_name), epoch, step, last=True)
        if self._main:
            self.uploader.finish()

    def _prune(self, ext: str | None, retention: saving.Retention, **at: int) -> None:
        if self._main:
            saving.prune(self.folder, self.session.cfg.output_name, ext, retention, **at)

    def _lora(self, file_name: str, epoch: int, step: int, last: bool = False) -> None:
        session = self.session
        path = saving.output_path(session.cfg, file_name)
        if self._main:
            meta = md.per_save_metadata({**self.base_meta, **session.base_hashes.result()}, epoch=epoch, step=step)
            self.handle.eval_mode()  # schedule-free optimizers save their averaged (eval) weights
            try:
                save_or_rescue(lambda target: session.trainable.save(target, meta, saving.save_dtype(session.cfg), session.cfg.save_model_as), path)
            finally:
                self.handle.train_mode()
            log.info("saved %s", path)
            self.uploader.file(path, last)
        session.accelerator.wait_for_everyone()
        self.saved.append(path)

    def _state(self, name: str, epoch: int, step: int, last: bool = False) -> None:
        # the state keeps the optimizer's training-mode weights: that is what the next step continues from
        path = saving.output_path(self.session.cfg, name)
        # every process takes part: each contributes its random states, the main process writes the folder
        save_state(path, self.live, epoch=epoch, step=step, accelerator=self.session.accelerator)
        if self._main:
            self.uploader.state(path, last)
        self.session.accelerator.wait_for_everyone()
