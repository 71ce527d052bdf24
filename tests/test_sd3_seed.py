"""seed 002 (the SD3 guide): its command on a tiny SD3.5-Large-style model with only the paths changed."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from helpers import write_dreambooth_folder
from lorakit.cli.main import main
from lorakit.families.sd3.tiny import build_tiny_sd3, save_sai_file


def test_seed_guide_command(tmp_path):
    """seed 002's command with only the paths changed (a 38-block tiny model takes --blocks_to_swap=32)."""
    big = build_tiny_sd3(2, "sd3.5l", num_layers=38)
    model = save_sai_file(big, tmp_path / "model" / "sd3.5_large.safetensors")
    images = write_dreambooth_folder(tmp_path / "img", count=1, repeats=1)
    config = tmp_path / "my_sd3_dataset_config.toml"
    config.write_text(
        "[general]\nresolution = 64\ncaption_extension = '.caption'\n[[datasets]]\nbatch_size = 1\n"
        f"[[datasets.subsets]]\nimage_dir = '{images / '1_sks toy'}'\nnum_repeats = 1\n", encoding="utf-8",
    )
    out = tmp_path / "out"
    command = (
        f"train --pretrained_model_name_or_path={model} --dataset_config={config} --output_dir={out} "
        "--output_name=my_sd3_lora --save_model_as=safetensors --network_module=networks.lora --network_dim=16 "
        "--network_alpha=1 --learning_rate=1e-4 --optimizer_type=AdamW8bit --lr_scheduler=constant --sdpa "
        "--max_train_epochs=10 --save_every_n_epochs=1 --mixed_precision=fp16 --gradient_checkpointing "
        "--apply_lg_attn_mask --apply_t5_attn_mask --weighting_scheme=sigma_sqrt --blocks_to_swap=32"
    )
    assert main(command.split()) == 0
    saved = sorted(p.name for p in out.glob("*.safetensors"))
    assert "my_sd3_lora.safetensors" in saved and "my_sd3_lora-000001.safetensors" in saved
    with safe_open(str(out / "my_sd3_lora.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert "lora_unet_joint_blocks_37_x_block_attn_qkv.lora_up.weight" in set(f.keys())
    assert meta["ss_base_model_version"] == "5-large" and json.loads(meta.get("ss_network_args", "{}")) == {}
    assert torch.isfinite(torch.tensor([float(meta.get("ss_network_alpha", 1))])).all()
