"""LoRA module and network: zero-init identity, bypass == merge, restore, regularisers, groups, strict loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.adapters.lora import LoRAModule, lora_delta_weight, lora_scale
from lorakit.adapters.network import LoRANetwork
from lorakit.errors import CheckpointError
from lorakit.adapters.targets import AdapterTarget

UNET_RANK, UNET_ALPHA, CONV_RANK, CONV_ALPHA = 4, 2.0, 2, 1.0


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def unet_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 32, generator=g)


def unet_targets(unet: nn.Module) -> list[AdapterTarget]:
    """Every Linear and Conv2d in the down/mid/up blocks: 3x3 convs at the conv rank (C3Lier), others LierLa."""
    targets = []
    for path, module in unet.named_modules():
        if not path.startswith(("down_blocks", "mid_block", "up_blocks")):
            continue
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        is_3x3 = isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)
        rank, alpha = (CONV_RANK, CONV_ALPHA) if is_3x3 else (UNET_RANK, UNET_ALPHA)
        targets.append(AdapterTarget("lora_unet_" + path.replace(".", "_"), module, "unet", rank, alpha))
    return targets


def run_unet(unet, inputs) -> torch.Tensor:
    sample, t, context = inputs
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=context).sample


def randomise_up(network: LoRANetwork, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.lora_modules.values():
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=g) * 0.1)


# ---------------------------------------------------------------------- math on tensors


def test_delta_weight_by_hand():
    down = torch.tensor([[1.0, 2.0]])  # rank 1, in 2
    up = torch.tensor([[3.0], [4.0]])  # out 2
    # scale = alpha / rank = 2
    assert torch.equal(lora_delta_weight(down, up, 2.0), torch.tensor([[6.0, 12.0], [8.0, 16.0]]))
    # alpha None or 0 means alpha = rank: scale 1
    assert torch.equal(lora_delta_weight(down, up, None), torch.tensor([[3.0, 6.0], [4.0, 8.0]]))
    assert lora_scale(0, 8) == 1.0 and lora_scale(4.0, 16) == 0.25
    as_conv = lora_delta_weight(down, up, 2.0, conv_kernel=(1, 1))
    assert as_conv.shape == (2, 2, 1, 1) and torch.equal(as_conv[:, :, 0, 0], torch.tensor([[6.0, 12.0], [8.0, 16.0]]))


def test_conv3x3_composition_equals_two_convs():
    g = torch.Generator().manual_seed(3)
    down = torch.randn(3, 5, 3, 3, generator=g)
    up = torch.randn(7, 3, 1, 1, generator=g)
    x = torch.randn(2, 5, 9, 9, generator=g)
    delta = lora_delta_weight(down, up, 1.5)
    assert delta.shape == (7, 5, 3, 3)
    two_step = nn.functional.conv2d(nn.functional.conv2d(x, down, stride=2, padding=1), up) * 0.5
    one_step = nn.functional.conv2d(x, delta, stride=2, padding=1)
    torch.testing.assert_close(one_step, two_step, atol=1e-5, rtol=1e-5)


def test_module_structure_and_init():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, dilation=1)
    lora = LoRAModule("lora_unet_conv", conv, rank=4, alpha=None)
    assert isinstance(lora.lora_down, nn.Conv2d) and lora.lora_down.kernel_size == (3, 3)
    assert lora.lora_down.stride == (2, 2) and lora.lora_down.padding == (1, 1) and lora.lora_down.bias is None
    assert lora.lora_up.kernel_size == (1, 1) and lora.lora_up.bias is None
    assert torch.count_nonzero(lora.lora_up.weight) == 0 and torch.count_nonzero(lora.lora_down.weight) > 0
    assert lora.alpha.dim() == 0 and float(lora.alpha) == 4.0 and lora.scale == 1.0
    # the base layer is not part of the adapter's state dict
    assert set(lora.state_dict()) == {"lora_down.weight", "lora_up.weight", "alpha"}
    with pytest.raises(TypeError):
        LoRAModule("x", nn.GroupNorm(2, 8), rank=2)



def test_half_precision_base_with_float32_lora_under_and_without_autocast():
    """A bf16 layer with a float32 LoRA: without autocast the input is cast to the LoRA's dtype; under autocast it
    is not (the matmuls cast it), and no float32 copy of the activation is made — the same output either way."""
    from torch.utils._python_dispatch import TorchDispatchMode

    g = torch.Generator().manual_seed(3)
    layer = nn.Linear(16, 8).to(torch.bfloat16)
    lora = LoRAModule("lora_unet_x", layer, rank=4, alpha=2.0)
    with torch.no_grad():
        lora.lora_up.weight.normal_(generator=g)
    lora.apply_to()
    x = torch.randn(2, 5, 16, generator=g).to(torch.bfloat16)
    plain = layer(x)  # no autocast: bf16 base, float32 branch
    expected = (layer.weight.float() @ x.float().transpose(1, 2)).transpose(1, 2) + layer.bias.float()
    expected = expected + (x.float() @ lora.delta_weight().T)
    torch.testing.assert_close(plain.float(), expected, atol=0.1, rtol=0.02)

    class FloatCopies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.to) and out.dtype == torch.float32:
                self.shapes.append(tuple(out.shape))
            return out

    copies = FloatCopies()
    with torch.autocast("cpu", dtype=torch.bfloat16), copies:
        autocast_out = layer(x)
    assert tuple(x.shape) not in copies.shapes  # the activation is never copied to float32
    torch.testing.assert_close(autocast_out.float(), plain.float(), atol=0.1, rtol=0.02)


# ---------------------------------------------------------------------- network on a real U-Net


def test_targets_cover_linear_1x1_and_3x3(unet):
    kinds = set()
    for target in unet_targets(unet):
        m = target.module
        kinds.add("linear" if isinstance(m, nn.Linear) else f"conv{m.kernel_size[0]}")
    assert kinds == {"linear", "conv1", "conv3"}


def test_zero_init_leaves_output_unchanged_and_restore_is_exact(unet, unet_inputs):
    reference = run_unet(unet, unet_inputs)
    base_keys = list(unet.state_dict())
    network = LoRANetwork(unet_targets(unet))
    network.apply_to()
    assert torch.equal(run_unet(unet, unet_inputs), reference)
    assert list(unet.state_dict()) == base_keys  # base names unchanged by attaching
    randomise_up(network)
    changed = run_unet(unet, unet_inputs)
    assert (changed - reference).abs().max() > 1e-3
    network.restore()
    assert torch.equal(run_unet(unet, unet_inputs), reference)


def test_bypass_equals_merged(unet, unet_inputs):
    reference = run_unet(unet, unet_inputs)
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    network = LoRANetwork(unet_targets(unet), multiplier=0.7)
    randomise_up(network, seed=5)
    network.eval().apply_to()
    bypass = run_unet(unet, unet_inputs)
    network.merge_to_base()
    try:
        merged = run_unet(unet, unet_inputs)  # merge detaches the branches, so ΔW is counted once
        torch.testing.assert_close(merged, bypass, atol=1e-5, rtol=1e-5)
        assert (merged - reference).abs().max() > 1e-3
    finally:
        unet.load_state_dict(original)


def test_per_layer_bypass_equals_merge_for_each_kind():
    g = torch.Generator().manual_seed(7)
    layers = [nn.Linear(6, 5), nn.Conv2d(6, 5, 1), nn.Conv2d(6, 5, 3, padding=1, stride=2)]
    inputs = [torch.randn(3, 4, 6, generator=g), torch.randn(2, 6, 7, 7, generator=g), torch.randn(2, 6, 7, 7, generator=g)]
    for layer, x in zip(layers, inputs):
        lora = LoRAModule("lora_unet_x", layer, rank=3, alpha=1.5)
        with torch.no_grad():
            lora.lora_up.weight.normal_(generator=g)
        lora.eval().apply_to()
        lora.multiplier = 0.5
        bypass = layer(x)
        lora.merge_to_base(0.5)
        assert not lora.is_applied
        torch.testing.assert_close(layer(x), bypass, atol=1e-5, rtol=1e-5)


def test_multiplier_scales_the_branch_linearly():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    base = layer(x).detach()
    network = LoRANetwork([AdapterTarget("lora_te_fc", layer, "text_encoder", 2, 1.0)])
    randomise_up(network)
    network.apply_to()
    full = layer(x).detach() - base
    network.set_multiplier(0.25)
    torch.testing.assert_close(layer(x).detach() - base, 0.25 * full)
    network.set_multiplier(0.0)
    assert torch.equal(layer(x), base)


# ---------------------------------------------------------------------- regularisers


def _attached_lora(layer: nn.Module, **options) -> LoRAModule:
    """A LoRA on `layer` with a random (non-zero) up factor, attached."""
    lora = LoRAModule("lora_unet_l", layer, **options)
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    lora.apply_to()
    return lora


def _branch_outputs(lora: LoRAModule, layer: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
    """n calls of the patched layer, minus the base output: (n, *output shape)."""
    base = layer.__class__.forward(layer, x)
    return torch.stack([(layer(x) - base).detach() for _ in range(n)])


def _branch_draws(layer: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
    """n independent per-sample draws in one call: x is tiled n times along the batch (masks are per sample)."""
    tiled = x.repeat(n, *([1] * (x.dim() - 1)))
    with torch.no_grad():
        delta = layer(tiled) - layer.__class__.forward(layer, tiled)
    return delta.view(n, x.shape[0], *delta.shape[1:])


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_rank_dropout_preserves_expectation_and_only_in_train(kind):
    torch.manual_seed(11)
    layer = nn.Linear(8, 6) if kind == "linear" else nn.Conv2d(8, 6, 3, padding=1)
    x = torch.randn(3, 5, 8) if kind == "linear" else torch.randn(3, 8, 4, 4)
    lora = _attached_lora(layer, rank=4, alpha=4.0, rank_dropout=0.5)
    expected = _branch_outputs(lora.eval(), layer, x, 1)[0]
    assert torch.equal(_branch_outputs(lora, layer, x, 3), expected.expand(3, *expected.shape))
    lora.train()
    samples = _branch_draws(layer, x, 4000)
    assert not torch.allclose(samples[0], samples[1])
    # inverted-dropout rescaling: the mean over many draws approaches the eval output
    error = (samples.mean(0) - expected).abs().max() / expected.abs().max()
    assert error < 0.05


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_rank_dropout_mask_is_per_sample_and_rank_channel(kind):
    """With rank 1 and p = 0.5 a sample's branch is either all zero or exactly 2x its eval value."""
    torch.manual_seed(14)
    layer = nn.Linear(8, 6) if kind == "linear" else nn.Conv2d(8, 6, 3, padding=1)
    x = torch.randn(2, 5, 8) if kind == "linear" else torch.randn(2, 8, 4, 4)
    lora = _attached_lora(layer, rank=1, alpha=1.0, rank_dropout=0.5)
    expected = _branch_outputs(lora.eval(), layer, x, 1)[0]
    lora.train()
    draws = _branch_draws(layer, x, 1000)
    dropped = draws.flatten(2).abs().amax(2) == 0  # (draws, samples)
    kept = torch.stack([torch.isclose(d, 2 * expected, atol=1e-6).flatten(1).all(1) for d in draws])
    assert bool((dropped ^ kept).all())
    assert abs(dropped.float().mean().item() - 0.5) < 0.05
    assert bool((dropped[:, 0] != dropped[:, 1]).any())  # independent masks per sample


