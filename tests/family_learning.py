"""The learning check for a family's tiny model (helpers for the family tests, not a test module): a LoRA trained
on one fixed batch with the family's own objective lowers its loss, and its file, loaded into a fresh model,
moves the output exactly as the trained network did."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from helpers import targets_of
from lorakit.adapters.formats import load_lora_file, save_lora_file
from lorakit.adapters.network import LoRANetwork

OBJECTIVE_OPTIONS = SimpleNamespace(timestep_sampling="shift", discrete_flow_shift=2.2, weighting_scheme="none",
                                    sigmoid_scale=1.0, loss_type="l2")


def _options(dim: int = 8):
    return SimpleNamespace(network_dim=dim, network_alpha=float(dim), network_args=None, network_train_unet_only=True,
                           network_train_text_encoder_only=False, network_kwargs=lambda: {})


def _fixed_loss(family, comps, objective, latents, text, batch) -> torch.Tensor:
    noised = objective.noise(latents, generator=torch.Generator().manual_seed(5))  # the same noise every step
    prediction = family.predict(comps, noised.noisy, noised.timesteps, text, batch)
    return objective.elementwise_loss(prediction.float(), noised.target.float(), noised.timesteps).mean()


def train_on_a_fixed_batch(family, build, tmp_path, batch=None, steps: int = 25) -> tuple[list[float], float]:
    """Loss per step of a rank-8 LoRA on one batch, and the largest difference between the trained network's
    output and that of a fresh model with the saved file loaded."""
    comps = build()
    objective = family.objective(OBJECTIVE_OPTIONS, comps)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    captions = ["sks toy on a table", "a red square"]
    batch = batch or SimpleNamespace(captions=captions)
    with torch.no_grad():
        latents = family.encode_images(comps, images)
        text = family.encode_text(comps, captions)
    network = LoRANetwork(targets_of(family, comps, _options()))
    network.apply_to()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = _fixed_loss(family, comps, objective, latents, text, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    path = tmp_path / "fixed_batch.safetensors"
    save_lora_file(network.state_dict_kohya(), path, {})
    with torch.no_grad():
        trained = _fixed_loss(family, comps, objective, latents, text, batch)
        fresh = build()
        loaded = LoRANetwork(targets_of(family, fresh, _options()))
        loaded.load_kohya_state_dict(load_lora_file(path)[0], source=str(path))
        loaded.merge_to_base()
        again = _fixed_loss(family, fresh, objective, latents, text, batch)
    return losses, abs(float(trained) - float(again))


def sample_with_lora_matches_the_attached_network(family, model: str, tmp_path, scale: float = 4.0) -> tuple[float, float]:
    """`lorakit sample --lora file;0.8` (the LoRA merged into the weights) against the same file attached to the
    trainer's network at 0.8 in the family's pipeline: (mean pixel change the LoRA makes, largest difference)."""
    import numpy as np
    from PIL import Image

    from lorakit.cli.main import main
    from lorakit.families.base import ModelSource
    from lorakit.sampling.generate import generate_sample
    from lorakit.sampling.prompts import SamplePrompt

    comps = family.load_model(ModelSource(model))
    network = LoRANetwork(targets_of(family, comps, _options(4)))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    lora = tmp_path / "sample_lora.safetensors"
    save_lora_file(network.state_dict_kohya(), lora, {})

    def run(*extra: str) -> np.ndarray:
        out = tmp_path / f"sample{len(extra)}.png"
        argv = ["sample", "--ckpt_path", model, "--prompt", "a red square", "--width", "64", "--height", "64",
                "--steps", "2", "--seed", "1", "--guidance_scale", str(scale), "--output", str(out), *extra]
        assert main(argv) == 0
        with Image.open(out) as image:
            return np.asarray(image.convert("RGB"), dtype=np.int16)

    base, merged = run(), run("--lora", f"{lora};0.8")
    network.set_multiplier(0.8)
    network.apply_to()
    pipe = family.pipeline(comps)
    pipe.set_progress_bar_config(disable=True)
    attached = np.asarray(generate_sample(pipe, SamplePrompt(0, "a red square", "", 64, 64, 1, 2, scale)), dtype=np.int16)
    return float(np.abs(merged - base).mean()), float(np.abs(merged - attached).max())


ALGORITHMS = {  # --network_module and --network_args of every adapter algorithm the other families train
    "dora": ("networks.lora", "dora_wd=True"),
    "lora_fa": ("networks.lora_fa",),
    "dylora": ("networks.dylora", "unit=2"),
    "oft": ("networks.oft",),  # the attention layers (`oft_attention`)
    "lokr": ("lycoris.kohya", "algo=lokr", "preset=full", "factor=4"),
    "loha": ("lycoris.kohya", "algo=loha", "preset=attn-mlp"),
}


def algorithm_trains_and_round_trips(family, build, name: str) -> None:
    """A network of the algorithm on the family's layers: one step changes the output, and its file loads back."""
    from helpers import build_from_options, network_options

    module, *args = ALGORITHMS[name]
    cfg = network_options(module, *args, dim=4, alpha=1e-2 if name == "oft" else 2.0, network_train_unet_only=True)
    comps = build()
    network = build_from_options(cfg, family, comps, torch.device("cpu"))
    network.apply_to()
    objective = family.objective(OBJECTIVE_OPTIONS, comps)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    text = family.encode_text(comps, ["sks toy"])
    batch = SimpleNamespace(captions=["sks toy"])
    with torch.no_grad():
        before = float(_fixed_loss(family, comps, objective, latents, text, batch))
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    _fixed_loss(family, comps, objective, latents, text, batch).backward()
    optimizer.step()
    with torch.no_grad():
        after = float(_fixed_loss(family, comps, objective, latents, text, batch))
    assert abs(after - before) > 1e-7, name
    state = network.state_dict_kohya()
    again = build_from_options(cfg, family, build(), torch.device("cpu"))
    assert again.load_kohya_state_dict(state, source="x.safetensors") == []
