"""`TrainConfig`: every option of sd-scripts' LoRA training path, typed, with sd-scripts' names and defaults.

The fields live in section models (schema_data, schema_train, schema_loss, schema_output, and each model family's
own `options.py`); this class joins them, adds the cross-field rules (rules.py) and helpers that turn raw option strings into values.

Constructing a `TrainConfig` directly raises pydantic's ValidationError for a bad field and ConfigError for
bad combinations; `build_config` (validate.py) turns both into one ConfigError with readable messages.
"""

from __future__ import annotations

from typing import Any

from pydantic import PrivateAttr, ValidationInfo, model_validator

from lorakit.config.rules import cross_field_problems
from lorakit.config.schema_data import DatasetOptions, LoggingOptions, ModelOptions, OptionSection
from lorakit.config.schema_finetune import MODEL_COMMANDS, FinetuneOptions
from lorakit.config.schema_kinds import ControlNetOptions, TextualInversionOptions
from lorakit.config.schema_loss import MemoryOptions, NoiseLossOptions, TextEncoderOptions
from lorakit.config.schema_output import LorakitOptions, MetadataOptions, SamplingOptions, SavingOptions
from lorakit.config.schema_train import (
    DeepSpeedOptions,
    NetworkOptions,
    OptimizerOptions,
    TrainingLoopOptions,
    ValidationOptions,
)
from lorakit.config.types import literal_or_string, split_key_values, steps_from
from lorakit.errors import ConfigError
from lorakit.families.registry import family_option_sections

class TrainConfig(
    ModelOptions,
    DatasetOptions,
    NetworkOptions,
    OptimizerOptions,
    TrainingLoopOptions,
    NoiseLossOptions,
    TextEncoderOptions,
    MemoryOptions,
    SavingOptions,
    SamplingOptions,
    MetadataOptions,
    ValidationOptions,
    DeepSpeedOptions,
    LoggingOptions,
    LorakitOptions,
    TextualInversionOptions,
    ControlNetOptions,
    FinetuneOptions,
    *family_option_sections(),
):
    """All options of `lorakit train` (see the section classes for the fields and their help); the model
    families add their own sections (`families/<name>/options.py`)."""

    #: the command the options were given to: `train` (an adapter network), `finetune` or `dreambooth`
    _command: str = PrivateAttr("train")

    @property
    def command(self) -> str:
        return self._command

    @property
    def trains_model_weights(self) -> bool:
        """The model's own weights train (a fine-tune): they load and stay in float32 unless --full_bf16/fp16."""
        return self._command in MODEL_COMMANDS

    @property
    def trains_text_encoder(self) -> bool:
        """Some text encoder trains: its outputs cannot be cached whole. For `lorakit train` a text-encoder
        LoRA (unless --network_train_unet_only); for `lorakit finetune` --train_text_encoder; for `lorakit
        dreambooth` (train_db.py) unless --stop_text_encoder_training -1."""
        if not self.trains_model_weights:
            return not self.network_train_unet_only
        if self._command == "dreambooth":
            return self.stop_text_encoder_training != -1
        return self.train_text_encoder and self.stop_text_encoder_training != -1

    def for_command(self, command: str) -> "TrainConfig":
        self._command = command
        return self

    @model_validator(mode="before")
    @classmethod
    def _legacy_caption_extention(cls, data: Any) -> Any:
        # sd-scripts: a set --caption_extention (old spelling) replaces --caption_extension.
        if isinstance(data, dict) and data.get("caption_extention") is not None:
            data = {**data, "caption_extension": data["caption_extention"]}
        return data

    @model_validator(mode="after")
    def _cross_field_rules(self, info: ValidationInfo) -> TrainConfig:
        context = info.context or {}
        problems = cross_field_problems(
            self,
            skip_fields=frozenset(context.get("skip_fields", ())),
            skip_requirements=bool(context.get("skip_requirements", False)),
        )
        if problems:
            # `check_options` asks for the problems to be collected so it still gets a config back.
            if "collected_problems" in context:
                context["collected_problems"].extend(problems)
            else:
                raise ConfigError(problems)
        return self

    def network_kwargs(self) -> dict[str, str]:
        """`--network_args` as a dict; values stay strings, as sd-scripts passes them to the network."""
        return split_key_values(self.network_args, "network_args")

    def optimizer_kwargs(self) -> dict[str, Any]:
        """`--optimizer_args` as keyword arguments; values are Python literals where they parse as one."""
        return {k: literal_or_string(v) for k, v in split_key_values(self.optimizer_args, "optimizer_args").items()}

    def lr_scheduler_kwargs(self) -> dict[str, Any]:
        """`--lr_scheduler_args` as keyword arguments, parsed like `optimizer_kwargs`."""
        raw = split_key_values(self.lr_scheduler_args, "lr_scheduler_args")
        return {k: literal_or_string(v) for k, v in raw.items()}

    def resolve_warmup_steps(self, total_steps: int) -> int:
        """Warm-up steps: `lr_warmup_steps` as given, or its ratio/percentage of `total_steps`."""
        return steps_from(self.lr_warmup_steps, total_steps)

    def resolve_decay_steps(self, total_steps: int) -> int:
        """Decay steps of warmup_stable_decay, resolved like `resolve_warmup_steps`."""
        return steps_from(self.lr_decay_steps, total_steps)

    def non_default_options(self) -> dict[str, Any]:
        """The options whose value differs from the default (what `--output_config` writes)."""
        return {
            name: getattr(self, name)
            for name, field in type(self).model_fields.items()
            if getattr(self, name) != field.get_default(call_default_factory=True)
        }


#: Sections in the order they are shown in `--help` and written by `--output_config`.
SECTIONS: tuple[type[OptionSection], ...] = TrainConfig.__bases__


def section_of(name: str) -> str:
    """The section a field belongs to (e.g. "network" for network_dim)."""
    for section in SECTIONS:
        if name in section.model_fields:
            return section.SECTION
    raise KeyError(name)
