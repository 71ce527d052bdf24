"""`--network_module lycoris.kohya`: the LyCORIS algorithms, behind lorakit's adapter interface.

LyCORIS (Yeh et al., "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation",
arXiv:2309.14859; pip package `lycoris-lora`) implements LoRA/LoCon, LoHa, LoKr, (IA)³, DyLoRA, GLoRA, native
fine-tuning ("full"), Diag-OFT and BOFT, each with optional DoRA weight decomposition (`dora_wd`), Tucker
factors for convs (`use_tucker`) and a learned output scalar (`use_scalar`). The algorithms' math is the
package's own module classes; this file only chooses which layers get one and with which rank, and wraps each
module in `AdapterModule` so the rest of lorakit (network, optimizer groups, files, merging) treats it like any
other adapter.

Layer selection follows `lycoris.kohya` exactly: a preset (`full`, `full-lin`, `attn-mlp`, `attn-only`,
`unet-transformer-only`, `unet-convblock-only`, …) names module classes whose Linear/Conv children are adapted
and module paths adapted themselves; linears and 1x1 convs get `network_dim`/`network_alpha`, larger kernels
`conv_dim`/`conv_alpha` (0 switches them off). Two things differ, both on purpose:

* the module walk is done here, over the roots the model family names (`lora_unet`, `lora_te`/`lora_te1`…),
  and text-encoder names keep the `text_model_` level that transformers 5 dropped, so files carry the same
  kohya names as sd-scripts + LyCORIS files have always had (and ComfyUI/Forge/A1111 map);
* `block_dims`/`block_alphas` (and `conv_block_dims`/`conv_block_alphas`), which lycoris-lora 4.1.3's kohya
  entry point does not read at all (any list is accepted and ignored there), set per-block ranks with
  sd-scripts' `networks.lora` block indices: 25 for SD 1/2 and 23 for SDXL (a 25-value list on SDXL, as
  users' guides copy from SD 1.5, is read with SD's indices over the diffusers block paths, with a warning);
* on FLUX the transformer's layers are the family's own targets (BFL names, fused q/k/v views) chosen by the
  preset's BFL classes, since LyCORIS' presets name BFL's modules and diffusers' FLUX has other classes.

Files use the kohya prefixes `lora_unet_`/`lora_te_` (not the standalone `lycoris_` prefix) and the
package's tensor names (`hada_w1_a`, `lokr_w1`, `oft_blocks`, `diff`, `dora_scale`, `alpha`, …).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import nn

from lorakit.adapters.base import AdapterModule, base_weight, dequantized, is_float8, write_merged_weight
from lorakit.adapters.blocks import BlockLayout
from lorakit.adapters.targets import AdapterTarget
from lorakit.errors import CheckpointError, ConfigError

log = logging.getLogger("lorakit")

__all__ = [
    "LYCORIS_ALGOS",
    "LYCORIS_ARGS",
    "LycorisAdapter",
    "LycorisOptions",
    "LycorisRoot",
    "block_layout",
    "lycoris_family_targets",
    "lycoris_targets",
    "preset_classes",
]

#: algorithm names accepted for `algo=` (those `lycoris-lora` implements for kohya networks)
LYCORIS_ALGOS = ("lora", "locon", "loha", "lokr", "ia3", "glora", "diag-oft", "boft")
#: algorithms the package has but this bridge refuses, with the reason given to the user
LYCORIS_REFUSED = {
    "full": "it moves the layer's weight into the adapter, which lorakit's frozen-base network cannot hold",
    "dylora": "its state dict does not load back exactly; use --network_module networks.dylora",
}

#: every --network_args key the bridge reads
LYCORIS_ARGS = (
    "algo", "preset", "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout", "use_tucker",
    "use_scalar", "rank_dropout_scale", "train_norm", "block_dims", "block_alphas", "conv_block_dims",
    "conv_block_alphas", "dora_wd", "weight_decompose", "wd_on_output", "factor", "decompose_both", "full_matrix",
    "unbalanced_factorization", "block_size", "constraint", "rescaled", "bypass_mode", "rs_lora", "train_on_input",
    "use_cp", "use_conv_cp", "disable_conv_cp",
)

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", "none", ""}


def _import_lycoris():
    try:
        from lycoris.config import PRESET
        from lycoris.wrapper import network_module_dict
    except ImportError as exc:
        raise ConfigError(
            ["--network_module lycoris.kohya needs the lycoris-lora package: pip install lycoris-lora"]
        ) from exc
    return PRESET, network_module_dict


# ---------------------------------------------------------------------- options


def _bool(kwargs: Mapping[str, str], key: str, default: bool = False) -> bool:
    if key not in kwargs:
        return default
    value = str(kwargs[key]).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError([f"--network_args {key}={kwargs[key]}: must be True or False"])


def _number(kwargs: Mapping[str, str], key: str, kind: type, default: Any) -> Any:
    if key not in kwargs or kwargs[key] in ("", "None", None):
        return default
    try:
        return kind(float(kwargs[key])) if kind is int else kind(kwargs[key])
    except ValueError as exc:
        raise ConfigError([f"--network_args {key}={kwargs[key]}: must be a number"]) from exc


def _list_items(kwargs: Mapping[str, str], key: str) -> list[str]:
    return [p.strip() for p in str(kwargs[key]).strip("[]").split(",")]


def _number_list(kwargs: Mapping[str, str], key: str, kind: type, layout: BlockLayout | None) -> list | None:
    if key not in kwargs:
        return None
    parts = _list_items(kwargs, key)
    try:
        values = [kind(float(p)) if kind is int else kind(p) for p in parts]
    except ValueError as exc:
        raise ConfigError([f"--network_args {key}: every entry must be a number (got {kwargs[key]})"]) from exc
    if layout is not None and len(values) != layout.num_blocks:
        raise ConfigError([f"--network_args {key}: needs exactly {layout.num_blocks} values for this {layout.name} "
                           f"U-Net (one per block), got {len(values)}"])
    return values


#: the block-wise options, read with sd-scripts' block indices
BLOCK_OPTIONS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")


def block_layout(layout: BlockLayout | None, kwargs: Mapping[str, str]) -> BlockLayout | None:
    """The block numbering the block-wise lists follow on this model (None when no list is given).

    A model family's own layout (SD 1.x/2.x: 25 blocks, SDXL: 23 over the SGM layout), or the alternate one a
    layout accepts for lists of another length (on SDXL, users' guides pass SD 1.x's 25 values to `lycoris.kohya`,
    whose own entry point ignores them).
    """
    given = {key: len(_list_items(kwargs, key)) for key in BLOCK_OPTIONS if key in kwargs}
    if not given:
        return None
    if layout is None:
        raise ConfigError([
            f"--network_args {key}: block-wise LyCORIS ranks need a U-Net with numbered blocks; this model's "
            "denoiser has none" for key in given
        ])
    alternate = layout.lycoris_alternate
    if alternate is not None and set(given.values()) == {alternate.num_blocks}:
        log.warning(
            "--network_args %s: %d values are %s's block layout; %s has %d blocks. Reading them with %s's block "
            "indices over the U-Net's down/mid/up blocks (lycoris.kohya itself ignores these options)",
            "/".join(given), alternate.num_blocks, alternate.name, layout.name, layout.num_blocks, alternate.name,
        )
        return alternate
    return layout


@dataclass
class LycorisOptions:
    """The parsed `--network_args` of `lycoris.kohya`, with sd-scripts/LyCORIS defaults."""

    algo: str = "lora"
    preset: str = "full"
    dim: int = 4
    alpha: float = 1.0
    conv_dim: int = 4
    conv_alpha: float = 1.0
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_tucker: bool = False
    train_norm: bool = False
    block_dims: list[int] | None = None
    block_alphas: list[float] | None = None
    conv_block_dims: list[int] | None = None
    conv_block_alphas: list[float] | None = None
    block_layout: BlockLayout | None = None  # the numbering the block lists follow
    module_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, kwargs: Mapping[str, str], network_dim: int | None, network_alpha: float | None,
              network_dropout: float | None, layout: BlockLayout | None = None) -> "LycorisOptions":
        presets, modules = _import_lycoris()
        unknown = sorted(set(kwargs) - set(LYCORIS_ARGS))
        if unknown:
            raise ConfigError([f"--network_args {k}: not a lycoris.kohya argument" for k in unknown])
        algo = str(kwargs.get("algo", "lora")).lower()
        if algo in LYCORIS_REFUSED:
            raise ConfigError([f"--network_args algo={algo}: not supported by lorakit's LyCORIS bridge: {LYCORIS_REFUSED[algo]}"])
        if algo not in LYCORIS_ALGOS or algo not in modules:
            raise ConfigError([f"--network_args algo={algo}: unknown (choose from {', '.join(LYCORIS_ALGOS)})"])
        preset = str(kwargs.get("preset", "full"))
        if preset not in presets:
            raise ConfigError([f"--network_args preset={preset}: unknown (choose from {', '.join(presets)})"])
        dim = int(network_dim or 4)
        alpha = float(network_alpha) if network_alpha else float(dim)
        # sd-scripts hands --network_dropout to LyCORIS as `dropout` (its "workaround for LyCORIS")
        dropout = _number(kwargs, "dropout", float, network_dropout or 0.0)
        weight_decompose = _bool(kwargs, "dora_wd") or _bool(kwargs, "weight_decompose")
        tucker = any(_bool(kwargs, k) for k in ("use_tucker", "use_cp", "use_conv_cp")) or (
            "disable_conv_cp" in kwargs and not _bool(kwargs, "disable_conv_cp")
        )
        module_kwargs = {
            "use_scalar": _bool(kwargs, "use_scalar"),
            "rank_dropout_scale": _bool(kwargs, "rank_dropout_scale"),
            "weight_decompose": weight_decompose,
            "wd_on_out": _bool(kwargs, "wd_on_output", True),
            "factor": _number(kwargs, "factor", int, -1),
            "decompose_both": _bool(kwargs, "decompose_both"),
            "full_matrix": _bool(kwargs, "full_matrix"),
            "unbalanced_factorization": _bool(kwargs, "unbalanced_factorization"),
            "block_size": _number(kwargs, "block_size", int, 4),
            "constraint": _number(kwargs, "constraint", float, 0.0),
            "rescaled": _bool(kwargs, "rescaled"),
            "bypass_mode": _bool(kwargs, "bypass_mode"),
            "rs_lora": _bool(kwargs, "rs_lora"),
            "train_on_input": _bool(kwargs, "train_on_input"),
        }
        return cls(
            algo=algo,
            preset=preset,
            dim=dim,
            alpha=alpha,
            conv_dim=_number(kwargs, "conv_dim", int, dim),
            conv_alpha=_number(kwargs, "conv_alpha", float, alpha),
            dropout=dropout,
            rank_dropout=_number(kwargs, "rank_dropout", float, 0.0),
            module_dropout=_number(kwargs, "module_dropout", float, 0.0),
            use_tucker=tucker,
            train_norm=_bool(kwargs, "train_norm"),
            block_dims=_number_list(kwargs, "block_dims", int, layout),
            block_alphas=_number_list(kwargs, "block_alphas", float, layout),
            conv_block_dims=_number_list(kwargs, "conv_block_dims", int, layout),
            conv_block_alphas=_number_list(kwargs, "conv_block_alphas", float, layout),
            block_layout=layout,
            module_kwargs=module_kwargs,
        )


# ---------------------------------------------------------------------- targets


@dataclass(frozen=True)
class LycorisRoot:
    """One model part to walk: its kohya prefix, the module, the component, and a naming-only path prefix."""

    prefix: str
    module: nn.Module
    component: str
    path_prefix: str = ""
    is_denoiser: bool = False
    rename: Callable[[str], str] | None = None  # module path -> the path kohya names use; ValueError = no name


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm))


def _is_conv_kxk(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def lycoris_targets(roots: Sequence[LycorisRoot], options: LycorisOptions) -> list[AdapterTarget]:
    """The layers a `lycoris.kohya` network with this preset adapts, with their ranks (0-rank layers dropped)."""
    presets, _ = _import_lycoris()
    preset = presets[options.preset]
    found: dict[str, AdapterTarget] = {}
    for root in roots:
        key = "unet" if root.is_denoiser else "text_encoder"
        classes = set(preset.get(f"{key}_target_module", []))
        names = list(preset.get(f"{key}_target_name", []))
        for path, module in root.module.named_modules():
            if type(module).__name__ in classes:
                for child_path, child in module.named_modules():
                    full = f"{path}.{child_path}" if child_path else path
                    _add(found, root, full, child, options, preset)
            elif path in names:
                _add(found, root, path, module, options, preset)
    return list(found.values())


def _add(found: dict[str, AdapterTarget], root: LycorisRoot, path: str, module: nn.Module, options: LycorisOptions, preset: Mapping) -> None:
    try:
        named_path = root.rename(path) if root.rename else path
    except ValueError:
        return  # no module of that name in the reference layout: a file entry for it would load nowhere
    name = f"{root.prefix}_{(root.path_prefix + named_path).replace('.', '_')}"
    if name in found:
        return
    if _is_norm(module):
        if options.train_norm:
            found[name] = AdapterTarget(name, module, root.component, 1, 1.0)
        return
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return
    spatial = _is_conv_kxk(module)
    if spatial and not preset.get("enable_conv", True):
        return
    block = _block_of(path, name, options) if root.is_denoiser else None
    rank, alpha = _rank_for(block, spatial, options)
    if rank > 0:
        found[name] = AdapterTarget(name, module, root.component, rank, alpha)


def _block_of(path: str, kohya_name: str, options: LycorisOptions) -> int | None:
    """The module's block index in the numbering the block lists follow (None without lists)."""
    layout = options.block_layout
    return None if layout is None else layout.lycoris_block_of(path, kohya_name)


