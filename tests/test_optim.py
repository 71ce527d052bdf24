"""Optimizer construction: every sd-scripts name builds and trains a tiny model; sd-scripts' adjustments; errors."""

from __future__ import annotations

import importlib.util
import logging
import sys

import pytest
import torch

from lorakit.config import TrainConfig
from lorakit.errors import ConfigError
from lorakit.training.optim import KNOWN_OPTIMIZERS, OptimizerHandle, build_optimizer

REQUIRED = {"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "data", "resolution": 512,
            "output_dir": "out"}

# Adaptive optimizers take an LR around 1.0 (a multiplier of their own estimate); the rest a usual one.
ADAPTIVE_LR = 1.0
PLAIN_LR = 1e-3

# bitsandbytes runs its paged optimizers unpaged on the CPU and says so; that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")


def make_cfg(**options) -> TrainConfig:
    return TrainConfig(**(REQUIRED | options))


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def needs(module: str):
    return pytest.mark.skipif(not has(module), reason=f"optional package for {module} is not installed")


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 64x64 = 4096 weights: the size at which bitsandbytes switches to 8-bit optimizer state.
    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(16, 8, generator=generator), torch.randn(16, 64, generator=generator)


def loss_of(model: torch.nn.Module) -> torch.Tensor:
    x, y = batch()
    return torch.nn.functional.mse_loss(model(x), y)


def train_steps(handle: OptimizerHandle, model: torch.nn.Module, steps: int = 2) -> None:
    for _ in range(steps):
        loss_of(model).backward()
        handle.optimizer.step()
        handle.optimizer.zero_grad(set_to_none=True)


def run_two_steps(
    optimizer_type: str, lr: float, args: list[str] | None = None, steps: int = 2
) -> tuple[OptimizerHandle, float, float, float]:
    """Build over two param groups, train `steps` steps; returns handle, loss before/after, max parameter change."""
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    groups = [{"params": list(model[0].parameters()), "lr": lr}, {"params": list(model[2].parameters()), "lr": lr}]
    cfg = make_cfg(optimizer_type=optimizer_type, learning_rate=lr, optimizer_args=args)
    handle = build_optimizer(cfg, groups)
    with torch.no_grad():
        start = loss_of(model).item()
    train_steps(handle, model, steps)
    handle.eval_mode()  # schedule-free: evaluate the averaged weights, as the loop does before saving
    with torch.no_grad():
        end = loss_of(model).item()
    handle.train_mode()
    change = max((p.detach() - b).abs().max().item() for p, b in zip(model.parameters(), before))
    return handle, start, end, change


MODULES = {"bitsandbytes.optim": "bitsandbytes", "lion_pytorch": "lion_pytorch", "prodigyopt": "prodigyopt",
           "schedulefree": "schedulefree", "dadaptation": "dadaptation", "dadaptation.experimental": "dadaptation"}

# D-Adaptation starts from a tiny step estimate (d0=1e-6), so two steps barely move: check it moved at all.
SLOW_STARTERS = {"dadaptation", "dadaptadampreprint", "dadaptadanip", "dadaptadagrad", "dadaptadam", "dadaptadan",
                 "dadaptlion", "dadaptsgd"}
# Schedule-free RAdam skips the update while the variance rectification term is undefined (its first 5 steps).
STEPS = {"radamschedulefree": 6}


@pytest.mark.parametrize("key", sorted(KNOWN_OPTIMIZERS))
def test_every_builtin_optimizer_trains(key):
    known = KNOWN_OPTIMIZERS[key]
    top = MODULES.get(known.module, known.module)
    if not has(top.split(".")[0]):
        pytest.skip(f"{known.package} is not installed")
    lr = ADAPTIVE_LR if key.startswith(("dadapt", "prodigy")) else PLAIN_LR
    handle, start, end, change = run_two_steps(known.name, lr, steps=STEPS.get(key, 2))
    assert handle.name == known.name
    assert type(handle.optimizer).__name__ == known.cls
    assert change > 0, f"{known.name} did not change the parameters"
    if key not in SLOW_STARTERS:
        assert end < start, f"{known.name}: loss {start} -> {end}"


@pytest.mark.parametrize("name", ["RAdam", "radam", "torch.optim.Adagrad", "Adamax"])
def test_torch_optim_names_and_dotted_classes(name):
    handle, start, end, _ = run_two_steps(name, 1e-2)
    assert end < start
    assert handle.description.startswith("torch.optim.")


@needs("bitsandbytes")
def test_dotted_third_party_class_keeps_its_case():
    handle, start, end, _ = run_two_steps("bitsandbytes.optim.AdEMAMix8bit", PLAIN_LR)
    assert type(handle.optimizer).__name__ == "AdEMAMix8bit"
    assert end < start


