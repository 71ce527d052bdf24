"""How a micro-batch's gradients become a weight update: after the backward pass (the usual way), or during it.

* `StepAfterBackward`: at the end of an accumulation the gradients are reduced across processes, clipped over
  all trained parameters together, and the optimizer steps over all of them.
* `StepDuringBackward` (`--fused_backward_pass`, `--blockwise_fused_optimizers`, `--fused_optimizer_groups`):
  post-accumulate-grad hooks step each parameter (or each block / group of parameters) as soon as its
  gradient is complete and free the gradient, so the gradients of the whole model never exist at once (the
  memory of a full fine-tune is then weights + optimizer state + one block's gradients). Clipping is per
  parameter (per group) then, as sd-scripts clips in its hooks.

Both drive one optimizer with the run's parameter groups, so the LR scheduler, the training state and resume
are the same. A partial step runs the optimizer with each group's `params` cut down to the parameters being
stepped: every optimizer whose update of a parameter depends only on that parameter's gradient and state
(AdamW, Adafactor, Lion, SGD, ...) then gives exactly what a whole step gives. The step-size estimators that
look at all parameters together (D-Adaptation, Prodigy, schedule-free) are refused by the option checks.

With `--fused_backward_pass` and bfloat16 weights (`--full_bf16`) each parameter is stepped on a float32 copy
and written back with stochastic rounding (`stochastic_round_`), so updates smaller than bfloat16's spacing
still move the weights on average.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import nn

from lorakit.training.step import all_reduce_gradients


class WeightUpdates(Protocol):
    def after_backward(self, sync: bool) -> None:
        """Called after each micro-batch's backward pass; `sync` ends an accumulation."""


def build_updates(cfg: Any, accelerator: Any, optimizer: Any, params: list[nn.Parameter],
                  names: dict[nn.Parameter, str], during_backward: bool = True) -> WeightUpdates:
    """The update rule the options choose; `optimizer` is accelerate's wrapper, `names` names each parameter
    (for the blocks of --blockwise_fused_optimizers). Without `during_backward` (what is trained has no use for
    it: an adapter network, as sd-scripts' train_network ignores --fused_backward_pass) the step follows the
    backward pass."""
    if not during_backward:
        return StepAfterBackward(cfg, accelerator, optimizer, params)
    if cfg.fused_backward_pass:
        sets = [[p] for p in params]
        return StepDuringBackward(cfg, accelerator, optimizer, sets, stochastic=True)
    if getattr(cfg, "blockwise_fused_optimizers", False):
        return StepDuringBackward(cfg, accelerator, optimizer, blocks_of(params, names), stochastic=False)
    if getattr(cfg, "fused_optimizer_groups", None):
        groups = _lr_ordered(getattr(optimizer, "optimizer", optimizer).param_groups, set(params))
        return StepDuringBackward(cfg, accelerator, optimizer, split_in_groups(groups, cfg.fused_optimizer_groups), stochastic=False)
    return StepAfterBackward(cfg, accelerator, optimizer, params)


class StepAfterBackward:
    def __init__(self, cfg: Any, accelerator: Any, optimizer: Any, params: list[nn.Parameter]):
        self.cfg, self.accelerator, self.optimizer, self.params = cfg, accelerator, optimizer, params

    def after_backward(self, sync: bool) -> None:
        if sync:
            all_reduce_gradients(self.accelerator, self.params)
            if self.cfg.max_grad_norm:
                self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()  # the accelerate wrapper steps only when `sync` is set
        self.optimizer.zero_grad(set_to_none=True)