def test_neuron_dropout_only_in_train_and_unbiased():
    torch.manual_seed(12)
    layer = nn.Linear(8, 6)
    x = torch.randn(4, 8)
    lora = _attached_lora(layer, rank=4, alpha=2.0, dropout=0.3)
    expected = _branch_outputs(lora.eval(), layer, x, 1)[0]
    lora.train()
    samples = _branch_draws(layer, x, 4000)
    assert not torch.allclose(samples[0], samples[1])
    assert (samples.mean(0) - expected).abs().max() / expected.abs().max() < 0.05


def test_module_dropout_skips_the_whole_branch():
    torch.manual_seed(13)
    layer = nn.Linear(8, 6)
    x = torch.randn(4, 8)
    lora = _attached_lora(layer, rank=4, module_dropout=0.25)
    expected = _branch_outputs(lora.eval(), layer, x, 1)[0]
    samples = _branch_outputs(lora.train(), layer, x, 2000)
    skipped = torch.tensor([torch.equal(s, torch.zeros_like(s)) for s in samples])
    full = torch.tensor([torch.allclose(s, expected) for s in samples])
    assert bool((skipped | full).all())  # all or nothing, never partial
    assert abs(skipped.float().mean().item() - 0.25) < 0.04
    assert torch.equal(_branch_outputs(lora.eval(), layer, x, 5)[4], expected)


