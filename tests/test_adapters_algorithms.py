"""Adapter algorithms (LoRA, DoRA, LoRA-FA, DyLoRA, OFT): invariants per layer type and dtype, files, training.

Every algorithm is checked the same way on a Linear, a 1x1 conv and a 3x3 conv, with the base layer in float32
and in bfloat16: the zero-initialised adapter leaves the output unchanged, the bypass forward equals a forward
with the merged weight, and save -> load reproduces the tensors and ΔW exactly.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import network_options as options, build_from_options
from lorakit.adapters.dora import DoRAModule, dora_merged_weight, dora_weight_norm
from lorakit.adapters.dylora import DyLoRAModule
from lorakit.adapters.lora import LoRAModule
from lorakit.adapters.lora_fa import LoRAFAModule
from lorakit.adapters.network import LoRANetwork
from lorakit.adapters.oft import OFTModule, oft_rotation
from lorakit.errors import CheckpointError, ConfigError
from lorakit.adapters.targets import AdapterTarget

LAYERS = {
    "linear": lambda: nn.Linear(16, 32),
    "conv1x1": lambda: nn.Conv2d(16, 32, 1),
    "conv3x3": lambda: nn.Conv2d(16, 32, 3, padding=1),
}
ALGORITHMS = {
    "lora": lambda layer: LoRAModule("lora_unet_x", layer, 4, 2.0),
    "dora": lambda layer: DoRAModule("lora_unet_x", layer, 4, 2.0),
    "dora-output-axis": lambda layer: DoRAModule("lora_unet_x", layer, 4, 2.0, wd_on_output=True),
    "lora_fa": lambda layer: LoRAFAModule("lora_unet_x", layer, 4, 2.0),
    "dylora": lambda layer: DyLoRAModule("lora_unet_x", layer, 4, 2.0, unit=2),
    "oft": lambda layer: OFTModule("oft_unet_x", layer, 4, 1e-2),
}
DTYPES = [torch.float32, torch.bfloat16]


def make_layer(kind: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return LAYERS[kind]().to(dtype).requires_grad_(False)


def make_input(kind: str, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    shape = (3, 5, 16) if kind == "linear" else (3, 16, 6, 6)
    return torch.randn(shape, generator=g).to(dtype)


def randomise(adapter: nn.Module, seed: int = 1, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            noise = torch.randn(param.shape, generator=g) * scale
            # keep magnitudes positive and near their initial norms
            param.copy_(param * (1 + noise.abs()) if name == "dora_scale" else noise)


def plain_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    weight = weight.to(x.dtype)
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding)
    return F.linear(x, weight, layer.bias)


def tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 5e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_zero_init_merged_equals_bypass_and_save_load(algo, kind, dtype):
    layer, x = make_layer(kind, dtype), make_input(kind, dtype)
    base = layer(x)
    adapter = ALGORITHMS[algo](layer).eval()
    adapter.apply_to()
    assert torch.equal(layer(x), base) or (layer(x) - base).abs().max() <= tolerance(dtype) * base.abs().max()
    assert adapter.delta_weight().abs().max() < 1e-6

    randomise(adapter)
    bypass = layer(x)
    merged = plain_forward(layer, x, adapter.merged_weight())
    scale = base.abs().max()
    assert (bypass - base).abs().max() > 1e-2 * scale, "the randomised adapter must change the output"
    assert (bypass.float() - merged.float()).abs().max() <= tolerance(dtype) * scale

    state = adapter.adapter_state_dict()
    fresh = ALGORITHMS[algo](make_layer(kind, dtype))
    assert fresh.load_adapter_tensors(state, source="file.safetensors") == []
    for key, value in fresh.adapter_state_dict().items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(fresh.delta_weight(), adapter.delta_weight())

    adapter.restore()
    assert torch.equal(layer(x), base), "restore() gives the layer its own forward back"


@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_merge_to_base_matches_bypass_and_multiplier(algo):
    layer, x = make_layer("linear", torch.float32), make_input("linear", torch.float32)
    base = layer(x)
    adapter = ALGORITHMS[algo](layer).eval()
    randomise(adapter)
    adapter.apply_to()
    adapter.multiplier = 0.5
    half = layer(x)
    adapter.multiplier = 0.0
    assert torch.allclose(layer(x), base)
    adapter.multiplier = 0.5
    adapter.merge_to_base(0.5)
    assert not adapter.is_applied
    assert torch.allclose(layer(x), half, atol=1e-5)


def test_dora_matches_the_paper_formula_on_both_axes():
    layer = make_layer("linear", torch.float32)
    adapter = DoRAModule("lora_unet_x", layer, 4, 2.0)
    assert adapter.dora_scale.shape == (1, 16), "one magnitude per input channel (kohya dora_scale layout)"
    assert torch.allclose(adapter.dora_scale.flatten(), layer.weight.norm(dim=0))
    randomise(adapter)
    w = layer.weight + adapter.delta_weight()  # the norm is over W + (alpha/r)·up·down
    expected = adapter.dora_scale * w / w.norm(dim=0, keepdim=True)
    assert torch.allclose(adapter.merged_weight(), expected, atol=1e-6)
    # the merged weight's column norms are the magnitudes: the definition of the decomposition
    assert torch.allclose(adapter.merged_weight().norm(dim=0), adapter.dora_scale.flatten(), atol=1e-5)

    outputs = DoRAModule("lora_unet_x", layer, 4, 2.0, wd_on_output=True)
    assert outputs.dora_scale.shape == (32, 1), "PEFT / DoRA reference code axis"
    randomise(outputs)
    w = layer.weight + outputs.delta_weight()
    assert torch.allclose(outputs.merged_weight(), outputs.dora_scale * w / w.norm(dim=1, keepdim=True), atol=1e-6)
    assert torch.allclose(outputs.merged_weight().norm(dim=1), outputs.dora_scale.flatten(), atol=1e-5)


def test_dora_norm_is_detached_and_neuron_dropout_ignored():
    layer, x = make_layer("linear", torch.float32), make_input("linear", torch.float32)
    adapter = DoRAModule("lora_unet_x", layer, 4, 2.0, dropout=0.5, rank_dropout=0.25)
    assert adapter.dropout == 0.0 and adapter.rank_dropout == 0.25
    randomise(adapter)
    adapter.apply_to()
    adapter.train()
    layer(x).sum().backward()
    assert adapter.dora_scale.grad is not None and adapter.lora_up.weight.grad is not None


@pytest.mark.parametrize("written_on_output", [False, True], ids=["input-axis", "output-axis"])
def test_dora_reads_the_other_axis_from_a_file(written_on_output):
    layer = make_layer("conv3x3", torch.float32)
    written = DoRAModule("lora_unet_x", layer, 4, 2.0, wd_on_output=written_on_output)
    randomise(written)
    reader = DoRAModule("lora_unet_x", layer, 4, 2.0, wd_on_output=not written_on_output)
    reader.load_adapter_tensors(written.adapter_state_dict(), source="in.safetensors")
    assert reader.magnitude_axis == (0 if written_on_output else 1)
    assert reader.adapter_state_dict()["dora_scale"].shape == written.dora_scale.shape
    assert torch.allclose(reader.merged_weight(), written.merged_weight())
    assert torch.allclose(
        dora_merged_weight(layer.weight, written.delta_weight(), written.dora_scale),
        written.merged_weight(),
    )
    assert dora_weight_norm(layer.weight, 1).shape == (1, 16, 1, 1)


@pytest.mark.parametrize("kind", ["linear-square", "conv1x1"])
def test_dora_axis_from_the_shape_of_other_tools_files(kind):
    """(out, 1, ...) / (1, in, ...) decide the axis even on square layers; 1-D vectors follow ComfyUI's rule."""
    torch.manual_seed(0)
    layer = (nn.Linear(16, 16) if kind == "linear-square" else nn.Conv2d(16, 32, 1)).requires_grad_(False)
    out_ch, in_ch = layer.weight.shape[:2]
    source = DoRAModule("lora_unet_x", layer, 4, 2.0)
    randomise(source)
    tensors = source.adapter_state_dict()
    for magnitude, axis in [
        (torch.rand(in_ch) + 1, 1 if in_ch != out_ch else 0),  # 1-D: output when its length is `out`
        (torch.rand(out_ch) + 1, 0),
        (torch.rand(1, in_ch) + 1, 1),  # a 2-D row also for a conv
        (torch.rand(out_ch, 1) + 1, 0),
    ]:
        reader = DoRAModule("lora_unet_x", layer, 4, 2.0)
        reader.load_adapter_tensors({**tensors, "dora_scale": magnitude}, source="other.safetensors")
        assert reader.magnitude_axis == axis, tuple(magnitude.shape)
        expected_shape = [1] * layer.weight.dim()
        expected_shape[axis] = layer.weight.shape[axis]
        assert tuple(reader.adapter_state_dict()["dora_scale"].shape) == tuple(expected_shape)
        assert torch.equal(reader.dora_scale.flatten(), magnitude.flatten())
    with pytest.raises(CheckpointError, match="dora_scale"):
        DoRAModule("lora_unet_x", layer, 4, 2.0).load_adapter_tensors(
            {**tensors, "dora_scale": torch.ones(3, 5)}, source="bad.safetensors"
        )


