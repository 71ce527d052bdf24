"""Optimizer construction from --optimizer_type / --optimizer_args, as sd-scripts' `get_optimizer`.

Names are compared case-insensitively against the table below (sd-scripts' built-in names). Anything else is
an arbitrary class: a bare name is looked up in `torch.optim`, a dotted `module.Class` is imported. Every class
is constructed as `Class(param_groups, lr=learning_rate, **optimizer_args)`, except for the adjustments that
sd-scripts makes (SGD Nesterov momentum, Adafactor's relative step).

Third-party optimizer packages are optional: a missing one is a ConfigError that names the package to install.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from lorakit.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownOptimizer:
    """One of sd-scripts' built-in optimizer names and how to build it."""

    name: str  # spelling used in messages and docs
    module: str
    cls: str
    package: str | None = None  # pip package; None when it ships with lorakit's own dependencies
    # Added to the kwargs when absent; they appear in ss_optimizer, as in sd-scripts.
    defaults: dict[str, Any] = field(default_factory=dict)
    # Always passed but not recorded in ss_optimizer (sd-scripts passes `nesterov=True` outside the kwargs).
    fixed: dict[str, Any] = field(default_factory=dict)


def _k(name: str, module: str, cls: str | None = None, package: str | None = None, **extra: Any) -> KnownOptimizer:
    return KnownOptimizer(name, module, cls or name, package, **extra)


_BNB = "bitsandbytes"
_NESTEROV = {"defaults": {"momentum": 0.9}, "fixed": {"nesterov": True}}

KNOWN_OPTIMIZERS: dict[str, KnownOptimizer] = {
    k.name.lower(): k
    for k in (
        _k("AdamW", "torch.optim"),
        _k("AdamW8bit", "bitsandbytes.optim", package=_BNB),
        _k("PagedAdamW8bit", "bitsandbytes.optim", package=_BNB),
        _k("Lion8bit", "bitsandbytes.optim", package=_BNB),
        _k("PagedLion8bit", "bitsandbytes.optim", package=_BNB),
        _k("SGDNesterov8bit", "bitsandbytes.optim", "SGD8bit", package=_BNB, **_NESTEROV),
        _k("PagedAdamW", "bitsandbytes.optim", package=_BNB),
        _k("PagedAdamW32bit", "bitsandbytes.optim", package=_BNB),
        _k("Lion", "lion_pytorch", package="lion-pytorch"),
        _k("SGDNesterov", "torch.optim", "SGD", **_NESTEROV),
        _k("DAdaptation", "dadaptation.experimental", "DAdaptAdamPreprint", package="dadaptation"),
        _k("DAdaptAdamPreprint", "dadaptation.experimental", package="dadaptation"),
        _k("DAdaptAdanIP", "dadaptation.experimental", package="dadaptation"),
        _k("DAdaptAdaGrad", "dadaptation", package="dadaptation"),
        _k("DAdaptAdam", "dadaptation", package="dadaptation"),
        _k("DAdaptAdan", "dadaptation", package="dadaptation"),
        _k("DAdaptLion", "dadaptation", package="dadaptation"),
        _k("DAdaptSGD", "dadaptation", package="dadaptation"),
        _k("Prodigy", "prodigyopt", package="prodigyopt"),
        _k("Adafactor", "transformers.optimization"),
        _k("RAdamScheduleFree", "schedulefree", package="schedulefree"),
        _k("AdamWScheduleFree", "schedulefree", package="schedulefree"),
        _k("SGDScheduleFree", "schedulefree", package="schedulefree"),
    )
}

# pip names of packages whose import name differs, for `module.Class` optimizers and schedulers.
PIP_NAMES = {
    "lion_pytorch": "lion-pytorch",
    "pytorch_optimizer": "pytorch-optimizer",
    "prodigyplus": "prodigy-plus-schedule-free",
    "came_pytorch": "came-pytorch",
    "transformers": "transformers",
}

# D-Adaptation and Prodigy estimate the step size themselves; the given LR is a multiplier of it.
_ADAPTIVE_PREFIXES = ("dadapt", "prodigy")
_ADAPTIVE_LR_FLOOR = 0.1


@dataclass
class OptimizerHandle:
    """The optimizer with what the training loop needs to drive and describe it.

    `description` is the `ss_optimizer` metadata value (`module.Class(k=v,...)`). `schedule_free` optimizers
    (Defazio et al., "The Road Less Scheduled", arXiv:2405.15682) keep two sets of weights: call `eval_mode()`
    before sampling, validation and saving (so the averaged weights are used and saved), and `train_mode()`
    after. With Adafactor's relative step the optimizer owns the schedule: `adafactor_initial_lr` is then set
    and the scheduler builder uses the `adafactor` proxy schedule.
    """

    optimizer: torch.optim.Optimizer
    description: str
    name: str
    schedule_free: bool = False
    adaptive: bool = False
    adafactor_initial_lr: float | None = None

    def train_mode(self) -> None:
        """Switch a schedule-free optimizer to its training weights; no-op for the others."""
        if self.schedule_free:
            self.optimizer.train()

    def eval_mode(self) -> None:
        """Switch a schedule-free optimizer to its averaged weights; no-op for the others."""
        if self.schedule_free:
            self.optimizer.eval()

    def lr_logs(self, last_lrs: list[float], descriptions: list[str]) -> dict[str, float]:
        """`lr/<desc>` per group and, for D-Adaptation/Prodigy, `lr/d*lr/<desc>` (sd-scripts' log keys)."""
        logs: dict[str, float] = {}
        groups = self.optimizer.param_groups
        for i, lr in enumerate(last_lrs):
            desc = descriptions[i] if i < len(descriptions) else f"group{i}"
            logs[f"lr/{desc}"] = float(lr)
            if i < len(groups) and "d" in groups[i] and (self.adaptive or self.schedule_free):
                logs[f"lr/d*lr/{desc}"] = float(groups[i]["d"] * groups[i]["lr"])
        return logs


