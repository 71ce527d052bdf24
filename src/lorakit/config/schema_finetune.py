"""Options of whole-model training (`lorakit finetune`, `lorakit dreambooth`): sd-scripts' `fine_tune.py`,
`train_db.py`, `sdxl_train.py`, `sd3_train.py` and `flux_train.py` options, with their names, plus EMA.

The options shared with LoRA training (datasets, optimizers, saving, ...) live in the other sections. Which
options belong to which command is `command_problems`: a LoRA option given to `lorakit finetune` (or the other
way round) is an error naming the command that takes it, because it would silently do nothing.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from lorakit.config.schema_data import OptionSection

#: the commands that train the model's own weights; `lorakit train` trains an adapter network
MODEL_COMMANDS = ("finetune", "dreambooth")


class FinetuneOptions(OptionSection):
    SECTION: ClassVar[str] = "finetune"

    train_text_encoder: bool = Field(False, description="train the text encoder(s) too (CLIP-L and G for SD3)")
    learning_rate_te: float | None = Field(None, ge=0, description="text-encoder learning rate (default --learning_rate)")
    learning_rate_te1: float | None = Field(None, ge=0, description="LR of text encoder 1 (CLIP-L); 0 leaves it frozen")
    learning_rate_te2: float | None = Field(None, ge=0, description="LR of text encoder 2 (CLIP-G / bigG); 0 leaves it frozen")
    learning_rate_te3: float | None = Field(None, ge=0, description="[SD3] LR of T5-XXL; 0 leaves it frozen")
    stop_text_encoder_training: int | None = Field(
        None, ge=-1, description="step after which the text encoder stops training; -1: never trains (DreamBooth)")
    no_token_padding: bool = Field(False, description="[SD] train_db.py's; no effect there or here (a warning says so)")
    train_t5xxl: bool = Field(False, description="[SD3/FLUX] train T5-XXL too (with --train_text_encoder)")
    use_t5xxl_cache_only: bool = Field(False, description="[SD3] cache T5-XXL's outputs only; the CLIPs run every step")
    block_lr: str | None = Field(None, description="[SDXL] 23 comma-separated U-Net block learning rates (0 freezes a block)")
    num_last_block_to_freeze: int | None = Field(None, ge=0, description="[SD3] freeze the last N image-stream parameters of the MMDiT")
    blockwise_fused_optimizers: bool = Field(False, description="one optimizer step per block, during the backward pass")
    fused_optimizer_groups: int | None = Field(None, ge=1, description="N parameter groups each stepped during the backward pass")
    mem_eff_save: bool = Field(False, description="save tensor by tensor (lorakit always streams safetensors checkpoints)")
    diffusers_xformers: bool = Field(False, description="xformers attention in diffusers (lorakit uses PyTorch SDPA)")
    skip_latents_validity_check: bool = Field(False, description="deprecated spelling of --skip_cache_check")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="keep an exponential moving average of the trained weights with this decay (e.g. 0.9999)")
    ema_update_every: int = Field(1, ge=1, description="update the EMA every N optimizer steps")
    save_ema: Literal["alongside", "instead"] = Field(
        "alongside", description="with --ema_decay: 'alongside' writes NAME-ema.* beside each checkpoint, 'instead' "
        "writes the EMA weights in place of the trained ones")


#: options only `lorakit train` reads (an adapter network), refused by the whole-model commands
NETWORK_ONLY = (
    "network_module", "network_dim", "network_alpha", "network_dropout", "network_args", "network_weights",
    "dim_from_weights", "network_train_unet_only", "network_train_text_encoder_only", "unet_lr", "text_encoder_lr",
    "scale_weight_norms", "base_weights", "base_weights_multiplier", "save_format",
)
#: options of the whole-model scripts that are not `lorakit train`'s (`fused_backward_pass` is both)
MODEL_ONLY = tuple(name for name in FinetuneOptions.model_fields)


def command_problems(cfg: Any, command: str) -> list[str]:
    """Options given to a command that does not read them, each named with the command that does."""
    given = set(cfg.model_fields_set)
    if command in MODEL_COMMANDS:
        wrong = [name for name in NETWORK_ONLY if name in given]
        problems = [f"--{name} is an option of `lorakit train` (LoRA training); `lorakit {command}` trains the "
                    "model's own weights" for name in wrong]
        if "save_model_as" in given and cfg.save_model_as == "pt":
            problems.append("--save_model_as pt: a checkpoint is saved as safetensors, ckpt, diffusers or diffusers_safetensors")
        return problems
    wrong = [name for name in MODEL_ONLY if name in given]
    problems = [f"--{name} is an option of `lorakit finetune` (whole-model training), not of `lorakit {command}`" for name in wrong]
    if cfg.save_model_as in ("diffusers", "diffusers_safetensors"):
        problems.append(f"--save_model_as {cfg.save_model_as}: a LoRA is saved as safetensors, ckpt or pt")
    return problems


def block_lr_values(text: str) -> list[float]:
    """`--block_lr` as numbers (ValueError names the bad item)."""
    values = []
    for item in text.split(","):
        try:
            values.append(float(item))
        except ValueError:
            raise ValueError(f"--block_lr: {item.strip()!r} is not a number") from None
    return values
