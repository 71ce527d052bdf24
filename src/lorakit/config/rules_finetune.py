"""Checks of the whole-model training options and of the fused optimizer steps (any command), with the
deprecated spellings sd-scripts still maps. Family-dependent ones (`--block_lr` is SDXL's, `--num_last_block_to_
freeze` SD3's) are `training/finetune_setup.py`'s, still before the model loads."""

from __future__ import annotations

from typing import Any

from lorakit.config.schema_finetune import block_lr_values


def model_training_problems(cfg: Any) -> list[str]:
    """Every problem of the fused-step options and, for `lorakit finetune`/`dreambooth`, of its own options."""
    problems = _fused_problems(cfg)
    if not cfg.trains_model_weights:
        return problems
    if cfg.fp8_base or cfg.fp8_base_unet:
        problems.append("--fp8_base/--fp8_base_unet: the trained weights cannot be stored in float8; remove it")
    if cfg.train_t5xxl and not cfg.train_text_encoder and cfg.command == "finetune":
        problems.append("--train_t5xxl trains T5-XXL with the other text encoders: add --train_text_encoder")
    if cfg.block_lr is not None:
        try:
            block_lr_values(cfg.block_lr)
        except ValueError as error:
            problems.append(str(error))
    if cfg.ema_update_every != 1 and cfg.ema_decay is None:
        problems.append("--ema_update_every needs --ema_decay (the EMA is off without it)")
    return problems


def _fused_problems(cfg: Any) -> list[str]:
    chosen = [f"--{name}" for name in ("fused_backward_pass", "blockwise_fused_optimizers", "fused_optimizer_groups")
              if getattr(cfg, name, None)]
    if len(chosen) > 1:
        return [f"{' and '.join(chosen)} exclude each other: each steps the optimizer during the backward pass its own way"]
    if not chosen or chosen[0] == "--fused_backward_pass":
        return []  # --fused_backward_pass's own rules (Adafactor, no accumulation) are in rules.py
    problems = []
    if cfg.gradient_accumulation_steps != 1:
        problems.append(f"{chosen[0]} steps each block as its gradients are ready: it needs --gradient_accumulation_steps 1")
    name = (cfg.optimizer_type or "AdamW").strip()
    if name.lower().endswith("schedulefree") or name.lower().startswith(("dadapt", "prodigy")):
        problems.append(f"{chosen[0]} with --optimizer_type {name}: its step size is estimated over all parameters "
                        "together, so it cannot step block by block; use AdamW, Adafactor, Lion or another per-parameter optimizer")
    return problems


def model_training_warnings(cfg: Any) -> list[str]:
    """Deprecated options mapped as sd-scripts maps them, and options that change nothing here."""
    warnings = []
    if cfg.skip_latents_validity_check and not cfg.skip_cache_check:
        cfg.skip_cache_check = True
        warnings.append("--skip_latents_validity_check is deprecated; it is taken as --skip_cache_check")
    if cfg.diffusers_xformers:
        warnings.append("--diffusers_xformers: lorakit uses PyTorch SDPA attention instead; training continues")
    if cfg.command == "finetune" and cfg.stop_text_encoder_training not in (None, -1) and not cfg.train_text_encoder:
        warnings.append("--stop_text_encoder_training without --train_text_encoder: the text encoder is not trained at all")
    return warnings

