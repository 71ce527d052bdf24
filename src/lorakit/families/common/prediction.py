"""What a diffusers folder says its model predicts, against what the run trains.

As in sd-scripts, `--v_parameterization` decides what an SD/SDXL run trains. A folder whose scheduler config
says otherwise is usually a forgotten flag (an SD 2.x-v or a v-pred SDXL model trained as epsilon learns the wrong
target without any error), so the run says so, naming the file and its value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PREDICTION_TYPES = ("epsilon", "v_prediction")


def declared_prediction_type(model: str | None) -> tuple[Path, str] | None:
    """(the scheduler config, its prediction_type) of a diffusers folder; None for a single file or no value."""
    if not model:
        return None
    file = Path(model) / "scheduler" / "scheduler_config.json"
    try:
        declared = json.loads(file.read_text(encoding="utf-8")).get("prediction_type")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return (file, declared) if declared in PREDICTION_TYPES else None


def prediction_type_warnings(cfg: Any) -> list[str]:
    """A warning when the folder's prediction_type disagrees with --v_parameterization."""
    found = declared_prediction_type(cfg.pretrained_model_name_or_path)
    trained = "v_prediction" if cfg.v_parameterization else "epsilon"
    if found is None or found[1] == trained:
        return []
    file, declared = found
    advice = ("add --v_parameterization" if declared == "v_prediction" else "remove --v_parameterization")
    return [f"{file} says prediction_type={declared!r}, but this run trains {trained} (--v_parameterization "
            f"{'given' if cfg.v_parameterization else 'not given'}); the flag decides, as in sd-scripts: {advice} "
            f"if the model predicts {declared}"]