# ---------------------------------------------------------------------- optimizer groups


def _mixed_network() -> LoRANetwork:
    torch.manual_seed(0)
    targets = [
        AdapterTarget("lora_te_q", nn.Linear(4, 4), "text_encoder", 2, 1.0),
        AdapterTarget("lora_te_k", nn.Linear(4, 4), "text_encoder", 2, 1.0),
        AdapterTarget("lora_unet_a", nn.Linear(4, 8), "unet", 2, 1.0),
        AdapterTarget("lora_unet_b", nn.Conv2d(4, 8, 3), "unet", 2, 1.0),
        AdapterTarget("lora_unet_c", nn.Conv2d(4, 8, 1), "unet", 2, 1.0),
    ]
    return LoRANetwork(targets)


def test_param_groups():
    network = _mixed_network()
    assert network.num_modules_by_component() == {"text_encoder": 2, "unet": 3}
    assert len(network.trainable_parameters()) == 10

    groups, names = network.prepare_optimizer_params(5e-5, None, 1e-4)
    assert names == ["textencoder", "unet"]
    assert [g["lr"] for g in groups] == [5e-5, 1e-4]
    assert [len(g["params"]) for g in groups] == [4, 6]
    te_ids = {id(p) for m in ("lora_te_q", "lora_te_k") for p in network.lora_modules[m].parameters()}
    assert {id(p) for p in groups[0]["params"]} == te_ids

    groups, names = network.prepare_optimizer_params(None, 2e-4, 1e-4)
    assert names == ["textencoder", "unet"] and [g["lr"] for g in groups] == [1e-4, 2e-4]

    groups, names = network.prepare_optimizer_params(0, 3e-4, 1e-4)  # 0 = do not train the text encoder
    assert names == ["unet"] and groups[0]["lr"] == 3e-4

    groups, names = network.prepare_optimizer_params(1e-5, 0, 1e-4)
    assert names == ["textencoder"] and groups[0]["lr"] == 1e-5


