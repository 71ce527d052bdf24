"""`lorakit finetune` / `lorakit dreambooth` end to end on tiny models of every family: sd-scripts' whole-model
command lines (fine_tune.py with a metadata JSON, train_db.py with regularisation images, sdxl_train.py,
sd3_train.py, flux_train.py) with only paths and sizes changed; the checkpoints read back by diffusers' own
single-file and folder loaders, holding exactly the trained weights (the training state's), the input's keys,
and the untouched tensors of the input byte for byte; and resume bit for bit."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import write_dreambooth_folder, write_tiny_checkpoints
from lorakit.cli.main import main
from lorakit.config import parse_train_args
from lorakit.errors import ConfigError


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_checkpoints(tmp_path_factory.mktemp("sd1"), "sd1")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_dreambooth_folder(tmp_path_factory.mktemp("data"), count=2, repeats=1)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def state_part(state_dir: Path, part: str) -> dict[str, torch.Tensor]:
    """The trained weights of a part as the training state holds them (exactly what was trained)."""
    prefix = f"parts.{part}."
    return {k[len(prefix):]: v for k, v in tensors(state_dir / "model.safetensors").items() if k.startswith(prefix)}


def run(command: str, **paths: Path) -> None:
    assert main(shlex.split(command.format(**{k: shlex.quote(str(v)) for k, v in paths.items()}))) == 0


def assert_same_weights(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    compared = [k for k in expected if k in own]
    assert len(compared) > 0.9 * len(expected)
    for key in compared:
        assert torch.equal(own[key].float(), expected[key].float()), key


def untouched_and_changed(before: Path, after: Path) -> tuple[set[str], set[str]]:
    old, new = tensors(before), tensors(after)
    assert set(old) == set(new), "the checkpoint has the input file's keys"
    same = {k for k in old if old[k].dtype == new[k].dtype and torch.equal(old[k], new[k])}
    return same, set(old) - same


# ---------------------------------------------------------------------------------------------------------
# SD 1.x: fine_tune.py with a metadata JSON, train_db.py with regularisation images
# ---------------------------------------------------------------------------------------------------------

FINE_TUNE = """finetune --pretrained_model_name_or_path={model} --in_json={meta} --train_data_dir={images}
--output_dir={out} --output_name=ft --resolution=64 --train_batch_size=1 --learning_rate=5e-5 --max_train_steps=2
--optimizer_type=AdamW --xformers --mixed_precision=no --save_every_n_steps=1 --train_text_encoder
--learning_rate_te=1e-5 --dataset_repeats=1 --save_state --seed=1 --max_data_loader_n_workers=0 --ema_decay=0.5"""


def write_metadata(data_dir: Path, path: Path) -> Path:
    folder = next(data_dir.iterdir())
    entries = {str(image.with_suffix("")): {"caption": f"sks toy, picture {i}"} for i, image in enumerate(sorted(folder.glob("*.png")))}
    path.write_text(json.dumps(entries), encoding="utf-8")
    return folder


def test_fine_tune_py_with_metadata_json(sd1, data_dir, tmp_path):
    images = write_metadata(data_dir, tmp_path / "meta.json")
    out = tmp_path / "out"
    run(FINE_TUNE, model=sd1["safetensors"], meta=tmp_path / "meta.json", images=images, out=out)
    same, changed = untouched_and_changed(sd1["safetensors"], out / "ft.safetensors")
    assert all(k.startswith("first_stage_model.") for k in same - {"cond_stage_model.transformer.text_model.embeddings.position_ids"})
    assert any(k.startswith("model.diffusion_model.") for k in changed)
    assert any(k.startswith("cond_stage_model.") for k in changed), "--train_text_encoder"
    assert (out / "ft-step00000001.safetensors").is_file() and (out / "ft-step00000001-ema.safetensors").is_file()
    meta = metadata(out / "ft.safetensors")
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and not any(k.startswith("ss_") for k in meta)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(str(out / "ft.safetensors"), config=str(sd1["folder"]),
                                                    local_files_only=True, safety_checker=None)
    assert_same_weights(pipe.unet, state_part(out / "ft-state", "denoiser"))
    assert_same_weights(pipe.text_encoder, state_part(out / "ft-state", "text_encoder_0"))
    ema = tensors(out / "ft-ema.safetensors")
    final = tensors(out / "ft.safetensors")
    assert ema.keys() == final.keys() and any(not torch.equal(ema[k], final[k]) for k in changed)


TRAIN_DB = """dreambooth --pretrained_model_name_or_path={model} --train_data_dir={data} --output_dir={out} --output_name=db
--reg_data_dir={reg} --prior_loss_weight=1.0 --resolution=64 --train_batch_size=1 --learning_rate=1e-4
--max_train_steps=2 --mixed_precision=no --save_every_n_steps=1 --save_model_as=diffusers
--clip_skip=2 --seed=42 --color_aug --stop_text_encoder_training=1 --no_token_padding --max_data_loader_n_workers=0"""


def test_train_db_py_with_regularisation_images_into_a_diffusers_folder(sd1, data_dir, tmp_path):
    reg = write_dreambooth_folder(tmp_path / "reg", count=2, repeats=1, name="toy")
    out = tmp_path / "out"
    run(TRAIN_DB, model=sd1["safetensors"], data=data_dir, reg=reg, out=out)
    from diffusers import StableDiffusionPipeline

    step1 = StableDiffusionPipeline.from_pretrained(str(out / "db-step00000001"), local_files_only=True, safety_checker=None)
    final = StableDiffusionPipeline.from_pretrained(str(out / "db"), local_files_only=True, safety_checker=None)
    base = StableDiffusionPipeline.from_pretrained(str(sd1["folder"]), local_files_only=True, safety_checker=None)
    te = lambda pipe: next(v for k, v in pipe.text_encoder.state_dict().items() if k.endswith("layers.0.mlp.fc1.weight"))  # noqa: E731
    unet = lambda pipe: pipe.unet.conv_in.weight  # noqa: E731
    assert not torch.equal(te(step1), te(base)), "the text encoder trains in step 1"
    assert torch.equal(te(final), te(step1)), "and stops at --stop_text_encoder_training 1"
    assert not torch.equal(unet(final), unet(step1))


def test_diffusers_folder_keeps_its_layout_and_untouched_files(sd1, data_dir, tmp_path):
    out = tmp_path / "out"
    run("finetune --pretrained_model_name_or_path={model} --train_data_dir={data} --output_dir={out} --output_name=ft "
        "--resolution=64 --max_train_steps=1 --learning_rate=1e-4 --seed=1 --max_data_loader_n_workers=0 --save_state "
        "--save_precision=fp16", model=sd1["folder"], data=data_dir, out=out)
    folder = out / "ft"
    for untouched in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "model_index.json"):
        assert (folder / untouched).read_bytes() == (sd1["folder"] / untouched).read_bytes(), untouched
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert set(tensors(unet_file)) == set(tensors(sd1["folder"] / "unet" / "diffusion_pytorch_model.safetensors"))
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", local_files_only=True)
    trained = {k: v.half() for k, v in state_part(out / "ft-state", "denoiser").items()}
    assert_same_weights(unet, trained)
    assert metadata(unet_file)["modelspec.architecture"] == "stable-diffusion-v1"


def test_resume_is_bitwise_exact_with_the_fused_backward_pass(sd1, data_dir, tmp_path):
    base = ("finetune --pretrained_model_name_or_path={model} --train_data_dir={data} --output_dir={out} --output_name=ft "
            "--resolution=64 --max_train_steps=3 --seed=3 --max_data_loader_n_workers=0 --optimizer_type=Adafactor "
            "--optimizer_args relative_step=False scale_parameter=False warmup_init=False --learning_rate=1e-3 "
            "--fused_backward_pass --ema_decay=0.9 --save_ema=instead")
    run(base + " --save_every_n_steps=2 --save_state", model=sd1["safetensors"], data=data_dir, out=tmp_path / "whole")
    run(base + " --resume={state}", model=sd1["safetensors"], data=data_dir, out=tmp_path / "resumed",
        state=tmp_path / "whole" / "ft-step00000002-state")
    assert (tmp_path / "whole" / "ft.safetensors").read_bytes() != (tmp_path / "whole" / "ft-step00000002.safetensors").read_bytes()
    whole, resumed = tensors(tmp_path / "whole" / "ft.safetensors"), tensors(tmp_path / "resumed" / "ft.safetensors")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


# ---------------------------------------------------------------------------------------------------------
# SDXL, SD3, FLUX
# ---------------------------------------------------------------------------------------------------------

SDXL_TRAIN = """finetune --pretrained_model_name_or_path={model} --train_data_dir={data} --output_dir={out}
--output_name=xl --resolution=64 --enable_bucket --min_bucket_reso=64 --max_bucket_reso=128 --bucket_reso_steps=32
--train_batch_size=1 --learning_rate=1e-4 --max_train_steps=1 --optimizer_type=AdamW --lr_scheduler=constant
--mixed_precision=no --save_precision=float --no_half_vae --gradient_checkpointing --cache_latents --save_state
--train_text_encoder --learning_rate_te1=1e-5 --learning_rate_te2=0 --block_lr={block_lr} --seed=1
--max_data_loader_n_workers=0"""


def test_sdxl_train_py_with_block_lrs(data_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from lorakit.families.sdxl.model_files import save_sdxl_diffusers_folder
    from lorakit.families.sdxl.sgm_keys import save_sdxl_single_file
    from lorakit.families.sdxl.tiny import build_tiny_sdxl

    comps = build_tiny_sdxl(0)
    model, folder = tmp_path / "sdxl.safetensors", tmp_path / "sdxl_diffusers"
    save_sdxl_single_file(comps, model)
    save_sdxl_diffusers_folder(comps, folder)
    rates = ["1e-4"] * 23
    rates[0] = rates[22] = "0"  # the time/label embeddings and the output layer stay frozen
    out = tmp_path / "out"
    run(SDXL_TRAIN, model=model, data=data_dir, out=out, block_lr=",".join(rates))
    same, changed = untouched_and_changed(model, out / "xl.safetensors")
    frozen = ("model.diffusion_model.time_embed.", "model.diffusion_model.label_emb.", "model.diffusion_model.out.",
              "first_stage_model.", "conditioner.embedders.1.")
    assert not [k for k in changed if k.startswith(frozen)], "block_lr 0, CLIP-G at LR 0 and the VAE are untouched"
    assert any(k.startswith("conditioner.embedders.0.") for k in changed)
    pipe = StableDiffusionXLPipeline.from_single_file(str(out / "xl.safetensors"), config=str(folder), local_files_only=True)
    assert_same_weights(pipe.unet, state_part(out / "xl-state", "denoiser"))
    assert metadata(out / "xl.safetensors")["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


SD3_TRAIN = """finetune --pretrained_model_name_or_path={model} --train_data_dir={data} --output_dir={out}
--output_name=sd3 --resolution=64 --save_model_as=safetensors --mixed_precision=no --learning_rate=1e-4
--max_train_steps=1 --optimizer_type=adamw --weighting_scheme=uniform --train_text_encoder --learning_rate_te1=1e-5
--learning_rate_te2=0 --num_last_block_to_freeze=2 --blockwise_fused_optimizers --save_state --seed=1
--max_data_loader_n_workers=0"""


def test_sd3_train_py_with_blockwise_fused_optimizers(data_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from lorakit.families.sd3.tiny import build_tiny_sd3, save_pipeline_folder, save_sai_file

    comps = build_tiny_sd3(0, "sd3")
    model = save_sai_file(comps, tmp_path / "sd3_medium_incl_clips_t5xxl.safetensors")
    folder = save_pipeline_folder(comps, tmp_path / "sd3_diffusers")
    out = tmp_path / "out"
    run(SD3_TRAIN, model=model, data=data_dir, out=out)
    same, changed = untouched_and_changed(model, out / "sd3.safetensors")
    assert any(k.startswith("text_encoders.clip_l.") for k in changed)
    assert not [k for k in changed if k.startswith(("text_encoders.clip_g.", "text_encoders.t5xxl.", "first_stage_model."))]
    last = "model.diffusion_model.joint_blocks.1.x_block.adaLN_modulation.1."
    assert {last + "weight", last + "bias"} <= same, "--num_last_block_to_freeze 2: the last two x_block tensors"
    assert "model.diffusion_model.joint_blocks.1.x_block.mlp.fc2.weight" in changed
    pipe = StableDiffusion3Pipeline.from_single_file(str(out / "sd3.safetensors"), config=str(folder), local_files_only=True)
    assert_same_weights(pipe.transformer, state_part(out / "sd3-state", "denoiser"))
    clip_l = state_part(out / "sd3-state", "text_encoder_0")
    # diffusers' SD3 single-file reader sets CLIP's text_projection to the identity whatever the file holds
    assert_same_weights(pipe.text_encoder, {k: v for k, v in clip_l.items() if not k.startswith("text_projection")})
    saved = tensors(out / "sd3.safetensors")
    assert torch.equal(saved["text_encoders.clip_l.transformer.text_projection.weight"], clip_l["text_projection.weight"])


FLUX_TRAIN = """finetune --pretrained_model_name_or_path {flux1} --clip_l {clip_l} --t5xxl {t5xxl} --ae {ae}
--save_model_as safetensors --sdpa --persistent_data_loader_workers --max_data_loader_n_workers 0
--seed 42 --gradient_checkpointing --mixed_precision bf16 --save_precision bf16
--dataset_config {dataset} --output_dir {out} --output_name output-name
--learning_rate 5e-5 --max_train_epochs 2 --sdpa --highvram --cache_text_encoder_outputs_to_disk --cache_latents_to_disk --save_every_n_epochs 1
--optimizer_type adafactor --optimizer_args "relative_step=False" "scale_parameter=False" "warmup_init=False"
--lr_scheduler constant_with_warmup --max_grad_norm 0.0
--timestep_sampling shift --discrete_flow_shift 3.1582 --model_prediction_type raw --guidance_scale 1.0
--fused_backward_pass  --blocks_to_swap 4 --full_bf16 --save_state"""


def test_seed_flux_train_py_command(tmp_path):
    """Seed 001's FLUX.1 fine-tuning command (24 GB: fused Adafactor, 8 blocks swapped, full bf16) on a tiny FLUX
    with 4 double and 6 single blocks (4 swapped). diffusers' FLUX single-file reader assumes FLUX.1's width, so
    the file is read back through the BFL key table and compared with the training state."""
    from diffusers import FluxTransformer2DModel

    from lorakit.families.flux.bfl_keys import bfl_to_diffusers
    from lorakit.families.flux.tiny import build_tiny_flux, save_bfl_files

    comps = build_tiny_flux(0)
    torch.manual_seed(1)
    comps.denoiser = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=4, num_single_layers=6, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    files = save_bfl_files(comps, tmp_path / "models")
    data = write_dreambooth_folder(tmp_path / "data", count=1, repeats=1)
    dataset = tmp_path / "dataset_1024_bs1.toml"
    dataset.write_text(f'[general]\ncaption_extension = ".caption"\n[[datasets]]\nresolution = 64\nbatch_size = 1\n'
                       f'[[datasets.subsets]]\nimage_dir = "{next(data.iterdir())}"\nnum_repeats = 1\n', encoding="utf-8")
    out = tmp_path / "out"
    run(FLUX_TRAIN, **files, dataset=dataset, out=out)
    assert (out / "output-name-000001.safetensors").is_file()
    saved = tensors(out / "output-name.safetensors")
    assert set(saved) == set(tensors(files["flux1"])) and all(v.dtype == torch.bfloat16 for v in saved.values())
    trained = state_part(out / "output-name-state", "denoiser")
    assert all(v.dtype == torch.bfloat16 for v in trained.values()), "--full_bf16"
    read_back = bfl_to_diffusers(saved)
    assert read_back.keys() == trained.keys()
    assert all(torch.equal(read_back[k], trained[k]) for k in trained)
    assert metadata(out / "output-name.safetensors")["modelspec.architecture"] == "flux-1-dev"


# ---------------------------------------------------------------------------------------------------------
# Options: every problem at once, before anything loads
# ---------------------------------------------------------------------------------------------------------


def test_options_belong_to_their_command(sd1, data_dir, tmp_path):
    common = [f"--pretrained_model_name_or_path={sd1['safetensors']}", f"--train_data_dir={data_dir}", "--resolution=64",
              f"--output_dir={tmp_path}"]
    with pytest.raises(ConfigError) as error:
        parse_train_args(common + ["--network_dim=4", "--fused_backward_pass", "--blockwise_fused_optimizers",
                                   "--ema_update_every=2"], command="finetune")
    text = str(error.value)
    assert "--network_dim is an option of `lorakit train`" in text
    assert "exclude each other" in text and "--ema_update_every needs --ema_decay" in text
    with pytest.raises(ConfigError, match="--train_text_encoder is an option of `lorakit finetune`"):
        parse_train_args(common + ["--train_text_encoder"])
    code = main(["finetune", *common, "--block_lr=" + ",".join(["1e-4"] * 23), "--blocks_to_swap=2",
                 "--num_last_block_to_freeze=1"])
    assert code == 2


def test_sd_family_checks_before_loading(sd1, data_dir, tmp_path, capsys):
    args = ["finetune", f"--pretrained_model_name_or_path={sd1['safetensors']}", f"--train_data_dir={data_dir}",
            "--resolution=64", f"--output_dir={tmp_path}", "--block_lr=1,2", "--num_last_block_to_freeze=1",
            "--blocks_to_swap=2", "--train_t5xxl", "--train_text_encoder"]
    assert main(args) == 2
    err = capsys.readouterr().err
    for expected in ("--block_lr is sdxl_train.py's", "--num_last_block_to_freeze is sd3_train.py's",
                     "--blocks_to_swap in a fine-tune needs", "--train_t5xxl: the SD 1.x/2.x family has no T5-XXL"):
        assert expected in err, expected


def test_no_token_padding_is_accepted_with_a_warning_that_it_does_nothing():
    from lorakit.config import parse_train_args

    argv = ["--pretrained_model_name_or_path=m.safetensors", "--train_data_dir=d", "--output_dir=o", "--resolution=64"]
    _, warnings = parse_train_args([*argv, "--no_token_padding"], command="dreambooth")
    assert any(w.startswith("--no_token_padding has no effect") for w in warnings), warnings
    _, warnings = parse_train_args(argv, command="dreambooth")
    assert not any("no_token_padding" in w for w in warnings)
