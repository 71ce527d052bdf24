"""What the training types share before anything loads: which options belong to which type.

Every command parses the same `TrainConfig`, so an option of another training type (say `--token_string` given to
`lorakit train`) would otherwise be accepted and do nothing; each type names such options as problems.
"""

from __future__ import annotations

from typing import Any

from lorakit.config.schema_kinds import ControlNetOptions, TextualInversionOptions

#: the option sections only one training type reads, by the command that reads them
OWN_SECTIONS = {"textual-inversion": TextualInversionOptions, "controlnet": ControlNetOptions}


def foreign_option_problems(cfg: Any, command: str) -> list[str]:
    """Options of other training types set on `lorakit <command>`, one message each."""
    problems = []
    for owner, section in OWN_SECTIONS.items():
        if owner == command:
            continue
        for name, field in section.model_fields.items():
            if getattr(cfg, name, None) != field.get_default(call_default_factory=True):
                problems.append(f"--{name} belongs to `lorakit {owner}`; remove it from `lorakit {command}`")
    return problems
