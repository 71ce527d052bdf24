"""Chroma: loading both layouts, exact detection, missing parts named, padding masks as sd-scripts, LoRA names as
ComfyUI's key table has them, diffusers' ChromaPipeline.load_lora_weights as an independent reader of our files
(kohya and converted), training from the command line with the memory options, and the tools."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from helpers import random_network, write_dreambooth_folder
from lorakit.adapters.formats import load_lora_file, save_lora_file
from lorakit.cli.main import main
from lorakit.errors import CheckpointError
from lorakit.families.base import TextConditioning
from lorakit.families.chroma import bfl_keys
from lorakit.families.chroma.family import ChromaFamily
from lorakit.families.chroma.loading import load_chroma_components
from lorakit.families.chroma.masking import install_key_mask, trim_text
from lorakit.families.chroma.tiny import build_tiny_chroma, save_bfl_files, save_pipeline_folder
from lorakit.families.registry import detect_family, get_family
from lorakit.tools.common import load_lora

PROMPT = "a red square on a blue background"


def net_cfg(*args: str, unet_only: bool = True, dim: int = 4):
    values = dict(a.split("=", 1) for a in args)
    return SimpleNamespace(network_dim=dim, network_alpha=2.0, network_args=list(args) or None, network_kwargs=lambda: dict(values),
                           network_train_unet_only=unet_only, network_train_text_encoder_only=False, network_dropout=None)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("chroma")
    comps = build_tiny_chroma(0)
    files = save_bfl_files(comps, root / "bfl")
    files["comfy"] = save_bfl_files(comps, root / "comfy", comfy_prefix=True)["chroma"]
    files["folder"] = save_pipeline_folder(comps, root / "diffusers")
    return files


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_folder_original_and_comfy_files_load_the_same_model(saved):
    folder = load_chroma_components(str(saved["folder"]))
    for transformer in (saved["chroma"], saved["comfy"]):
        single = load_chroma_components(str(transformer), t5xxl=str(saved["t5xxl"]), ae=str(saved["ae"]))
        for a, b in [(folder.denoiser, single.denoiser), (folder.vae, single.vae), (folder.text_encoders[0], single.text_encoders[0])]:
            _same(a, b)


def test_original_layout_has_no_flux1_modulation_and_round_trips(saved):
    with safe_open(str(saved["chroma"]), "pt") as f:
        keys = set(f.keys())
    assert "distilled_guidance_layer.norms.0.scale" in keys and "double_blocks.0.img_attn.qkv.weight" in keys
    assert not any(part in k for k in keys for part in ("img_mod", "txt_mod", "modulation.lin", "vector_in", "time_in"))
    state = build_tiny_chroma(0).denoiser.state_dict()
    back = bfl_keys.bfl_to_diffusers(bfl_keys.diffusers_to_bfl(state))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_detection_is_exact(saved, tmp_path):
    from lorakit.families.flux.tiny import build_tiny_flux, save_bfl_files as save_flux

    for path in (saved["chroma"], saved["comfy"], saved["folder"]):
        assert detect_family(str(path)) == "chroma"
        assert not get_family("flux").owns_checkpoint(str(path))
    flux = save_flux(build_tiny_flux(0), tmp_path / "flux")["flux1"]
    assert detect_family(str(flux)) == "flux" and not ChromaFamily().owns_checkpoint(str(flux))
    assert not ChromaFamily().owns_checkpoint(str(saved["ae"])) and not ChromaFamily().owns_checkpoint(str(saved["t5xxl"]))


def test_missing_parts_are_named(saved, tmp_path):
    with pytest.raises(CheckpointError, match="also pass --t5xxl, --ae"):
        load_chroma_components(str(saved["chroma"]))
    lonely = tmp_path / "t5xxl.safetensors"
    lonely.write_bytes(saved["t5xxl"].read_bytes())
    with pytest.raises(CheckpointError, match="no T5 tokenizer found"):
        load_chroma_components(str(saved["chroma"]), t5xxl=str(lonely), ae=str(saved["ae"]))
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: file not found \(--ae\)"):
        load_chroma_components(str(saved["chroma"]), t5xxl=str(saved["t5xxl"]), ae=str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="autoencoder"):
        load_chroma_components(str(saved["ae"]), t5xxl=str(saved["t5xxl"]), ae=str(saved["ae"]))


# ------------------------------------------------------------------------------------------ padding mask


def _predict(family, comps, latents, text):
    timesteps = torch.full((latents.shape[0],), 600.0)
    with torch.no_grad():
        return family.predict(comps, latents, timesteps, text, None)


def test_padding_is_hidden_as_sd_scripts_hides_it():
    """Each caption sees its own tokens and one padding token: in a batch of captions of different lengths every
    sample gets what it gets alone, and what the hidden padding holds changes nothing."""
    family, comps = ChromaFamily(), build_tiny_chroma(0)
    comps.extras.update(t5_max_length=32, model_prediction_type="raw", key_mask=install_key_mask(comps.denoiser))
    text = family.encode_text(comps, ["sks toy, a square", "a much longer caption about a red square on blue"])
    kept = text.tensors["t5_attn_mask"].sum(dim=1) + 1
    assert kept[0] < kept[1] < 32
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    both = _predict(family, comps, latents, text)
    alone = _predict(family, comps, latents[:1], TextConditioning({k: v[:1] for k, v in text.tensors.items()}))
    torch.testing.assert_close(both[:1], alone, atol=1e-5, rtol=1e-5)
    noisy = dict(text.tensors)
    noisy["t5_out"] = noisy["t5_out"].clone()
    noisy["t5_out"][0, int(kept[0]):] = 7.0  # hidden padding of the short caption
    torch.testing.assert_close(_predict(family, comps, latents, TextConditioning(noisy)), both, atol=1e-5, rtol=1e-5)
    hidden, keep = trim_text(text.tensors["t5_out"], text.tensors["t5_attn_mask"])
    assert hidden.shape[1] == int(kept[1]) and keep.sum(dim=1).tolist() == kept.tolist()


# ------------------------------------------------------------------------------------------ LoRA files


def comfy_key_table(comfy_file) -> dict[str, tuple[int, ...]]:
    """ComfyUI's key table for a model it loads from a file in BFL layout, written from its rule (comfy/lora.py,
    model_lora_keys_unet): every `diffusion_model.<path>.weight` of the model is reachable as
    `lora_unet_<path with dots as underscores>`. Values are the weights' shapes."""
    table = {}
    with safe_open(str(comfy_file), "pt") as f:
        for key in f.keys():
            path = key.removeprefix("model.")  # the file's `model.diffusion_model.` is ComfyUI's `diffusion_model.`
            if path.startswith("diffusion_model.") and path.endswith(".weight"):
                table["lora_unet_" + path[len("diffusion_model."):-len(".weight")].replace(".", "_")] = tuple(f.get_slice(key).get_shape())
    return table