def test_description_is_module_class_with_args():
    handle, *_ = run_two_steps("AdamW", PLAIN_LR, ["weight_decay=0.01", "betas=0.9,0.99"])
    assert handle.description == "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.99))"
    assert handle.optimizer.defaults["betas"] == (0.9, 0.99)
    plain, *_ = run_two_steps("adamw", PLAIN_LR)
    assert plain.description == "torch.optim.adamw.AdamW"


def test_sgd_nesterov_defaults_momentum_and_matches_formula():
    """First Nesterov step with buffer b = g: p ← p − lr·(g + μ·b) = p − lr·(1 + μ)·g."""
    model = tiny_model()
    handle = build_optimizer(make_cfg(optimizer_type="SGDNesterov", learning_rate=0.1), [{"params": list(model.parameters())}])
    assert handle.description == "torch.optim.sgd.SGD(momentum=0.9)"
    assert handle.optimizer.defaults["nesterov"] is True
    before = [p.detach().clone() for p in model.parameters()]
    loss_of(model).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    handle.optimizer.step()
    for p, b, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), b - 0.1 * 1.9 * g)


@needs("lion_pytorch")
def test_lion_first_step_is_lr_times_sign_of_gradient():
    """Lion (Chen et al., arXiv:2302.06675) with zero momentum: p ← p − lr·sign((1 − β1)·g)."""
    model = tiny_model()
    handle = build_optimizer(make_cfg(use_lion_optimizer=True, learning_rate=1e-4), [{"params": list(model.parameters())}])
    assert handle.name == "Lion" and handle.description == "lion_pytorch.lion_pytorch.Lion"
    before = [p.detach().clone() for p in model.parameters()]
    loss_of(model).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    handle.optimizer.step()
    for p, b, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), b - 1e-4 * torch.sign(g))


@needs("bitsandbytes")
def test_use_8bit_adam_means_adamw8bit():
    model = tiny_model()
    handle = build_optimizer(make_cfg(use_8bit_adam=True, learning_rate=1e-3), [{"params": list(model.parameters())}])
    assert handle.name == "AdamW8bit"
    assert type(handle.optimizer).__name__ == "AdamW8bit"


def test_adafactor_relative_step_owns_the_schedule():
    model = tiny_model()
    groups = [{"params": list(model[0].parameters()), "lr": 1e-3}, {"params": list(model[2].parameters()), "lr": 5e-4}]
    handle = build_optimizer(make_cfg(optimizer_type="Adafactor", learning_rate=1e-3), groups)
    assert handle.adafactor_initial_lr == 1e-3
    assert handle.description == "transformers.optimization.Adafactor(relative_step=True)"
    assert all(g["lr"] is None and g["relative_step"] for g in handle.optimizer.param_groups)


def test_adafactor_warmup_init_forces_relative_step():
    model = tiny_model()
    cfg = make_cfg(optimizer_type="adafactor", learning_rate=1e-3, optimizer_args=["relative_step=False", "warmup_init=True"])
    handle = build_optimizer(cfg, [{"params": list(model.parameters()), "lr": 1e-3}])
    assert handle.optimizer.defaults["relative_step"] is True
    assert handle.adafactor_initial_lr == 1e-3


def test_adafactor_fixed_lr_keeps_group_lrs_and_warns(caplog):
    model = tiny_model()
    args = ["relative_step=False", "scale_parameter=False", "warmup_init=False"]
    cfg = make_cfg(optimizer_type="Adafactor", learning_rate=1e-3, optimizer_args=args, lr_scheduler="cosine")
    with caplog.at_level(logging.WARNING):
        handle = build_optimizer(cfg, [{"params": list(model.parameters()), "lr": 1e-3}])
    assert handle.adafactor_initial_lr is None
    assert handle.optimizer.param_groups[0]["lr"] == 1e-3
    assert "max_grad_norm" in caplog.text and "constant_with_warmup" in caplog.text


@needs("prodigyopt")
def test_adaptive_optimizers_warn_on_small_or_several_lrs_and_log_d_lr(caplog):
    model = tiny_model()
    groups = [{"params": list(model[0].parameters()), "lr": 1e-4}, {"params": list(model[2].parameters()), "lr": 2e-4}]
    with caplog.at_level(logging.WARNING):
        handle = build_optimizer(make_cfg(optimizer_type="prodigy", learning_rate=1e-4), groups)
    assert "around 1.0" in caplog.text and "only the first" in caplog.text
    logs = handle.lr_logs([1e-4, 2e-4], ["textencoder", "unet"])
    assert logs["lr/unet"] == 2e-4
    assert logs["lr/d*lr/unet"] == pytest.approx(handle.optimizer.param_groups[1]["d"] * 2e-4)