class StepDuringBackward:
    """Steps each set of parameters from a post-accumulate-grad hook once all of the set's gradients exist."""

    def __init__(self, cfg: Any, accelerator: Any, optimizer: Any, sets: list[list[nn.Parameter]], *, stochastic: bool):
        self.cfg, self.accelerator = cfg, accelerator
        self.inner = getattr(optimizer, "optimizer", optimizer)  # the bare optimizer: the hooks step it themselves
        self.sets = [s for s in sets if s]
        self.stochastic = stochastic
        self.set_of: dict[nn.Parameter, int] = {p: i for i, s in enumerate(self.sets) for p in s}
        self.ready: dict[int, list[nn.Parameter]] = {}
        for param in self.set_of:
            param.register_post_accumulate_grad_hook(self._hook)

    def _hook(self, param: nn.Parameter) -> None:
        index = self.set_of[param]
        ready = self.ready.setdefault(index, [])
        ready.append(param)
        if len(ready) == len(self.sets[index]):
            self._step(self.ready.pop(index))

    def after_backward(self, sync: bool) -> None:
        """Sets some of whose parameters got no gradient this time (unused layers) are stepped now."""
        for index in sorted(self.ready):
            self._step(self.ready.pop(index))

    def _step(self, params: list[nn.Parameter]) -> None:
        if self.accelerator.num_processes > 1:
            all_reduce_gradients(self.accelerator, params)
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        chosen = set(params)
        if self.stochastic and params[0].dtype == torch.bfloat16:
            with float32_master(params):
                step_only(self.inner, chosen)
            stochastic_write_back(params)
        else:
            step_only(self.inner, chosen)
        for param in params:
            param.grad = None


@torch.no_grad()
def step_only(optimizer: torch.optim.Optimizer, params: set[nn.Parameter]) -> None:
    """One optimizer step over `params` alone (each group's list cut down to them for the call)."""
    saved = [group["params"] for group in optimizer.param_groups]
    try:
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if p in params]
        optimizer.step()
    finally:
        for group, original in zip(optimizer.param_groups, saved):
            group["params"] = original


class float32_master:
    """Within the block, bfloat16 parameters hold float32 copies of themselves (and of their gradients)."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params

    def __enter__(self) -> None:
        for param in self.params:
            low, grad = param.data, param.grad
            param.grad = None
            param.data = low.float()
            param.grad = grad.float()
            param._low_precision = low  # the bfloat16 storage the result goes back into

    def __exit__(self, *exc: Any) -> None:
        return None


def stochastic_write_back(params: list[nn.Parameter]) -> None:
    for param in params:
        low = param.__dict__.pop("_low_precision")
        stochastic_round_(low, param.data)
        param.grad = None
        param.data = low


@torch.no_grad()
def stochastic_round_(target: torch.Tensor, source: torch.Tensor) -> None:
    """Write float32 `source` into bfloat16 `target`, rounding up with probability equal to the dropped
    fraction: bfloat16 is the top 16 bits of a float32, so adding a uniform 16-bit integer to the bit pattern
    and cutting the low 16 bits off rounds up exactly when the random number exceeds the remainder."""
    bits = source.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device)
    rounded = (bits + noise).bitwise_and_(-65536)  # 0xFFFF0000: keep the bfloat16 part
    target.copy_(rounded.view(torch.float32))  # exact: the low bits are zero


def blocks_of(params: list[nn.Parameter], names: dict[nn.Parameter, str]) -> list[list[nn.Parameter]]:
    """Parameters grouped by their block: the module path up to its first numbered level
    (`transformer_blocks.3`), everything without one in a block of its own per part."""
    blocks: dict[str, list[nn.Parameter]] = {}
    for param in params:
        blocks.setdefault(block_key(names.get(param, "")), []).append(param)
    return list(blocks.values())


def block_key(name: str) -> str:
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return ".".join(parts[:2]) + ".other"


def _lr_ordered(groups: list[dict], trained: set[nn.Parameter]) -> list[tuple[float | None, list[nn.Parameter]]]:
    return [(group.get("lr"), [p for p in group["params"] if p in trained]) for group in groups]


def split_in_groups(groups: list[tuple[float | None, list[nn.Parameter]]], count: int) -> list[list[nn.Parameter]]:
    """sdxl_train.py's --fused_optimizer_groups: consecutive runs of about total/N parameters, a new run
    also wherever the learning rate changes."""
    total = sum(len(params) for _, params in groups)
    per_group = max(1, math.ceil(total / count))
    runs: list[list[nn.Parameter]] = []
    for _, params in groups:
        current: list[nn.Parameter] = []
        for param in params:
            current.append(param)
            if len(current) == per_group:
                runs.append(current)
                current = []
        if current:
            runs.append(current)
    return runs
