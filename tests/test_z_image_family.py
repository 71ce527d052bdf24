"""Z-Image family: loading a diffusers folder and the single files ComfyUI and musubi-tuner use (checked against
diffusers' own single-file converter), missing parts named, the pipeline's conditioning, LoRA names against
ComfyUI's key tables, diffusers' ZImagePipeline as an independent reader of our files, and the memory options."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers import load_local_pipeline, random_network
from lorakit.adapters.formats import save_lora_file
from lorakit.errors import CheckpointError, ConfigError
from lorakit.families.base import ModelSource, TextConditioning
from lorakit.families.registry import detect_family, guess_lora_family
from lorakit.families.z_image.family import ZImageFamily
from lorakit.families.z_image.loading import load_z_image_components
from lorakit.families.z_image.lora_convert import diffusers_to_kohya, kohya_to_diffusers
from lorakit.families.z_image.tiny import build_tiny_z_image, pipeline_of, save_pipeline_folder, save_single_files


def options(**overrides):
    base = dict(network_dim=4, network_alpha=2.0, network_args=None, network_train_unet_only=True,
                network_train_text_encoder_only=False)
    base.update(overrides)
    return SimpleNamespace(**base, network_kwargs=lambda: {})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("zimage")
    comps = build_tiny_z_image(0)
    files = save_single_files(comps, root / "single")
    files["folder"] = save_pipeline_folder(comps, root / "diffusers")
    return files


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_folder_and_single_files_load_the_same_model(saved):
    folder = load_z_image_components(str(saved["folder"]))
    single = load_z_image_components(str(saved["z_image"]), text_encoder=str(saved["qwen3"]), vae=str(saved["ae"]))
    for a, b in ((folder.denoiser, single.denoiser), (folder.vae, single.vae), (folder.text_encoders[0], single.text_encoders[0])):
        assert _same_weights(a, b)
    assert detect_family(str(saved["z_image"])) == detect_family(str(saved["folder"])) == "z_image"


def test_comfy_layout_matches_diffusers_own_converter(saved):
    """diffusers' single-file converter reads our ComfyUI-layout file into the very weights we load."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    theirs = convert_z_image_transformer_checkpoint_to_diffusers(load_file(str(saved["z_image"])))
    ours = build_tiny_z_image(0).denoiser.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_missing_parts_are_named(saved, tmp_path):
    with pytest.raises(CheckpointError, match="--text_encoder and --vae"):
        load_z_image_components(str(saved["z_image"]))
    lonely = tmp_path / "qwen3.safetensors"
    lonely.write_bytes(saved["qwen3"].read_bytes())
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_z_image_components(str(saved["z_image"]), text_encoder=str(lonely), vae=str(saved["ae"]))


def test_text_conditioning_follows_the_pipeline():
    comps = build_tiny_z_image(0)
    ours = ZImageFamily().encode_text(comps, ["a photo of sks toy", "toy"])
    theirs, _ = pipeline_of(comps).encode_prompt(["a photo of sks toy", "toy"], do_classifier_free_guidance=False)
    for index, row in enumerate(theirs):
        mask = ours.tensors["text_mask"][index]
        torch.testing.assert_close(ours.tensors["text"][index][mask], row)


def _comfy_table(comps) -> dict[str, tuple[int, ...]]:
    """ComfyUI's keys for a Z-Image model, from the facts of comfy/lora.py and comfy/utils.py: its model holds
    `layers.N.attention.qkv` (q, k, v rows), `attention.out`, `feed_forward.w1..w3`; the generic table maps
    `lora_unet_<name with _>` to each `diffusion_model.<name>.weight`, and the Z-Image table maps diffusers' names
    (`transformer.`/`diffusion_model.`/bare `layers.N.attention.to_q`, `to_out.0`, ...) onto them."""
    config = comps.denoiser.config
    table: dict[str, tuple[int, ...]] = {}
    for index in range(config.n_layers):
        comfy = {"attention.qkv": (3 * config.dim, config.dim), "attention.out": (config.dim, config.dim)}
        hidden = int(config.dim / 3 * 8)
        comfy |= {"feed_forward.w1": (hidden, config.dim), "feed_forward.w2": (config.dim, hidden), "feed_forward.w3": (hidden, config.dim)}
        for name, shape in comfy.items():
            table[f"lora_unet_layers_{index}_{name.replace('.', '_')}"] = shape
        diffusers = {"attention.to_q": comfy["attention.qkv"], "attention.to_k": comfy["attention.qkv"],
                     "attention.to_v": comfy["attention.qkv"], "attention.to_out.0": comfy["attention.out"]}
        for name, shape in {**diffusers, **{k: v for k, v in comfy.items() if k.startswith("feed")}}.items():
            for prefix in ("transformer.", "diffusion_model.", ""):
                table[f"{prefix}layers.{index}.{name}"] = shape
    return table


