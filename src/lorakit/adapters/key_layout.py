"""How a model family names LoRA modules, in the kohya layout and in the diffusers/PEFT layout.

A kohya module name is `<prefix>_<module path with "." replaced by "_">` (`lora_unet_down_blocks_0_...`); the
diffusers/PEFT layout keeps the dotted path under a component prefix (`unet.down_blocks.0....`). Going from
dotted to kohya is a plain replace; going back needs to know which underscores belong to a module name
(`down_blocks`, `to_q`) and which stand for dots, so each family lists its compound path segments as data
(`families/<name>/lora_keys.py`) and hands a `KeyLayout` to everything that reads or writes LoRA names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from lorakit.families.base import Components

__all__ = ["KeyLayout"]


@dataclass(frozen=True)
class KeyLayout:
    """The LoRA naming rules of one model family.

    `components` maps a kohya prefix (`lora_unet`) to the diffusers component prefix (`unet`); `segments` is
    every module-path segment that may appear (compound ones with underscores included), so a kohya name
    can be split back into a dotted path and an unknown name can be refused; `model_roots` returns, for a
    loaded model, the root module of each kohya prefix and the path prefix kohya names add to it.
    """

    family: str  # the family's title, for messages
    components: dict[str, str]
    segments: frozenset[str]
    model_roots: Callable[[Components], dict[str, tuple[nn.Module, str]]] | None = None
    # file-side denoiser path <-> diffusers path, where they differ (e.g. SGM U-Net names in kohya files)
    denoiser_to_diffusers: Callable[[str], str | None] | None = None
    denoiser_from_diffusers: Callable[[str], str | None] | None = None

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
