"""Steps taken during the backward pass (training/updates.py) against the ordinary optimizer step."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers.optimization import Adafactor

from lorakit.training.updates import block_key, build_updates, split_in_groups, stochastic_round_

ACCELERATOR = SimpleNamespace(num_processes=1)  # one process: nothing to reduce


class Blocks(nn.Module):
    """A small residual stack with numbered blocks (the shape of a transformer's block list)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16)) for _ in range(3))
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def options(**given) -> SimpleNamespace:
    base = dict(max_grad_norm=0.0, fused_backward_pass=False, blockwise_fused_optimizers=False, fused_optimizer_groups=None)
    return SimpleNamespace(**{**base, **given})


def train(model: nn.Module, make_optimizer, cfg, steps: int = 3) -> nn.Module:
    params = list(model.parameters())
    optimizer = make_optimizer(params)
    names = {p: n for n, p in model.named_parameters()}
    updates = build_updates(cfg, ACCELERATOR, optimizer, params, names)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(5, 8, generator=generator)
        loss = model(x).pow(2).mean()
        loss.backward()
        updates.after_backward(True)
    return model


def adafactor(params):
    return Adafactor(params, lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False)


def assert_close(a: nn.Module, b: nn.Module, rel: float) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=rel, atol=0), name


def test_fused_backward_pass_equals_the_unfused_adafactor_step():
    torch.manual_seed(0)
    model = Blocks()
    start = copy.deepcopy(model)
    plain = train(copy.deepcopy(model), adafactor, options())
    fused = train(model, adafactor, options(fused_backward_pass=True))
    assert_close(fused, plain, 1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(fused.parameters(), start.parameters())), "the weights moved"
    assert all(p.grad is None for p in fused.parameters()), "each gradient is freed once its parameter stepped"


@pytest.mark.parametrize("cfg", [options(blockwise_fused_optimizers=True), options(fused_optimizer_groups=2)],
                         ids=["blockwise", "groups"])
def test_blockwise_and_grouped_steps_equal_the_per_step_optimizer(cfg):
    torch.manual_seed(1)
    model = Blocks()
    make = lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)  # noqa: E731
    plain = train(copy.deepcopy(model), make, options())
    fused = train(model, make, cfg)
    assert_close(fused, plain, 1e-6)


def test_blocks_are_the_numbered_module_paths():
    assert block_key("parts.denoiser.transformer_blocks.3.attn.to_q.weight") == "parts.denoiser.transformer_blocks.3"
    assert block_key("parts.denoiser.proj_out.weight") == "parts.denoiser.other"
    params = [nn.Parameter(torch.zeros(1)) for _ in range(5)]
    runs = split_in_groups([(1e-3, params[:3]), (1e-4, params[3:])], 2)
    assert [len(r) for r in runs] == [3, 2], "about total/N per run, and a new run where the LR changes"


def test_stochastic_rounding_is_unbiased():
    """1 + a quarter of bfloat16's spacing at 1: round-to-nearest gives 1 every time, stochastic rounding gives
    the upper neighbour a quarter of the time, so the mean is the float32 value."""
    spacing = 2.0 ** -7
    value = 1.0 + 0.25 * spacing
    source = torch.full((200_000,), value, dtype=torch.float32)
    target = torch.empty_like(source, dtype=torch.bfloat16)
    torch.manual_seed(0)
    stochastic_round_(target, source)
    as_float = target.float()
    assert set(as_float.unique().tolist()) == {1.0, 1.0 + spacing}
    assert abs(as_float.mean().item() - value) < 0.01 * spacing
    assert source.to(torch.bfloat16).float().mean().item() == 1.0, "nearest rounding loses the update"


def test_fused_step_on_bfloat16_weights_rounds_stochastically():
    """Updates far below bfloat16's spacing still move the weights (on average) with --full_bf16."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    updates = build_updates(options(fused_backward_pass=True), ACCELERATOR, optimizer, [weight], {weight: "w"})
    (weight.float() * -1e-3).sum().backward()  # gradient -1e-3: SGD adds 1e-3, an eighth of the spacing (2^-7)
    updates.after_backward(True)
    assert weight.dtype == torch.bfloat16 and weight.grad is None
    assert abs(weight.float().mean().item() - 1.001) < 2e-4
