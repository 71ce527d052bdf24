"""Builders shared by several test files: tiny checkpoints on disk and small DreamBooth folders."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from lorakit.families.sd.ldm_keys import save_sd_single_file
from lorakit.toy.tiny_models import build_tiny_sd, save_sd_diffusers_folder


def write_tiny_checkpoints(root: Path, version: str) -> dict[str, Path]:
    """The same tiny model as a diffusers folder, a single .safetensors and a single .ckpt (LDM layout)."""
    comps = build_tiny_sd(version, seed=0)
    paths = {"folder": root / f"{version}_diffusers", "safetensors": root / f"{version}.safetensors", "ckpt": root / f"{version}.ckpt"}
    save_sd_diffusers_folder(comps, paths["folder"])
    save_sd_single_file(comps, paths["safetensors"], fmt="safetensors")
    save_sd_single_file(comps, paths["ckpt"], fmt="ckpt")
    return paths


def write_dreambooth_folder(root: Path, *, count: int = 4, size: int = 64, repeats: int = 2, name: str = "sks toy") -> Path:
    """`root/<repeats>_<name>/` with simple two-colour images and a caption file for each."""
    folder = root / f"{repeats}_{name}"
    folder.mkdir(parents=True)
    colours = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 200, 20)]
    for index in range(count):
        image = Image.new("RGB", (size, size), colours[index % len(colours)])
        image.paste((255, 255, 255), (size // 4, size // 4, size // 2 + index * 2, size // 2 + index * 2))
        image.save(folder / f"img_{index:03d}.png")
        (folder / f"img_{index:03d}.caption").write_text(f"sks toy, a square number {index}", encoding="utf-8")
    return root