def test_lora_names_are_in_comfyui_key_tables(tmp_path):
    comps = build_tiny_z_image(0)
    family = ZImageFamily()
    network = random_network(family, comps, options(), seed=1)
    kohya = network.state_dict_kohya()
    table = _comfy_table(comps)
    modules = {k.partition(".")[0] for k in kohya}
    assert modules == {n for n in table if n.startswith("lora_unet_")}
    for name in modules:
        assert kohya[f"{name}.lora_up.weight"].shape[0] == table[name][0]
        assert kohya[f"{name}.lora_down.weight"].shape[1] == table[name][1]
    peft, _ = kohya_to_diffusers(kohya, {})
    assert {k.rsplit(".lora_", 1)[0] for k in peft} <= set(table)
    assert guess_lora_family(sorted(modules)) == guess_lora_family(sorted(peft)) == "z_image"
    back, _ = diffusers_to_kohya(peft, {})
    assert back.keys() == kohya.keys()


def test_diffusers_files_of_other_trainers_fuse_back():
    """ai-toolkit's layout (diffusion_model.*, lora_A/B, q/k/v with their own down matrices) fuses block-diagonally."""
    torch.manual_seed(0)
    state = {}
    for part in ("to_q", "to_k", "to_v"):
        state[f"diffusion_model.layers.0.attention.{part}.lora_A.weight"] = torch.randn(2, 8)
        state[f"diffusion_model.layers.0.attention.{part}.lora_B.weight"] = torch.randn(8, 2)
    kohya, _ = diffusers_to_kohya(state, {})
    up, down = kohya["lora_unet_layers_0_attention_qkv.lora_up.weight"], kohya["lora_unet_layers_0_attention_qkv.lora_down.weight"]
    expected = torch.cat([state[f"diffusion_model.layers.0.attention.{p}.lora_B.weight"] @ state[f"diffusion_model.layers.0.attention.{p}.lora_A.weight"]
                          for p in ("to_q", "to_k", "to_v")])
    torch.testing.assert_close(up @ down, expected)