def _rank_for(block: int | None, spatial: bool, options: LycorisOptions) -> tuple[int, float]:
    rank, alpha = (options.conv_dim, options.conv_alpha) if spatial else (options.dim, options.alpha)
    if block is None:
        return rank, alpha
    dims, alphas = (options.conv_block_dims, options.conv_block_alphas) if spatial else (options.block_dims, options.block_alphas)
    if dims is None and spatial:
        return rank, alpha
    if dims is not None:
        rank = dims[block]
    if alphas is not None:
        alpha = alphas[block]
    return rank, alpha


def preset_classes(options: LycorisOptions) -> set[str]:
    """The denoiser module classes the preset adapts (a family choosing its own targets reads them)."""
    presets, _ = _import_lycoris()
    return set(presets[options.preset].get("unet_target_module", []))


def lycoris_family_targets(targets: Sequence[AdapterTarget], options: LycorisOptions) -> list[AdapterTarget]:
    """The LyCORIS modules over layers a family chose itself for the preset (fused views the diffusers model
    keeps apart), with `--network_dim`/alpha (conv_dim/conv_alpha for 3x3 convolutions)."""
    found = []
    for target in targets:
        spatial = _is_conv_kxk(target.module)
        rank, alpha = (options.conv_dim, options.conv_alpha) if spatial else (options.dim, options.alpha)
        if rank > 0:
            found.append(AdapterTarget(target.name, target.module, target.component, rank, alpha))
    return found