def test_every_lora_module_is_in_comfyui_key_table(saved, tmp_path):
    family, comps = ChromaFamily(), build_tiny_chroma(0)
    network = random_network(family, comps, net_cfg("in_dims=[2,2,2,2,2]", "split_qkv=True"), seed=1)
    state = network.state_dict_kohya()
    table = comfy_key_table(saved["comfy"])
    modules = {k.rsplit(".", 2)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in state}
    assert {"lora_unet_img_in", "lora_unet_txt_in", "lora_unet_single_blocks_1_linear1"} <= modules
    for name in modules:
        assert name in table, name
        up, down = state[f"{name}.lora_up.weight"], state[f"{name}.lora_down.weight"]
        assert (up.shape[0], down.shape[1]) == table[name][:2], name
    t5 = random_network(family, comps, net_cfg("train_t5xxl=True", unet_only=False), seed=1).state_dict_kohya()
    t5_keys = [k for k in t5 if k.startswith("lora_te3_")]
    assert t5_keys and "not loaded" in family.loader_support("kohya", "lora", t5_keys)["ComfyUI"]


def _render(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=2, guidance_scale=4.0, width=64, height=64, max_sequence_length=32,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_diffusers_pipeline_reads_our_file_as_lorakit_merges_it(saved, tmp_path, layout):
    """Ours: `lorakit lora merge` into the diffusers folder. Theirs: diffusers' ChromaPipeline with the file loaded
    by `load_lora_weights`: our kohya file (double blocks: diffusers' kohya reader assumes width 3072 in single
    blocks) or the whole LoRA converted by `lorakit lora convert --to diffusers`."""
    from diffusers import ChromaPipeline

    family = ChromaFamily()
    args = ("train_blocks=double",) if layout == "kohya" else ()
    network = random_network(family, build_tiny_chroma(0), net_cfg(*args), seed=3)
    kohya = tmp_path / "kohya.safetensors"
    save_lora_file(network.state_dict_kohya(), kohya, {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "chroma"})
    assert main(["lora", "merge", "--sd_model", str(saved["folder"]), "--models", str(kohya), "--save_to", str(tmp_path / "merged")]) == 0
    loaded = kohya
    if layout == "diffusers":
        loaded = tmp_path / "peft.safetensors"
        assert main(["lora", "convert", "--src_path", str(kohya), "--dst_path", str(loaded), "--to", "diffusers"]) == 0
        assert all(k.startswith("transformer.") and ".lora_" in k for k in load_lora_file(loaded)[0])
    base = _render(ChromaPipeline.from_pretrained(str(saved["folder"]), local_files_only=True))
    ours = _render(ChromaPipeline.from_pretrained(str(tmp_path / "merged"), local_files_only=True))
    theirs_pipe = ChromaPipeline.from_pretrained(str(saved["folder"]), local_files_only=True)
    theirs_pipe.load_lora_weights(str(loaded), adapter_name="ours")
    theirs = _render(theirs_pipe)
    assert (theirs - base).abs().max() > 1e-3
    assert (theirs - ours).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------ training and tools


def _train(model_args, data, out, *extra):
    argv = ["train", *model_args, f"--train_data_dir={data}", "--resolution=64", f"--output_dir={out}", "--output_name=tiny",
            "--network_dim=4", "--network_alpha=2", "--max_train_steps=2", "--learning_rate=1e-3", "--seed=3",
            "--max_data_loader_n_workers=0", *extra]
    return main(argv)


@pytest.mark.parametrize("extra", [
    ["--model_type=chroma", "--apply_t5_attn_mask", "--guidance_scale=0.0", "--timestep_sampling=sigmoid",
     "--network_module=networks.lora_flux", "--network_args", "train_t5xxl=True"],
    ["--network_train_unet_only", "--fp8_base", "--mixed_precision=bf16", "--cache_text_encoder_outputs"],
    ["--network_train_unet_only", "--gradient_checkpointing", "--cpu_offload_checkpointing", "--train_batch_size=2"],
], ids=["sd_scripts_command", "fp8_cached_text", "offloaded_checkpointing"])
def test_trains_from_the_command_line(saved, tmp_path, extra):
    data = write_dreambooth_folder(tmp_path / "data", count=2, repeats=1)
    files = [f"--pretrained_model_name_or_path={saved['chroma']}", f"--t5xxl={saved['t5xxl']}", f"--ae={saved['ae']}"]
    assert _train(files, data, tmp_path / "out", *extra) == 0
    state, metadata = load_lora_file(tmp_path / "out" / "tiny.safetensors")
    assert metadata["ss_base_model_version"] == "chroma" and metadata["modelspec.architecture"] == "chroma/lora"
    assert metadata["modelspec.implementation"] == "https://huggingface.co/lodestones/Chroma"
    assert any(k.startswith("lora_te3_") for k in state) == ("train_t5xxl=True" in extra)
    assert all(v.isfinite().all() for v in state.values())


def test_blocks_to_swap_beyond_the_model_is_a_clear_error(saved, tmp_path, capsys):
    data = write_dreambooth_folder(tmp_path / "data", count=1, repeats=1)
    assert _train([f"--pretrained_model_name_or_path={saved['folder']}"], data, tmp_path / "out", "--blocks_to_swap=1") == 2
    assert "--blocks_to_swap 1" in capsys.readouterr().err


def test_inspect_resize_and_extract(saved, tmp_path, capsys):
    family = ChromaFamily()
    network = random_network(family, build_tiny_chroma(0), net_cfg(dim=4), seed=5)
    lora = tmp_path / "lora.safetensors"
    save_lora_file(network.state_dict_kohya(), lora, {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "chroma"})
    assert main(["lora", "inspect", str(lora)]) == 0
    assert "family       chroma" in capsys.readouterr().out
    assert main(["lora", "resize", "--model", str(lora), "--save_to", str(tmp_path / "r2.safetensors"), "--new_rank", "2"]) == 0
    assert {v.shape[0] for k, v in load_lora_file(tmp_path / "r2.safetensors")[0].items() if k.endswith("lora_down.weight")} == {2}
    merged = tmp_path / "merged.safetensors"
    assert main(["lora", "merge", "--sd_model", str(saved["chroma"]), "--models", str(lora), "--save_to", str(merged)]) == 0
    assert detect_family(str(merged)) == "chroma"
    extracted = tmp_path / "extracted.safetensors"
    assert main(["lora", "extract", "--model_org", str(saved["chroma"]), "--model_tuned", str(merged), "--save_to", str(extracted),
                 "--dim", "4", "--clamp_quantile", "1"]) == 0
    original, recovered = load_lora(lora), load_lora(extracted)
    assert recovered.family.name == "chroma" and recovered.modules.keys() == original.modules.keys()
    for name, module in original.modules.items():
        torch.testing.assert_close(recovered.modules[name].delta(), module.delta(), atol=2e-5, rtol=1e-4)


def test_sample_command_shows_the_lora(saved, tmp_path):
    import numpy as np
    from PIL import Image

    family = ChromaFamily()
    lora = tmp_path / "lora.safetensors"
    network = random_network(family, build_tiny_chroma(0), net_cfg(), seed=7)
    save_lora_file(network.state_dict_kohya(), lora, {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "chroma"})
    images = []
    for name, extra in (("base", []), ("lora", ["--lora", f"{lora};1.0"])):
        out = tmp_path / f"{name}.png"
        assert main(["sample", "--ckpt_path", str(saved["folder"]), "--prompt", PROMPT, "--width", "64", "--height", "64",
                     "--steps", "2", "--seed", "1", "--output", str(out), *extra]) == 0
        images.append(np.asarray(Image.open(out).convert("RGB"), dtype=np.int16))
    assert np.abs(images[0] - images[1]).mean() > 0.5
