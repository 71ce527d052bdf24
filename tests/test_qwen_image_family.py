"""Qwen-Image family: loading a diffusers folder and the single files ComfyUI and musubi-tuner use, missing parts
named, the objective's conditioning, LoRA names against ComfyUI's key table, diffusers' QwenImagePipeline as an
independent reader of our files, and the memory options (fp8, block swap, CPU-offloaded checkpointing)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers import load_local_pipeline, random_network
from lorakit.adapters.formats import save_lora_file
from lorakit.errors import CheckpointError, ConfigError
from lorakit.families.base import ModelSource, TextConditioning
from lorakit.families.qwen_image.family import QwenImageFamily
from lorakit.families.qwen_image.loading import load_qwen_image_components
from lorakit.families.qwen_image.tiny import build_tiny_qwen_image, save_pipeline_folder, save_single_files
from lorakit.families.registry import detect_family, guess_lora_family


def options(**overrides):
    base = dict(network_dim=4, network_alpha=2.0, network_args=None, network_train_unet_only=True,
                network_train_text_encoder_only=False, blocks_to_swap=None)
    base.update(overrides)
    return SimpleNamespace(**base, network_kwargs=lambda: {})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    comps = build_tiny_qwen_image(0)
    files = save_single_files(comps, root / "single")
    files["folder"] = save_pipeline_folder(comps, root / "diffusers")
    return files


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Equal weights (the language-model head, unused for conditioning and absent from ComfyUI's file, aside)."""
    sa, sb = a.state_dict(), b.state_dict()
    sa.pop("lm_head.weight", None), sb.pop("lm_head.weight", None)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_folder_and_single_files_load_the_same_model(saved):
    folder = load_qwen_image_components(str(saved["folder"]))
    single = load_qwen_image_components(str(saved["transformer"]), text_encoder=str(saved["text_encoder"]), vae=str(saved["vae"]))
    assert _same_weights(folder.denoiser, single.denoiser) and _same_weights(folder.vae, single.vae)
    assert _same_weights(folder.text_encoders[0], single.text_encoders[0])
    assert folder.tokenizers[0]("a photo").input_ids == single.tokenizers[0]("a photo").input_ids
    assert detect_family(str(saved["transformer"])) == detect_family(str(saved["folder"])) == "qwen_image"


def test_missing_parts_are_named(saved, tmp_path):
    with pytest.raises(CheckpointError, match="--text_encoder and --vae"):
        load_qwen_image_components(str(saved["transformer"]))
    lonely = tmp_path / "te.safetensors"
    lonely.write_bytes(saved["text_encoder"].read_bytes())
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_qwen_image_components(str(saved["transformer"]), text_encoder=str(lonely), vae=str(saved["vae"]))
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        (tmp_path / "tokenizer").mkdir()
        for file in (saved["transformer"].parent / "tokenizer").iterdir():
            (tmp_path / "tokenizer" / file.name).write_bytes(file.read_bytes())
        load_qwen_image_components(str(saved["transformer"]), text_encoder=str(lonely), vae=str(saved["vae"]), edit=True)


def test_text_conditioning_follows_the_pipeline():
    """Our text tokens are the pipeline's prompt embeddings (template, last hidden state, 34 tokens dropped)."""
    from lorakit.families.qwen_image.tiny import pipeline_of

    comps = build_tiny_qwen_image(0)
    ours = QwenImageFamily().encode_text(comps, ["a photo of sks toy", "toy"])
    embeds, mask = pipeline_of(comps).encode_prompt(["a photo of sks toy", "toy"], device="cpu")
    assert torch.equal(ours.tensors["text_mask"], mask.bool())
    torch.testing.assert_close(ours.tensors["text"], embeds)


def test_cached_text_equals_fresh_text():
    from lorakit.data.text_cache import CaptionCache

    family, comps = QwenImageFamily(), build_tiny_qwen_image(0)
    fresh = family.encode_text(comps, ["a photo of sks toy", "toy"])
    family.text_cache = CaptionCache(ragged_mask=family.text_cache_format.ragged_mask)
    family.encode_text(comps, ["toy"])
    cached = family.encode_text(comps, ["a photo of sks toy", "toy"])
    assert len(family.text_cache) == 2
    for name in ("text", "text_mask"):
        torch.testing.assert_close(cached.tensors[name], fresh.tensors[name])