def test_param_groups_loraplus():
    network = _mixed_network()
    groups, names = network.prepare_optimizer_params(None, None, 1e-4, loraplus_lr_ratio=16, loraplus_unet_lr_ratio=4)
    assert names == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 16e-4, 1e-4, 4e-4])
    up_ids = {id(network.lora_modules[m].lora_up.weight) for m in ("lora_unet_a", "lora_unet_b", "lora_unet_c")}
    assert {id(p) for p in groups[3]["params"]} == up_ids


def test_unet_only_network_and_bad_targets():
    layer = nn.Linear(2, 2)
    network = LoRANetwork([AdapterTarget("lora_unet_x", layer, "unet", 1, 1.0)])
    groups, names = network.prepare_optimizer_params(1e-3, None, 1e-4)
    assert names == ["unet"]
    with pytest.raises(ValueError, match="share the name"):
        LoRANetwork([AdapterTarget("lora_unet_x", layer, "unet", 1, 1.0)] * 2)
    with pytest.raises(ValueError, match="component"):
        LoRANetwork([AdapterTarget("lora_vae_x", layer, "vae", 1, 1.0)])


def test_apply_max_norm_by_hand():
    layer = nn.Linear(2, 2)
    network = LoRANetwork([AdapterTarget("lora_unet_x", layer, "unet", 1, 1.0)])
    module = network.lora_modules["lora_unet_x"]
    with torch.no_grad():
        module.lora_down.weight.copy_(torch.tensor([[3.0, 0.0]]))
        module.lora_up.weight.copy_(torch.tensor([[0.0], [4.0]]))  # ΔW = [[0,0],[12,0]], ‖ΔW‖ = 12
    scaled, mean, largest = network.apply_max_norm(3.0)
    assert (scaled, largest) == (1, 12.0) and mean == pytest.approx(3.0)
    assert float(module.delta_weight().detach().norm()) == pytest.approx(3.0)
    assert network.apply_max_norm(3.0)[0] == 0


