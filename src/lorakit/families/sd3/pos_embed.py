"""`--enable_scaled_pos_embed`: per-resolution scaled positional embeddings for SD3.5 Medium.

SD3.5 Medium was trained at several resolutions with positional embeddings rescaled to each one, so that an
image covers the same range of positions whatever its size. As sd-scripts (`MMDiT.enable_scaled_pos_embed`,
`get_scaled_2d_sincos_pos_embed`):

- each dataset resolution (w, h) gives a latent size round(√(w·h)) / VAE stride and a patched size P = that / patch
  size; for each P a sin-cos table covers a G×G grid, G = ⌊1.5·P⌋, with positions

      pos(i) = (i − (G − P)/2) · 16 / P,   i = 0 … G−1

  so the centred P×P window spans [0, 16) in steps of 16/P at every resolution (16 is the base grid size);
- a batch's patched h×w picks the table by area: the smallest P whose limit it does not exceed, the limits being
  the mid-points (P_k² + P_{k+1}²)/2 between neighbouring sizes and (1.5·P_max)² for the largest (an area past
  that uses the largest P);
- the h×w window is cut from the table's centre (or at a random place under `--pos_emb_random_crop_rate`); a side
  longer than the table adds a table for P = max(h, w).

The sin-cos embedding of a position pair (x, y) is [sin(x·ω), cos(x·ω), sin(y·ω), cos(y·ω)] with
ω_k = 10000^(−k/(D/4)), k = 0 … D/4−1, x the column and y the row, as diffusers' and SAI's tables.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch

log = logging.getLogger("lorakit")

POS_EMBED_MAX_RATIO = 1.5  # each table covers 1.5x its resolution's patched size
BASE_SIZE = 16  # the centred window spans positions [0, BASE_SIZE) at every resolution


def scaled_positions(grid_size: int, sample_size: int, base_size: int = BASE_SIZE) -> torch.Tensor:
    """The 1-D positions of a `grid_size` grid scaled for `sample_size` patches: (i − (G − P)/2)·base/P."""
    index = torch.arange(grid_size, dtype=torch.float32) / grid_size
    scale = base_size * grid_size / sample_size
    shift = scale * (grid_size - sample_size) / (2 * grid_size)
    return index * scale - shift


def _sincos(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M, D): [sin(p·ω), cos(p·ω)] with ω_k = 10000^(−k/(D/2)), computed in float64."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def scaled_sincos_table(embed_dim: int, grid_size: int, sample_size: int, base_size: int = BASE_SIZE) -> torch.Tensor:
    """(1, G·G, D) float32: the G×G table, rows first, each entry [column embedding ; row embedding]."""
    if embed_dim % 4:
        raise ValueError(f"scaled positional embeddings need a width divisible by 4, got {embed_dim}")
    positions = scaled_positions(grid_size, sample_size, base_size)
    rows, cols = torch.meshgrid(positions, positions, indexing="ij")
    table = torch.cat([_sincos(embed_dim // 2, cols), _sincos(embed_dim // 2, rows)], dim=1)
    return table.float().unsqueeze(0)


def latent_sizes(resolutions: Iterable[tuple[int, int]], vae_stride: int) -> list[int]:
    """Distinct latent sizes round(√(w·h)) // stride of the dataset resolutions, ascending."""
    return sorted({round(math.sqrt(w * h)) // vae_stride for w, h in resolutions})


class ScaledPositionEmbeddings:
    """The scaled tables for a set of latent sizes, and the window a latent of a given size uses."""

    def __init__(self, embed_dim: int, patch_size: int, sizes: Iterable[int]):
        self.embed_dim, self.patch_size = embed_dim, patch_size
        patched = sorted({size // patch_size for size in sizes})
        if not patched or patched[0] < 1:
            raise ValueError(f"no usable latent sizes for scaled positional embeddings: {sorted(sizes)}")
        limits = [(a * a + b * b) // 2 for a, b in zip(patched, patched[1:])]
        limits.append(int((patched[-1] * POS_EMBED_MAX_RATIO) ** 2))
        self.area_limits: list[tuple[int, int]] = list(zip(limits, patched))
        self.tables: dict[int, torch.Tensor] = {p: self._table(p) for p in patched}

    def _table(self, patched_size: int) -> torch.Tensor:
        return scaled_sincos_table(self.embed_dim, int(patched_size * POS_EMBED_MAX_RATIO), patched_size)

    @property
    def patched_sizes(self) -> list[int]:
        return [size for _, size in self.area_limits]

    def size_for(self, h: int, w: int) -> int:
        """The patched size P whose table an h×w (patched) latent uses."""
        area = h * w
        for limit, size in self.area_limits:
            if area <= limit:
                return size
        return self.area_limits[-1][1]

    def window(self, height: int, width: int, *, random_crop: bool = False, device: torch.device | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """(1, h·w, D) for a latent of `height`×`width` (latent pixels, as diffusers' `cropped_pos_embed` gets)."""
        h, w = height // self.patch_size, width // self.patch_size
        size = self.size_for(h, w)
        table = self.tables[size]
        grid = round(math.sqrt(table.shape[1]))
        if h > grid or w > grid:
            size = max(h, w)
            if size not in self.tables:
                log.warning("scaled positional embeddings: adding a table for %dx%d patches (the %dx%d table is too "
                            "small for this tall or wide image)", size, size, grid, grid)
                self.tables[size] = self._table(size)
                limit = int(size * POS_EMBED_MAX_RATIO) ** 2
                self.area_limits = sorted({*self.area_limits, (limit, size)})
            table = self.tables[size]
            grid = round(math.sqrt(table.shape[1]))
        if random_crop:
            top = int(torch.randint(0, grid - h + 1, ()))
            left = int(torch.randint(0, grid - w + 1, ()))
        else:
            top, left = (grid - h) // 2, (grid - w) // 2
        if device is not None and table.device != torch.device(device) or dtype is not None and table.dtype != dtype:
            table = self.tables[size] = table.to(device=device, dtype=dtype)  # kept there for the next step
        window = table.reshape(1, grid, grid, -1)[:, top:top + h, left:left + w, :]
        return window.reshape(1, h * w, -1)


# ---------------------------------------------------------------------------------------------------------
# Attaching the tables to diffusers' SD3 patch embedding
# ---------------------------------------------------------------------------------------------------------


def install(transformer: torch.nn.Module, scaled: ScaledPositionEmbeddings) -> None:
    """Make the MMDiT's PatchEmbed take its positional window from `scaled` (training and sampling alike).

    diffusers' PatchEmbed adds `self.cropped_pos_embed(height, width)` to the patch tokens; an instance attribute
    of that name replaces the centre crop of the fixed table. The tables are not parameters and not saved.
    """
    embed = transformer.pos_embed

    def cropped(height: int, width: int) -> torch.Tensor:
        return scaled.window(height, width, device=embed.proj.weight.device)

    embed.scaled_pos_embeds = scaled
    embed.cropped_pos_embed = cropped


def dataset_resolutions(cfg: object) -> list[tuple[int, int]]:
    """(width, height) of every dataset the run trains on (`--dataset_config`, or `--resolution` otherwise)."""
    from lorakit.data.dataset_config import plan_datasets

    return [spec.resolution for spec in plan_datasets(cfg).datasets]


def vae_stride(vae: torch.nn.Module) -> int:
    """Pixels per latent pixel: 2^(number of VAE blocks − 1) (8 for SD3's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def enable_scaled_pos_embed(transformer: torch.nn.Module, vae: torch.nn.Module,
                            resolutions: Iterable[tuple[int, int]], model_type: str) -> ScaledPositionEmbeddings:
    """Build the tables for the datasets' resolutions and attach them to the transformer."""
    resolutions = list(resolutions)
    sizes = latent_sizes(resolutions, vae_stride(vae))
    embed = transformer.pos_embed
    scaled = ScaledPositionEmbeddings(embed.proj.out_channels, embed.patch_size, sizes)
    if model_type != "5-medium":
        log.warning("--enable_scaled_pos_embed: SD3.5 Medium was trained with scaled positional embeddings; this "
                    "%s model was not, so they may help little", model_type)
    log.info("--enable_scaled_pos_embed: resolutions %s, latent sizes %s, tables of %s patches",
             resolutions, sizes, scaled.patched_sizes)
    install(transformer, scaled)
    return scaled
