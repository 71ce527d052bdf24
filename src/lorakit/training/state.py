"""Resumable training states (`--save_state`, `--resume`): write crash-safely, read back exactly.

A state folder holds what an interrupted run needs to continue bit for bit (names follow accelerate's
`save_state`, which sd-scripts uses, plus sd-scripts' `train_state.json`):

    model.safetensors      the trained tensors (the Trainable's module), exactly as in memory
    optimizer.bin          optimizer state dict
    scheduler.bin          LR scheduler state dict
    scaler.pt              fp16 gradient scaler (only with one)
    random_states_0.pkl    python, numpy, torch CPU and CUDA RNG states, and the training-noise generator
    random_states_1.pkl    ... of process 1, and so on (only with several processes)
    train_state.json       {"current_epoch": e, "current_step": s}
    loss_average.json      the window of the logged moving-average loss (so a resumed run logs the same values)
    run_options.json       the run's options (no secrets, paths cut to their last part): a resume says what it
                           changes and refuses what cannot take effect (lorakit.training.resume_options)

Everything is written into a staging folder `.<name>.<random>.tmp` (unique to the writing process) and the
folder is renamed when complete, so a crash during a save leaves the previous states untouched and never a
half-written folder under the final name; a failed save (a full disk) removes its staging folder, and the
stale one of a killed run is removed when the next run starts (`lorakit.training.destination`).

No file of a state runs code when it is read: the pickled files hold only tensors and plain data and are read
with `torch.load(weights_only=True)` (`lorakit.safe_load`). NumPy's random state is stored as a tensor; states
of earlier versions, which pickled it as a NumPy array, still load through an allow-list of NumPy's array
reconstruction (nothing else).

With several processes every process calls `save_state`: the main process gathers their random states
(one `random_states_{rank}.pkl` each, as accelerate names them) and writes the whole folder, so only it needs
to reach `--output_dir`. On resume each process reads its own file, or rank 0's when the state has none for it.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import safetensors.torch
import torch

from lorakit.atomic import fsync_folder, staged_folder
from lorakit.errors import CheckpointError, ConfigError
from lorakit.safe_load import load_plain_data

log = logging.getLogger("lorakit")

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.bin"
SCHEDULER_FILE = "scheduler.bin"
SCALER_FILE = "scaler.pt"
RNG_FILE = "random_states_0.pkl"  # the main process's; required in every state
TRAIN_STATE_FILE = "train_state.json"
LOSS_AVERAGE_FILE = "loss_average.json"
OPTIONS_FILE = "run_options.json"  # read by training/resume_options.py
REQUIRED = (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, TRAIN_STATE_FILE)
PICKLED = (OPTIMIZER_FILE, SCHEDULER_FILE, SCALER_FILE)  # besides the random_states_*.pkl files


def rng_file(rank: int) -> str:
    """The random-state file of process `rank` (accelerate's name)."""
    return f"random_states_{rank}.pkl"


@dataclass
class TrainingState:
    """The live objects a state captures; `noise_generator` draws the training noise and timesteps."""

    module: torch.nn.Module  # the trainable's module (its parameters and buffers)
    optimizer: Any
    lr_scheduler: Any
    noise_generator: torch.Generator
    scaler: Any = None
    loss_average: Any = None  # lorakit.training.loss_log.MovingAverage: state_dict() of plain numbers
    run_options: dict[str, Any] | None = None  # the options, so that a resume can say what it changes


@dataclass(frozen=True)
class ResumeInfo:
    epoch: int
    step: int


# ------------------------------------------------------------------------------------------------ RNG


def capture_rng(noise_generator: torch.Generator | None) -> dict[str, Any]:
    """Every random-number state a training step reads."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state_as_plain_data(),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch_cuda"] = torch.cuda.get_rng_state_all()
    if noise_generator is not None:
        states["noise_generator"] = noise_generator.get_state()
    return states


def _numpy_state_as_plain_data() -> tuple[Any, ...]:
    """NumPy's MT19937 state with its key as a tensor, so the file needs no NumPy class to be read back."""
    name, key, position, has_gauss, cached = np.random.get_state()
    return (name, torch.from_numpy(key.astype(np.int64)), int(position), int(has_gauss), float(cached))


def _numpy_state(saved: tuple[Any, ...]) -> tuple[Any, ...]:
    """The state for `np.random.set_state`, from this version's tensor key or an earlier version's array."""
    name, key, *rest = saved
    key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    return (name, key.astype(np.uint32), *rest)


def restore_rng(states: dict[str, Any], noise_generator: torch.Generator | None) -> None:
    random.setstate(states["python"])
    np.random.set_state(_numpy_state(states["numpy"]))
    torch.set_rng_state(states["torch_cpu"])
    if "torch_cuda" in states and torch.cuda.is_available():
        cuda_states = states["torch_cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            log.warning("the state holds RNG states of %d GPUs, this machine has %d; CUDA RNG not restored",
                        len(cuda_states), torch.cuda.device_count())
    if noise_generator is not None and "noise_generator" in states:
        noise_generator.set_state(states["noise_generator"])


# ------------------------------------------------------------------------------------------------ save


def _atomic_folder(final: Path, write: Callable[[Path], None]) -> None:
    """Run `write(staging)` into a staging folder beside `final`, then put it in place with renames only.

    A failure (a full disk, a removed folder) removes the staging folder and is a `CheckpointError` naming the
    state, so neither a partial folder nor a traceback is left.
    """
    try:
        with staged_folder(final) as staging:
            write(staging)
            fsync_folder(staging)
    except OSError as exc:
        raise CheckpointError(f"cannot write the training state {final}: {exc.strerror or exc}") from None


def _write_file(path: Path, write: Callable[[Any], None]) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def network_tensors(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The network's tensors (parameters and buffers) as contiguous CPU copies."""
    return {k: v.detach().to("cpu").contiguous() for k, v in network.state_dict().items()}


def save_state(folder: Path, state: TrainingState, *, epoch: int, step: int, accelerator: Any = None) -> Path:
    """Write a complete state folder at `folder` (atomically); returns it.

    Without an accelerator (or with one process) the caller is the only writer. With several processes every
    process must call this at the same point: each captures its random states, the main process gathers them
    and writes the folder, and all return once it is in place.
    """
    world = accelerator.num_processes if accelerator is not None else 1
    rng = capture_rng(state.noise_generator)
    if world > 1:
        from accelerate.utils import gather_object

        # the collective orders the captures before the main process writes; it draws no random numbers
        states = gather_object([(accelerator.process_index, rng)])
        if not accelerator.is_main_process:
            accelerator.wait_for_everyone()  # until the folder is renamed into place
            return folder
        rngs = dict(states)
    else:
        rngs = {0: rng}

    def write(tmp: Path) -> None:
        data = safetensors.torch.save(network_tensors(state.module))
        _write_file(tmp / MODEL_FILE, lambda f: f.write(data))
        _write_file(tmp / OPTIMIZER_FILE, lambda f: torch.save(state.optimizer.state_dict(), f))
        if hasattr(state.lr_scheduler, "state_dict"):
            _write_file(tmp / SCHEDULER_FILE, lambda f: torch.save(state.lr_scheduler.state_dict(), f))
        if state.scaler is not None:
            _write_file(tmp / SCALER_FILE, lambda f: torch.save(state.scaler.state_dict(), f))
        for rank, states in sorted(rngs.items()):
            _write_file(tmp / rng_file(rank), lambda f, states=states: torch.save(states, f))
        text = json.dumps({"current_epoch": epoch, "current_step": step}, indent=2).encode()
        _write_file(tmp / TRAIN_STATE_FILE, lambda f: f.write(text))
        if state.loss_average is not None:
            average = json.dumps(state.loss_average.state_dict()).encode()
            _write_file(tmp / LOSS_AVERAGE_FILE, lambda f: f.write(average))
        if state.run_options is not None:
            options = json.dumps(state.run_options, indent=1, sort_keys=True).encode()
            _write_file(tmp / OPTIONS_FILE, lambda f: f.write(options))
        _require_resumable(tmp, folder)

    _atomic_folder(folder, write)
    log.info("saved state %s", folder)
    if world > 1:
        accelerator.wait_for_everyone()
    return folder


def _require_resumable(staging: Path, folder: Path) -> None:
    """Publish no state that `--resume` would refuse: e.g. a custom scheduler (--lr_scheduler_type) whose
    state_dict holds objects rather than plain data."""
    for file in _pickled_files(staging):
        try:
            _torch_load(file, mmap=True)
        except CheckpointError as exc:
            reason = str(exc).split(": ", 1)[-1]
            raise CheckpointError(f"{folder / file.name}: not saved, because it could not be resumed: {reason}") from None


# ------------------------------------------------------------------------------------------------ load


def check_state_folder(path: str | os.PathLike) -> list[str]:
    """Problems with a --resume folder, found before any model loads: missing, incomplete, or holding a file
    that is not plain data (refused without running anything from it)."""
    folder = Path(path)
    if not folder.is_dir():
        return [f"--resume {path}: no such state folder{_missing_state_hint(folder)}"]
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        return [f"--resume {path}: not a complete lorakit state (missing {', '.join(missing)})"]
    problems = []
    checks = [(_check_safetensors, folder / MODEL_FILE), (read_train_state, folder),
              *((lambda file: _torch_load(file, mmap=True), file) for file in _pickled_files(folder))]
    if (folder / LOSS_AVERAGE_FILE).exists():
        checks.append((lambda file: _restore_loss_average(file, _Discard()), folder / LOSS_AVERAGE_FILE))
    for check, file in checks:
        try:
            check(file)
        except CheckpointError as exc:
            problems.append(f"--resume: {exc}")
    return problems


def _check_safetensors(file: Path) -> None:
    """Read the header only: names, shapes and offsets that fit the file."""
    try:
        with safetensors.safe_open(str(file), framework="pt", device="cpu") as handle:
            list(handle.keys())
    except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
        raise CheckpointError(f"{file}: not a readable safetensors file, it may be truncated or damaged "
                              f"({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _missing_state_hint(folder: Path) -> str:
    if folder.is_symlink():
        return f" (a symbolic link to {os.readlink(folder)}, which is not a folder)"
    if folder.parent.is_dir() and any(folder.parent.glob(f".{glob.escape(folder.name)}.*.tmp")):
        return " (an interrupted save leaves only a .tmp folder; resume from the state before it)"
    return ""


def _pickled_files(folder: Path) -> list[Path]:
    """The state's torch.save files: optimizer, scheduler, scaler and every process's random states."""
    files = [folder / name for name in PICKLED if (folder / name).is_file()]
    return files + sorted(folder.glob("random_states_*.pkl"))


def read_train_state(path: str | os.PathLike) -> ResumeInfo:
    file = Path(path) / TRAIN_STATE_FILE
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        return ResumeInfo(int(data.get("current_epoch", 0)), int(data["current_step"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{file}: cannot read the training position ({exc})") from None


def load_state(path: str | os.PathLike, state: TrainingState, rank: int | None = None) -> ResumeInfo:
    """Restore network, optimizer, scheduler, scaler and RNG from a state folder.

    Process `rank` (the launcher's RANK when not given) restores its own random states; from a state saved
    with fewer processes it takes rank 0's, except for the training-noise generator, which keeps its own
    per-process seed so that the processes do not all draw the same noise.
    """
    problems = check_state_folder(path)
    if problems:
        raise ConfigError(problems)
    folder = Path(path)
    _load_network(folder / MODEL_FILE, state.module)
    _restore(folder / OPTIMIZER_FILE, state.optimizer.load_state_dict)
    if (folder / SCHEDULER_FILE).is_file() and hasattr(state.lr_scheduler, "load_state_dict"):
        _restore(folder / SCHEDULER_FILE, state.lr_scheduler.load_state_dict)
    if state.scaler is not None and (folder / SCALER_FILE).is_file():
        _restore(folder / SCALER_FILE, state.scaler.load_state_dict)
    rank = _rank() if rank is None else rank
    own = folder / rng_file(rank)
    if own.is_file():
        _restore(own, lambda states: restore_rng(states, state.noise_generator))
    else:
        log.warning("%s has no random states of process %d (saved with fewer processes); it uses those of "
                    "process 0 with its own noise seed, so the run continues, but not exactly", folder, rank)
        _restore(folder / RNG_FILE, lambda states: restore_rng(states, None))
    _restore_loss_average(folder / LOSS_AVERAGE_FILE, state.loss_average)
    info = read_train_state(folder)
    log.info("resumed from %s at epoch %d, step %d", folder, info.epoch, info.step)
    return info


class _Discard:
    """Accepts a loss-average state and keeps nothing (checking a state folder before the run exists)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        [float(v) for v in state["values"]], float(state["total"])


def _restore_loss_average(file: Path, average: Any) -> None:
    """The logged moving average's window; a state of an earlier version has none and starts it afresh."""
    if average is None or not file.is_file():
        return
    try:
        average.load_state_dict(json.loads(file.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{file}: cannot read the loss average ({_first_line(exc)})") from None


def _rank() -> int:
    from lorakit.training.distributed import rank_from_env

    return rank_from_env()


def _restore(file: Path, apply: Callable[[Any], None]) -> None:
    """Read one state file and hand it to its object; a file of another run's kind names itself."""
    data = _torch_load(file)
    try:
        apply(data)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"{file}: does not fit this run ({_first_line(exc)}); resume with the options of the "
                              "run that saved it (optimizer, scheduler, network, precision)") from None


def _torch_load(file: Path, mmap: bool = False) -> Any:
    """Tensors and plain data only (`lorakit.safe_load`); random-state files of earlier lorakit versions
    also hold NumPy arrays, which are rebuilt from their bytes without calling anything else."""
    return load_plain_data(file, allow_numpy_arrays=file.name.startswith("random_states_"), mmap=mmap)


@torch.no_grad()
def _load_network(file: Path, network: torch.nn.Module) -> None:
    try:
        tensors = safetensors.torch.load_file(str(file))
    except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
        raise CheckpointError(f"{file}: not a readable safetensors file, it may be truncated or damaged "
                              f"({_first_line(exc)})") from None
    own = network.state_dict()
    extra = sorted(set(tensors) - set(own))
    missing = sorted(set(own) - set(tensors))
    if extra or missing:
        raise CheckpointError(
            f"{file}: the state was saved with a different network ({len(missing)} tensors missing, e.g. "
            f"{(missing or ['-'])[0]}; {len(extra)} unexpected, e.g. {(extra or ['-'])[0]}); resume with the "
            "same --network_dim, --network_args and model as the interrupted run"
        )
    for key, value in tensors.items():
        if own[key].shape != value.shape:
            raise CheckpointError(f"{file}: {key} has shape {tuple(value.shape)}, the network {tuple(own[key].shape)}")
        own[key].copy_(value)
