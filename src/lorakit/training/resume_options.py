"""What a resumed run changes: the options a state was saved with, compared with the resuming run's options.

A state holds the adapter's tensors, the optimizer's moments and learning rates, the LR schedule's position and
base rates, and the random streams. A changed option that one of these was made with cannot take effect on a
resume (the state would silently win over the command line while the file's metadata recorded the command
line), so the run refuses it before anything loads. Any other change takes effect from the resumed step on,
and the run says so, one line per option. States of earlier versions hold no options: nothing is compared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorakit.training.state import OPTIONS_FILE
from lorakit.training.trackers import portable_options

# The options a state's contents were made with, and what holds them.
_FIXED_BY = {
    "the adapter's tensors": ("network_module", "network_dim", "network_alpha", "network_args",
                              "network_train_unet_only", "network_train_text_encoder_only", "family", "v2"),
    "the optimizer's state": ("optimizer_type", "optimizer_args", "use_8bit_adam", "use_lion_optimizer",
                              "learning_rate", "unet_lr", "text_encoder_lr"),
    "the LR schedule's state": ("lr_scheduler", "lr_scheduler_type", "lr_scheduler_args", "lr_warmup_steps",
                                "lr_decay_steps", "lr_scheduler_num_cycles", "lr_scheduler_power",
                                "lr_scheduler_timescale", "lr_scheduler_min_lr_ratio"),
    "the random streams": ("seed",),
    "the position in the epoch (counted in batches)": ("train_batch_size", "gradient_accumulation_steps"),
}
FIXED_BY_STATE = {option: holder for holder, options in _FIXED_BY.items() for option in options}
# what a resume always changes, or what only says how the command was given
_NOT_COMPARED = frozenset({"resume", "dry_run", "config_file", "output_config", "initial_step", "initial_epoch"})


def saved_options(cfg: Any) -> dict[str, Any]:
    """The options a state records: without secrets, paths cut to their last component (states are shared)."""
    return {key: value for key, value in portable_options(cfg).items() if key not in _NOT_COMPARED}


def resume_changes(cfg: Any, state_folder: str | Path) -> tuple[list[str], list[str]]:
    """(problems, notes): each option the resuming run changes, refused when the state holds what it was made
    with, reported as taking effect otherwise."""
    file = Path(state_folder) / OPTIONS_FILE
    if not file.is_file():
        return [], []
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [f"--resume {state_folder}: {OPTIONS_FILE} cannot be read ({exc})"], []
    now = saved_options(cfg)
    problems, notes = [], []
    for key in sorted(set(saved) | set(now)):
        before, after = saved.get(key), now.get(key)
        if before == after:
            continue
        change = f"--{key} was {_shown(before)} when the state was saved and is {_shown(after)} now"
        holder = FIXED_BY_STATE.get(key)
        if holder:
            problems.append(f"--resume {state_folder}: {change}; {holder} keeps the old value, so the change cannot "
                            f"take effect: give --{key} {_shown(before)}, or start a new run from the saved LoRA "
                            "with --network_weights")
        else:
            notes.append(f"--resume: {change}; the resumed steps use the new value")
    return problems, notes


def _shown(value: Any) -> str:
    return "unset" if value is None else repr(value) if isinstance(value, str) else str(value)
