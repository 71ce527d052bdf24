"""Option sections for logging, the base model and the dataset (sd-scripts inventory §2.1–2.3).

Names and defaults are sd-scripts'. Each section is a pydantic model; `TrainConfig` inherits all of them, so
the section a field belongs to is known (used for `--help` groups and `--output_config` tables).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lorakit.config.types import (
    MAX_TOKEN_LENGTHS,
    LogLevel,
    LogWith,
    ResizeInterpolation,
    parse_float_pair,
    parse_resolution,
)


class OptionSection(BaseModel):
    """Base of every option section: unknown names are errors, assignments are validated."""

    # allow_inf_nan=False: no option means anything with NaN or infinity (`--learning_rate nan` trained nothing)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    SECTION: ClassVar[str] = ""


class LoggingOptions(OptionSection):
    SECTION: ClassVar[str] = "logging"

    console_log_level: LogLevel | None = Field(None, description="console log level (default INFO)")
    console_log_file: str | None = Field(None, description="write the log to this file instead of stderr")
    console_log_simple: bool = Field(False, description="plain log format")
    logging_dir: str | None = Field(None, description="TensorBoard logs go to <logging_dir>/<log_prefix><time>")
    log_with: LogWith | None = Field(None, description="tensorboard, wandb or all")
    log_prefix: str | None = Field(None, description="prefix of the timestamped log folder")
    log_tracker_name: str | None = Field(None, description="tracker/project name")
    log_tracker_config: str | None = Field(None, description="TOML file of tracker init kwargs")
    wandb_run_name: str | None = Field(None, description="wandb run name")
    wandb_api_key: str | None = Field(None, description="wandb API key")
    log_config: bool = Field(False, description="log the options (without secrets and absolute paths)")


class ModelOptions(OptionSection):
    SECTION: ClassVar[str] = "model"

    pretrained_model_name_or_path: str | None = Field(None, description="base model: file or diffusers folder")
    v2: bool = Field(False, description="SD 2.x model")
    v_parameterization: bool = Field(False, description="v-prediction model")
    tokenizer_cache_dir: str | None = Field(None, description="folder to save/load tokenizers")
    vae: str | None = Field(None, description="replacement VAE")
    disable_mmap_load_safetensors: bool = Field(False, description="load safetensors without mmap")
    controlnet_model_name_or_path: str | None = Field(None, description="ControlNet model")


class DatasetOptions(OptionSection):
    SECTION: ClassVar[str] = "dataset"

    dataset_config: str | None = Field(None, description="dataset TOML/JSON ([general], [[datasets]])")
    train_data_dir: str | None = Field(None, description="folder of N_name image folders")
    reg_data_dir: str | None = Field(None, description="folder of N_name regularisation folders")
    in_json: str | None = Field(None, description="fine-tuning metadata JSON")
    dataset_repeats: int = Field(1, ge=0, description="repeats of the --in_json dataset (sd-scripts accepts 0; only --in_json datasets read it)")
    resolution: tuple[int, int] | None = Field(None, description="'SIZE' or 'WIDTH,HEIGHT'")
    train_batch_size: int = Field(1, ge=1, description="batch size per device")
    enable_bucket: bool = Field(False, description="aspect-ratio bucketing")
    min_bucket_reso: int = Field(256, ge=1, description="smallest bucket side")
    max_bucket_reso: int = Field(1024, ge=1, description="largest bucket side")
    bucket_reso_steps: int = Field(64, ge=1, description="bucket side granularity")
    bucket_no_upscale: bool = Field(False, description="per-image buckets, never upscale")
    resize_interpolation: ResizeInterpolation | None = Field(None, description="resize filter")
    caption_extension: str = Field(".caption", description="caption file extension")
    caption_extention: str | None = Field(None, description="legacy spelling of --caption_extension")
    caption_separator: str = Field(",", description="tag separator")
    shuffle_caption: bool = Field(False, description="shuffle tags")
    keep_tokens: int = Field(0, ge=0, description="keep the first N tags in place")
    keep_tokens_separator: str = Field("", description="marker between fixed and shuffled parts")
    secondary_separator: str | None = Field(None, description="replaced by caption_separator after shuffling")
    enable_wildcard: bool = Field(False, description="{a|b} wildcards and multi-line captions")
    caption_prefix: str | None = Field(None, description="text before every caption")
    caption_suffix: str | None = Field(None, description="text after every caption")
    # Caption and tag dropout rates are probabilities without rescaling, so 1.0 is a legal (if odd) value.
    caption_dropout_rate: float = Field(0.0, ge=0, le=1, description="probability of an empty caption")
    caption_dropout_every_n_epochs: int = Field(0, ge=0, description="drop all captions every N epochs")
    caption_tag_dropout_rate: float = Field(0.0, ge=0, le=1, description="per-tag drop probability")
    token_warmup_min: int = Field(1, ge=0, description="tags used at step 0 of token warm-up")
    token_warmup_step: float = Field(0, ge=0, description="step where all tags are used (<1: ratio)")
    color_aug: bool = Field(False, description="weak colour augmentation")
    flip_aug: bool = Field(False, description="random horizontal flips")
    random_crop: bool = Field(False, description="random instead of centre crop")
    face_crop_aug_range: tuple[float, float] | None = Field(None, description="'LOW,HIGH' face crop scale")
    alpha_mask: bool = Field(False, description="use the image alpha channel as loss mask")
    cache_info: bool = Field(False, description="cache caption and size information")
    cache_latents: bool = Field(False, description="encode images once and keep latents in memory")
    cache_latents_to_disk: bool = Field(False, description="cache latents to .npz files")
    vae_batch_size: int = Field(1, ge=1, description="VAE batch size for caching")
    skip_cache_check: bool = Field(False, description="do not validate existing caches")
    debug_dataset: bool = Field(False, description="show batches instead of training")
    dataset_class: str | None = Field(None, description="custom dataset class package.module.Class")
    max_token_length: int | None = Field(None, description="[SD/SDXL] 75, 150 or 225 prompt tokens")
    weighted_captions: bool = Field(False, description="(tag:1.3) attention weights in captions")
    prior_loss_weight: float = Field(1.0, ge=0, description="loss weight of regularisation images")
    conditioning_data_dir: str | None = Field(None, description="conditioning images folder")
    masked_loss: bool = Field(False, description="multiply the loss by conditioning masks")
    max_data_loader_n_workers: int = Field(8, ge=0, description="data loader worker processes")
    persistent_data_loader_workers: bool = Field(False, description="keep workers between epochs")

    @field_validator("resolution", mode="before")
    @classmethod
    def _parse_resolution(cls, value: Any) -> Any:
        return parse_resolution(value)

    @field_validator("face_crop_aug_range", mode="before")
    @classmethod
    def _parse_face_crop(cls, value: Any) -> Any:
        return parse_float_pair(value)

    @field_validator("max_token_length")
    @classmethod
    def _check_token_length(cls, value: int | None) -> int | None:
        if value is not None and value not in MAX_TOKEN_LENGTHS:
            raise ValueError(f"must be one of 75, 150, 225 (got {value})")
        return value
