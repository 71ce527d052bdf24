"""Option sections for the network, the optimizer and the training loop (sd-scripts inventory §2.4–2.6)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, field_validator

from lorakit.config.schema_data import OptionSection
from lorakit.config.types import LrScheduler, MixedPrecision, OffloadDevice, as_list, parse_steps_or_ratio


class NetworkOptions(OptionSection):
    SECTION: ClassVar[str] = "network"

    network_module: str | None = Field(None, description="network module, e.g. networks.lora")
    network_dim: int | None = Field(None, ge=1, description="LoRA rank (default 4)")
    network_alpha: float = Field(1.0, ge=0, description="LoRA alpha; scale = alpha / rank")
    # A dropout of 1 would divide by zero in the 1/(1-p) rescaling, hence the open upper bound.
    network_dropout: float | None = Field(None, ge=0, lt=1, description="dropout on the rank activations")
    network_args: list[str] | None = Field(None, description="key=value arguments for the network")
    network_weights: str | None = Field(None, description="initial LoRA weights")
    dim_from_weights: bool = Field(False, description="take ranks from --network_weights")
    network_train_unet_only: bool = Field(False, description="train only the U-Net/DiT LoRA")
    network_train_text_encoder_only: bool = Field(False, description="train only the text-encoder LoRA")
    unet_lr: float | None = Field(None, ge=0, description="U-Net/DiT learning rate (default --learning_rate)")
    text_encoder_lr: list[float] | None = Field(None, description="text-encoder learning rate(s)")
    scale_weight_norms: float | None = Field(None, gt=0, description="max-norm regularisation of the update")
    base_weights: list[str] | None = Field(None, description="LoRA files merged into the model first")
    base_weights_multiplier: list[float] | None = Field(None, description="multipliers of --base_weights")

    @field_validator("network_args", "base_weights", mode="before")
    @classmethod
    def _wrap_strings(cls, value: Any) -> Any:
        return as_list(value)

    @field_validator("text_encoder_lr", "base_weights_multiplier", mode="before")
    @classmethod
    def _wrap_numbers(cls, value: Any) -> Any:
        return as_list(value)

    @field_validator("text_encoder_lr")
    @classmethod
    def _non_negative_rates(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(rate < 0 for rate in value):
            raise ValueError(f"learning rates must be >= 0 (got {value})")
        return value


class OptimizerOptions(OptionSection):
    SECTION: ClassVar[str] = "optimizer"

    optimizer_type: str = Field("", description="optimizer name or module.Class (default AdamW)")
    optimizer_args: list[str] | None = Field(None, description="key=value optimizer arguments")
    learning_rate: float = Field(2.0e-6, ge=0, description="learning rate")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm; 0 disables")
    use_8bit_adam: bool = Field(False, description="legacy alias of --optimizer_type AdamW8bit")
    use_lion_optimizer: bool = Field(False, description="legacy alias of --optimizer_type Lion")
    lr_scheduler: LrScheduler = Field("constant", description="learning-rate schedule")
    lr_warmup_steps: int | float | str = Field(0, description="warm-up steps, ratio < 1 or 'N%'")
    lr_decay_steps: int | float | str = Field(0, description="decay steps, ratio < 1 or 'N%'")
    lr_scheduler_num_cycles: int = Field(1, ge=1, description="restarts of cosine_with_restarts")
    lr_scheduler_power: float = Field(1.0, description="power of the polynomial schedule")
    lr_scheduler_timescale: int | None = Field(None, ge=1, description="inverse_sqrt timescale")
    lr_scheduler_min_lr_ratio: float | None = Field(None, ge=0, le=1, description="minimum LR ratio")
    lr_scheduler_type: str = Field("", description="custom scheduler class")
    lr_scheduler_args: list[str] | None = Field(None, description="key=value scheduler arguments")
    fused_backward_pass: bool = Field(False, description="fused backward pass (Adafactor)")

    @field_validator("optimizer_args", "lr_scheduler_args", mode="before")
    @classmethod
    def _wrap_strings(cls, value: Any) -> Any:
        return as_list(value)

    @field_validator("lr_warmup_steps", "lr_decay_steps", mode="before")
    @classmethod
    def _steps_or_ratio(cls, value: Any) -> Any:
        return parse_steps_or_ratio(value)


class TrainingLoopOptions(OptionSection):
    SECTION: ClassVar[str] = "training"

    max_train_steps: int = Field(1600, ge=1, description="total optimizer steps")
    max_train_epochs: int | None = Field(None, ge=1, description="epochs (overrides --max_train_steps)")
    gradient_accumulation_steps: int = Field(1, ge=1, description="batches per optimizer step")
    gradient_checkpointing: bool = Field(False, description="activation checkpointing")
    mixed_precision: MixedPrecision = Field("no", description="no, fp16 or bf16")
    full_fp16: bool = Field(False, description="train the network in fp16")
    full_bf16: bool = Field(False, description="train the network in bf16")
    fp8_base: bool = Field(False, description="base model weights in float8")
    fp8_base_unet: bool = Field(False, description="float8 for the U-Net/DiT only")
    no_half_vae: bool = Field(False, description="keep the VAE in float32")
    seed: int | None = Field(None, description="random seed")
    xformers: bool = Field(False, description="xformers attention")
    sdpa: bool = Field(False, description="PyTorch scaled-dot-product attention")
    mem_eff_attn: bool = Field(False, description="memory-efficient attention")
    torch_compile: bool = Field(False, description="compile the model with torch.compile")
    dynamo_backend: str = Field("inductor", description="torch.compile backend")
    dynamo_mode: str | None = Field(None, description="torch.compile mode")
    dynamo_fullgraph: bool = Field(False, description="torch.compile fullgraph")
    dynamo_dynamic: bool = Field(False, description="torch.compile dynamic shapes")
    lowram: bool = Field(False, description="load models directly to the GPU")
    highvram: bool = Field(False, description="skip cache clearing during caching")
    clip_skip: int | None = Field(None, ge=1, description="[SD] use the n-th last text-encoder layer")
    ddp_timeout: int | None = Field(None, ge=1, description="DDP timeout in minutes")
    ddp_gradient_as_bucket_view: bool = Field(False, description="DDP gradient_as_bucket_view")
    ddp_static_graph: bool = Field(False, description="DDP static_graph")


class DeepSpeedOptions(OptionSection):
    SECTION: ClassVar[str] = "deepspeed"

    deepspeed: bool = Field(False, description="use DeepSpeed")
    zero_stage: int = Field(2, ge=0, le=3, description="ZeRO stage")
    offload_optimizer_device: OffloadDevice | None = Field(None, description="optimizer offload device")
    offload_optimizer_nvme_path: str | None = Field(None, description="optimizer NVMe offload path")
    offload_param_device: OffloadDevice | None = Field(None, description="parameter offload device")
    offload_param_nvme_path: str | None = Field(None, description="parameter NVMe offload path")
    zero3_init_flag: bool = Field(False, description="ZeRO-3 init")
    zero3_save_16bit_model: bool = Field(False, description="ZeRO-3 16-bit save")
    fp16_master_weights_and_gradients: bool = Field(False, description="fp16 master weights")


class ValidationOptions(OptionSection):
    SECTION: ClassVar[str] = "validation"

    validation_split: float = Field(0.0, ge=0, lt=1, description="fraction of images held out")
    validation_seed: int | None = Field(None, description="seed of the split and validation noise")
    validate_every_n_steps: int | None = Field(None, ge=1, description="validate every N steps")
    validate_every_n_epochs: int | None = Field(None, ge=1, description="validate every N epochs")
    max_validation_steps: int | None = Field(None, ge=1, description="cap on validation batches")
