"""`lorakit lora resize` and `merge` on every kind of file lorakit writes, and seed 000's train-then-shrink.

Files of each adapter algorithm are written as training writes them (the trainer's network, its kohya tensors
and the `ss_network_*` metadata) over a tiny SD 1.5; then merged into the model (against the trainer's own
merge, and for OFT against sdxl_merge_lora.py's formula written out here), resized from ΔW with --base_model,
and refused without it where ΔW depends on the model.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from helpers import build_from_options, network_options, write_dreambooth_folder
from lorakit.adapters.formats import load_lora_file, save_lora_file
from lorakit.cli.lora import main as lora_main
from lorakit.families.common.ldm_keys import save_sd_single_file
from lorakit.families.registry import get_family
from lorakit.families.sd.tiny import build_tiny_sd
from lorakit.tools.common import load_lora
from lorakit.tools.models import load_base_model

FILES = {
    "dora": ("networks.lora", ["dora_wd=True", "conv_dim=4"], 4, 2.0),
    "oft": ("networks.oft", ["enable_all_linear=True", "enable_conv=True"], 4, 1e-2),
    "loha": ("lycoris.kohya", ["algo=loha", "preset=attn-mlp"], 4, 2.0),
    "lokr-norm": ("lycoris.kohya", ["algo=lokr", "factor=4", "preset=attn-mlp", "train_norm=True"], 4, 2.0),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "sd15.safetensors"
    save_sd_single_file(build_tiny_sd("sd1", seed=0), path, fmt="safetensors")
    return path


def write_file(kind: str, folder: Path) -> tuple[Path, object]:
    """A file of `kind` with random tensors, written as training writes it; and its network (on a fresh model)."""
    module, args, dim, alpha = FILES[kind]
    options = network_options(module, *args, dim=dim, alpha=alpha)
    network = build_from_options(options, get_family("sd"), build_tiny_sd("sd1", seed=0), torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in network.named_parameters():
            param.copy_(param * (1 + 0.1 * torch.rand(param.shape, generator=g)) if "dora_scale" in name
                        else torch.randn(param.shape, generator=g) * (0.02 if kind == "oft" else 0.1))
    path = folder / f"{kind}.safetensors"
    metadata = {"ss_network_module": module, "ss_network_dim": str(dim), "ss_network_alpha": str(alpha),
                "ss_network_args": json.dumps(dict(a.split("=", 1) for a in args)), "ss_base_model_version": "sd_v1"}
    save_lora_file(network.state_dict_kohya(), path, metadata)
    return path, network


@pytest.mark.parametrize("kind", list(FILES))
def test_merge_into_model_and_resize_with_the_base_model(kind, model, tmp_path):
    path, network = write_file(kind, tmp_path)
    merged = tmp_path / "merged.safetensors"
    assert lora_main(["merge", "--sd_model", str(model), "--save_to", str(merged), "--models", str(path), "--ratios", "0.7"]) == 0
    ours = load_base_model(str(merged), family="sd").denoiser.state_dict()
    reference = build_tiny_sd("sd1", seed=0)
    module, args, dim, alpha = FILES[kind]
    again = build_from_options(network_options(module, *args, dim=dim, alpha=alpha), get_family("sd"), reference,
                               torch.device("cpu"))
    again.load_kohya_state_dict(network.state_dict_kohya(), source="x")
    for module in again.lora_modules.values():
        module.merge_to_base(0.7)
    expected, before = reference.denoiser.state_dict(), build_tiny_sd("sd1", seed=0).denoiser.state_dict()
    changed = [k for k in expected if not torch.equal(expected[k], before[k])]
    assert changed
    for key in changed:
        torch.testing.assert_close(ours[key], expected[key], rtol=1e-5, atol=1e-6)

    # resized at a rank no smaller than any layer's: ΔW of every module is kept
    out = tmp_path / "resized.safetensors"
    assert lora_main(["resize", "--model", str(path), "--base_model", str(model), "--save_to", str(out), "--new_rank", "512"]) == 0
    resized = load_lora(out)
    deltas = {name: m.delta_weight() for name, m in network.lora_modules.items()}
    norms = [n for n in deltas if deltas[n].dim() == 1]
    assert set(resized.modules) == set(deltas) - set(norms)
    for name, factors in resized.modules.items():
        torch.testing.assert_close(factors.delta().reshape(deltas[name].shape), deltas[name], rtol=1e-4, atol=1e-5)
    tensors, _ = load_lora_file(out)
    assert all(f"{n}.w_norm" in tensors for n in norms)  # LyCORIS norm modules pass through


def test_oft_merge_is_sdxl_merge_loras_formula(model, tmp_path):
    path, _ = write_file("oft", tmp_path)
    merged = tmp_path / "merged.safetensors"
    assert lora_main(["merge", "--sd_model", str(model), "--save_to", str(merged), "--models", str(path)]) == 0
    tensors, _ = load_lora_file(path)
    base = build_tiny_sd("sd1", seed=0).denoiser
    name = "oft_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    layer = base.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    blocks, alpha = tensors[f"{name}.oft_blocks"].float(), float(tensors[f"{name}.alpha"])
    # sdxl_merge_lora.py: Q = B − Bᵀ clamped to ‖Q‖ ≤ alpha·out, R = (I + Q)(I − Q)⁻¹, W' = einsum("oi,op->pi", W, R)
    q = blocks - blocks.transpose(1, 2)
    norm = torch.norm(q.flatten())
    q = q * ((torch.clamp(norm, max=alpha * layer.out_features) + 1e-8) / (norm + 1e-8))
    eye = torch.eye(q.shape[-1]).expand_as(q)
    rotation = torch.block_diag(*torch.matmul(eye + q, torch.linalg.inv(eye - q)))
    expected = torch.einsum("oi,op->pi", layer.weight.float(), rotation)
    ours = load_base_model(str(merged), family="sd").denoiser.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_resize_without_the_model_says_what_it_needs(tmp_path, capsys):
    path, _ = write_file("loha", tmp_path)
    assert lora_main(["resize", "--model", str(path), "--save_to", str(tmp_path / "out.safetensors")]) == 2
    assert "give --base_model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# seed 000: its LyCORIS training command, then its resize_lora.py command
# ---------------------------------------------------------------------------------------------------------

SEED_000 = r"""
--lowram --pretrained_model_name_or_path="{model}" --train_data_dir="{data}" --resolution="64,64"
--output_dir="{out}" --enable_bucket --min_bucket_reso=32 --max_bucket_reso=128 --network_alpha=4
--save_model_as="safetensors" --network_module="lycoris.kohya"
--network_args "preset=full" "conv_dim=256" "conv_alpha=4" "use_tucker=False" "use_scalar=False"
  "rank_dropout_scale=False" "algo=locon" "train_norm=False"
  "block_dims=8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8"
  "block_alphas=0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625,0.0625"
