"""FLUX.2 [klein]: loading both layouts (sharded text encoder, ComfyUI prefix), BFL keys as diffusers' own converter
reads them, exact detection, missing parts named, latents/text/positions as Flux2KleinPipeline builds them, LoRA names
as ComfyUI's key table has them, diffusers' Flux2KleinPipeline.load_lora_weights as an independent reader of our
files, training from the command line with the memory options, and the tools."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from helpers import random_network, write_dreambooth_folder
from lorakit.adapters.formats import load_lora_file, save_lora_file
from lorakit.cli.main import main
from lorakit.errors import CheckpointError
from lorakit.families.flux2 import bfl_keys
from lorakit.families.flux2.family import Flux2Family
from lorakit.families.flux2.loading import load_flux2_components
from lorakit.families.flux2.packing import image_ids, pack, patchify, text_ids, unpack
from lorakit.families.flux2.tiny import TINY_TRANSFORMER, build_tiny_flux2, save_bfl_files, save_pipeline_folder
from lorakit.families.registry import detect_family, get_family
from lorakit.tools.common import load_lora

PROMPT = "a red square on a blue background"
META = {"ss_network_module": "networks.lora_flux_2", "ss_base_model_version": "flux_2_klein_4b"}


def net_cfg(*args: str, dim: int = 4):
    values = dict(a.split("=", 1) for a in args)
    return SimpleNamespace(network_dim=dim, network_alpha=2.0, network_args=list(args) or None, network_kwargs=lambda: dict(values),
                           network_train_unet_only=True, network_train_text_encoder_only=False, network_dropout=None,
                           network_module="networks.lora_flux_2")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    comps = build_tiny_flux2(0)
    files = save_bfl_files(comps, root / "bfl", shards=2)
    files["comfy"] = save_bfl_files(comps, root / "comfy", comfy_prefix=True)["flux2"]
    files["folder"] = save_pipeline_folder(comps, root / "diffusers")
    return files


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_folder_original_and_comfy_files_load_the_same_model(saved):
    folder = load_flux2_components(str(saved["folder"]))
    for transformer in (saved["flux2"], saved["comfy"]):
        single = load_flux2_components(str(transformer), text_encoder=str(saved["text_encoder"]), vae=str(saved["ae"]))
        _same(folder.denoiser, single.denoiser)
        _same(folder.vae, single.vae)
        _same(folder.text_encoders[0].model, single.text_encoders[0])  # a file's Qwen3 is the decoder stack alone


def test_bfl_keys_are_those_diffusers_own_converter_reads(saved):
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    with safe_open(str(saved["flux2"]), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    ours = bfl_keys.bfl_to_diffusers(dict(state))
    theirs = convert_flux2_transformer_checkpoint_to_diffusers(dict(state))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert bfl_keys.diffusers_to_bfl(ours).keys() == state.keys()


def test_detection_is_exact(saved, tmp_path):
    from lorakit.families.chroma.tiny import build_tiny_chroma, save_bfl_files as save_chroma
    from lorakit.families.flux.tiny import build_tiny_flux, save_bfl_files as save_flux

    for path in (saved["flux2"], saved["comfy"], saved["folder"]):
        assert detect_family(str(path)) == "flux2"
        assert not [name for name in ("flux", "chroma", "sd3", "sdxl") if get_family(name).owns_checkpoint(str(path))]
    others = [save_flux(build_tiny_flux(0), tmp_path / "flux")["flux1"], save_chroma(build_tiny_chroma(0), tmp_path / "chroma")["chroma"]]
    assert not [str(p) for p in others + [saved["ae"], saved["text_encoder"]] if Flux2Family().owns_checkpoint(str(p))]


def test_missing_parts_are_named(saved, tmp_path):
    with pytest.raises(CheckpointError, match="also pass --text_encoder, --vae"):
        load_flux2_components(str(saved["flux2"]))
    first = saved["text_encoder"]
    lonely = tmp_path / first.name
    lonely.write_bytes(first.read_bytes())
    with pytest.raises(CheckpointError, match="shard .*00002-of-00002.safetensors is missing"):
        load_flux2_components(str(saved["flux2"]), text_encoder=str(lonely), vae=str(saved["ae"]))
    (tmp_path / first.name.replace("00001", "00002")).write_bytes(first.with_name(first.name.replace("00001", "00002")).read_bytes())
    with pytest.raises(CheckpointError, match="no Qwen3 tokenizer found"):
        load_flux2_components(str(saved["flux2"]), text_encoder=str(lonely), vae=str(saved["ae"]))


def test_dev_is_refused_clearly(tmp_path):
    from diffusers import Flux2Transformer2DModel

    from lorakit.families.flux2.model_files import save_transformer_file

    dev = Flux2Transformer2DModel(**{**TINY_TRANSFORMER, "joint_attention_dim": 15360, "guidance_embeds": True})
    save_transformer_file(dev, tmp_path / "dev.safetensors")
    with pytest.raises(CheckpointError, match=r"FLUX.2 \[dev\] transformer"):
        load_flux2_components(str(tmp_path / "dev.safetensors"))


def test_latents_text_and_positions_are_the_pipeline_s(saved):
    from diffusers import Flux2KleinPipeline

    family, comps = Flux2Family(), load_flux2_components(str(saved["folder"]))
    comps.extras.update(max_length=64, model_prediction_type="raw")
    pipe = family.pipeline(comps)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = family.encode_images(comps, images)
        theirs = pipe._encode_vae_image(images, generator=None)
        text = family.encode_text(comps, [PROMPT, "sks"]).tensors["qwen3"]
        their_text = Flux2KleinPipeline._get_qwen3_prompt_embeds(comps.text_encoders[0], comps.tokenizers[0], [PROMPT, "sks"],
                                                                 max_sequence_length=64)
    torch.testing.assert_close(patchify(latents), theirs)
    torch.testing.assert_close(pack(latents), Flux2KleinPipeline._pack_latents(theirs))
    assert torch.equal(unpack(pack(latents), 8, 8), latents)
    torch.testing.assert_close(text, their_text)
    assert torch.equal(image_ids(8, 8, torch.device("cpu")), Flux2KleinPipeline._prepare_latent_ids(theirs)[0])
    assert torch.equal(text_ids(64, torch.device("cpu")), Flux2KleinPipeline._prepare_text_ids(text)[0])


# ------------------------------------------------------------------------------------------ LoRA files


def comfy_key_table(comfy_file) -> dict[str, tuple[int, ...]]:
    """ComfyUI's key table for a model it loads in BFL layout, from its rule (comfy/lora.py, model_lora_keys_unet):
    every `diffusion_model.<path>.weight` is reachable as `lora_unet_<path with dots as underscores>`."""
    table = {}
    with safe_open(str(comfy_file), "pt") as f:
        for key in f.keys():
            path = key.removeprefix("model.")
            if path.startswith("diffusion_model.") and path.endswith(".weight"):
                table["lora_unet_" + path[len("diffusion_model."):-len(".weight")].replace(".", "_")] = tuple(f.get_slice(key).get_shape())
    return table


def test_every_lora_module_is_in_comfyui_key_table(saved):
    family, comps = Flux2Family(), build_tiny_flux2(0)
    state = random_network(family, comps, net_cfg("in_dims=[2,2,2,2,2]"), seed=1).state_dict_kohya()
    table = comfy_key_table(saved["comfy"])
    modules = {k.split(".")[0] for k in state}
    assert {"lora_unet_img_in", "lora_unet_time_in_in_layer", "lora_unet_double_blocks_0_txt_mlp_0",
            "lora_unet_single_blocks_1_linear1"} <= modules
    for name in modules:
        assert name in table, name
        assert (state[f"{name}.lora_up.weight"].shape[0], state[f"{name}.lora_down.weight"].shape[1]) == table[name][:2], name


def _render(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=PROMPT, num_inference_steps=2, guidance_scale=4.0, width=64, height=64, max_sequence_length=64,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_diffusers_pipeline_reads_our_file_as_lorakit_merges_it(saved, tmp_path, layout):
    """Ours: `lorakit lora merge` into the diffusers folder. Theirs: diffusers' Flux2KleinPipeline with our kohya file
    or the one `lorakit lora convert --to diffusers` wrote, loaded by `load_lora_weights`."""
    from diffusers import Flux2KleinPipeline

    network = random_network(Flux2Family(), build_tiny_flux2(0), net_cfg(), seed=3)
    kohya = tmp_path / "kohya.safetensors"
    save_lora_file(network.state_dict_kohya(), kohya, META)
    assert main(["lora", "merge", "--sd_model", str(saved["folder"]), "--models", str(kohya), "--save_to", str(tmp_path / "merged")]) == 0
    loaded = kohya
    if layout == "diffusers":
        loaded = tmp_path / "peft.safetensors"
        assert main(["lora", "convert", "--src_path", str(kohya), "--dst_path", str(loaded), "--to", "diffusers"]) == 0
        assert any(".attn.to_qkv_mlp_proj.lora_A." in k for k in load_lora_file(loaded)[0])
    base = _render(Flux2KleinPipeline.from_pretrained(str(saved["folder"]), local_files_only=True))
    ours = _render(Flux2KleinPipeline.from_pretrained(str(tmp_path / "merged"), local_files_only=True))
    theirs_pipe = Flux2KleinPipeline.from_pretrained(str(saved["folder"]), local_files_only=True)
    theirs_pipe.load_lora_weights(str(loaded), adapter_name="ours")
    theirs = _render(theirs_pipe)
    assert (theirs - base).abs().max() > 1e-3
    assert (theirs - ours).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------ training and tools


def _train(model_args, data, out, *extra):
    argv = ["train", *model_args, f"--train_data_dir={data}", "--resolution=64", f"--output_dir={out}", "--output_name=tiny",
            "--network_dim=4", "--network_alpha=2", "--max_train_steps=2", "--learning_rate=1e-3", "--seed=3",
            "--max_data_loader_n_workers=0", "--network_train_unet_only", *extra]
    return main(argv)


@pytest.mark.parametrize("extra", [
    ["--model_version=klein-base-4b", "--timestep_sampling=flux_shift", "--weighting_scheme=none",
     "--network_module=networks.lora_flux_2"],
    ["--fp8_base", "--mixed_precision=bf16", "--cache_text_encoder_outputs"],
    ["--gradient_checkpointing", "--cpu_offload_checkpointing", "--train_batch_size=2"],
], ids=["musubi_command", "fp8_cached_text", "offloaded_checkpointing"])
def test_trains_from_the_command_line(saved, tmp_path, extra):
    data = write_dreambooth_folder(tmp_path / "data", count=2, repeats=1)
    files = [f"--pretrained_model_name_or_path={saved['flux2']}", f"--text_encoder={saved['text_encoder']}", f"--vae={saved['ae']}"]
    assert _train(files, data, tmp_path / "out", *extra) == 0
    state, metadata = load_lora_file(tmp_path / "out" / "tiny.safetensors")
    assert metadata["ss_base_model_version"] == "flux_2_klein_4b" and metadata["modelspec.architecture"] == "Flux.2-klein-4b/lora"
    assert metadata["modelspec.implementation"] == "https://github.com/black-forest-labs/flux2"
    assert state and all(k.startswith("lora_unet_") for k in state) and all(v.isfinite().all() for v in state.values())


def test_wrong_model_version_and_blocks_to_swap_are_clear_errors(saved, tmp_path, capsys):
    data = write_dreambooth_folder(tmp_path / "data", count=1, repeats=1)
    folder = [f"--pretrained_model_name_or_path={saved['folder']}"]
    assert _train(folder, data, tmp_path / "out", "--model_version=klein-base-9b") == 2
    assert "--model_version klein-base-9b" in capsys.readouterr().err
    assert _train(folder, data, tmp_path / "out2", "--blocks_to_swap=1") == 2
    assert "--blocks_to_swap 1" in capsys.readouterr().err


def test_inspect_resize_and_extract(saved, tmp_path, capsys):
    network = random_network(Flux2Family(), build_tiny_flux2(0), net_cfg(), seed=5)
    lora = tmp_path / "lora.safetensors"
    save_lora_file(network.state_dict_kohya(), lora, META)
    assert main(["lora", "inspect", str(lora)]) == 0
    out = capsys.readouterr().out
    assert "flux2" in out and "musubi-tuner reads it" in out
    assert main(["lora", "resize", "--model", str(lora), "--save_to", str(tmp_path / "r2.safetensors"), "--new_rank", "2"]) == 0
    assert {v.shape[0] for k, v in load_lora_file(tmp_path / "r2.safetensors")[0].items() if k.endswith("lora_down.weight")} == {2}
    merged = tmp_path / "merged.safetensors"
    assert main(["lora", "merge", "--sd_model", str(saved["flux2"]), "--models", str(lora), "--save_to", str(merged)]) == 0
    assert detect_family(str(merged)) == "flux2"
    extracted = tmp_path / "extracted.safetensors"
    assert main(["lora", "extract", "--model_org", str(saved["flux2"]), "--model_tuned", str(merged), "--save_to", str(extracted),
                 "--dim", "4", "--clamp_quantile", "1"]) == 0
    original, recovered = load_lora(lora), load_lora(extracted)
    assert recovered.family.name == "flux2" and recovered.modules.keys() == original.modules.keys()
    for name, module in original.modules.items():
        torch.testing.assert_close(recovered.modules[name].delta(), module.delta(), atol=2e-5, rtol=1e-4)


def test_sample_command_shows_the_lora(saved, tmp_path):
    import numpy as np
    from PIL import Image

    lora = tmp_path / "lora.safetensors"
    save_lora_file(random_network(Flux2Family(), build_tiny_flux2(0), net_cfg(), seed=7).state_dict_kohya(), lora, META)
    images = []
    for name, extra in (("base", []), ("lora", ["--lora", f"{lora};1.0"])):
        out = tmp_path / f"{name}.png"
        assert main(["sample", "--ckpt_path", str(saved["folder"]), "--prompt", PROMPT, "--width", "64", "--height", "64",
                     "--steps", "2", "--seed", "1", "--output", str(out), *extra]) == 0
        images.append(np.asarray(Image.open(out).convert("RGB"), dtype=np.int16))
    assert np.abs(images[0] - images[1]).mean() > 0.5
