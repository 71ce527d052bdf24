"""Which options lorakit implements today, and what it says about the ones it only recognises.

Every option name of sd-scripts is accepted by the parser, so a command line never fails on spelling alone.
An option set to a non-default value must then be either implemented, a known fallback (warning), without
effect here (silently accepted), or listed in `UNSUPPORTED` (error with a message). When a feature lands,
delete its names from `UNSUPPORTED` and add them to `IMPLEMENTED`; tests check that every field is in
exactly one of these tables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from lorakit.config.schema import TrainConfig

_REMOVE = "remove it to train without it"

#: Hints for options sd-scripts has, for as long as lorakit lacks them. `UNSUPPORTED` (below) is this table minus
#: `IMPLEMENTED`, so landing a feature means adding its names to `IMPLEMENTED` and nothing else.
_HINTS: dict[str, str] = {}

#: Options that select something lorakit does differently, or that do nothing in LoRA training (in sd-scripts
#: either); training continues with this warning.
FALLBACKS: dict[str, str] = {
    "xformers": "--xformers: lorakit uses PyTorch SDPA attention instead; training continues",
    "mem_eff_attn": "--mem_eff_attn: lorakit uses PyTorch SDPA attention instead; training continues",
    "fused_backward_pass": "--fused_backward_pass applies to full fine-tuning only; LoRA training runs without it, "
                           "as sd-scripts' train_network does (its Adafactor and accumulation checks still apply)",
    "controlnet_model_name_or_path": "--controlnet_model_name_or_path is read by ControlNet training only; LoRA "
                                     "training ignores it, as sd-scripts' train_network does",
    "no_token_padding": "--no_token_padding has no effect: sd-scripts' train_db.py accepts it but no longer reads it "
                        "(its dataset code for it is switched off); captions are padded to 77 tokens as there",
}

#: the commands that read an option FALLBACKS names as unread by LoRA training
FALLBACK_READERS: dict[str, tuple[str, ...]] = {
    "fused_backward_pass": ("finetune", "dreambooth"),
    "controlnet_model_name_or_path": ("controlnet",),
}

#: Options that tune sd-scripts' loading; lorakit's loading needs no such switch, so they are accepted silently.
NO_EFFECT: frozenset[str] = frozenset({"lowram", "highvram", "disable_mmap_load_safetensors"})


#: Network modules lorakit builds (adapters/factory.py); each family module checks its own --network_args.
NETWORK_MODULES_DONE = (
    "networks.lora", "networks.lora_flux", "networks.lora_sd3", "networks.lora_fa", "networks.dylora", "networks.oft", "networks.oft_flux",
    "lycoris.kohya",
)


def _family_network_modules() -> tuple[str, ...]:
    """The network modules the registered families name as their own (imported only when a module is not in
    NETWORK_MODULES_DONE, so parsing the usual options imports no model code)."""
    from lorakit.families.registry import family_class, family_names

    modules = (m for name in family_names() for cls in [family_class(name)] for m in (*cls.lora_network_modules, *cls.oft_network_modules))
    return tuple(dict.fromkeys(m for m in modules if m not in NETWORK_MODULES_DONE))


def _network_module(value: Any) -> str | None:
    if value is None or value in NETWORK_MODULES_DONE or value in _family_network_modules():
        return None
    # sd-scripts imports any module with create_network; such a module builds on sd-scripts' own model classes,
    # which lorakit does not have, so only the modules lorakit builds itself can be named
    return (
        f"--network_module {value}: not a network module lorakit builds (a module written for sd-scripts' model "
        f"classes cannot run on lorakit's); use one of {', '.join(NETWORK_MODULES_DONE + _family_network_modules())}"
    )


_NETWORK_KEYS_DONE = (
    "conv_dim", "conv_alpha", "rank_dropout", "module_dropout",
    # DoRA (adapters/dora.py)
    "dora_wd", "wd_on_output",
    # block-wise ranks and learning rates (adapters/blocks.py), LoRA+, module listing
    "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight", "mid_lr_weight",
    "up_lr_weight", "block_lr_zero_threshold", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio", "verbose",
)


def generic_lora_keys() -> frozenset[str]:
    """The --network_args keys `networks.lora` reads on every family."""
    return frozenset(_NETWORK_KEYS_DONE)


def _family_lora_keys() -> frozenset[str]:
    """The keys some family's LoRA module reads (`networks.lora` is the family's own LoRA module: FLUX's
    `train_t5xxl`, SD3's `emb_dims`, ...); the family, known later, refuses those it does not read."""
    from lorakit.families.registry import all_families

    return frozenset(key for family in all_families() for key in family.family_arg_keys("networks.lora") or ())


