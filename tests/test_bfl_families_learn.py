"""The toy-world check for the BFL-layout families added last (Chroma, FLUX.2 [klein]), on their tiny models: a LoRA
trained through the family's own encode / noise / predict steps drives the loss of a fixed batch down, and the file
it is saved to moves the model's output exactly as the trained network did, once lorakit merges it into the weights.
"""

from __future__ import annotations

import pytest
import torch

from lorakit.adapters.factory import build_network
from lorakit.adapters.formats import save_lora_file
from lorakit.adapters.spec import make_target_spec
from lorakit.cli.main import main
from lorakit.config.schema import TrainConfig
from lorakit.families.registry import fixtures, get_family

STEPS = 25


def _setup(name: str, root):
    family = get_family(name)
    args, _ = fixtures(name).bench_files("tiny", root / "model")
    options = dict(a[2:].split("=", 1) for a in args)
    cfg = TrainConfig.model_validate({**options, "model_prediction_type": "raw", "timestep_sampling": "sigmoid"},
                                     context={"skip_requirements": True})
    spec = make_target_spec(family, module=family.default_network_module, rank=4, alpha=4.0, train_text_encoder=False)
    comps = family.load(cfg, spec)
    return family, cfg, spec, comps, options


def _fixed_batch(family, cfg, comps):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = family.encode_images(comps, images)
        text = family.encode_text(comps, ["sks toy, a red square", "sks toy on a blue field"])
    return family.objective(cfg, comps).noise(latents, generator=torch.Generator().manual_seed(1)), text


@pytest.mark.parametrize("name", ["chroma", "flux2"])
def test_lora_learns_a_fixed_batch_and_its_file_moves_the_output_as_trained(name, tmp_path):
    family, cfg, spec, comps, options = _setup(name, tmp_path)
    noised, text = _fixed_batch(family, cfg, comps)
    network = build_network(spec, family, comps, "cpu")
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)

    def loss() -> torch.Tensor:
        prediction = family.predict(comps, noised.noisy, noised.timesteps, text, None)
        return torch.nn.functional.mse_loss(prediction.float(), noised.target.float())

    losses = []
    for _ in range(STEPS):
        value = loss()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(float(value.detach()))
    assert losses[-1] < 0.7 * losses[0], losses

    with torch.no_grad():
        trained = family.predict(comps, noised.noisy, noised.timesteps, text, None)
    lora = tmp_path / "trained.safetensors"
    save_lora_file(network.state_dict_kohya(), lora, {"ss_network_module": family.default_network_module,
                                                        "ss_base_model_version": family.base_model(None).version})
    model = options["pretrained_model_name_or_path"]
    merged = tmp_path / "merged.safetensors"
    assert main(["lora", "merge", "--sd_model", model, "--models", str(lora), "--save_to", str(merged)]) == 0
    merged_comps = family.load(cfg.model_copy(update={"pretrained_model_name_or_path": str(merged)}), spec)
    with torch.no_grad():
        from_file = family.predict(merged_comps, noised.noisy, noised.timesteps, text, None)
    torch.testing.assert_close(from_file, trained, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["chroma", "flux2"])
@pytest.mark.parametrize("extra", [
    ["--network_module=FAMILY", "--network_args", "dora_wd=True", "train_blocks=single"],
    ["--network_module=networks.lora_fa"],
    ["--network_module=networks.dylora", "--network_args", "unit=2"],
    ["--network_module=networks.oft", "--network_alpha=0.01"],
    ["--network_module=lycoris.kohya", "--network_args", "algo=lokr", "preset=attn-only", "factor=4"],
], ids=["dora", "lora_fa", "dylora", "oft", "lycoris_lokr"])
def test_every_adapter_algorithm_trains_from_the_command_line(name, extra, tmp_path):
    from helpers import write_dreambooth_folder
    from lorakit.adapters.formats import load_lora_file

    args, _ = fixtures(name).bench_files("tiny", tmp_path / "model")
    data = write_dreambooth_folder(tmp_path / "data", count=1, repeats=1)
    argv = ["train", f"--family={name}", *args, f"--train_data_dir={data}", "--resolution=64", f"--output_dir={tmp_path / 'out'}",
            "--output_name=tiny", "--network_dim=4", "--network_alpha=2", "--max_train_steps=2", "--learning_rate=1e-3",
            "--max_data_loader_n_workers=0", "--network_train_unet_only",
            *[a.replace("FAMILY", get_family(name).default_network_module) for a in extra]]
    assert main(argv) == 0
    tensors, metadata = load_lora_file(tmp_path / "out" / "tiny.safetensors")
    assert metadata["ss_base_model_version"] == get_family(name).base_model(None).version
    assert tensors and all(v.isfinite().all() for v in tensors.values())
    assert any(v.abs().sum() > 0 for k, v in tensors.items() if not k.endswith("alpha"))