def test_lora_fa_freezes_down():
    adapter = LoRAFAModule("lora_unet_x", make_layer("conv3x3", torch.float32), 4, 2.0)
    assert not adapter.lora_down.weight.requires_grad and adapter.lora_up.weight.requires_grad
    assert adapter.lora_down.weight.std() > 0


def test_dylora_truncated_forward_and_gradients_on_newest_unit():
    layer, x = make_layer("linear", torch.float32), make_input("linear", torch.float32)
    adapter = DyLoRAModule("lora_unet_x", layer, 4, 4.0, unit=2)
    randomise(adapter)
    adapter.apply_to()
    adapter.train()
    torch.manual_seed(0)
    b = adapter.sample_rank()
    torch.manual_seed(0)
    out = layer(x)
    down, up = adapter.lora_down.weight, adapter.lora_up.weight
    expected = F.linear(x, layer.weight, layer.bias) + F.linear(F.linear(x, down[:b]), up[:, :b]) * (4.0 / b)
    assert torch.allclose(out, expected, atol=1e-5)
    out.sum().backward()
    grad = adapter.lora_down.weight.grad
    assert grad[: b - 2].abs().sum() == 0 and grad[b - 2 : b].abs().sum() > 0 and grad[b:].abs().sum() == 0
    with pytest.raises(ValueError, match="multiple of unit"):
        DyLoRAModule("lora_unet_x", layer, 3, 3.0, unit=2)