def _network_args(cfg: TrainConfig) -> list[str]:
    if cfg.network_module not in (None, "networks.lora"):
        return []  # other modules validate their own keys (e.g. families/flux/network_args.py)
    try:
        keys = cfg.network_kwargs()
    except ConfigError:
        return []  # malformed items are reported by the cross-field rules
    known = generic_lora_keys() | _family_lora_keys()
    # sd-scripts' networks.lora ignores a key it does not read; stopping keeps a misspelt key from being lost
    return [
        f"--network_args {key}: not a key of networks.lora{_did_you_mean(key, known)}; its keys: "
        f"{', '.join(_NETWORK_KEYS_DONE)} (and the family's own, e.g. train_t5xxl)"
        for key in keys
        if key not in known
    ]


def _did_you_mean(key: str, known: frozenset[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.7)
    return f" (did you mean {close[0]}?)" if close else ""


#: Implemented options whose values are only partly supported: option -> check of the value.
PARTIAL: dict[str, Callable[[Any], str | None]] = {
    "network_module": _network_module,
}

#: Options implemented in full (plus those in PARTIAL, whose values are checked).
IMPLEMENTED: frozenset[str] = frozenset(
    {
        "pretrained_model_name_or_path", "v2", "v_parameterization", "vae", "family",
        "train_data_dir", "reg_data_dir", "dataset_config", "resolution", "train_batch_size", "enable_bucket",
        "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale", "caption_extension",
        "caption_extention", "cache_latents", "vae_batch_size", "prior_loss_weight", "max_data_loader_n_workers",
        "persistent_data_loader_workers",
        # examples from a class of the user's own (data/dataset_class.py)
        "dataset_class",
        # validation loss (data/holdout.py, training/validation.py)
        "validation_split", "validation_seed", "validate_every_n_steps", "validate_every_n_epochs",
        "max_validation_steps",
        # LoRA files read besides the run's own (training/network_files.py)
        "dim_from_weights", "base_weights", "base_weights_multiplier",
        # long and weighted captions of CLIP encoders (families/common/clip_prompts.py)
        "max_token_length", "weighted_captions",
        "network_module", "network_dim", "network_alpha", "network_dropout", "network_args", "network_weights",
        "network_train_unet_only", "network_train_text_encoder_only", "unet_lr", "text_encoder_lr",
        "optimizer_type", "optimizer_args", "learning_rate", "max_grad_norm", "lr_scheduler", "lr_warmup_steps",
        "max_train_steps", "max_train_epochs", "gradient_accumulation_steps", "gradient_checkpointing",
        "mixed_precision", "seed", "clip_skip", "sdpa",
        "output_dir", "output_name", "save_model_as", "save_precision", "save_every_n_epochs", "save_every_n_steps",
        "training_comment", "no_metadata", "metadata_title", "metadata_author", "metadata_description",
        "metadata_license", "metadata_tags", "metadata_usage_hint", "metadata_thumbnail", "metadata_merged_from",
        "metadata_trigger_phrase", "metadata_preprocessor", "metadata_is_negative_embedding",
        "logging_dir", "log_with", "log_prefix", "console_log_level", "log_tracker_name", "log_tracker_config",
        "dry_run", "config_file", "output_config", "tokenizer_cache_dir",
        # noise and loss (objectives/noise.py, objectives/losses.py)
        "noise_offset", "noise_offset_random_strength", "adaptive_noise_scale", "multires_noise_iterations",
        "multires_noise_discount", "ip_noise_gamma", "ip_noise_gamma_random_strength", "zero_terminal_snr",
        "min_timestep", "max_timestep", "min_snr_gamma", "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss",
        "debiased_estimation_loss", "loss_type", "huber_schedule", "huber_c", "huber_scale",
        # optimizers and schedules (training/optim.py, training/schedulers.py)
        "use_8bit_adam", "use_lion_optimizer", "lr_decay_steps", "lr_scheduler_num_cycles", "lr_scheduler_power",
        "lr_scheduler_timescale", "lr_scheduler_min_lr_ratio", "lr_scheduler_type", "lr_scheduler_args",
        # datasets (data/)
        "in_json", "dataset_repeats", "resize_interpolation", "caption_separator", "shuffle_caption", "keep_tokens",
        "keep_tokens_separator", "secondary_separator", "enable_wildcard", "caption_prefix", "caption_suffix",
        "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "token_warmup_min",
        "token_warmup_step", "color_aug", "flip_aug", "random_crop", "face_crop_aug_range", "alpha_mask", "cache_info",
        "skip_cache_check", "conditioning_data_dir", "masked_loss", "cache_latents_to_disk",
        # network extras, saving, resume and sampling (training/loop.py, training/state.py, sampling/)
        "scale_weight_norms", "save_n_epoch_ratio", "save_last_n_epochs", "save_last_n_steps", "save_state",
        "save_state_on_train_end", "save_last_n_epochs_state", "save_last_n_steps_state", "resume",
        "initial_epoch", "initial_step", "skip_until_initial_step", "sample_prompts", "sample_every_n_steps",
        "sample_every_n_epochs", "sample_at_first", "sample_sampler",
        # SDXL (families/sdxl/)
        "no_half_vae", "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk", "text_encoder_batch_size",
        # flow-matching models, fp8 and block swap (objectives/flow.py, families/common/)
        "fp8_base", "fp8_base_unet", "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "timestep_sampling",
        "sigmoid_scale", "discrete_flow_shift", "model_prediction_type", "blocks_to_swap", "cpu_offload_checkpointing",
        # quantized frozen weights, compiled blocks and the memory planner (families/common/quant.py, training/memory_plan.py)
        "base_quant", "compile", "vram_budget", "torch_compile", "dynamo_backend", "dynamo_mode", "dynamo_fullgraph",
        "dynamo_dynamic",
        "save_format",
        # several processes (training/distributed.py)
        "ddp_timeout", "ddp_gradient_as_bucket_view", "ddp_static_graph",
        # DeepSpeed through accelerate's plugin (training/distributed.py; the package is checked at start-up)
        "deepspeed", "zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path", "offload_param_device",
        "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model", "fp16_master_weights_and_gradients",
        # logging and precision (cli/main.py, training/trackers.py, training/run.py)
        "console_log_file", "console_log_simple", "log_config", "wandb_run_name", "wandb_api_key", "full_fp16",
        "full_bf16",
        # the batches printed and written instead of training (training/debug_dataset.py)
        "debug_dataset",
        # Hugging Face Hub uploads and resume (training/hub.py)
        "huggingface_repo_id", "huggingface_repo_type", "huggingface_path_in_repo", "huggingface_token",
        "huggingface_repo_visibility", "save_state_to_huggingface", "resume_from_huggingface", "async_upload",
        # torch.compile of the denoiser (training/setup.py)
        "torch_compile", "dynamo_backend", "dynamo_mode", "dynamo_fullgraph", "dynamo_dynamic",
        # images decoded at start-up (data/verify.py)
        "skip_bad_images",
        # textual inversion and ControlNet (training/textual_inversion.py, training/controlnet.py)
        "token_string", "init_word", "num_vectors_per_token", "use_object_template", "use_style_template", "weights",
        # (controlnet_model_name_or_path and fused_backward_pass are in FALLBACKS: LoRA training ignores them)
        "lllite", "cond_emb_dim",
        # whole-model training (training/finetune*.py, training/fused_step.py, training/ema.py)
        "train_text_encoder", "learning_rate_te", "learning_rate_te1", "learning_rate_te2",
        "learning_rate_te3", "stop_text_encoder_training", "train_t5xxl", "use_t5xxl_cache_only",
        "block_lr", "num_last_block_to_freeze", "blockwise_fused_optimizers", "fused_optimizer_groups", "mem_eff_save",
        "diffusers_xformers", "skip_latents_validity_check",
        "ema_decay", "ema_update_every", "save_ema",
    }
)  # fmt: skip

def _family_tables() -> tuple[frozenset[str], dict[str, str], dict[str, str]]:
    """The options the model families add (`families/<name>/options.py`): implemented, except those a family
    marks NOT_AVAILABLE (refused, with the hint to give) or NO_EFFECT (accepted with the warning to give)."""
    from lorakit.families.registry import family_option_sections

    sections = family_option_sections()
    refused = {name: hint for section in sections for name, hint in getattr(section, "NOT_AVAILABLE", {}).items()}
    warned = {name: text for section in sections for name, text in getattr(section, "NO_EFFECT", {}).items()}
    fields = {name for section in sections for name in section.model_fields}
    return frozenset(fields - set(refused) - set(warned)), refused, warned


_FAMILY_IMPLEMENTED, _FAMILY_REFUSED, _FAMILY_WARNED = _family_tables()
IMPLEMENTED = IMPLEMENTED | _FAMILY_IMPLEMENTED
FALLBACKS.update(_FAMILY_WARNED)

#: Recognised but not implemented yet: option name -> what the user can do instead.
UNSUPPORTED: dict[str, str] = {name: hint for name, hint in {**_HINTS, **_FAMILY_REFUSED}.items() if name not in IMPLEMENTED}


def check_supported(cfg: TrainConfig, command: str = "train") -> tuple[list[str], list[str]]:
    """(errors, warnings) for options set to something lorakit cannot do yet or does differently, for
    `lorakit <command>`."""
    errors: list[str] = []
    warnings: list[str] = []
    for name, value in cfg.non_default_options().items():
        if name in UNSUPPORTED:
            errors.append(f"--{name} is recognised but not implemented yet in lorakit; {UNSUPPORTED[name]}")
        elif name in FALLBACKS and command not in FALLBACK_READERS.get(name, ()):
            warnings.append(FALLBACKS[name])
        elif name in PARTIAL:
            message = PARTIAL[name](value)
            if message:
                errors.append(message)
    errors.extend(_network_args(cfg))
    return errors, warnings