def optimizer_name(cfg: Any) -> str:
    """The optimizer name after the legacy flags: --use_8bit_adam => AdamW8bit, --use_lion_optimizer => Lion."""
    if getattr(cfg, "use_8bit_adam", False):
        return "AdamW8bit"
    if getattr(cfg, "use_lion_optimizer", False):
        return "Lion"
    return (cfg.optimizer_type or "").strip() or "AdamW"


def is_schedule_free(name: str) -> bool:
    """sd-scripts' test: the name ends with "schedulefree" (so prodigyplus.ProdigyPlusScheduleFree counts too)."""
    return name.lower().endswith("schedulefree")


def is_adaptive(name: str) -> bool:
    """D-Adaptation and Prodigy variants, which estimate the step size `d` themselves."""
    return name.lower().startswith(_ADAPTIVE_PREFIXES)


def pip_name(module: str) -> str:
    """The package to `pip install` for an import path (its top-level module, mapped where the names differ)."""
    top = module.split(".")[0]
    return PIP_NAMES.get(top, top.replace("_", "-"))


def import_module(module: str, what: str, package: str | None = None) -> Any:
    """Import `module`, also from the working directory (the `lorakit` command, unlike `python script.py`, does
    not put it on the path), turning a missing module into a ConfigError that says where it was looked for and,
    for a known third-party module, what to install."""
    try:
        return _import_also_from_working_directory(module)
    except ImportError as exc:
        top = module.split(".")[0]
        missing = isinstance(exc, ModuleNotFoundError) and exc.name is not None and exc.name.split(".")[0] == top
        if missing and package is None and top not in PIP_NAMES:
            raise ConfigError([
                f"{what}: no module {top!r} is installed or in the working directory {Path.cwd()} "
                f"(put {top}.py or a {top}/ folder there, on PYTHONPATH, or install the package that provides it)"
            ]) from exc
        package = package or pip_name(module)
        raise ConfigError([
            f"{what} needs the Python package '{package}', which is not installed or failed to import "
            f"({exc}); install it with: pip install {package}"
        ]) from exc


def _import_also_from_working_directory(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        cwd = str(Path.cwd())
        if exc.name is None or exc.name.split(".")[0] != module.split(".")[0] or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)  # last: a file here never hides an installed package
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError:
            sys.path.remove(cwd)
            raise


def class_from(module: Any, name: str, what: str, base: type | None = None) -> Callable[..., Any]:
    """`module.name`, or a ConfigError with the closest names in that module."""
    found = getattr(module, name, None)
    if found is not None:
        return found
    candidates = [n for n, v in vars(module).items() if inspect.isclass(v) and (base is None or issubclass(v, base))]
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError([f"{what}: {module.__name__} has no class {name}{hint}"])


def _resolve_class(name: str) -> tuple[Callable[..., Any], KnownOptimizer | None]:
    """The optimizer class for a name: built-in table, then torch.optim, then an importable `module.Class`."""
    what = f"--optimizer_type {name}"
    known = KNOWN_OPTIMIZERS.get(name.lower())
    if known is not None:
        module = import_module(known.module, what, known.package)
        return class_from(module, known.cls, what), known
    if "." in name:
        module_name, cls = name.rsplit(".", 1)
        return class_from(import_module(module_name, what), cls, what), None
    return _torch_optimizer(name), None


