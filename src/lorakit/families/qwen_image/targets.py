"""The layers `networks.lora_qwen_image` (musubi-tuner) adapts: every Linear of every transformer block except the
modulation layers (img_mod, txt_mod): the joint attention's q/k/v and output projections of both streams and
both streams' MLPs."""

from __future__ import annotations

import re

from torch import nn

from lorakit.adapters.targets import AdapterTarget, kohya_name

EXCLUDED = re.compile(r"_mod_")  # musubi-tuner's default exclude pattern (the adaLN modulation)
ATTENTION = re.compile(r"_attn_(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out_0|to_add_out)$")


def transformer_targets(transformer: nn.Module, rank: int, alpha: float | None) -> list[AdapterTarget]:
    targets = []
    for index, block in enumerate(transformer.transformer_blocks):
        for path, module in block.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            name = kohya_name("lora_unet", f"transformer_blocks.{index}.{path}")
            if not EXCLUDED.search(name):
                targets.append(AdapterTarget(name, module, "unet", rank, alpha or float(rank)))
    return targets
