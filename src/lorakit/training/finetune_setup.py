"""How `lorakit finetune` / `lorakit dreambooth` set up what they train (a `TrainingType`): their checks before
the model loads, what the family loads for them, which modules keep their float32 weights, and the
`FinetuneTrainable` with sd-scripts' optimizer groups."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from lorakit.adapters.spec import TargetSpec, make_target_spec
from lorakit.config.schema_finetune import block_lr_values
from lorakit.errors import ConfigError
from lorakit.families.base import Components, ModelFamily, part_modules
from lorakit.data.conditioning import ConditioningUse
from lorakit.training.kinds import foreign_option_problems
from lorakit.training.checkpoint_files import ModelLayout, output_kind
from lorakit.training.finetune_trainable import FinetuneTrainable

log = logging.getLogger("lorakit")


class FinetuneTraining:
    """`lorakit finetune` / `lorakit dreambooth`: the model's own weights (full fine-tune and DreamBooth)."""

    title = "fine-tune"
    preserves_outputs = False  # the trained weights are the model's own: nothing to switch off
    conditioning = ConditioningUse.MASK  # as sd-scripts' fine-tuning scripts: conditioning subsets are loss masks

    def option_problems(self, cfg: Any, family: ModelFamily) -> list[str]:
        return finetune_problems(cfg, family) + foreign_option_problems(cfg, "finetune")

    def prepare_dataset(self, cfg: Any, dataset: Any) -> None:
        """Nothing: the captions are trained as they are."""

    def spec(self, cfg: Any, family: ModelFamily) -> TargetSpec:
        """What the family loads for: which encoders train (they are not cached), T5 among them or not."""
        if cfg.train_t5xxl and "train_t5xxl" not in (family.family_arg_keys(family.default_network_module) or ()):
            raise ConfigError([f"--train_t5xxl: the {family.title} family has no T5-XXL encoder"])
        args = {"train_t5xxl": "True"} if cfg.train_t5xxl else {}
        return make_target_spec(family, module=family.default_network_module, args=args,
                                train_text_encoder=cfg.trains_text_encoder)

    def trained_modules(self, cfg: Any, family: ModelFamily, comps: Components, spec: TargetSpec) -> list[nn.Module]:
        return [comps.denoiser, *(module for _, module in trained_encoders(cfg, family, comps, spec))]

    def build(self, cfg: Any, spec: TargetSpec, family: ModelFamily, comps: Components, device: Any) -> FinetuneTrainable:
        parts = {"denoiser": comps.denoiser, **dict(trained_encoders(cfg, family, comps, spec))}
        for module in parts.values():
            module.requires_grad_(True)
        frozen = freeze_parameters(cfg, family, comps)
        groups, names = optimizer_groups(cfg, family, comps, parts, frozen)
        source = ModelLayout.of(cfg.pretrained_model_name_or_path)
        given = cfg.save_model_as if "save_model_as" in cfg.model_fields_set else None
        trainable = FinetuneTrainable(family, comps, parts, groups, names, source, output_kind(given, source), cfg)
        count = sum(p.numel() for p in trainable.trainable_parameters())
        log.info("training %s: %d parameters (%s)", ", ".join(parts), count, ", ".join(names))
        return trainable


FINETUNE = FinetuneTraining()