def _torch_optimizer(name: str) -> Callable[..., Any]:
    """`torch.optim.<name>` (exact case first, as sd-scripts, then case-insensitively) or a did-you-mean."""
    classes = {
        n: v for n, v in vars(torch.optim).items()
        if inspect.isclass(v) and issubclass(v, torch.optim.Optimizer) and v is not torch.optim.Optimizer
    }
    if name in classes:
        return classes[name]
    by_lower = {n.lower(): v for n, v in classes.items()}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    choices = [k.name for k in KNOWN_OPTIMIZERS.values()] + sorted(classes)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    close = close or difflib.get_close_matches(name.lower(), [c.lower() for c in choices], n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError([
        f"--optimizer_type {name}: unknown optimizer{hint} (built-in names: "
        f"{', '.join(k.name for k in KNOWN_OPTIMIZERS.values())}; also any torch.optim class or module.Class)"
    ])


def _warn_adaptive(param_groups: list[dict], lr: float) -> None:
    """sd-scripts' D-Adaptation/Prodigy checks: LR should be about 1.0, and only the first group's LR counts."""
    actual = param_groups[0].get("lr", lr) if param_groups and isinstance(param_groups[0], dict) else lr
    rates = {g.get("lr", actual) for g in param_groups if isinstance(g, dict)}
    if actual is not None and actual <= _ADAPTIVE_LR_FLOOR:
        log.warning(
            "learning rate %s is too low for D-Adaptation/Prodigy, which scale their own step estimate by it; "
            "set --learning_rate (and --unet_lr/--text_encoder_lr) around 1.0", actual)
    if len(rates) > 1:
        log.warning(
            "D-Adaptation/Prodigy with several learning rates (e.g. text encoder and U-Net): only the first "
            "one (%s) takes effect", actual)


def _adafactor_setup(cfg: Any, kwargs: dict[str, Any], param_groups: list[dict]) -> float | None:
    """sd-scripts' Adafactor handling. Returns the initial LR of the `adafactor` schedule, or None.

    relative_step defaults to True (and is forced on by warmup_init). With it Adafactor computes its own step
    size: the per-group LRs are removed, `learning_rate` is only the schedule's reported initial LR.
    """
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        log.info("Adafactor: relative_step set to True because warmup_init is True")
        kwargs["relative_step"] = True
    if kwargs["relative_step"]:
        if cfg.learning_rate:
            log.warning("Adafactor with relative_step: --learning_rate %s is used only as the initial LR that is "
                        "reported before the first step", cfg.learning_rate)
        dropped = [g.pop("lr", None) for g in param_groups if isinstance(g, dict)]
        if any(lr is not None and lr != cfg.learning_rate for lr in dropped):
            log.warning("Adafactor with relative_step ignores --unet_lr and --text_encoder_lr")
        if getattr(cfg, "lr_scheduler", "adafactor") != "adafactor":
            log.info("Adafactor with relative_step: using the adafactor LR schedule instead of --lr_scheduler %s",
                     cfg.lr_scheduler)
        return float(cfg.learning_rate or 0.0)
    if getattr(cfg, "max_grad_norm", 0.0):
        log.warning("Adafactor: --max_grad_norm %s clips gradients; --max_grad_norm 0 is recommended",
                    cfg.max_grad_norm)
    if getattr(cfg, "lr_scheduler", "constant_with_warmup") != "constant_with_warmup":
        log.warning("Adafactor without relative_step: --lr_scheduler constant_with_warmup is recommended")
    if kwargs.get("clip_threshold", 1.0) != 1.0:
        log.warning("Adafactor: clip_threshold=1.0 is recommended")
    return None


def describe(cls: Callable[..., Any], kwargs: dict[str, Any]) -> str:
    """`module.Class(k=v,...)` as sd-scripts writes `ss_optimizer`."""
    qualified = f"{cls.__module__}.{cls.__name__}"
    described = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return f"{qualified}({described})" if described else qualified


def _construct(cls: Callable[..., Any], param_groups: list[dict], lr: float | None, kwargs: dict, name: str) -> Any:
    try:
        return cls(param_groups, lr=lr, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError([f"--optimizer_type {name} with --optimizer_args {kwargs}: rejected by "
                           f"{cls.__name__} ({exc})"]) from exc


def build_optimizer(cfg: Any, param_groups: list[dict]) -> OptimizerHandle:
    """Build the optimizer named by `cfg` over `param_groups` (sd-scripts' `get_optimizer`).

    The groups are modified in place for Adafactor with relative_step (their "lr" is removed).
    """
    name = optimizer_name(cfg)
    kwargs = dict(cfg.optimizer_kwargs()) if hasattr(cfg, "optimizer_kwargs") else {}
    cls, known = _resolve_class(name)
    lower = name.lower()
    lr: float | None = cfg.learning_rate
    fixed: dict[str, Any] = {}
    if known is not None:
        for key, value in known.defaults.items():
            if key not in kwargs:
                log.info("%s: %s set to %s", known.name, key, value)
                kwargs[key] = value
        fixed = dict(known.fixed)
    if is_adaptive(lower):
        _warn_adaptive(param_groups, lr)
    if lower in ("lion", "lion8bit", "pagedlion8bit") and lr and lr > 3e-4:
        log.info("Lion usually needs a learning rate 3-10x smaller than AdamW (given %s)", lr)
    adafactor_lr = _adafactor_setup(cfg, kwargs, param_groups) if lower == "adafactor" else None
    if adafactor_lr is not None:
        lr = None
    optimizer = _construct(cls, param_groups, lr, {**kwargs, **fixed}, name)
    schedule_free = is_schedule_free(name) and callable(getattr(optimizer, "train", None))
    if callable(getattr(optimizer, "train", None)):
        # Schedule-free optimizers start in training mode, as sd-scripts puts them.
        optimizer.train()
    return OptimizerHandle(
        optimizer=optimizer,
        description=describe(cls, kwargs),
        name=known.name if known is not None else name,
        schedule_free=schedule_free,
        adaptive=is_adaptive(lower),
        adafactor_initial_lr=adafactor_lr,
    )