# ---------------------------------------------------------------------- kohya state dict


def test_state_dict_kohya_names_and_strict_load(unet):
    network = LoRANetwork(unet_targets(unet))
    randomise_up(network, seed=9)
    sd = network.state_dict_kohya()
    names = list(network.lora_modules)
    assert set(sd) == {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert sd[f"{q}.lora_down.weight"].shape == (UNET_RANK, 32) and sd[f"{q}.lora_up.weight"].shape == (32, UNET_RANK)
    assert sd[f"{q}.alpha"].shape == () and float(sd[f"{q}.alpha"]) == UNET_ALPHA
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert sd[f"{conv}.lora_down.weight"].shape == (CONV_RANK, 32, 3, 3) and float(sd[f"{conv}.alpha"]) == CONV_ALPHA

    fresh = LoRANetwork(unet_targets(unet))
    assert fresh.load_kohya_state_dict(sd, source="my.safetensors") == []
    assert all(torch.equal(fresh.state_dict_kohya()[k], v) for k, v in sd.items())

    partial = {k: v for k, v in sd.items() if not k.startswith(q + ".")}
    warnings = fresh.load_kohya_state_dict(partial, source="my.safetensors")
    assert len(warnings) == 1 and q in warnings[0]

    foreign = dict(sd, **{"lora_unet_nowhere.lora_down.weight": torch.zeros(1, 1)})
    with pytest.raises(CheckpointError, match="my.safetensors.*lora_unet_nowhere.lora_down.weight"):
        fresh.load_kohya_state_dict(foreign, source="my.safetensors")

    wrong_shape = dict(sd, **{f"{q}.lora_up.weight": torch.zeros(32, 8)})
    with pytest.raises(CheckpointError) as info:
        fresh.load_kohya_state_dict(wrong_shape, source="bad.safetensors")
    message = str(info.value)
    assert "bad.safetensors" in message and f"{q}.lora_up.weight" in message
    assert "(32, 8)" in message and f"(32, {UNET_RANK})" in message


def test_loaded_alpha_updates_scale():
    layer = nn.Linear(3, 3)
    network = LoRANetwork([AdapterTarget("lora_unet_x", layer, "unet", 2, 2.0)])
    sd = network.state_dict_kohya()
    sd["lora_unet_x.alpha"] = torch.tensor(0.5)
    network.load_kohya_state_dict(sd, source="f")
    assert network.lora_modules["lora_unet_x"].scale == 0.25
    del sd["lora_unet_x.alpha"]
    warnings = network.load_kohya_state_dict(sd, source="f")
    assert "alpha" in warnings[0] and network.lora_modules["lora_unet_x"].scale == 1.0


def test_to_moves_and_casts_every_module(unet):
    network = LoRANetwork(unet_targets(unet)).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in network.parameters())
    assert all(m.alpha.dtype == torch.float64 for m in network.lora_modules.values())
