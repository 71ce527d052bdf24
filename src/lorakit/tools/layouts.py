"""How each model family names LoRA modules, in the kohya layout and in the diffusers/PEFT layout.

A kohya module name is `<prefix>_<module path with "." replaced by "_">` (`lora_unet_down_blocks_0_...`); the
diffusers/PEFT layout keeps the dotted path under a component prefix (`unet.down_blocks.0....`). Going from
dotted to kohya is a plain replace; going back needs to know which underscores belong to a module name
(`down_blocks`, `to_q`) and which stand for dots, so each family lists its compound path segments as data.

A family plugs in by adding one `KeyLayout` to `LAYOUTS` (its prefixes, its segment vocabulary, and how to
find its modules in loaded `Components`); every tool works through this interface only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from torch import nn

from lorakit.families.base import Components

__all__ = ["LAYOUTS", "KeyLayout", "guess_family", "layout_for"]


@dataclass(frozen=True)
class KeyLayout:
    """The LoRA naming rules of one model family.

    `components` maps a kohya prefix (`lora_unet`) to the diffusers component prefix (`unet`); `segments` is
    every module-path segment that may appear (compound ones with underscores included), so a kohya name
    can be split back into a dotted path and an unknown name can be refused; `model_roots` returns, for a
    loaded model, the root module of each kohya prefix and the path prefix kohya names add to it.
    """

    family: str
    components: dict[str, str]
    segments: frozenset[str]
    model_roots: Callable[[Components], dict[str, tuple[nn.Module, str]]] | None = None
    modelspec: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    # other ModelSpec architectures a file of this version may name (FLUX.1-schnell shares "flux1" with dev):
    # kept from a source LoRA, or given by the base model an extraction reads
    modelspec_variants: frozenset[str] = frozenset()
    # file-side denoiser path <-> diffusers path, where they differ (SDXL: SGM names in kohya files)
    denoiser_to_diffusers: Callable[[str], str | None] | None = None
    denoiser_from_diffusers: Callable[[str], str | None] | None = None
    # families whose kohya modules are fused layers (SD3, FLUX) convert whole state dicts instead
    peft_writer: Callable[..., dict] | None = None
    peft_reader: Callable[..., dict] | None = None
    default_version: str = "sd_v1"

    # ------------------------------------------------------------------ names

    def split_kohya(self, module_name: str) -> tuple[str, str] | None:
        """(`lora_unet`, `down_blocks_0_...`) for a kohya module name of this family, else None."""
        # longest prefix first so that `lora_te1` is never read as `lora_te` + `1_...`
        for prefix in sorted(self.components, key=len, reverse=True):
            if module_name.startswith(prefix + "_"):
                return prefix, module_name[len(prefix) + 1 :]
        return None

    def kohya_to_path(self, module_name: str) -> str | None:
        """`lora_unet_down_blocks_0_attentions_0_proj_in` -> `unet.down_blocks.0.attentions.0.proj_in`.

        None when the name has no known prefix or a segment this family's models never contain.
        """
        split = self.split_kohya(module_name)
        if split is None:
            return None
        prefix, rest = split
        segments = self._split_segments(rest.split("_"))
        if segments is None:
            return None
        return f"{self.components[prefix]}.{'.'.join(segments)}"

    def kohya_to_diffusers_path(self, module_name: str) -> str | None:
        """The diffusers module path of a kohya name (SGM U-Net paths renamed for SDXL), else None."""
        path = self.kohya_to_path(module_name)
        if path is None or self.denoiser_to_diffusers is None or not module_name.startswith("lora_unet_"):
            return path
        component, _, rest = path.partition(".")
        renamed = self.denoiser_to_diffusers(rest)
        return None if renamed is None else f"{component}.{renamed}"

    def path_to_kohya(self, path: str) -> str | None:
        """`text_encoder.text_model.encoder.layers.0.mlp.fc1` -> `lora_te_text_model_encoder_layers_0_mlp_fc1`."""
        component, _, rest = path.partition(".")
        if self.denoiser_from_diffusers is not None and component == self.components.get("lora_unet") and rest:
            rest = self.denoiser_from_diffusers(rest) or ""
        for prefix, name in self.components.items():
            if name == component and rest:
                if self._split_segments(rest.replace(".", "_").split("_")) != rest.split("."):
                    return None  # a segment outside the vocabulary: the round trip would not be exact
                return f"{prefix}_{rest.replace('.', '_')}"
        return None

    def _split_segments(self, tokens: list[str]) -> list[str] | None:
        """Greedy longest match of underscore tokens against the segment vocabulary (digits always allowed)."""
        longest = max((s.count("_") + 1 for s in self.segments), default=1)
        segments: list[str] = []
        i = 0
        while i < len(tokens):
            for width in range(min(longest, len(tokens) - i), 0, -1):
                candidate = "_".join(tokens[i : i + width])
                if candidate in self.segments or (width == 1 and candidate.isdigit()):
                    segments.append(candidate)
                    i += width
                    break
            else:
                return None
        return segments

    # ------------------------------------------------------------------ models

    def module_index(self, components: Components) -> dict[str, nn.Module]:
        """Every Linear and Conv2d of the model by its kohya name: what a LoRA key can refer to."""
        index: dict[str, nn.Module] = {}
        if self.model_roots is None:
            return index
        for prefix, (root, path_prefix) in self.model_roots(components).items():
            for path, module in root.named_modules():
                if path and isinstance(module, (nn.Linear, nn.Conv2d)):
                    index[f"{prefix}_{(path_prefix + path).replace('.', '_')}"] = module
        return index

    def owns(self, module_names: Iterable[str]) -> bool:
        """True when every name has one of this family's kohya prefixes."""
        return all(self.split_kohya(name) is not None for name in module_names)


