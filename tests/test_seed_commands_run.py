"""Every LoRA, tool and inference command line of the four seeds, run through lorakit on tiny models with only
the launcher, paths and sizes (resolution, steps, epochs) changed.

`RUN_BY` names, for each such command line, the test that runs it; the commands not run elsewhere are run here.
A seed command that cannot run on a CPU with tiny models would be listed in `NOT_RUN` with the reason (none is).
Commands of other training kinds (seed 001's FLUX fine-tuning and ControlNet commands) belong to those kinds'
tests (`test_finetune.py`, `test_controlnet.py`).
"""

from __future__ import annotations

import importlib
import shlex
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import write_dreambooth_folder
from lorakit.cli.main import main
from test_seed_commands import SEED_003

#: seed command -> "test module::test function" that runs it with only the launcher, paths and sizes changed
RUN_BY = {
    "000 sdxl_train_network.py (LyCORIS preset=full locon)": "test_sdxl_train::test_seed_000_command",
    "000 resize_lora.py -o DIR -r fro_ckpt=1,thr=-3.55 model lora":
        "test_tools_any_file::test_seed_000_trains_then_shrinks_with_its_own_commands",
    "001 flux_train_network.py (networks.lora_flux, fp8, cached outputs)":
        "test_flux_train::test_seed_001_command_runs_with_only_paths_changed",
    "001 flux_minimal_inference.py --lora": "test_generate::test_seed_001_flux_minimal_inference_command",
    "001 networks/flux_merge_lora.py": "test_seed_commands_run::test_seed_001_flux_merge_lora",
    "001 tools/convert_diffusers_to_flux.py": "test_model_convert::test_flux_bfl_and_diffusers_round_trip",
    "001 sd3_train_network.py (networks.lora_sd3, separate encoders, fp8)":
        "test_seed_commands_run::test_seed_001_sd3_lora_command",
    "002 sd3_train_network.py (networks.lora, SD3.5 Large, block swap)": "test_sd3_seed::test_seed_guide_command",
    "003 train_network.py (DreamBooth with regularisation images)":
        "test_seed_commands_run::test_seed_003_dreambooth_lora_command",
    "003 gen_img_diffusers.py --network_module networks.lora": "test_generate::test_seed_003_gen_img_network_command",
}
#: seed command -> why it cannot run here
NOT_RUN: dict[str, str] = {}


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("command", sorted(RUN_BY))
def test_the_test_running_each_seed_command_exists(command):
    module, _, function = RUN_BY[command].partition("::")
    assert callable(getattr(importlib.import_module(module), function, None)), RUN_BY[command]


def test_seed_003_dreambooth_lora_command(tmp_path):
    """sd-scripts' LoRA guide: train_network.py with regularisation images, --use_8bit_adam, --xformers, fp16."""
    from lorakit.families.sd.tiny import build_tiny_sd, save_sd_diffusers_folder
    from lorakit.families.common.ldm_keys import save_sd_single_file

    model = tmp_path / "model.safetensors"
    save_sd_single_file(build_tiny_sd("sd1", seed=0), model, fmt="safetensors")
    data = write_dreambooth_folder(tmp_path / "data", count=2, repeats=2)
    reg = write_dreambooth_folder(tmp_path / "reg", count=2, repeats=1, name="toy")
    out = tmp_path / "out"
    command = SEED_003.format(model=model, data=data, reg=reg, out=out)
    sizes = {"--resolution=448,640": "--resolution=64,96", "--max_train_steps=400": "--max_train_steps=2"}
    argv = [sizes.get(token, token) for token in shlex.split(command)]
    assert main(["train", *argv, "--max_data_loader_n_workers=0"]) == 0
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files and files[-1] == "last.safetensors"
    with safe_open(str(out / "last.safetensors"), framework="pt") as f:
        metadata = f.metadata()
        assert any(k.startswith("lora_te_") for k in f.keys()) and any(k.startswith("lora_unet_") for k in f.keys())
    assert metadata["ss_num_reg_images"] == "2" and metadata["ss_clip_skip"] == "2"
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_seed"] == "42"


