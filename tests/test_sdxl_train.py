"""SDXL end to end through `lorakit train` (`lorakit.cli.main.main`), on a tiny SDXL-architecture model.

* two optimizer steps from a diffusers folder and from an SGM single file, with and without cached
  text-encoder outputs, epsilon and v-prediction (auto-detected and with `--family=sdxl`);
* the trained LoRA file (U-Net + both text encoders, LierLa and C3Lier), loaded by diffusers'
  `StableDiffusionXLPipeline.load_lora_weights`, renders what lorakit's own merge of that file renders;
* seed 000's SDXL command (the user's LyCORIS guide) run for real with only the paths changed;
* files of another family (an SD 1.5 LoRA as --network_weights, an SD 1.5 checkpoint with --family=sdxl)
  end with exit status 2 and a message saying what was found and what was expected.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from helpers import load_local_pipeline, lora_options, render, write_dreambooth_folder, write_tiny_checkpoints, targets_of
from lorakit.adapters.formats import load_lora_file
from lorakit.adapters.network import LoRANetwork
from lorakit.cli.main import main
from lorakit.checkpoint_io import write_safetensors_atomic
from lorakit.families.sdxl import sgm_keys
from lorakit.families.sdxl.family import StableDiffusionXLFamily
from lorakit.families.sdxl.tiny import build_tiny_sdxl, save_sdxl_diffusers_folder
from test_seed_commands import SEED_000


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """One process runs trainings with different --mixed_precision; accelerate keeps its state per process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The same tiny SDXL (seed 0) as a diffusers folder and as an SGM single file."""
    root = tmp_path_factory.mktemp("sdxl_models")
    comps = build_tiny_sdxl(seed=0)
    paths = {"folder": root / "sdxl_diffusers", "single_file": root / "sdxl.safetensors"}
    save_sdxl_diffusers_folder(comps, paths["folder"])
    sgm_keys.save_sdxl_single_file(comps, paths["single_file"])
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dreambooth_folder(tmp_path_factory.mktemp("sdxl_data") / "img", count=2, repeats=1)


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", "--resolution=64",
        f"--output_dir={out}", "--output_name=tiny", "--network_module=networks.lora", "--network_dim=4",
        "--network_alpha=2", "--max_train_steps=2", "--learning_rate=1e-3", "--seed=1",
        "--max_data_loader_n_workers=0", *extra,
    ]


class Spy:
    """Records what the SDXL family was asked for during a run: the objective and every text-encoder call."""

    def __init__(self, monkeypatch):
        self.objectives: list = []
        self.encoded: list[tuple[list[str], bool]] = []
        objective, run_encoders = StableDiffusionXLFamily.objective, StableDiffusionXLFamily.text_encoder_outputs

        def spy_objective(family, cfg, comps):
            result = objective(family, cfg, comps)
            self.objectives.append(result)
            return result

        def spy_run_encoders(family, comps, captions, clip_skip=None):
            self.encoded.append((list(captions), torch.is_grad_enabled()))
            return run_encoders(family, comps, captions, clip_skip)

        monkeypatch.setattr(StableDiffusionXLFamily, "objective", spy_objective)
        monkeypatch.setattr(StableDiffusionXLFamily, "text_encoder_outputs", spy_run_encoders)


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# -- 1. two steps: folder / single file x cached / uncached text x epsilon / v --------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("cached", [False, True], ids=["te-trained", "te-cached"])
@pytest.mark.parametrize("source", ["folder", "single_file"])
def test_two_steps(models, data, tmp_path, monkeypatch, source, cached, prediction):
    spy = Spy(monkeypatch)
    out = tmp_path / "out"
    extra = ["--cache_text_encoder_outputs", "--network_train_unet_only"] if cached else []
    extra += ["--v_parameterization"] if prediction == "v" else []
    # the folder run names the family, the single-file run lets lorakit detect it
    extra += ["--family=sdxl"] if source == "folder" else []
    assert main(train_args(models[source], data, out, *extra)) == 0

    tensors, meta = read_lora(out / "tiny.safetensors")
    prefixes = {key.split("_")[1] for key in tensors}
    assert prefixes == ({"unet"} if cached else {"unet", "te1", "te2"})
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.") for k in tensors)
    assert not any(k.startswith(("lora_unet_down_blocks", "lora_te_")) for k in tensors)
    ups = [v for k, v in tensors.items() if k.endswith(".lora_up.weight")]
    assert any(v.abs().sum() > 0 for v in ups), "two optimizer steps must move the zero-initialised up weights"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.prediction_type"] == prediction

    assert [o.v_prediction for o in spy.objectives] == [prediction == "v"]
    captions = {"sks toy, a square number 0", "sks toy, a square number 1"}
    if cached:
        # each distinct caption went through the encoders once, without gradients, and was reused after
        encoded = [c for batch, _ in spy.encoded for c in batch]
        assert sorted(encoded) == sorted(captions)
        assert not any(grad for _, grad in spy.encoded)
    else:
        # trained encoders run on every step, with gradients for their LoRA modules
        assert len(spy.encoded) >= 2 and all(grad for _, grad in spy.encoded)


# -- 2. the trained file, read by diffusers ------------------------------------------------------------------


@pytest.mark.parametrize("conv", [False, True], ids=["lierla", "c3lier"])
def test_trained_file_loads_in_diffusers_as_our_merge(models, data, tmp_path, conv):
    """Train U-Net + both encoders for two steps (a large learning rate, so the LoRA visibly changes the
    image), then render: the file merged by lorakit vs the file loaded by diffusers' load_lora_weights."""
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "out"
    extra = ["--learning_rate=5e-2", "--network_args", "conv_dim=4", "conv_alpha=2"] if conv else ["--learning_rate=5e-2"]
    assert main(train_args(models["single_file"], data, out, *extra)) == 0
    lora_file = out / "tiny.safetensors"
    state, _ = load_lora_file(str(lora_file))
    assert {key.split("_")[1] for key in state} == {"unet", "te1", "te2"}
    assert any(k.startswith("lora_unet_input_blocks_1_0_in_layers_2.") for k in state) == conv

    ours = load_local_pipeline(StableDiffusionXLPipeline, models["folder"])
    comps = SimpleNamespace(denoiser=ours.unet, text_encoders=[ours.text_encoder, ours.text_encoder_2])
    network = LoRANetwork(targets_of(StableDiffusionXLFamily(), comps, lora_options(conv)))
    assert network.load_kohya_state_dict(state, source=str(lora_file)) == []  # every module has its weights
    base = render(ours)
    network.merge_to_base()
    merged = render(ours)

    theirs = load_local_pipeline(StableDiffusionXLPipeline, models["folder"])
    theirs.load_lora_weights(str(lora_file), adapter_name="trained")
    loaded = render(theirs)
    te1, te2 = (getattr(te, "text_model", te) for te in (theirs.text_encoder, theirs.text_encoder_2))
    assert hasattr(te1.encoder.layers[1].self_attn.q_proj, "lora_A")
    assert hasattr(te2.encoder.layers[2].mlp.fc2, "lora_A")
    assert hasattr(theirs.unet.down_blocks[0].resnets[0].conv1, "lora_A") == conv

    assert (merged - base).abs().max() > 1e-2, "the LoRA must change the image for the comparison to mean anything"
    assert (loaded - merged).abs().max() < 1e-4