# ---------------------------------------------------------------------------------------------------------
# SD 1.x / 2.x: diffusers UNet names under lora_unet, CLIP (with the text_model level) under lora_te
# ---------------------------------------------------------------------------------------------------------

_SD_UNET_SEGMENTS = (
    "down_blocks", "up_blocks", "mid_block", "attentions", "resnets", "downsamplers", "upsamplers",
    "transformer_blocks", "attn1", "attn2", "to_q", "to_k", "to_v", "to_out", "ff", "net", "proj",
    "proj_in", "proj_out", "norm", "norm1", "norm2", "norm3", "conv", "conv1", "conv2", "conv_shortcut",
    "time_emb_proj", "conv_in", "conv_out", "conv_norm_out", "time_embedding", "linear_1", "linear_2",
)
_SD_TEXT_SEGMENTS = (
    "text_model", "encoder", "layers", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "mlp", "fc1",
    "fc2", "embeddings", "token_embedding", "position_embedding", "final_layer_norm", "layer_norm1",
    "layer_norm2",
)


def _sd_roots(components: Components) -> dict[str, tuple[nn.Module, str]]:
    encoder = components.text_encoders[0]
    # transformers 5 dropped the `text_model.` level from CLIPTextModel; kohya names keep it
    text_prefix = "" if hasattr(encoder, "text_model") else "text_model."
    return {"lora_unet": (components.denoiser, ""), "lora_te": (encoder, text_prefix)}


SD_LAYOUT = KeyLayout(
    family="sd",
    components={"lora_unet": "unet", "lora_te": "text_encoder"},
    segments=frozenset(_SD_UNET_SEGMENTS + _SD_TEXT_SEGMENTS),
    model_roots=_sd_roots,
    # version -> (modelspec architecture, implementation, resolution), as the family writes them
    modelspec={
        "sd_v1": ("stable-diffusion-v1", "diffusers", 512),
        "sd_v2": ("stable-diffusion-v2-512", "diffusers", 512),
        "sd_v2_v": ("stable-diffusion-v2-768-v", "diffusers", 768),
    },
)

# ---------------------------------------------------------------------------------------------------------
# SDXL: SGM U-Net paths under lora_unet (`input_blocks_4_1_...`), CLIP-L under lora_te1, CLIP-G under lora_te2
# ---------------------------------------------------------------------------------------------------------

