"""LoRA files a run reads besides its own: `--dim_from_weights` and `--base_weights`, checked before anything loads.

* `--dim_from_weights` (sd-scripts' `create_network_from_weights`): the network is built with the modules of
  `--network_weights`, each at the rank and alpha the file stores, whatever `--network_dim`/`--network_alpha` and
  the size keys of `--network_args` say; the file's weights are then loaded into it as usual.
* `--base_weights A B --base_weights_multiplier 0.5 1` merges those LoRA files into the base model's weights
  (W ← W + m·ΔW, multiplier 1 when not given) before the network is attached, as sd-scripts does; the trained
  LoRA then learns on top of the merged model and holds only its own change.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lorakit.adapters.algorithms import algorithm_of
from lorakit.errors import CheckpointError, ConfigError

log = logging.getLogger("lorakit")

#: adapter algorithms whose layers are LoRA factors a file can size (sd-scripts' modules with create_network_from_weights)
SIZED_ALGORITHMS = ("lora", "lora_fa", "dylora")


def _read(path: str, family: Any, option: str, problems: list[str]) -> Any:
    """A LoRA file read with the family's key layout (tools.common.load_lora), or None with the problem noted."""
    from lorakit.tools.common import load_lora

    if not Path(path).is_file():
        problems.append(f"{option} {path}: no such file")
        return None
    try:
        return load_lora(path, family.name)
    except (CheckpointError, ConfigError, OSError, ValueError) as error:
        problems.append(f"{option} {path}: cannot be read as a LoRA file of this model ({error})")
        return None


def sized_spec(cfg: Any, family: Any, spec: Any, problems: list[str]) -> Any:
    """The spec with `module_sizes` read from --network_weights when --dim_from_weights asks for them."""
    if not cfg.dim_from_weights or spec is None:
        return spec
    if not cfg.network_weights:
        problems.append("--dim_from_weights reads the ranks from --network_weights; give that file")
        return spec
    if algorithm_of(spec.module, family) not in SIZED_ALGORITHMS:
        problems.append(f"--dim_from_weights sizes LoRA modules; --network_module {spec.module} builds other "
                        "adapters (use networks.lora, networks.lora_fa or networks.dylora, or remove it)")
        return spec
    lora = _read(cfg.network_weights, family, "--network_weights", problems)
    if lora is None:
        return spec
    sizes = {name: (module.rank, module.alpha_value) for name, module in lora.modules.items()}
    log.info("--dim_from_weights: %d modules, ranks %s", len(sizes), sorted({rank for rank, _ in sizes.values()}))
    return spec.replace(module_sizes=sizes)


def base_weight_problems(cfg: Any, family: Any) -> list[str]:
    """Every --base_weights file must be a readable LoRA file of the run's family."""
    problems: list[str] = []
    for path in cfg.base_weights or []:
        _read(path, family, "--base_weights", problems)
    return problems


def merge_base_weights(cfg: Any, family: Any, comps: Any) -> None:
    """Merge --base_weights into the loaded model's weights (W ← W + multiplier·ΔW)."""
    if not cfg.base_weights:
        return
    from lorakit.tools.common import load_lora
    from lorakit.tools.merge import merge_into_model

    multipliers = cfg.base_weights_multiplier or [1.0] * len(cfg.base_weights)
    loras = [load_lora(path, family.name) for path in cfg.base_weights]
    changed = merge_into_model(comps, family, loras, multipliers)
    for path, multiplier in zip(cfg.base_weights, multipliers):
        log.info("--base_weights: merged %s with multiplier %s", path, multiplier)
    log.info("--base_weights: %d layers of the base model changed", changed)