# -- 3. seed 000 ---------------------------------------------------------------------------------------------


def test_seed_000_command(tmp_path):
    """Seed 000 (`sdxl_train_network.py` with lycoris.kohya LoCon, fp16, cached latents on disk, multires noise,
    gradient accumulation 6, batch 8) on a tiny SDXL single file with only the paths changed, plus
    `--max_train_steps=2` appended (the command's own 400 steps at 1024 px would take hours on a CPU; the
    later value wins, as in sd-scripts). Its step-100 sampling and epoch-50 saving are therefore not reached.
    On a machine without CUDA, --mixed_precision=fp16 falls back to float32 with a warning."""
    model = tmp_path / "model" / "sdxl.safetensors"
    sgm_keys.save_sdxl_single_file(build_tiny_sdxl(seed=0), model)
    data = write_dreambooth_folder(tmp_path / "training_dir", count=1, repeats=1)
    image_dir = data / "1_sks toy"
    for caption in image_dir.glob("*.caption"):  # the seed reads --caption_extension=".txt"
        caption.rename(caption.with_suffix(".txt"))
    prompts = tmp_path / "training_dir" / "sample-prompts.txt"
    prompts.write_text("sks toy --n blurry --w 64 --h 64 --d 1 --l 6.0 --s 2\n", encoding="utf-8")
    out = tmp_path / "output_dir"
    command = SEED_000.format(model=model, data=data, out=out, prompts=prompts)
    assert main(["train", *shlex.split(command), "--max_train_steps=2"]) == 0

    tensors, meta = read_lora(out / "yifftoolkit.safetensors")
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert all(t.dtype == torch.float16 for t in tensors.values()), "--save_precision=fp16"
    prefixes = {key.split("_")[1] for key in tensors}
    assert prefixes == {"unet", "te1", "te2"}  # preset=full trains both text encoders too
    # algo=locon: linears at network_dim 8 (block_dims) with block alpha 0.0625, 3x3 convs at conv_dim 256, alpha 4
    linear = [k for k in tensors if k.startswith("lora_unet_") and k.endswith("attn2_to_k.lora_down.weight")]
    assert linear and all(tensors[k].shape[0] == 8 for k in linear)
    assert all(tensors[k.replace("lora_down.weight", "alpha")].item() == 0.0625 for k in linear)
    conv = [k for k in tensors if k.startswith("lora_unet_") and k.endswith(".lora_down.weight") and tensors[k].dim() == 4
            and tensors[k].shape[-1] == 3]
    assert conv and all(tensors[k].shape[0] == 256 for k in conv)
    assert all(tensors[k.replace("lora_down.weight", "alpha")].item() == 4 for k in conv)
    assert list(image_dir.glob("*_sdxl.npz")), "--cache_latents_to_disk writes the latents beside the image"
    # U-Net modules carry SGM names, as sd-scripts' SDXL LyCORIS files do (and ComfyUI/Forge expect)
    unet = [k for k in tensors if k.startswith("lora_unet_")]
    assert any(k.startswith("lora_unet_input_blocks_") for k in unet)
    assert any(k.startswith("lora_unet_output_blocks_") for k in unet)
    assert not any(k.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_")) for k in unet)


# -- 4. files of another family --------------------------------------------------------------------------------


def assert_clean_failure(capsys, argv: list[str], *expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    return err


def test_sd15_lora_as_network_weights(models, data, tmp_path, capsys):
    sd_lora = tmp_path / "sd15_lora.safetensors"
    write_safetensors_atomic({
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 32),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 4),
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 64),
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": torch.zeros(64, 4),
    }, sd_lora)
    out = tmp_path / "out"
    err = assert_clean_failure(
        capsys, train_args(models["single_file"], data, out, f"--network_weights={sd_lora}"),
        str(sd_lora), "an SD 1.x/2.x LoRA", "lora_te1_", "lora_te2_",
    )
    assert "this model's LoRA uses" in err
    assert not (out / "tiny.safetensors").exists()


def test_sd15_checkpoint_with_family_sdxl(data, tmp_path, capsys):
    sd15 = write_tiny_checkpoints(tmp_path / "models", "sd1")
    out = tmp_path / "out"
    for source in ("safetensors", "folder"):
        err = assert_clean_failure(
            capsys, train_args(sd15[source], data, out, "--family=sdxl"), str(sd15[source]), "SDXL", "--family sd",
        )
        assert "SD 1.x/2.x checkpoint" in err or "StableDiffusionPipeline model, not SDXL" in err
    assert not (out / "tiny.safetensors").exists()