def test_lora_names_follow_musubi_and_comfyui_key_table():
    """ComfyUI's Qwen-Image model keeps diffusers' module names; comfy/lora.py maps `lora_unet_<path with _>` of
    every `diffusion_model.<path>.weight` (plus `transformer.<path>`, `<path>` and `lycoris_<path with _>`)."""
    comps = build_tiny_qwen_image(0)
    family = QwenImageFamily()
    from helpers import targets_of

    names = {t.name for t in targets_of(family, comps, options())}
    comfy_table = {"lora_unet_" + k[: -len(".weight")].replace(".", "_")
                   for k in comps.denoiser.state_dict() if k.endswith(".weight")}
    assert names <= comfy_table
    per_block = {n.removeprefix("lora_unet_transformer_blocks_0_") for n in names if n.startswith("lora_unet_transformer_blocks_0_")}
    assert per_block == {"attn_to_q", "attn_to_k", "attn_to_v", "attn_add_q_proj", "attn_add_k_proj", "attn_add_v_proj",
                         "attn_to_out_0", "attn_to_add_out", "img_mlp_net_0_proj", "img_mlp_net_2", "txt_mlp_net_0_proj",
                         "txt_mlp_net_2"}
    assert guess_lora_family(sorted(names)) == "qwen_image"
    assert all(family.lora_layout.kohya_to_path(n) for n in names)