@needs("schedulefree")
def test_schedule_free_train_and_eval_switch_weights():
    handle, *_ = run_two_steps("AdamWScheduleFree", 1e-2)
    assert handle.schedule_free
    params = [p for g in handle.optimizer.param_groups for p in g["params"]]
    training = [p.detach().clone() for p in params]
    handle.eval_mode()
    averaged = [p.detach().clone() for p in params]
    handle.train_mode()
    assert any(not torch.equal(a, t) for a, t in zip(averaged, training))
    assert all(torch.allclose(p, t) for p, t in zip(params, training))


def test_eval_mode_is_a_no_op_for_ordinary_optimizers():
    handle, *_ = run_two_steps("AdamW", PLAIN_LR)
    assert not handle.schedule_free
    handle.eval_mode()
    handle.train_mode()


@pytest.mark.parametrize(("name", "package"), [("Prodigy", "prodigyopt"), ("AdamW8bit", "bitsandbytes"),
                                               ("Lion", "lion-pytorch"), ("RAdamScheduleFree", "schedulefree"),
                                               ("DAdaptAdam", "dadaptation")])
def test_missing_package_names_it(monkeypatch, name, package):
    module = KNOWN_OPTIMIZERS[name.lower()].module
    for blocked in {module, module.split(".")[0]}:
        monkeypatch.setitem(sys.modules, blocked, None)  # makes `import` raise ImportError
    with pytest.raises(ConfigError, match=f"pip install {package}"):
        build_optimizer(make_cfg(optimizer_type=name), [{"params": list(tiny_model().parameters())}])


def test_missing_custom_module_names_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"no module 'no_such_optimizers' is installed or in the working directory") as error:
        build_optimizer(make_cfg(optimizer_type="no_such_optimizers.Fancy"), [{"params": list(tiny_model().parameters())}])
    assert "pip install" not in str(error.value)


def test_a_module_in_the_working_directory_is_found_by_the_command(tmp_path, monkeypatch):
    """The `lorakit` entry point does not put the working directory on the path (`python script.py` would)."""
    (tmp_path / "my_local_optimizers.py").write_text(
        "import torch\n\nclass SignSGD(torch.optim.SGD):\n    pass\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    handle = build_optimizer(make_cfg(optimizer_type="my_local_optimizers.SignSGD"), [{"params": list(tiny_model().parameters())}])
    assert type(handle.optimizer).__name__ == "SignSGD"


@pytest.mark.parametrize(("name", "suggestion"), [("AdamW9bit", "AdamW8bit"), ("Prodigi", "Prodigy"),
                                                  ("AdamWScheduleFre", "AdamWScheduleFree")])
def test_unknown_name_suggests_the_closest(name, suggestion):
    with pytest.raises(ConfigError, match=f"did you mean .*{suggestion}"):
        build_optimizer(make_cfg(optimizer_type=name), [{"params": list(tiny_model().parameters())}])


def test_unknown_class_in_a_module_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean AdamW"):
        build_optimizer(make_cfg(optimizer_type="torch.optim.AdamWW"), [{"params": list(tiny_model().parameters())}])


def test_bad_optimizer_args_are_a_config_error():
    with pytest.raises(ConfigError, match="optimizer_args"):
        build_optimizer(make_cfg(optimizer_args=["bogus=1"]), [{"params": list(tiny_model().parameters())}])


def test_custom_optimizer_from_a_module_on_the_path(tmp_path, monkeypatch):
    """The docs' recipe: a class in a user module, named as module.Class with its arguments."""
    package = tmp_path / "my_optimizers"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "sign_sgd.py").write_text(
        "import torch\n\n"
        "class SignSGD(torch.optim.Optimizer):\n"
        "    def __init__(self, params, lr=1e-4, weight_decay=0.0):\n"
        "        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))\n\n"
        "    @torch.no_grad()\n"
        "    def step(self, closure=None):\n"
        "        for group in self.param_groups:\n"
        "            for p in group['params']:\n"
        "                if p.grad is not None:\n"
        "                    p.mul_(1 - group['lr'] * group['weight_decay']).add_(p.grad.sign(), alpha=-group['lr'])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    handle, start, end, _ = run_two_steps("my_optimizers.sign_sgd.SignSGD", 1e-3, ["weight_decay=0.01"])
    assert handle.description == "my_optimizers.sign_sgd.SignSGD(weight_decay=0.01)"
    assert end < start
