"""Sample images during training (`--sample_prompts`, `--sample_every_n_steps/epochs`, `--sample_at_first`).

When (inventory §7.1): at step 0 with --sample_at_first; after an optimizer step when the step is a multiple of
--sample_every_n_steps (only without --sample_every_n_epochs); after epoch e when e is a multiple of
--sample_every_n_epochs. Images go to `<output_dir>/sample/` under sd-scripts' names:
`<output_name>_<e{epoch:06d} | {step:06d}>_<prompt#:02d>_<YYYYmmddHHMMSS>[_<seed>].png`.

Sampling must not change training: every RNG state is saved before and restored after, the network and the
models are put in eval mode (no LoRA dropout) and back, and schedule-free optimizers switch to their averaged
weights for the images and back.

With several processes the prompts are divided among them (process r makes prompts r, r+N, ..., as in
sd-scripts); each image keeps its prompt's number in its name, and the processes wait for each other after
an event so that none runs ahead into the next step.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from lorakit.atomic import staged_file
from lorakit.sampling.prompts import SampleDefaults, SamplePrompt, read_sample_prompts
from lorakit.training import distributed

log = logging.getLogger("lorakit")


def sampler_problem(name: str, where: str) -> str | None:
    """A message when the sampler cannot be built here (LMS needs scipy, which is optional)."""
    from lorakit.objectives.samplers import SAMPLERS, build_sampler

    if name.lower() not in SAMPLERS:
        log.warning("%s: unknown sampler %s; DDIM is used (as in sd-scripts)", where, name)
    try:
        build_sampler(name, "epsilon")
    except (ImportError, ValueError) as exc:
        return f"{where}: sampler {name} cannot be used here ({' '.join(str(exc).split())})"
    return None


def sampling_problems(cfg: Any, prompts: list[SamplePrompt]) -> list[str]:
    """Problems with the samplers a run would use, found before any model loads."""
    names = {(cfg.sample_sampler or "ddim"): f"--sample_sampler {cfg.sample_sampler}"}
    for prompt in prompts:
        if prompt.sample_sampler:
            names.setdefault(prompt.sample_sampler, f"--sample_prompts {cfg.sample_prompts} (prompt {prompt.index + 1})")
    return [p for p in (sampler_problem(name, where) for name, where in names.items()) if p]


@dataclass(frozen=True)
class SampleSchedule:
    every_n_steps: int | None
    every_n_epochs: int | None
    at_first: bool

    @classmethod
    def from_config(cls, cfg: Any) -> "SampleSchedule":
        steps, epochs = cfg.sample_every_n_steps, cfg.sample_every_n_epochs
        for name, value in (("sample_every_n_steps", steps), ("sample_every_n_epochs", epochs)):
            if value is not None and value <= 0:
                log.warning("--%s %s is not positive; sampling by it is off (as in sd-scripts)", name, value)
        steps = steps if steps and steps > 0 else None
        epochs = epochs if epochs and epochs > 0 else None
        return cls(steps, epochs, bool(cfg.sample_at_first))

    def after_step(self, step: int) -> bool:
        return self.every_n_epochs is None and bool(self.every_n_steps) and step % self.every_n_steps == 0

    def after_epoch(self, epoch: int) -> bool:
        return bool(self.every_n_epochs) and epoch % self.every_n_epochs == 0

    @property
    def active(self) -> bool:
        return self.at_first or bool(self.every_n_steps) or bool(self.every_n_epochs)


def sample_file_name(output_name: str | None, index: int, *, epoch: int | None, step: int, seed: int | None,
                     timestamp: str | None = None) -> str:
    """sd-scripts' sample image name: epoch events use `e{epoch:06d}`, step events `{step:06d}`."""
    number = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    stamp = timestamp or time.strftime("%Y%m%d%H%M%S", time.localtime())
    prefix = f"{output_name}_" if output_name else ""
    suffix = f"_{seed}" if seed is not None else ""
    return f"{prefix}{number}_{index:02d}_{stamp}{suffix}.png"


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore python, numpy, torch CPU and CUDA random states on exit."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@contextlib.contextmanager
def eval_mode(modules: list[torch.nn.Module], handle: Any) -> Iterator[None]:
    """Modules in eval mode and a schedule-free optimizer on its averaged weights; previous modes restored."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    if handle is not None:
        handle.eval_mode()
    try:
        yield
    finally:
        if handle is not None:
            handle.train_mode()
        for m, training in modes:
            m.training = training


class Sampler:
    """Makes the sample images of one run; the loop calls `at_first`, `after_step` and `after_epoch`."""

    def __init__(self, session: Any, handle: Any):
        cfg = session.cfg
        self.session, self.handle = session, handle
        self.schedule = SampleSchedule.from_config(cfg)
        # sd-scripts' sample defaults for every family (512 px, 30 steps, scale 7.5); a prompt line overrides them
        self.prompts: list[SamplePrompt] = read_sample_prompts(cfg.sample_prompts, SampleDefaults()) if cfg.sample_prompts else []
        self.folder = Path(cfg.output_dir) / "sample"
        self.written: list[Path] = []
        accelerator = session.accelerator
        warning = distributed.uneven_prompts_warning(len(self.prompts), accelerator.num_processes)
        if warning and self.enabled and accelerator.is_main_process:
            log.warning(warning)

    @property
    def enabled(self) -> bool:
        return bool(self.prompts) and self.schedule.active

    def at_first(self, step: int) -> None:
        if self.enabled and self.schedule.at_first:
            self.run(epoch=0, step=step)

    def after_step(self, step: int) -> None:
        if self.enabled and self.schedule.after_step(step):
            self.run(epoch=None, step=step)

    def after_epoch(self, epoch: int, step: int) -> None:
        if self.enabled and self.schedule.after_epoch(epoch):
            self.run(epoch=epoch, step=step)

    def run(self, *, epoch: int | None, step: int) -> list[Path]:
        """Write this process's share of the images (one per prompt); training RNG and modes are left as they were.

        Every process loads the whole model (`setup.setup_session`), so each builds its pipelines from its own modules.
        """
        session, acc = self.session, self.session.accelerator
        prompts = distributed.prompts_for_process(self.prompts, acc.process_index, acc.num_processes)
        from lorakit.sampling.generate import generate_sample

        self.folder.mkdir(parents=True, exist_ok=True)
        comps = session.comps
        modules = [comps.denoiser, comps.vae, *comps.text_encoders, session.trainable.module]
        paths = []
        pipelines: dict[str, Any] = {}
        with preserved_rng(), eval_mode(modules, self.handle), acc.autocast():
            for prompt in prompts:
                sampler = (prompt.sample_sampler or session.cfg.sample_sampler or "ddim").lower()
                if sampler not in pipelines:
                    pipelines[sampler] = session.trainable.sample_pipeline(session.family, comps, sampler)
                    pipelines[sampler].set_progress_bar_config(disable=True)
                spelled, inputs = session.trainable.sample_inputs(prompt)
                image = generate_sample(pipelines[sampler], spelled, clip_skip=session.cfg.clip_skip, inputs=inputs)
                paths.append(self._write(image, prompt, epoch=epoch, step=step))
        if acc.num_processes > 1:
            log.info("process %d wrote %d sample images to %s", acc.process_index, len(paths), self.folder)
        else:
            log.info("wrote %d sample images to %s", len(paths), self.folder)
        self.written += paths
        acc.wait_for_everyone()  # a process with fewer prompts waits here, not at the next gradient reduction
        return paths

    def _write(self, image: Any, prompt: SamplePrompt, *, epoch: int | None, step: int) -> Path:
        name = sample_file_name(self.session.cfg.output_name, prompt.index, epoch=epoch, step=step, seed=prompt.seed)
        path = self.folder / name
        with staged_file(path) as tmp:
            image.save(tmp, format="PNG")
        return path