def _render(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red square on a blue background", num_inference_steps=2, width=64, height=64,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


def test_diffusers_pipeline_reads_our_lora_file(saved, tmp_path):
    from diffusers import QwenImagePipeline

    family = QwenImageFamily()
    ours = load_local_pipeline(QwenImagePipeline, saved["folder"])
    comps = SimpleNamespace(denoiser=ours.transformer, text_encoders=[ours.text_encoder])
    network = random_network(family, comps, options(), seed=3)
    path = tmp_path / "lora.safetensors"
    save_lora_file(network.state_dict_kohya(), path, {"ss_network_module": "networks.lora_qwen_image"})
    base = _render(ours)
    network.merge_to_base()
    merged = _render(ours)
    theirs = load_local_pipeline(QwenImagePipeline, saved["folder"])
    theirs.load_lora_weights(str(path), adapter_name="ours")
    loaded = _render(theirs)
    assert (merged - base).abs().max() > 1e-2
    assert (loaded - merged).abs().max() < 1e-4


def _velocity(comps, family=None, batch=None):
    family = family or QwenImageFamily()
    torch.manual_seed(1)
    latents = torch.randn(1, 16, 8, 8)
    text = TextConditioning({"text": torch.randn(1, 5, 32), "text_mask": torch.ones(1, 5, dtype=torch.bool)})
    return family.predict(comps, latents, torch.tensor([400.0]), text, batch)


def test_fp8_block_swap_and_offloaded_checkpointing_keep_the_output(saved):
    family = QwenImageFamily()
    reference = _velocity(build_tiny_qwen_image(0, layers=4))
    fp8 = family.load_model(ModelSource(str(saved["folder"]), fp8="denoiser"))
    assert fp8.denoiser.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    swapped = build_tiny_qwen_image(0, layers=4)
    with pytest.raises(ConfigError, match="at most 2"):
        family._check_block_swap(SimpleNamespace(blocks_to_swap=3), swapped)
    family.prepare_block_swap(swapped, SimpleNamespace(blocks_to_swap=2), None)
    torch.testing.assert_close(_velocity(swapped, family), reference)
    offloaded = build_tiny_qwen_image(0, layers=4)
    offloaded.extras["cpu_offload_checkpointing"] = True
    family.enable_gradient_checkpointing(offloaded, False)
    offloaded.denoiser.train()
    for p in offloaded.denoiser.parameters():
        p.requires_grad_(False)
    torch.testing.assert_close(_velocity(offloaded), reference)


def _paired_data(root, count: int = 2):
    """Targets and their references (same file names), and a dataset TOML giving the references per image."""
    from PIL import Image

    images, references = root / "images", root / "references"
    images.mkdir(parents=True), references.mkdir()
    for index in range(count):
        Image.new("RGB", (64, 64), (40 * index, 90, 200)).save(images / f"pair_{index}.png")
        Image.new("RGB", (64, 64), (200, 40 * index, 90)).save(references / f"pair_{index}.png")
        (images / f"pair_{index}.caption").write_text("make it blue", encoding="utf-8")
    config = root / "dataset.toml"
    config.write_text(
        '[general]\ncaption_extension = ".caption"\n\n[[datasets]]\nresolution = 64\nbatch_size = 2\n\n'
        f'  [[datasets.subsets]]\n  image_dir = "{images.as_posix()}"\n  conditioning_data_dir = "{references.as_posix()}"\n',
        encoding="utf-8")
    return config


def test_edit_trains_on_pairs_from_the_command_line(tmp_path):
    """Qwen-Image-Edit from a diffusers Edit folder, references given per image by conditioning_data_dir."""
    from safetensors import safe_open

    from lorakit.cli.main import main

    folder = save_pipeline_folder(build_tiny_qwen_image(0, edit=True), tmp_path / "edit")
    config = _paired_data(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["train", f"--pretrained_model_name_or_path={folder}", f"--dataset_config={config}", f"--output_dir={out}",
            "--output_name=edit", "--network_module=networks.lora_qwen_image", "--network_dim=4",
            "--network_train_unet_only", "--max_train_steps=2", "--learning_rate=1e-3", "--seed=1",
            "--max_data_loader_n_workers=0", "--timestep_sampling=shift", "--discrete_flow_shift=2.2"]
    assert main(argv) == 0
    with safe_open(str(out / "edit.safetensors"), framework="pt") as f:
        metadata = f.metadata()
        assert any(k.startswith("lora_unet_transformer_blocks_1_attn_to_q.") for k in f.keys())
    assert metadata["modelspec.architecture"] == "Qwen-Image-Edit/lora"
    assert metadata["modelspec.implementation"] == "https://github.com/QwenLM/Qwen-Image"


def test_edit_needs_references(tmp_path, capsys):
    from lorakit.cli.main import main
    from helpers import write_dreambooth_folder

    folder = save_pipeline_folder(build_tiny_qwen_image(0, edit=True), tmp_path / "edit")
    data = write_dreambooth_folder(tmp_path / "data", count=2, repeats=1)
    argv = ["train", f"--pretrained_model_name_or_path={folder}", f"--train_data_dir={data}", f"--output_dir={tmp_path}", "--resolution=64",
            "--network_module=networks.lora_qwen_image", "--max_train_steps=1", "--dry_run"]
    assert main(argv) != 0
    assert "conditioning" in capsys.readouterr().err


def test_edit_reference_enters_the_sequence_and_the_text_encoder():
    """Edit's prediction depends on the reference image through both the transformer and Qwen2.5-VL, and equals
    the velocity of the noisy tokens with the reference latents (VAE mode) appended, as the Edit pipeline."""
    family, comps = QwenImageFamily(), build_tiny_qwen_image(0, edit=True)
    torch.manual_seed(2)
    noisy, references = torch.randn(1, 16, 8, 8), torch.rand(1, 3, 64, 64) * 2 - 1
    batch = SimpleNamespace(captions=["make it blue"], conditioning_images=references)
    with torch.no_grad():
        ours = family.predict(comps, noisy, torch.tensor([300.0]), None, batch)
        other = family.predict(comps, noisy, torch.tensor([300.0]), None, SimpleNamespace(captions=["make it blue"], conditioning_images=-references))
        text = TextConditioning(family._encode(comps, ["make it blue"], references))
        expected = family.velocity(comps, noisy, torch.tensor([300.0]), text, family.encode_images(comps, references, sample=False))
    torch.testing.assert_close(ours, expected)
    assert (ours - other).abs().max() > 1e-4


def test_a_lora_learns_a_fixed_batch_and_its_file_moves_the_output(tmp_path):
    from family_learning import train_on_a_fixed_batch

    losses, file_gap = train_on_a_fixed_batch(QwenImageFamily(), lambda: build_tiny_qwen_image(0), tmp_path)
    assert losses[-1] < 0.8 * losses[0], losses
    assert file_gap < 1e-5


def test_edit_lora_learns_a_fixed_batch_of_pairs(tmp_path):
    from family_learning import train_on_a_fixed_batch

    references = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(8)) * 2 - 1
    batch = SimpleNamespace(captions=["sks toy on a table", "a red square"], conditioning_images=references)
    losses, file_gap = train_on_a_fixed_batch(QwenImageFamily(), lambda: build_tiny_qwen_image(0, edit=True), tmp_path, batch)
    assert losses[-1] < 0.8 * losses[0], losses
    assert file_gap < 1e-5


def test_lorakit_sample_merges_the_lora_as_the_network_runs(saved, tmp_path):
    from family_learning import sample_with_lora_matches_the_attached_network

    change, gap = sample_with_lora_matches_the_attached_network(QwenImageFamily(), str(saved["folder"]), tmp_path)
    assert change > 1.0 and gap <= 2


@pytest.mark.parametrize("name", ["dora", "dylora", "oft", "lokr"])
def test_every_adapter_algorithm_trains_on_the_transformer(name):
    from family_learning import algorithm_trains_and_round_trips

    algorithm_trains_and_round_trips(QwenImageFamily(), lambda: build_tiny_qwen_image(0), name)