# ---------------------------------------------------------------------- the adapter


def glora_delta_weight(glora: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """GLoRA's ΔW = (alpha/r)·scalar·(W·a1·a2 + b1·b2) at multiplier 1, in float32 whatever W's dtype.

    Chavan et al., "One-for-All: Generalized LoRA" (arXiv:2306.07967), as lycoris-lora lays it out: a2 (r, in)
    and a1 (in, r) act on the input side of W, b1·b2 is a plain low-rank term shaped like W (for a conv, b2
    carries the kernel and a1, a2 are 1x1). The package never builds its Tucker variant for GLoRA.
    """
    if getattr(glora, "tucker", False):
        raise NotImplementedError(f"{glora.lora_name}: GLoRA with a Tucker core is not supported")
    w = weight.float()
    a1 = glora.a1.weight.float().flatten(1)  # (in, r)
    a2 = glora.a2.weight.float().flatten(1)  # (r, in)
    b = glora.b1.weight.float().flatten(1) @ glora.b2.weight.float().flatten(1)
    w_a = torch.einsum("or...,ri->oi...", torch.einsum("oi...,ir->or...", w, a1), a2)  # (W·a1)·a2 on the inputs
    return (w_a + b.reshape(w.shape)) * (float(glora.scale) * glora.scalar.float())



@contextlib.contextmanager
def _package_reads(lyco: nn.Module, weight: torch.Tensor) -> Iterator[None]:
    """Let the package's merge read `weight` as its layer's weight.

    lycoris-lora reads W as `org_module[0].weight` inside `get_merged_weight`; a float8 weight there fails in
    its first addition (float8 takes part in no type promotion). For the duration of the call the package sees
    a stand-in holding the upcast weight and the layer's bias; nothing else of the layer is read there.
    """
    real = lyco.org_module
    lyco.org_module = [SimpleNamespace(weight=weight, bias=real[0].bias)]
    try:
        yield
    finally:
        lyco.org_module = real


@contextlib.contextmanager
def _plain_layer_class(layer: nn.Module) -> Iterator[None]:
    """Let the package see a float8 layer (`--fp8_base`) as the torch class it stands in for.

    lycoris-lora builds its convolution factors as `type(org_module)(...)`: for a layer that keeps its weight in
    float8 through every cast, the factors would be trained in float8 too. The stand-in class is shown only
    while the package module is built."""
    if not is_float8(layer.weight):
        yield
        return
    own = type(layer)
    layer.__class__ = next(c for c in own.__mro__ if c.__module__.startswith("torch.nn.modules"))
    try:
        yield
    finally:
        layer.__class__ = own


class LycorisAdapter(AdapterModule):
    """One LyCORIS module (LoCon, LoHa, LoKr, …) behind the `AdapterModule` interface.

    The package module does the math and owns its tensors; its state dict already uses the file's names. Its
    own `apply_to`/`restore` are used so that it keeps the original forward it chains to.
    """

    def __init__(self, target: AdapterTarget, options: LycorisOptions, multiplier: float = 1.0):
        super().__init__(target.name, target.module, multiplier)
        _, modules = _import_lycoris()
        with _plain_layer_class(target.module):
            if _is_norm(target.module):
                from lycoris.modules.norms import NormModule

                self.lyco = NormModule(
                    target.name, target.module, multiplier, options.rank_dropout, options.module_dropout,
                    **options.module_kwargs,
                )
            else:
                self.lyco = modules[options.algo](
                    target.name, target.module, multiplier, target.rank, target.alpha, options.dropout,
                    options.rank_dropout, options.module_dropout, options.use_tucker, **options.module_kwargs,
                )
        self.lyco.to(device=target.module.weight.device)

    @property
    def algorithm(self) -> str:
        return type(self.lyco).__name__

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "multiplier" and "lyco" in self._modules:
            self.lyco.multiplier = value

    # LyCORIS keeps a per-layer chain of wrappers: let it record the original forward, then route through us
    @property
    def is_applied(self) -> bool:
        return self.org_module.__dict__.get("forward") == self.forward

    def apply_to(self) -> None:
        if not self.is_applied:
            self.lyco.apply_to()
            self.org_module.forward = self.forward

    def restore(self) -> None:
        if self.is_applied:
            self.org_module.forward = self.lyco.forward
            self.lyco.restore()

    def original_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lyco.org_forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lyco = self.lyco
        if _is_norm(self.org_module):
            return lyco.forward(x)  # norm layers have no weight-rebuild op taking a weight difference
        if (type(lyco).__name__ == "LoConModule" and x.dtype == lyco.dtype and not getattr(lyco, "wd", False)
                and not is_float8(self.org_module.weight)):  # its own forward adds ΔW to the stored weight
            return lyco.forward(x)
        return self._rebuild_forward(x)

    def _merged(self, multiplier: float, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W' in float32, the new bias or None) at `multiplier`, from the layer's `weight` (read once by the
        caller: a fused view builds it anew on every read).

        GLoRA's weight depends on W itself (ΔW = W·A + B), and lycoris-lora 4.1.3 multiplies the layer's
        weight by its float32 factors as they are, which fails on a half-precision base: its ΔW is formed
        here in float32 instead. Every other algorithm uses the package's own `get_merged_weight`.
        """
        weight = dequantized(weight)
        if type(self.lyco).__name__ == "GLoRAModule":
            return weight.float() + multiplier * glora_delta_weight(self.lyco, weight), None
        with _package_reads(self.lyco, weight):
            merged, bias = self.lyco.get_merged_weight(multiplier, weight.shape, weight.device)
        return merged.float(), bias

    def _rebuild_forward(self, x: torch.Tensor) -> torch.Tensor:
        """W x + (W' − W) x with the weight difference cast to the activation's dtype.

        Used for every algorithm but plain LoCon: lycoris-lora 4.1.3's own forwards multiply the activation
        by adapter tensors of their own dtype (and by the float32 weight its DoRA epilogue returns), which
        fails when a half-precision base model carries float32 adapters, and its LoHa forward does not agree
        with its own `get_merged_weight`, the function every offline merge uses. This is the package's
        "rebuild" forward (rank dropout lives in the rebuilt weight, module dropout skips the branch);
        neuron dropout is not applied on this path.
        """
        lyco = self.lyco
        if self.training and lyco.module_dropout and torch.rand(()) < lyco.module_dropout:
            return self.original_forward(x)
        weight = base_weight(self.org_module)
        merged, _ = self._merged(self.multiplier, weight)
        delta = (merged - weight.float()).to(x.dtype)
        return self.original_forward(x) + lyco.op(x, delta, None, **lyco.kw_dict)

    def merged_weight(self, multiplier: float = 1.0) -> torch.Tensor:
        return self._merged(multiplier, self.org_module.weight)[0]

    def delta_weight(self) -> torch.Tensor:
        weight = base_weight(self.org_module)
        return self._merged(1.0, weight)[0] - weight.float()

    @torch.no_grad()
    def merge_to_base(self, multiplier: float = 1.0) -> None:
        merged, bias = self._merged(multiplier, self.org_module.weight)
        write_merged_weight(self.org_module, merged)
        if bias is not None and self.org_module.bias is not None:
            self.org_module.bias.copy_(bias.to(self.org_module.bias.dtype))
        self.restore()

    def plus_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.lyco.named_parameters() if "lora_up" in n and p.requires_grad]

    # files: the package's own names (its custom state dict), read back through its load hooks
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        return self.lyco.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.lyco.state_dict().items()}

    @torch.no_grad()
    def load_adapter_tensors(self, tensors: Mapping[str, torch.Tensor], source: str) -> list[str]:
        expected = self.adapter_state_dict()
        unknown = sorted(set(tensors) - set(expected))
        if unknown:
            raise CheckpointError(
                f"{source}: key {self.lora_name}.{unknown[0]} is not a tensor of this {self.algorithm} "
                f"(expected {', '.join(sorted(expected))})"
            )
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise CheckpointError(f"{source}: {self.lora_name} has no {' or '.join(missing)}")
        for suffix, value in tensors.items():
            if value.numel() != expected[suffix].numel():
                raise CheckpointError(
                    f"{source}: key {self.lora_name}.{suffix} has shape {tuple(value.shape)} but this network "
                    f"expects {tuple(expected[suffix].shape)}"
                )
        state = {k: v.reshape(expected[k].shape) for k, v in tensors.items()}
        result = self.lyco.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise CheckpointError(f"{source}: {self.lora_name}: the {self.algorithm} module did not take {', '.join(result.unexpected_keys)}")
        return []

    def extra_repr(self) -> str:
        return f"name={self.lora_name}, algo={self.algorithm}"