SEED_001_SD3 = """
--pretrained_model_name_or_path {model} --clip_l {clip_l} --clip_g {clip_g} --t5xxl {t5xxl}
--cache_latents_to_disk --save_model_as safetensors --sdpa --persistent_data_loader_workers
--max_data_loader_n_workers 2 --seed 42 --gradient_checkpointing --mixed_precision bf16 --save_precision bf16
--network_module networks.lora_sd3 --network_dim 4 --network_train_unet_only
--optimizer_type adamw8bit --learning_rate 1e-4
--cache_text_encoder_outputs --cache_text_encoder_outputs_to_disk --fp8_base
--highvram --max_train_epochs 1 --save_every_n_epochs 1 --dataset_config {config}
--output_dir {out} --output_name sd3-lora-name
"""


def test_seed_001_sd3_lora_command(tmp_path):
    """seed 001's sd3_train_network.py command: an SD3.5 file without encoders, CLIP-L/G and T5 as their own
    files, fp8 base, cached latents and text-encoder outputs on disk (epochs 4 -> 1)."""
    from lorakit.families.sd3.tiny import build_tiny_sd3, save_sai_file, save_text_encoder_files

    comps = build_tiny_sd3(1, "sd3.5m")
    model = save_sai_file(comps, tmp_path / "models" / "sd3.5_medium.safetensors", include=("vae",))
    encoders = save_text_encoder_files(comps, tmp_path / "models" / "sd3")
    images = write_dreambooth_folder(tmp_path / "img", count=2, repeats=1)
    config = tmp_path / "dataset_1024_bs2.toml"
    config.write_text("[general]\nresolution = 64\ncaption_extension = '.caption'\n[[datasets]]\nbatch_size = 2\n"
                      f"[[datasets.subsets]]\nimage_dir = '{images / '1_sks toy'}'\nnum_repeats = 1\n", encoding="utf-8")
    out = tmp_path / "out"
    command = SEED_001_SD3.format(model=model, config=config, out=out, **{k: encoders[k] for k in ("clip_l", "clip_g", "t5xxl")})
    assert main(["train", *shlex.split(command)]) == 0
    state = load_file(str(out / "sd3-lora-name.safetensors"))
    assert state and all(k.startswith("lora_unet_") for k in state)
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    assert list((images / "1_sks toy").glob("*_sd3_te.npz")) and list((images / "1_sks toy").glob("*_sd3.npz"))


def test_seed_001_flux_merge_lora(tmp_path):
    """`python networks/flux_merge_lora.py --flux_model flux1-dev.safetensors --save_to output.safetensors
    --models lora1.safetensors --ratios 2.0 --save_precision fp16 --loading_device cuda --working_device cpu`."""
    from lorakit.families.flux.tiny import build_tiny_flux, save_bfl_files
    from lorakit.families.flux.family import FluxFamily
    from test_tools_families import net_cfg, random_network
    from lorakit.adapters.formats import save_lora_file

    comps = build_tiny_flux(0)
    files = save_bfl_files(comps, tmp_path)
    lora = tmp_path / "lora1.safetensors"
    save_lora_file(random_network(FluxFamily(), comps, net_cfg(unet_only=True)).state_dict_kohya(), lora)
    out = tmp_path / "output.safetensors"
    command = (f"--flux_model {files['flux1']} --save_to {out} --models {lora} --ratios 2.0 --save_precision fp16 "
               "--loading_device cuda --working_device cpu")
    assert main(["lora", "merge", *shlex.split(command)]) == 0
    merged, base = load_file(str(out)), load_file(str(files["flux1"]))
    assert merged["double_blocks.0.img_attn.qkv.weight"].dtype == torch.float16
    assert not torch.equal(merged["double_blocks.0.img_attn.qkv.weight"].float(),
                           base["double_blocks.0.img_attn.qkv.weight"].half().float())


def test_no_seed_command_is_left_out():
    assert not set(RUN_BY) & set(NOT_RUN)
    assert len(RUN_BY) + len(NOT_RUN) == 10  # the LoRA, tool and inference command lines of the four seeds