_SGM_SEGMENTS = (
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers", "skip_connection",
    "op", "time_embed", "label_emb", "out",
)


@lru_cache(maxsize=1)
def _sgm_names():
    from lorakit.families.sdxl.loading import bundled_config
    from lorakit.families.sdxl.sgm_keys import SgmUnetNames

    # the block numbering of SDXL's U-Net; smaller test U-Nets with the same levels-per-block share it
    return SgmUnetNames(bundled_config("unet"))


def _sgm_from_diffusers(path: str) -> str | None:
    try:
        return _sgm_names().module(path)
    except ValueError:
        return None


def _sgm_to_diffusers(path: str) -> str | None:
    """`input_blocks.4.1.proj_in` -> `down_blocks.1.attentions.0.proj_in` (the inverse of `SgmUnetNames`)."""
    from lorakit.families.sd.ldm_keys import UNET_RESNET
    from lorakit.families.sdxl.sgm_keys import SGM_UNET_TOP_LEVEL

    key = path + "."
    for diffusers, sgm in SGM_UNET_TOP_LEVEL.items():
        if key.startswith(sgm):
            return (diffusers + key[len(sgm):])[:-1]
    for diffusers_prefix, sgm_prefix, kind in sorted(_sgm_names().blocks, key=lambda row: -len(row[1])):
        if key.startswith(sgm_prefix):
            rest = key[len(sgm_prefix):]
            if kind == "resnet":
                for old, new in UNET_RESNET.items():
                    if rest.startswith(new):
                        rest = old + rest[len(new):]
                        break
            return (diffusers_prefix + rest)[:-1]
    return None


