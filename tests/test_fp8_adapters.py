"""`--fp8_base` with every adapter algorithm: the adapters compute with the dequantized weight.

Each algorithm is built twice over the same layer, once stored in float8 (`to_fp8`) and once in float32 holding the
same (float8-representable) values, with the same adapter tensors: the bypass output, the gradients, ΔW and the
merged weight must agree, on a plain layer and on the views FLUX and SD3 put over their fused/reordered layers
(where the crash was: a concatenation of float8 weights). Then every family trains one step on its tiny model
with its base in float8, for every algorithm.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lorakit.adapters.dora import DoRAModule
from lorakit.adapters.dylora import DyLoRAModule
from lorakit.adapters.lora import LoRAModule
from lorakit.adapters.lora_fa import LoRAFAModule
from lorakit.adapters.lycoris_bridge import LycorisAdapter, LycorisOptions
from lorakit.adapters.oft import OFTModule
from lorakit.adapters.targets import AdapterTarget
from lorakit.families.common.layers import FP8_DTYPE, FusedLinearView, to_fp8
from lorakit.families.sd3.layers import SwappedRowsView

LYCORIS = {
    "locon": ["algo=locon"], "loha": ["algo=loha"], "lokr": ["algo=lokr", "factor=4"], "ia3": ["algo=ia3"],
    "glora": ["algo=glora"], "diag-oft": ["algo=diag-oft", "block_size=4"], "boft": ["algo=boft", "block_size=4"],
    "locon-dora": ["algo=locon", "dora_wd=True"],
}


def lycoris(args: list[str]):
    options = LycorisOptions.parse(dict(a.split("=", 1) for a in args), 4, 2.0, None)
    return lambda layer: LycorisAdapter(AdapterTarget("lora_unet_x", layer, "unet", 4, 2.0), options)


ALGORITHMS = {
    "lora": lambda layer: LoRAModule("lora_unet_x", layer, 4, 2.0),
    "dora": lambda layer: DoRAModule("lora_unet_x", layer, 4, 2.0),
    "dora-output-axis": lambda layer: DoRAModule("lora_unet_x", layer, 4, 2.0, wd_on_output=True),
    "lora_fa": lambda layer: LoRAFAModule("lora_unet_x", layer, 4, 2.0),
    "dylora": lambda layer: DyLoRAModule("lora_unet_x", layer, 4, 2.0, unit=2),
    "oft": lambda layer: OFTModule("oft_unet_x", layer, 4, 1e-2),
    **{f"lycoris-{name}": lycoris(args) for name, args in LYCORIS.items()},
}


class Fused(nn.Module):
    """Two float linears seen as one fused layer (FLUX's/SD3's q, k, v), as the families build the view."""

    def __init__(self):
        super().__init__()
        self.parts = nn.ModuleList(nn.Linear(16, 32) for _ in range(2))

    def forward(self, x):
        return torch.cat([part(x) for part in self.parts], dim=-1)


def make_pair(kind: str) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """(float model, its layer to adapt, fp8 model, its layer): the same values, one stored in float8."""
    torch.manual_seed(0)
    model = {"linear": lambda: nn.Linear(16, 32), "conv3x3": lambda: nn.Conv2d(16, 32, 3, padding=1), "fused": Fused,
             "swapped": lambda: nn.Linear(16, 32)}[kind]()
    model.requires_grad_(False)
    quantised = copy.deepcopy(model)
    assert to_fp8(quantised, convolutions=True) > 0
    with torch.no_grad():  # the float model holds exactly the float8 values
        for (_, ours), (_, theirs) in zip(model.named_parameters(), quantised.named_parameters()):
            ours.copy_(theirs.float())
    if kind == "fused":  # views made after the copy: a view patches its parts' forwards
        return model, FusedLinearView(list(model.parts)), quantised, FusedLinearView(list(quantised.parts))
    if kind == "swapped":  # SD3's modulations in SAI row order
        return model, SwappedRowsView(model), quantised, SwappedRowsView(quantised)
    return model, model, quantised, quantised


def randomise(adapter: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            noise = torch.randn(param.shape, generator=g) * 0.2
            param.copy_(param * (1 + noise.abs()) if name.endswith("dora_scale") else noise)


def run(model: nn.Module, adapter: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    adapter.zero_grad()
    torch.manual_seed(3)  # the same random draws (DyLoRA's rank) in both runs
    out = model(x)
    out.float().square().mean().backward()
    return out.detach(), [p.grad.clone() for p in adapter.parameters() if p.grad is not None]


@pytest.mark.parametrize("kind", ["linear", "conv3x3", "fused", "swapped"])
@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_fp8_layer_adapts_like_its_dequantized_weight(algo, kind):
    if kind == "conv3x3" and algo in ("lycoris-ia3",):
        pytest.skip("(IA)^3 on convolutions scales channels only; covered on linears")
    model, layer, model8, layer8 = make_pair(kind)
    adapter, adapter8 = ALGORITHMS[algo](layer), ALGORITHMS[algo](layer8)
    randomise(adapter)
    adapter8.load_adapter_tensors(adapter.adapter_state_dict(), "test")
    for module in (adapter, adapter8):
        module.apply_to()
        module.train()
    x = torch.randn((3, 5, 16) if kind != "conv3x3" else (3, 16, 6, 6), generator=torch.Generator().manual_seed(7))
    out, grads = run(model, adapter, x)
    out8, grads8 = run(model8, adapter8, x)
    torch.testing.assert_close(out8, out, rtol=1e-5, atol=1e-5)
    assert grads and len(grads8) == len(grads)
    for g8, g in zip(grads8, grads):
        torch.testing.assert_close(g8, g, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(adapter8.delta_weight(), adapter.delta_weight(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adapter8.merged_weight(0.5), adapter.merged_weight(0.5), rtol=1e-5, atol=1e-6)
    # under bf16 autocast (how --fp8_base trains) the adapted fp8 layer runs and stays close
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model8(x)
    torch.testing.assert_close(low.float(), out, rtol=5e-2, atol=5e-2)
    # merging writes float8 back
    adapter8.merge_to_base(1.0)
    assert all(p.dtype == FP8_DTYPE for n, p in model8.named_parameters() if n.endswith("weight"))


# ---------------------------------------------------------------------------------------------------------
# every family, every algorithm: one training step on the tiny model with its base in float8
# ---------------------------------------------------------------------------------------------------------

NETWORKS = {
    "lora-conv": ["--network_module=networks.lora", "--network_args", "conv_dim=4"],
    "dora": ["--network_module=networks.lora", "--network_args", "dora_wd=True", "conv_dim=4"],
    "dora-split": ["--network_module=networks.lora", "--network_args", "dora_wd=True", "split_qkv=True"],
    "lora_fa": ["--network_module=networks.lora_fa"],
    "dylora": ["--network_module=networks.dylora", "--network_args", "unit=2"],
    "oft": ["--network_module=networks.oft", "--network_alpha=1e-2", "--network_args", "enable_all_linear=True", "enable_conv=True"],
    # seed 001's FLUX OFT recipe (its --network_dim 128 is for the real model's widths)
    "oft_flux": ["--network_module=networks.oft_flux", "--network_dim=4", "--network_alpha=1e-3", "--network_args",
                 "enable_all_linear=True", "--network_train_unet_only"],
    **{f"lycoris-{name}": ["--network_module=lycoris.kohya", "--network_args", "preset=full", "conv_dim=4", *args]
       for name, args in LYCORIS.items()},
}
#: each algorithm on at least one U-Net and one transformer family (all of them on every layer kind above)
CASES = [
    ("sd", "oft"), ("sd", "lycoris-glora"), ("sd", "lora-conv"),
    ("sdxl", "dora"), ("sdxl", "lycoris-locon-dora"),
    ("sd3", "dora-split"), ("sd3", "oft"), ("sd3", "lycoris-diag-oft"), ("sd3", "lycoris-glora"),
    ("flux", "oft_flux"), ("flux", "dora"), ("flux", "lycoris-lokr"), ("flux", "lycoris-ia3"), ("flux", "dylora"),
    ("flux", "lora_fa"), ("flux", "lycoris-locon"), ("sd3", "lycoris-loha"),
]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, list[str]]:
    from lorakit.families.registry import family_names, fixtures

    root = tmp_path_factory.mktemp("models")
    return {name: fixtures(name).bench_files("tiny", root / name)[0] for name in family_names()}


@pytest.mark.parametrize("family_name,network", CASES, ids=[f"{f}-{n}" for f, n in CASES])
def test_every_algorithm_trains_on_a_float8_base(family_name, network, tiny_models, tmp_path):
    from accelerate.state import AcceleratorState

    from lorakit.config import parse_train_args
    from lorakit.families.registry import resolve_family
    from lorakit.training.run import make_accelerator
    from lorakit.training.setup import setup_session

    AcceleratorState._reset_state(reset_partial_state=True)
    cfg, _ = parse_train_args([*tiny_models[family_name], f"--train_data_dir={tmp_path}", f"--output_dir={tmp_path}",
                               "--resolution=64", "--fp8_base", "--mixed_precision=bf16", "--seed=0",
                               *NETWORKS[network]])
    family = resolve_family(cfg)
    session = setup_session(cfg, family, make_accelerator(cfg))
    comps = session.comps
    assert any(p.dtype == FP8_DTYPE for p in comps.denoiser.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        text = family.encode_text(comps, ["a red square"])
        scale = 2 ** (len(comps.vae.config.block_out_channels) - 1)
        latents = torch.randn(1, comps.vae.config.latent_channels, 64 // scale, 64 // scale, generator=torch.Generator().manual_seed(0))
        noised = session.objective.noise(latents, generator=torch.Generator().manual_seed(1))
        prediction = family.predict(comps, noised.noisy, noised.timesteps, text, None)
    torch.nn.functional.mse_loss(prediction.float(), noised.target.float()).backward()
    grads = [p.grad for p in session.trainable.trainable_parameters() if p.grad is not None]
    assert grads and all(g.isfinite().all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