def _render(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red square on a blue background", num_inference_steps=2, width=64, height=64, guidance_scale=0.0,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


def test_diffusers_pipeline_reads_our_converted_file(saved, tmp_path):
    from diffusers import ZImagePipeline

    family = ZImageFamily()
    ours = load_local_pipeline(ZImagePipeline, saved["folder"])
    network = random_network(family, SimpleNamespace(denoiser=ours.transformer, text_encoders=[ours.text_encoder]), options(), seed=3)
    state, metadata = family.lora_file_state(network.state_dict_kohya(), {"ss_network_module": "networks.lora_zimage"}, "diffusers")
    path = tmp_path / "lora.safetensors"
    save_lora_file(state, path, metadata)
    base = _render(ours)
    network.merge_to_base()
    merged = _render(ours)
    theirs = load_local_pipeline(ZImagePipeline, saved["folder"])
    theirs.load_lora_weights(str(path), adapter_name="ours")
    loaded = _render(theirs)
    assert (merged - base).abs().max() > 1e-2
    assert (loaded - merged).abs().max() < 1e-4


def _velocity(comps, family=None):
    family = family or ZImageFamily()
    torch.manual_seed(1)
    text = TextConditioning({"text": torch.randn(2, 5, 32), "text_mask": torch.tensor([[True] * 5, [True] * 3 + [False] * 2])})
    return family.predict(comps, torch.randn(2, 16, 8, 8), torch.tensor([400.0, 900.0]), text, None)


def test_prediction_is_the_negated_model_output_at_one_minus_sigma():
    comps = build_tiny_z_image(0)
    torch.manual_seed(1)
    text = torch.randn(1, 5, 32)
    noisy = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        ours = ZImageFamily().predict(comps, noisy, torch.tensor([250.0]),
                                      TextConditioning({"text": text, "text_mask": torch.ones(1, 5, dtype=torch.bool)}), None)
        raw = comps.denoiser([noisy[0].unsqueeze(1)], torch.tensor([0.75]), [text[0]], return_dict=False)[0][0]
    torch.testing.assert_close(ours[0], -raw.squeeze(1))


def test_fp8_block_swap_and_offloaded_checkpointing_keep_the_output(saved):
    family = ZImageFamily()
    reference = _velocity(build_tiny_z_image(0, layers=4))
    fp8 = family.load_model(ModelSource(str(saved["folder"]), fp8="denoiser"))
    assert fp8.denoiser.layers[0].attention.to_q.weight.dtype == torch.float8_e4m3fn
    swapped = build_tiny_z_image(0, layers=4)
    with pytest.raises(ConfigError, match="at most 2"):
        family._check_block_swap(SimpleNamespace(blocks_to_swap=3), swapped)
    family.prepare_block_swap(swapped, SimpleNamespace(blocks_to_swap=2), None)
    torch.testing.assert_close(_velocity(swapped, family), reference)
    offloaded = build_tiny_z_image(0, layers=4)
    offloaded.extras["cpu_offload_checkpointing"] = True
    family.enable_gradient_checkpointing(offloaded, False)
    offloaded.denoiser.train()
    torch.testing.assert_close(_velocity(offloaded), reference)


def test_trains_from_the_command_line_in_the_diffusers_layout(saved, tmp_path):
    from safetensors import safe_open

    from helpers import write_dreambooth_folder
    from lorakit.cli.main import main

    data = write_dreambooth_folder(tmp_path / "data", count=2, repeats=1)
    argv = ["train", f"--pretrained_model_name_or_path={saved['z_image']}", f"--text_encoder={saved['qwen3']}",
            f"--vae={saved['ae']}", f"--train_data_dir={data}", "--resolution=64", f"--output_dir={tmp_path / 'out'}",
            "--output_name=z", "--network_module=networks.lora_zimage", "--network_dim=4", "--network_train_unet_only",
            "--save_format=diffusers", "--max_train_steps=2", "--learning_rate=1e-3", "--seed=1",
            "--max_data_loader_n_workers=0", "--cache_text_encoder_outputs", "--blocks_to_swap=0"]
    assert main(argv) == 0
    with safe_open(str(tmp_path / "out" / "z.safetensors"), framework="pt") as f:
        assert "transformer.layers.1.attention.to_k.lora_B.weight" in f.keys()
        assert f.metadata()["modelspec.architecture"] == "Z-Image/lora"


def test_a_lora_learns_a_fixed_batch_and_its_file_moves_the_output(tmp_path):
    from family_learning import train_on_a_fixed_batch

    losses, file_gap = train_on_a_fixed_batch(ZImageFamily(), lambda: build_tiny_z_image(0), tmp_path)
    assert losses[-1] < 0.8 * losses[0], losses
    assert file_gap < 1e-5


def test_lorakit_sample_merges_the_lora_as_the_network_runs(saved, tmp_path):
    from family_learning import sample_with_lora_matches_the_attached_network

    change, gap = sample_with_lora_matches_the_attached_network(ZImageFamily(), str(saved["folder"]), tmp_path, scale=0.0)
    assert change > 1.0 and gap <= 2


@pytest.mark.parametrize("name", ["dora", "dylora", "oft", "lokr"])
def test_every_adapter_algorithm_trains_on_the_transformer(name):
    from family_learning import algorithm_trains_and_round_trips

    algorithm_trains_and_round_trips(ZImageFamily(), lambda: build_tiny_z_image(0), name)