def test_oft_rotation_is_orthogonal_constrained_and_keeps_bias():
    blocks = torch.randn(4, 8, 8)
    rotation = oft_rotation(blocks, constraint=None)
    eye = torch.eye(8).expand(4, 8, 8)
    assert torch.allclose(rotation @ rotation.transpose(1, 2), eye, atol=1e-5)
    constrained = oft_rotation(blocks, constraint=1e-3)
    assert (constrained - eye).abs().max() < 1e-2
    layer = make_layer("linear", torch.float32)
    adapter = OFTModule("oft_unet_x", layer, 4, 1.0)
    randomise(adapter)
    merged = adapter.merged_weight()
    # rotations of output channels preserve each block's Gram matrix over the inputs
    gram = lambda w: torch.einsum("kin,kjn->kij", w.reshape(4, 8, -1), w.reshape(4, 8, -1)).diagonal(dim1=1, dim2=2).sum(-1)
    assert torch.allclose(gram(merged), gram(layer.weight), rtol=1e-4)
    adapter.apply_to()
    x = torch.zeros(2, 16)
    assert torch.allclose(layer(x), layer.bias.expand(2, -1)), "the bias is not rotated"
    with pytest.raises(ValueError, match="divisible"):
        OFTModule("oft_unet_x", nn.Linear(16, 30), 4, 1e-3)


