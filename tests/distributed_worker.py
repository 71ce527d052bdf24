"""Trains a tiny model with lorakit's real loop and records, in every process, the LoRA weights after each step.

`tests/test_distributed.py` runs it under `accelerate launch --multi_gpu --num_processes 2` (CPU forced, gloo)
and imports `recorded_run` for the single-process comparison run.

Usage: python distributed_worker.py RESULT_FILE RUN_NAME -- TRAIN_ARGS [--- RUN_NAME -- TRAIN_ARGS ...]

Three instruments, none touching the model: every micro-batch's random draws (training noise, timesteps,
VAE posterior sample) are seeded from its captions, so a batch gets the same noise whichever process and
whichever run trains it (the loop itself seeds noise per process, which is right for training but makes
runs with different process counts incomparable); and the trainer's per-step hook is wrapped to copy the
LoRA weights (and, at the first step, a digest of the latent cache) after each optimizer step, with the
random states a saved state would hold at that point; the state loader is wrapped to record the random
states it restored. The process group outlives each run (a run's end would destroy it) so one launch can
hold several runs.
"""

from __future__ import annotations

import contextlib
import os
import sys
import zlib
from typing import Any, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


@contextlib.contextmanager
def instrumented(record: dict[str, Any]) -> Iterator[None]:
    """Patch the trainer's step-loss and after-update hooks for the duration of a run; restore them after."""
    from accelerate.state import PartialState

    from lorakit.training import loop as trainer

    real_step_loss, real_after_update = trainer.step_loss, trainer.Trainer._after_update
    real_load_state = trainer.load_state
    real_destroy = PartialState.destroy_process_group

    def seeded_step_loss(session: Any, batch: Any) -> torch.Tensor:
        seed = zlib.crc32("|".join(batch.captions).encode())
        session.noise_generator.manual_seed(seed)
        torch.manual_seed(seed)
        return real_step_loss(session, batch)

    def recording_after_update(self: Any, *args: Any, **kwargs: Any) -> None:
        real_after_update(self, *args, **kwargs)
        record["weights"].append(torch.cat([p.detach().float().flatten().cpu() for p in self.params]))
        record["rng"].append(rng_digest(self.session.noise_generator))
        if "cache" not in record:
            record["cache"] = cache_digest(self.dataset)
            text_cache = getattr(self.session.family, "text_cache", None)
            record["text_files"] = len(text_cache.files) if text_cache is not None else 0

    def recording_load_state(path: Any, live: Any) -> Any:
        info = real_load_state(path, live)
        record["restored_rng"] = rng_digest(live.noise_generator)
        return info

    trainer.step_loss, trainer.Trainer._after_update = seeded_step_loss, recording_after_update
    trainer.load_state = recording_load_state
    PartialState.destroy_process_group = lambda self, group=None: None
    try:
        yield
    finally:
        trainer.step_loss, trainer.Trainer._after_update = real_step_loss, real_after_update
        trainer.load_state = real_load_state
        PartialState.destroy_process_group = real_destroy


def rng_digest(noise_generator: torch.Generator) -> dict[str, Any]:
    """The training-noise generator's and torch's CPU random states (what a step draws from)."""
    return {"noise": noise_generator.get_state().clone(), "torch_cpu": torch.get_rng_state()}


def cache_digest(dataset: Any) -> dict[str, float]:
    """How many latents the dataset holds in memory or on disk, and the sum of the in-memory ones."""
    if dataset.latents is not None:
        total = sum(float(t.double().sum()) for t in dataset.latents.values())
        return {"memory": len(dataset.latents), "sum": total}
    return {"files": len(dataset.latent_files or {})}


def recorded_run(argv: list[str]) -> dict[str, Any]:
    """One training run; returns its per-step weights, step losses, start step and the cache digest."""
    from lorakit.config import parse_train_args
    from lorakit.training.run import train

    record: dict[str, Any] = {"weights": [], "rng": []}
    cfg, _ = parse_train_args(argv)
    with instrumented(record):
        result = train(cfg)
    record["losses"] = result.step_losses
    record["start_step"] = result.start_step
    record["samples"] = sorted(path.name for path in result.sample_files)
    record["weights"] = torch.stack(record["weights"]) if record["weights"] else torch.empty(0)
    return record


def parse_runs(argv: list[str]) -> list[tuple[str, list[str]]]:
    """`NAME -- ARGS --- NAME -- ARGS` into [(NAME, ARGS), ...]."""
    runs, current = [], []
    for token in [*argv, "---"]:
        if token != "---":
            current.append(token)
            continue
        name, separator, *args = current
        assert separator == "--", f"expected NAME -- ARGS, got {current[:3]}"
        runs.append((name, args))
        current = []
    return runs


def main(argv: list[str]) -> None:
    from accelerate.utils import gather_object

    result_file, runs = argv[0], parse_runs(argv[1:])
    records = {name: recorded_run(args) for name, args in runs}
    from accelerate import PartialState

    state = PartialState()
    everyone = gather_object([{"rank": state.process_index, "world": state.num_processes, "records": records}])
    if state.is_main_process:
        torch.save(sorted(everyone, key=lambda item: item["rank"]), result_file)
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