SDXL_LAYOUT = KeyLayout(
    family="sdxl",
    components={"lora_unet": "unet", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"},
    segments=frozenset(_SD_UNET_SEGMENTS + _SGM_SEGMENTS + _SD_TEXT_SEGMENTS),
    modelspec={"sdxl_base_v1-0": ("stable-diffusion-xl-v1-base", "https://github.com/Stability-AI/generative-models", 1024)},
    denoiser_to_diffusers=_sgm_to_diffusers,
    denoiser_from_diffusers=_sgm_from_diffusers,
    default_version="sdxl_base_v1-0",
)

# ---------------------------------------------------------------------------------------------------------
# SD3 (SAI MMDiT paths) and FLUX (BFL paths) under lora_unet; CLIPs and T5 under lora_te1/2/3
# ---------------------------------------------------------------------------------------------------------

_T5_SEGMENTS = ("encoder", "block", "layer", "SelfAttention", "q", "k", "v", "o", "DenseReluDense", "wi", "wi_0", "wi_1", "wo")
_SD3_SEGMENTS = (
    "joint_blocks", "x_block", "context_block", "attn", "attn2", "qkv", "proj", "mlp", "fc1", "fc2",
    "adaLN_modulation", "context_embedder", "t_embedder", "x_embedder", "y_embedder", "final_layer", "linear",
)
_FLUX_SEGMENTS = (
    "double_blocks", "single_blocks", "img_attn", "txt_attn", "qkv", "proj", "img_mlp", "txt_mlp", "img_mod",
    "txt_mod", "lin", "linear1", "linear2", "modulation", "img_in", "txt_in", "time_in", "vector_in",
    "guidance_in", "in_layer", "out_layer", "final_layer", "linear",
)


def _sd3_peft_writer(state: dict, metadata: dict, *, keep_alpha: bool = False) -> tuple[dict, dict]:
    from lorakit.tools.convert import sd3_to_peft

    return sd3_to_peft(state, metadata, keep_alpha=keep_alpha)


def _sd3_peft_reader(state: dict, metadata: dict) -> tuple[dict, dict]:
    from lorakit.tools.convert import sd3_from_peft

    return sd3_from_peft(state, metadata)


def _flux_peft_writer(state: dict, metadata: dict, *, keep_alpha: bool = False) -> tuple[dict, dict]:
    from lorakit.tools.flux_lora import kohya_to_diffusers

    return kohya_to_diffusers(state, metadata, keep_alpha=keep_alpha)


def _flux_peft_reader(state: dict, metadata: dict) -> tuple[dict, dict]:
    from lorakit.tools.flux_lora import diffusers_to_kohya

    return diffusers_to_kohya(state, metadata)


_SD3_VERSIONS = ("medium", "5-medium", "5-large")
SD3_LAYOUT = KeyLayout(
    family="sd3",
    components={"lora_unet": "transformer", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2", "lora_te3": "text_encoder_3"},
    segments=frozenset(_SD3_SEGMENTS + _SD_TEXT_SEGMENTS + _T5_SEGMENTS),
    modelspec={v: (f"stable-diffusion-3-{v}", "diffusers", 1024) for v in _SD3_VERSIONS},
    peft_writer=_sd3_peft_writer,
    peft_reader=_sd3_peft_reader,
    default_version="medium",
)

FLUX_LAYOUT = KeyLayout(
    family="flux",
    components={"lora_unet": "transformer", "lora_te1": "text_encoder", "lora_te3": "text_encoder_2"},
    segments=frozenset(_FLUX_SEGMENTS + _SD_TEXT_SEGMENTS + _T5_SEGMENTS),
    modelspec={"flux1": ("flux-1-dev", "https://github.com/black-forest-labs/flux", 1024)},
    modelspec_variants=frozenset({"flux-1-schnell"}),
    peft_writer=_flux_peft_writer,
    peft_reader=_flux_peft_reader,
    default_version="flux1",
)

LAYOUTS: dict[str, KeyLayout] = {"sd": SD_LAYOUT, "sdxl": SDXL_LAYOUT, "sd3": SD3_LAYOUT, "flux": FLUX_LAYOUT}


def layout_for(family: str) -> KeyLayout:
    """The key layout of a family; families without one yet are named in the error."""
    from lorakit.errors import ConfigError

    if family not in LAYOUTS:
        raise ConfigError([f"the LoRA tools do not support the {family} family yet (available: {', '.join(LAYOUTS)})"])
    return LAYOUTS[family]


# ---------------------------------------------------------------------------------------------------------
# Guessing the family of a file from its module names and metadata
# ---------------------------------------------------------------------------------------------------------

# (family, fragments of module names only that family's files contain); checked in order (SD3 also has
# lora_te3_ and FLUX diffusers files also have transformer.transformer_blocks., so the order matters)
_FAMILY_HINTS = (
    ("sd3", ("lora_unet_joint_blocks_", "lora_unet_context_embedder", "lora_unet_x_embedder_")),
    ("flux", ("lora_unet_double_blocks_", "lora_unet_single_blocks_", "transformer.single_transformer_blocks.", "lora_te3_")),
    ("sd3", ("transformer.transformer_blocks.",)),
    ("sdxl", ("lora_te1_", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_output_blocks_", "text_encoder_2.")),
    ("sd", ("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_", "lora_te_", "unet.", "text_encoder.")),
)
_VERSION_FAMILIES = (("sdxl", "sdxl"), ("sd_v", "sd"), ("flux", "flux"), ("chroma", "flux"))


def guess_family(module_names: Iterable[str], metadata: dict[str, str] | None = None) -> str | None:
    """`sd`, `sdxl`, `sd3` or `flux` from the metadata (`ss_base_model_version`, `modelspec.architecture`)
    or else from the module names; None when nothing matches."""
    metadata = metadata or {}
    version = metadata.get("ss_base_model_version", "")
    for start, family in _VERSION_FAMILIES:
        if version.startswith(start):
            return family
    arch = metadata.get("modelspec.architecture", "")
    for fragment, family in (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-3", "sd3"), ("flux", "flux"), ("stable-diffusion-v", "sd")):
        if fragment in arch:
            return family
    names = list(module_names)
    for family, fragments in _FAMILY_HINTS:
        if any(name.startswith(fragment) or f".{fragment}" in name for name in names for fragment in fragments):
            return family
    return None