def test_oft_constraint_follows_a_loaded_alpha():
    """The forward reads alpha as a number kept beside the buffer; loading a file's alpha updates both."""
    trained = OFTModule("oft_unet_x", make_layer("linear", torch.float32), 4, 5e-2)
    randomise(trained)
    fresh = OFTModule("oft_unet_x", make_layer("linear", torch.float32), 4, 1e-3)
    fresh.load_state_dict(trained.state_dict())
    assert fresh.alpha_value == pytest.approx(5e-2) and fresh.constraint == pytest.approx(5e-2 * fresh.out_dim)
    torch.testing.assert_close(fresh.rotation(), trained.rotation())
    from_file = OFTModule("oft_unet_x", make_layer("linear", torch.float32), 4, 1e-3)
    from_file.load_adapter_tensors(trained.adapter_state_dict(), "oft.safetensors")  # how kohya files load
    assert from_file.alpha_value == pytest.approx(5e-2)
    torch.testing.assert_close(from_file.rotation(), trained.rotation())


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_oft_merge_is_the_readers_block_product(kind):
    """A file's oft_blocks mean what sd-scripts (`networks.oft`), ComfyUI and LyCORIS read: per block k,
    W'[k] = Σ_n R[k, n, m] W[k, n] (`einsum("k n m, k n ... -> k m ...")`, i.e. Rᵀ·W), R the Cayley transform."""
    layer = make_layer(kind, torch.float32)
    adapter = OFTModule("oft_unet_x", layer, 4, 1e-1)
    randomise(adapter, scale=0.1)
    b = adapter.oft_blocks.detach()
    q = b - b.transpose(1, 2)
    q = q * min(1.0, 1e-1 * 32 / float(q.flatten().norm()))
    eye = torch.eye(8).expand(4, 8, 8)
    r = (eye + q) @ torch.linalg.inv(eye - q)
    blocks = layer.weight.reshape(4, 8, *layer.weight.shape[1:])
    reference = blocks + torch.einsum("knm,kn...->km...", 0.5 * (r - eye), blocks)  # ComfyUI at strength 0.5
    assert torch.allclose(adapter.merged_weight(0.5), reference.reshape(layer.weight.shape), atol=1e-5)
    assert not torch.allclose(r, r.transpose(1, 2), atol=1e-3), "the test tells R from Rᵀ"


def test_network_loads_dora_and_rejects_foreign_keys():
    layer = make_layer("linear", torch.float32)
    targets = [AdapterTarget("lora_unet_x", layer, "unet", 4, 2.0)]
    network = LoRANetwork(targets, module_factory=lambda t: DoRAModule(t.name, t.module, t.rank, t.alpha))
    randomise(network)
    state = network.state_dict_kohya()
    assert set(state) == {"lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight", "lora_unet_x.alpha", "lora_unet_x.dora_scale"}
    plain = LoRANetwork([AdapterTarget("lora_unet_x", make_layer("linear", torch.float32), "unet", 4, 2.0)])
    with pytest.raises(CheckpointError, match="lora_unet_x.dora_scale"):
        plain.load_kohya_state_dict(state, source="dora.safetensors")


# ---------------------------------------------------------------------- through the factory, on a tiny SD 1.5


@pytest.fixture(scope="module")
def sd():
    from lorakit.families.sd.family import StableDiffusionFamily
    from lorakit.families.sd.tiny import build_tiny_sd

    return StableDiffusionFamily(), build_tiny_sd("sd1", seed=0)