def finetune_problems(cfg: Any, family: ModelFamily) -> list[str]:
    """The fine-tune options that depend on the family, checked before the model loads."""
    if not family.trains_whole_model:
        return [f"`lorakit finetune`/`dreambooth` is not available for the {family.title} family yet (LoRA training is: "
                "`lorakit train`)"]
    problems = []
    if cfg.block_lr is not None:
        if not family.block_lr_count:
            problems.append(f"--block_lr is sdxl_train.py's per-block learning rates; the {family.title} family has no such blocks")
        else:
            try:
                values = block_lr_values(cfg.block_lr)
                if len(values) != family.block_lr_count:
                    problems.append(f"--block_lr needs {family.block_lr_count} values for {family.title} (got {len(values)})")
            except ValueError:
                pass  # reported with the other option checks
    if cfg.num_last_block_to_freeze and not family.freezes_last_blocks:
        problems.append(f"--num_last_block_to_freeze is sd3_train.py's; the {family.title} family has no such blocks")
    if cfg.trains_text_encoder and family.separate_parts:
        problems.append(f"--train_text_encoder: a {family.title} checkpoint holds the transformer alone (its text "
                        "encoders are files of their own, trained by no whole-model script); leave it out")
    if cfg.blocks_to_swap and not (cfg.fused_backward_pass or cfg.blockwise_fused_optimizers or cfg.fused_optimizer_groups):
        problems.append("--blocks_to_swap in a fine-tune needs --fused_backward_pass or --blockwise_fused_optimizers: a "
                        "swapped block's weights are stepped while the block is on the device")
    given = cfg.save_model_as if "save_model_as" in cfg.model_fields_set else None
    kind = output_kind(given, ModelLayout.of(cfg.pretrained_model_name_or_path or "."))
    if kind not in ("folder", *family.single_file_kinds):
        problems.append(f"--save_model_as {kind}: the {family.title} family saves "
                        f"{' or '.join(k for k in family.single_file_kinds if k != 'diffusers')} or diffusers")
    return problems


def trained_encoders(cfg: Any, family: ModelFamily, comps: Components, spec: TargetSpec) -> list[tuple[str, nn.Module]]:
    """(part name, encoder) of the text encoders that train: those the family trains for the spec, less any
    whose learning rate is 0 (sdxl_train.py / sd3_train.py)."""
    chosen = family.text_encoders_to_train(comps, spec)
    named = [(name, module) for name, module in part_modules(comps).items() if name.startswith("text_encoder")]
    return [(name, module) for name, module in named
            if any(module is c for c in chosen) and encoder_lr(cfg, int(name.rsplit("_", 1)[1])) != 0]


def encoder_lr(cfg: Any, index: int) -> float:
    """`--learning_rate_te{index+1}`, else `--learning_rate_te`, else `--learning_rate`."""
    own = getattr(cfg, f"learning_rate_te{index + 1}", None) if index < 3 else None
    for value in (own, cfg.learning_rate_te, cfg.learning_rate):
        if value is not None:
            return value
    return cfg.learning_rate


def freeze_parameters(cfg: Any, family: ModelFamily, comps: Components) -> set[str]:
    """Denoiser parameter names frozen by --num_last_block_to_freeze (their requires_grad turned off)."""
    if not cfg.num_last_block_to_freeze:
        return set()
    names = set(family.parameters_to_freeze(comps, cfg.num_last_block_to_freeze))
    for name, param in comps.denoiser.named_parameters():
        if name in names:
            param.requires_grad_(False)
    log.info("--num_last_block_to_freeze %d: %d denoiser tensors frozen", cfg.num_last_block_to_freeze, len(names))
    return names


def optimizer_groups(cfg: Any, family: ModelFamily, comps: Components, parts: dict[str, nn.Module],
                     frozen: set[str]) -> tuple[list[dict[str, Any]], list[str]]:
    groups, names = denoiser_groups(cfg, family, comps, frozen)
    encoders = [name for name in parts if name.startswith("text_encoder")]
    for name in encoders:
        index = int(name.rsplit("_", 1)[1])
        params = [p for p in parts[name].parameters() if p.requires_grad]
        groups.append({"params": params, "lr": encoder_lr(cfg, index)})
        names.append("textencoder" if len(encoders) == 1 else f"textencoder{index + 1}")
    return groups, names


def denoiser_groups(cfg: Any, family: ModelFamily, comps: Components, frozen: set[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """One group at --learning_rate, or with --block_lr one per block (a block at 0 is frozen and left out)."""
    named = [(n, p) for n, p in comps.denoiser.named_parameters() if n not in frozen]
    if cfg.block_lr is None:
        return [{"params": [p for _, p in named], "lr": cfg.learning_rate}], ["unet"]
    rates = block_lr_values(cfg.block_lr)
    block_of = family.lr_blocks(comps)
    blocks: list[list[nn.Parameter]] = [[] for _ in rates]
    for name, param in named:
        blocks[block_of(name)].append(param)
    groups, names = [], []
    for index, (rate, params) in enumerate(zip(rates, blocks)):
        if rate == 0:
            for param in params:
                param.requires_grad_(False)
            continue
        groups.append({"params": params, "lr": rate})
        names.append(f"block{index}")
    return groups, names