--network_dropout=0 --lr_scheduler="cosine" --learning_rate=0.01 --unet_lr=0.01 --text_encoder_lr=0.01
--network_dim=8 --output_name="yifftoolkit" --scale_weight_norms=1 --no_half_vae --save_every_n_epochs=50
--mixed_precision="fp16" --save_precision="fp16" --caption_extension=".caption" --cache_latents --cache_latents_to_disk
--optimizer_type="AdamW" --max_grad_norm=1 --keep_tokens=1 --max_data_loader_n_workers=8 --bucket_reso_steps=32
--multires_noise_iterations=10 --multires_noise_discount=0.1 --log_prefix=xl-locon --gradient_accumulation_steps=6
--gradient_checkpointing --train_batch_size=8 --dataset_repeats=0 --max_train_steps=1 --shuffle_caption --sdpa
--sample_prompts="{prompts}" --sample_sampler="euler_a" --sample_every_n_steps=100
"""


def test_seed_000_trains_then_shrinks_with_its_own_commands(tmp_path):
    """The guide's SDXL LyCORIS command (sizes for a tiny model: 64 px, buckets 32-128; one step at a learning rate
    that moves a one-step LoRA past the recipe's threshold, where the guide trains 400 steps at 1e-4), then its
    `resize_lora.py -o DIR -r fro_ckpt=1,thr=-3.55 model.safetensors lora.safetensors`, then a merge of the result."""
    from lorakit.cli.main import main
    from lorakit.families.sdxl.sgm_keys import save_sdxl_single_file
    from lorakit.families.sdxl.tiny import build_tiny_sdxl

    model = tmp_path / "model.safetensors"
    save_sdxl_single_file(build_tiny_sdxl(0), model)
    data = write_dreambooth_folder(tmp_path / "data", count=1, repeats=1)
    prompts = tmp_path / "sample-prompts.txt"
    prompts.write_text("a toy --w 64 --h 64\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["train", *shlex.split(SEED_000.format(model=model, data=data, out=out, prompts=prompts))]) == 0
    lora = out / "yifftoolkit.safetensors"
    trained = load_lora(lora)
    assert "lora_unet_input_blocks_0_0" in trained.modules  # preset=full: SDXL's conv_in, which networks.lora never trains
    small = tmp_path / "small"
    small.mkdir()
    assert lora_main(["resize", "-o", str(small), "-r", "fro_ckpt=1,thr=-3.55", str(model), str(lora)]) == 0
    output = small / "yifftoolkit_frockpt1_th-3.55.safetensors"  # resize_lora.py's name for the recipe
    resized = load_lora(output)
    tensors, _ = load_lora_file(output)
    assert resized.modules and set(resized.modules) <= set(trained.modules)
    assert all(v.dtype == torch.float16 for v in tensors.values())  # -t 16, its default
    assert all(resized.modules[n].rank <= trained.modules[n].rank for n in resized.modules)
    merged = tmp_path / "merged.safetensors"
    assert lora_main(["merge", "--sd_model", str(model), "--save_to", str(merged), "--models", str(output)]) == 0