def sd_loss(family, comps, batch) -> torch.Tensor:
    latents, noise, t, ids = batch
    text = family.encode_text(comps, ["a red square"] * latents.shape[0])
    alphas = torch.linspace(0.999, 0.01, 1000)[t].view(-1, 1, 1, 1)
    noisy = alphas.sqrt() * latents + (1 - alphas).sqrt() * noise
    return F.mse_loss(family.predict(comps, noisy, t, text, None).float(), noise)


def fresh_components(sd):
    from lorakit.families.sd.tiny import build_tiny_sd

    family, _ = sd
    comps = build_tiny_sd("sd1", seed=0)
    for part in [comps.denoiser, *comps.text_encoders]:
        part.requires_grad_(False)
    return family, comps


def train_two_steps(family, comps, cfg) -> tuple[LoRANetwork, float, float]:
    network = build_from_options(cfg, family, comps, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 700]), None)
    groups, _ = network.prepare_optimizer_params(1e-2, 1e-2, 1e-2)
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    network.eval()
    with torch.no_grad():
        before = float(sd_loss(family, comps, batch))
    network.train()
    for _ in range(2):
        optimizer.zero_grad()
        sd_loss(family, comps, batch).backward()
        optimizer.step()
    network.eval()
    with torch.no_grad():
        after = float(sd_loss(family, comps, batch))
    return network, before, after


NETWORKS = {
    "lora": options("networks.lora", "conv_dim=4", "conv_alpha=1"),
    "dora": options("networks.lora", "dora_wd=True", "conv_dim=4", "rank_dropout=0.1", network_dropout=0.1),
    "lora_fa": options("networks.lora_fa"),
    "dylora": options("networks.dylora", "unit=2"),
    "oft": options("networks.oft", "enable_all_linear=True", "enable_conv=True", dim=4, alpha=1e-2),
}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_two_training_steps_change_the_loss_and_file_round_trips(sd, name):
    family, comps = fresh_components(sd)
    network, before, after = train_two_steps(family, comps, NETWORKS[name])
    assert abs(after - before) > 1e-6, f"{name}: two steps must change the loss ({before} -> {after})"
    state = network.state_dict_kohya()
    if name == "oft":
        assert all(k.startswith("oft_unet_") and k.endswith((".oft_blocks", ".alpha")) for k in state)
    else:
        assert any(k.startswith("lora_te_") for k in state) and any(k.startswith("lora_unet_") for k in state)
    if name == "dora":
        assert any(k.endswith(".dora_scale") for k in state)
    family2, comps2 = fresh_components(sd)
    again = build_from_options(NETWORKS[name], family2, comps2, torch.device("cpu"))
    assert again.load_kohya_state_dict(state, source="x.safetensors") == []
    for key, value in again.state_dict_kohya().items():
        assert torch.equal(value, state[key]), key


def test_factory_errors_name_the_option(sd):
    family, comps = fresh_components(sd)
    with pytest.raises(ConfigError, match="conv_dim"):
        build_from_options(options("networks.dylora", "conv_dim=8"), family, comps, torch.device("cpu"))
    with pytest.raises(ConfigError, match="network_dim 5"):
        build_from_options(options("networks.oft", dim=5, alpha=1e-3), family, comps, torch.device("cpu"))
    with pytest.raises(ConfigError, match="networks.nope"):
        build_from_options(options("networks.nope"), family, comps, torch.device("cpu"))
    with pytest.raises(ConfigError, match="dora_wd"):
        build_from_options(options("networks.lora", "dora_wd=maybe"), family, comps, torch.device("cpu"))


def test_oft_warns_outside_the_recommended_constraint(sd, caplog):
    family, comps = fresh_components(sd)
    with caplog.at_level("WARNING", logger="lorakit"):
        network = build_from_options(options("networks.oft", dim=4, alpha=1.0), family, comps, torch.device("cpu"))
    assert "recommended range" in caplog.text
    names = list(network.lora_modules)
    assert names and all("_attn" in n and n.startswith("oft_unet_") for n in names), "default OFT targets attention only"
