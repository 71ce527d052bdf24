"""Rules that involve several options: the one place that lists which combinations are errors or warnings.

Each rule names the options it reads. When one of those options already failed its own validation, the rule
is skipped, so a bad value gives one message instead of a cascade. A rule returns a message (or a list of
messages) when the combination is wrong, otherwise None.

Rules marked `requirement=True` say that an input needed to *train* is missing. They are skipped when the
options are only being written out (`--output_config`), since a partial config file is a legitimate thing
to write.

Errors:
  * pretrained_model_name_or_path, a data source, resolution (without dataset_config), output_dir are required
  * network_train_unet_only excludes network_train_text_encoder_only
  * full_fp16 needs mixed_precision fp16; full_bf16 needs bf16; not both
  * fp8_base / fp8_base_unet need mixed precision; base_quant other than fp8 excludes them
  * v_pred_like_loss excludes v_parameterization; scale_v_pred_loss_like_noise_pred needs it
  * adaptive_noise_scale needs noise_offset
  * cache_latents (or _to_disk) excludes color_aug and random_crop
  * cache_text_encoder_outputs (or _to_disk) excludes captions that change per step (shuffle, dropout, warm-up,
    wildcards) given on the command line; dataset-file subsets are checked when the dataset is built
  * min_bucket_reso <= max_bucket_reso, and the resolution must fit between them when bucketing
  * min_timestep < max_timestep
  * use_8bit_adam / use_lion_optimizer exclude each other and optimizer_type
  * fused_backward_pass needs Adafactor and gradient_accumulation_steps 1
  * warm-up is not possible with lr_scheduler constant/adafactor or with lr_scheduler_type
  * the adafactor scheduler needs the Adafactor optimizer; cosine_with_min_lr needs lr_scheduler_min_lr_ratio
  * log_with tensorboard/all needs logging_dir
  * network_args / optimizer_args / lr_scheduler_args items are key=value; known network_args keys are numbers
  * base_weights_multiplier has one value per base_weights file
  * blocks_to_swap excludes cpu_offload_checkpointing
  * output_config needs config_file; initial_step below max_train_steps
Warnings: dataset_config overrides the folder options; zero_terminal_snr without v-parameterisation;
v2 with clip_skip; secrets given as options; *_to_disk caches imply the in-memory cache; sampling frequencies <= 0 disable sampling.

Rules that depend on the model family (the bucket step, --v2, options a family ignores) are the family's own
(`ModelFamily.option_problems` / `option_warnings`); they run with these when --family is given, and once the
family is detected otherwise, still before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from lorakit.config.schema import TrainConfig

Check = Callable[["TrainConfig"], "str | list[str] | None"]


@dataclass(frozen=True)
class Rule:
    """A check over several options; `fields` are the options it reads."""

    fields: tuple[str, ...]
    check: Check
    requirement: bool = False


ERROR_RULES: list[Rule] = []
WARNING_RULES: list[Rule] = []


def _error(*fields: str, requirement: bool = False) -> Callable[[Check], Check]:
    def register(check: Check) -> Check:
        ERROR_RULES.append(Rule(fields, check, requirement))
        return check

    return register


def _warning(*fields: str) -> Callable[[Check], Check]:
    def register(check: Check) -> Check:
        WARNING_RULES.append(Rule(fields, check))
        return check

    return register


def _run(rules: list[Rule], cfg: TrainConfig, skip_fields: frozenset[str], skip_requirements: bool) -> list[str]:
    messages: list[str] = []
    for rule in rules:
        if skip_fields.intersection(rule.fields) or (skip_requirements and rule.requirement):
            continue
        found = rule.check(cfg)
        if isinstance(found, str):
            messages.append(found)
        elif found:
            messages.extend(found)
    return messages


def cross_field_problems(
    cfg: TrainConfig, skip_fields: frozenset[str] = frozenset(), skip_requirements: bool = False
) -> list[str]:
    """Every error rule that fails, in the order of this file."""
    return _run(ERROR_RULES, cfg, skip_fields, skip_requirements)


def cross_field_warnings(cfg: TrainConfig) -> list[str]:
    """Every warning rule that applies."""
    return _run(WARNING_RULES, cfg, frozenset(), False)


# --- required inputs -------------------------------------------------------------------------------------


@_error("pretrained_model_name_or_path", requirement=True)
def _model_given(c: TrainConfig) -> str | None:
    if not c.pretrained_model_name_or_path:
        return "--pretrained_model_name_or_path is required: the base model file or diffusers folder"
    return None


@_error("train_data_dir", "dataset_config", "in_json", "dataset_class", requirement=True)
def _data_given(c: TrainConfig) -> str | None:
    if not (c.train_data_dir or c.dataset_config or c.in_json or c.dataset_class):
        return "no training data: give --train_data_dir, --dataset_config, --in_json or --dataset_class"
    return None


@_error("resolution", "dataset_config", requirement=True)
def _resolution_given(c: TrainConfig) -> str | None:
    if c.resolution is None and not c.dataset_config:
        return "--resolution is required when no --dataset_config gives it (e.g. --resolution 512 or 768,512)"
    return None


@_error("output_dir", "dry_run", requirement=True)
def _output_dir_given(c: TrainConfig) -> str | None:
    if not c.output_dir and not c.dry_run:
        return "--output_dir is required (the folder for the trained LoRA files)"
    return None


# --- combinations ----------------------------------------------------------------------------------------


@_error("network_train_unet_only", "network_train_text_encoder_only")
def _unet_only_vs_te_only(c: TrainConfig) -> str | None:
    if c.network_train_unet_only and c.network_train_text_encoder_only:
        return "--network_train_unet_only and --network_train_text_encoder_only exclude each other (nothing to train)"
    return None


@_error("full_fp16", "full_bf16", "mixed_precision")
def _full_precision(c: TrainConfig) -> list[str]:
    problems = []
    if c.full_fp16 and c.full_bf16:
        problems.append("--full_fp16 and --full_bf16 exclude each other")
    if c.full_fp16 and c.mixed_precision != "fp16":
        problems.append(f"--full_fp16 requires --mixed_precision fp16 (got {c.mixed_precision!r})")
    if c.full_bf16 and c.mixed_precision != "bf16":
        problems.append(f"--full_bf16 requires --mixed_precision bf16 (got {c.mixed_precision!r})")
    return problems


@_error("fp8_base", "fp8_base_unet", "mixed_precision")
def _fp8_needs_mixed_precision(c: TrainConfig) -> str | None:
    if (c.fp8_base or c.fp8_base_unet) and c.mixed_precision == "no":
        flag = "--fp8_base" if c.fp8_base else "--fp8_base_unet"
        return f"{flag} requires --mixed_precision fp16 or bf16"
    return None


@_error("base_quant", "fp8_base", "fp8_base_unet")
def _one_base_quantization(c: TrainConfig) -> str | None:
    if c.base_quant not in (None, "fp8") and (c.fp8_base or c.fp8_base_unet):
        flag = "--fp8_base" if c.fp8_base else "--fp8_base_unet"
        return f"--base_quant {c.base_quant} and {flag} exclude each other ({flag} is --base_quant fp8)"
    return None


@_error("v_pred_like_loss", "scale_v_pred_loss_like_noise_pred", "v_parameterization")
def _v_prediction_losses(c: TrainConfig) -> list[str]:
    problems = []
    if c.v_pred_like_loss and c.v_parameterization:
        problems.append("--v_pred_like_loss cannot be used with --v_parameterization (the model already predicts v)")
    if c.scale_v_pred_loss_like_noise_pred and not c.v_parameterization:
        problems.append("--scale_v_pred_loss_like_noise_pred requires --v_parameterization")
    return problems


@_error("adaptive_noise_scale", "noise_offset")
def _adaptive_noise_needs_offset(c: TrainConfig) -> str | None:
    if c.adaptive_noise_scale is not None and c.noise_offset is None:
        return "--adaptive_noise_scale requires --noise_offset"
    return None


@_error("cache_latents", "cache_latents_to_disk", "color_aug", "random_crop")
def _latent_cache_vs_augmentation(c: TrainConfig) -> str | None:
    if not (c.cache_latents or c.cache_latents_to_disk):
        return None
    blocking = [f"--{name}" for name in ("color_aug", "random_crop") if getattr(c, name)]
    if blocking:
        flag = "--cache_latents_to_disk" if c.cache_latents_to_disk else "--cache_latents"
        return f"{flag} cannot be used with {' or '.join(blocking)} (cached latents cannot change per epoch)"
    return None


@_error("cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk", "shuffle_caption", "caption_dropout_rate",
        "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "token_warmup_step", "enable_wildcard")
def _text_cache_vs_varying_captions(c: TrainConfig) -> str | None:
    if not (c.cache_text_encoder_outputs or c.cache_text_encoder_outputs_to_disk):
        return None
    varying = [f"--{name}" for name in ("shuffle_caption", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                                        "caption_tag_dropout_rate", "token_warmup_step", "enable_wildcard")
               if getattr(c, name)]
    if varying:
        flag = "--cache_text_encoder_outputs_to_disk" if c.cache_text_encoder_outputs_to_disk else "--cache_text_encoder_outputs"
        return f"{flag} cannot be used with {', '.join(varying)} (a cached caption encoding cannot change per step)"
    return None


@_error("min_bucket_reso", "max_bucket_reso", "resolution", "enable_bucket", "bucket_no_upscale", "dataset_config")
def _bucket_limits(c: TrainConfig) -> list[str]:
    problems = []
    if c.min_bucket_reso > c.max_bucket_reso:
        problems.append(
            f"--min_bucket_reso ({c.min_bucket_reso}) must not exceed --max_bucket_reso ({c.max_bucket_reso})"
        )
    # A resolution outside the bucket range is the dataset builder's check (data/build.py): it sees the
    # dataset config's own resolutions and the limits rounded to the bucket step, and runs in the same preflight
    return problems


@_error("min_timestep", "max_timestep")
def _timestep_range(c: TrainConfig) -> str | None:
    low = 0 if c.min_timestep is None else c.min_timestep
    high = 1000 if c.max_timestep is None else c.max_timestep
    if low >= high:
        return f"--min_timestep ({low}) must be smaller than --max_timestep ({high})"
    return None


@_error("use_8bit_adam", "use_lion_optimizer", "optimizer_type")
def _legacy_optimizer_flags(c: TrainConfig) -> str | None:
    legacy = [f"--{n}" for n in ("use_8bit_adam", "use_lion_optimizer") if getattr(c, n)]
    if len(legacy) == 2:
        return "--use_8bit_adam and --use_lion_optimizer exclude each other"
    if legacy and c.optimizer_type:
        return f"{legacy[0]} cannot be combined with --optimizer_type; use --optimizer_type alone"
    return None


@_error("fused_backward_pass", "optimizer_type", "gradient_accumulation_steps")
def _fused_backward(c: TrainConfig) -> list[str]:
    if not c.fused_backward_pass:
        return []
    problems = []
    if c.optimizer_type.lower() != "adafactor":
        problems.append("--fused_backward_pass requires --optimizer_type Adafactor")
    if c.gradient_accumulation_steps != 1:
        problems.append("--fused_backward_pass requires --gradient_accumulation_steps 1")
    return problems


@_error("lr_warmup_steps", "lr_scheduler", "lr_scheduler_type")
def _warmup_allowed(c: TrainConfig) -> str | None:
    warmup = c.lr_warmup_steps
    if (float(warmup.rstrip("%")) if isinstance(warmup, str) else warmup) == 0:
        return None
    if c.lr_scheduler_type:
        return "--lr_warmup_steps cannot be used with a custom --lr_scheduler_type"
    if c.lr_scheduler in ("constant", "adafactor"):
        return (
            f"--lr_warmup_steps needs a schedule with warm-up; --lr_scheduler {c.lr_scheduler} has none "
            "(use constant_with_warmup)"
        )
    return None


@_error("lr_scheduler", "optimizer_type", "lr_scheduler_min_lr_ratio")
def _scheduler_requirements(c: TrainConfig) -> str | None:
    if c.lr_scheduler == "adafactor" and c.optimizer_type.lower() != "adafactor":
        return "--lr_scheduler adafactor requires --optimizer_type Adafactor"
    if c.lr_scheduler == "cosine_with_min_lr" and c.lr_scheduler_min_lr_ratio is None:
        return "--lr_scheduler cosine_with_min_lr requires --lr_scheduler_min_lr_ratio"
    return None


@_error("log_with", "logging_dir")
def _tensorboard_needs_dir(c: TrainConfig) -> str | None:
    if c.log_with in ("tensorboard", "all") and not c.logging_dir:
        return f"--log_with {c.log_with} requires --logging_dir"
    return None


_NETWORK_NUMBER_KEYS = {"conv_dim": (int, 0, None), "conv_alpha": (float, 0, None)}
_NETWORK_DROPOUT_KEYS = ("rank_dropout", "module_dropout")


def _check_network_value(key: str, raw: str) -> str | None:
    if key in _NETWORK_DROPOUT_KEYS:
        try:
            rate = float(raw)
        except ValueError:
            return f"--network_args: {key} must be a number (got {raw!r})"
        return None if 0 <= rate < 1 else f"--network_args: {key} must be in [0, 1) (got {raw})"
    kind, low, _ = _NETWORK_NUMBER_KEYS[key]
    try:
        number = kind(raw)
    except ValueError:
        return f"--network_args: {key} must be {'an integer' if kind is int else 'a number'} (got {raw!r})"
    return None if number >= low else f"--network_args: {key} must be >= {low} (got {raw})"


@_error("network_args")
def _network_args_form(c: TrainConfig) -> list[str]:
    try:
        kwargs = c.network_kwargs()
    except ConfigError as error:
        return error.problems
    checked = set(_NETWORK_NUMBER_KEYS) | set(_NETWORK_DROPOUT_KEYS)
    found = (_check_network_value(k, v) for k, v in kwargs.items() if k in checked)
    return [message for message in found if message]


@_error("optimizer_args", "lr_scheduler_args")
def _key_value_lists(c: TrainConfig) -> list[str]:
    problems = []
    for parse in (c.optimizer_kwargs, c.lr_scheduler_kwargs):
        try:
            parse()
        except ConfigError as error:
            problems.extend(error.problems)
    return problems


@_error("base_weights", "base_weights_multiplier")
def _base_weight_multipliers(c: TrainConfig) -> str | None:
    if c.base_weights_multiplier is None:
        return None
    files = len(c.base_weights or [])
    if len(c.base_weights_multiplier) != files:
        given = len(c.base_weights_multiplier)
        return f"--base_weights_multiplier needs one value per --base_weights file ({files}), got {given}"
    return None


@_error("blocks_to_swap", "cpu_offload_checkpointing")
def _swap_vs_offload(c: TrainConfig) -> str | None:
    if c.blocks_to_swap and c.cpu_offload_checkpointing:
        return "--blocks_to_swap and --cpu_offload_checkpointing exclude each other"
    return None


@_error("output_config", "config_file")
def _output_config_target(c: TrainConfig) -> str | None:
    if c.output_config and not c.config_file:
        return "--output_config writes to the --config_file path; give --config_file"
    return None


@_error("initial_step", "max_train_steps", "max_train_epochs")
def _initial_step_in_range(c: TrainConfig) -> str | None:
    if c.initial_step is not None and c.max_train_epochs is None and c.initial_step >= c.max_train_steps:
        return f"--initial_step ({c.initial_step}) must be smaller than --max_train_steps ({c.max_train_steps})"
    return None


# --- warnings --------------------------------------------------------------------------------------------


@_warning("dataset_config", "train_data_dir", "reg_data_dir", "in_json")
def _dataset_config_overrides(c: TrainConfig) -> str | None:
    ignored = [f"--{n}" for n in ("train_data_dir", "reg_data_dir", "in_json") if getattr(c, n)]
    if c.dataset_config and ignored and not c.dataset_class:
        return f"--dataset_config is given, so {', '.join(ignored)} is ignored"
    return None


@_warning("dataset_class", "dataset_config", "train_data_dir", "reg_data_dir", "in_json")
def _dataset_class_overrides(c: TrainConfig) -> str | None:
    ignored = [f"--{n}" for n in ("dataset_config", "train_data_dir", "reg_data_dir", "in_json") if getattr(c, n)]
    if c.dataset_class and ignored:
        return f"--dataset_class is given, so {', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored"
    return None


@_warning("zero_terminal_snr", "v_parameterization")
def _zero_snr_without_v(c: TrainConfig) -> str | None:
    if c.zero_terminal_snr and not c.v_parameterization:
        return "--zero_terminal_snr is meant for v-prediction; --v_parameterization is not set"
    return None


@_warning("v2", "clip_skip")
def _v2_clip_skip(c: TrainConfig) -> str | None:
    if c.v2 and c.clip_skip is not None:
        return "--clip_skip with --v2: SD 2.x models were not trained with clip skip"
    return None


@_warning("wandb_api_key", "huggingface_token")
def _secrets_on_the_command_line(c: TrainConfig) -> list[str]:
    from lorakit.training.trackers import secret_warnings

    return secret_warnings(c)


@_warning("cache_latents_to_disk", "cache_text_encoder_outputs_to_disk")
def _disk_cache_implies_memory(c: TrainConfig) -> list[str]:
    messages = []
    if c.cache_latents_to_disk and not c.cache_latents:
        messages.append("--cache_latents_to_disk turns on --cache_latents")
    if c.cache_text_encoder_outputs_to_disk and not c.cache_text_encoder_outputs:
        messages.append("--cache_text_encoder_outputs_to_disk turns on --cache_text_encoder_outputs")
    return messages


@_warning("sample_every_n_steps", "sample_every_n_epochs")
def _sampling_disabled(c: TrainConfig) -> list[str]:
    names = ("sample_every_n_steps", "sample_every_n_epochs")
    return [f"--{n} <= 0 disables sampling" for n in names if getattr(c, n) is not None and getattr(c, n) <= 0]
