"""Telling a Z-Image model from other checkpoints cheaply, for `--family auto` (a `.safetensors` header only).

A Z-Image transformer has `noise_refiner`, `context_refiner` and `layers` blocks, caption and image pad tokens,
and a timestep embedding min(width, 256) wide (Lumina 2, whose NextDiT ComfyUI shares, has min(width, 1024)), in ComfyUI's
layout (`x_embedder`, `attention.qkv`) or diffusers' (`all_x_embedder.2-1`, `attention.to_q`), bare or under
`model.diffusion_model.`.
"""

from __future__ import annotations

from pathlib import Path

from lorakit.families.common.headers import class_name

ADALN_WIDTH = 256  # Z-Image's timestep embedding is min(dim, 256) wide (Lumina 2's: min(dim, 1024))
MARKERS = ("noise_refiner.0.", "context_refiner.0.", "layers.0.", "cap_embedder.1.weight", "x_pad_token", "cap_pad_token")
TIMESTEP_OUT = "t_embedder.mlp.2.weight"
PIPELINE = "ZImagePipeline"
TRANSFORMER_CLASS = "ZImageTransformer2DModel"


def is_z_image_source(path: str | Path) -> bool:
    source = Path(path)
    if source.is_dir():
        if class_name(source / "model_index.json") == PIPELINE:
            return True
        return any(class_name(f) == TRANSFORMER_CLASS for f in (source / "transformer" / "config.json", source / "config.json"))
    shapes = _header_shapes(source)
    return shapes is not None and shapes_are_z_image(shapes)


def shapes_are_z_image(shapes: dict[str, list[int]]) -> bool:
    from lorakit.families.z_image.comfy_keys import strip_prefix

    names = {strip_prefix(k): v for k, v in shapes.items()}
    if not all(any(n.startswith(m) for n in names) for m in MARKERS):
        return False
    width = names.get("cap_embedder.1.weight", [0])[0]
    return names.get(TIMESTEP_OUT, [0])[0] == min(width, ADALN_WIDTH)


def _header_shapes(source: Path) -> dict[str, list[int]] | None:
    if not source.is_file() or source.suffix.lower() != ".safetensors":
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(source), framework="pt", device="cpu") as handle:
            return {k: list(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError):
        return None
