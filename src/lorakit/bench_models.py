"""The models `lorakit bench` measures: tiny test models and real-size shapes with random weights, written once
as the single files users train from (SD: LDM layout, SDXL: SGM layout, FLUX: BFL `flux1` + `clip_l` + `t5xxl` +
`ae`), so model loading is measured from a real file.

Real sizes keep every shape the step touches: the full U-Net / transformer, the autoencoder and the text
encoders. One exception, said in the output: FLUX's T5-XXL keeps its width (4096, what the transformer reads) but
only 2 of its 24 layers, because the benchmark caches text-encoder outputs, so T5 runs once, before the first step;
`--flux_blocks` can shorten the transformer the same way for a smaller GPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

FAMILIES = ("sd", "sdxl", "flux")
SIZES = ("tiny", "real")
FLUX_REAL_BLOCKS = (19, 38)
FLUX_BENCH_T5_LAYERS = 2


@dataclass
class BenchModel:
    """Where the model's files are and the `lorakit train` options that name them."""

    family: str
    size: str
    model_args: list[str]
    notes: list[str] = field(default_factory=list)

    def train_args(self) -> list[str]:
        from lorakit.families.registry import FAMILIES

        # the sd-scripts network module the family trains with
        return [*self.model_args, f"--network_module={FAMILIES[self.family]().default_network_module}"]


def bench_model(family: str, size: str, cache: Path, flux_blocks: tuple[int, int] = FLUX_REAL_BLOCKS) -> BenchModel:
    """The model's files under `cache`, written on first use and reused afterwards."""
    if family not in FAMILIES or size not in SIZES:
        raise ValueError(f"unknown bench model {family}/{size}")
    tag = f"{family}_{size}" + (f"_{flux_blocks[0]}x{flux_blocks[1]}" if family == "flux" and size == "real" else "")
    folder = cache / tag
    writer = {"sd": _write_sd, "sdxl": _write_sdxl, "flux": _write_flux}[family]
    files = writer(size, folder, flux_blocks)
    notes = []
    if family == "flux" and size == "real":
        notes.append(f"FLUX transformer {flux_blocks[0]} double + {flux_blocks[1]} single blocks at width 3072; "
                     f"T5 at width 4096 with {FLUX_BENCH_T5_LAYERS} layers (outputs cached before the first step)")
    return BenchModel(family, size, files, notes)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build real-size models directly in `dtype`: half the memory and time of building in fp32 first."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _clean(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "transformers_version", "model_type")}


# ---------------------------------------------------------------------------------------------------------
# SD 1.5
# ---------------------------------------------------------------------------------------------------------


def _single_file(folder: Path, write: Callable[[Path], None]) -> list[str]:
    """Write the model as one checkpoint file unless it is there already; the option that names it."""
    path = folder / "model.safetensors"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        write(path)
    return [f"--pretrained_model_name_or_path={path}"]


def _write_sd(size: str, folder: Path, _blocks: tuple[int, int]) -> list[str]:
    from lorakit.families.sd.ldm_keys import save_sd_single_file

    return _single_file(folder, lambda path: save_sd_single_file(build_sd(size), path))


def build_sd(size: str):
    from lorakit.toy.tiny_models import build_tiny_sd

    if size == "tiny":
        return build_tiny_sd("sd1", seed=0)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorakit.families.base import Components
    from lorakit.families.common.tokenizers import bundled_clip_tokenizer
    from lorakit.families.sd.loading import bundled_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**_clean(bundled_config("sd15", "unet")))
    vae = AutoencoderKL(**_clean(bundled_config("sd15", "vae")))
    text = CLIPTextModel(CLIPTextConfig(**_clean(bundled_config("sd15", "text_encoder"))))
    return Components(unet.eval(), vae.eval(), [text.eval()], [bundled_clip_tokenizer()], {"prediction_type": "epsilon"})


# ---------------------------------------------------------------------------------------------------------
# SDXL
# ---------------------------------------------------------------------------------------------------------


def _write_sdxl(size: str, folder: Path, _blocks: tuple[int, int]) -> list[str]:
    from lorakit.families.sdxl.sgm_keys import save_sdxl_single_file

    return _single_file(folder, lambda path: save_sdxl_single_file(build_sdxl(size), path))


def build_sdxl(size: str):
    from lorakit.families.sdxl.tiny import build_tiny_sdxl

    if size == "tiny":
        return build_tiny_sdxl(seed=0)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lorakit.families.sdxl.loading import bundled_config

    tiny = build_tiny_sdxl(seed=0)  # for its tokenizers and scheduler extras
    torch.manual_seed(0)
    with _default_dtype(torch.bfloat16):
        unet = UNet2DConditionModel(**_clean(bundled_config("unet")))
        vae = AutoencoderKL(**_clean(bundled_config("vae")))
        te1 = CLIPTextModel(CLIPTextConfig(**_clean(bundled_config("text_encoder"))))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**_clean(bundled_config("text_encoder_2"))))
    tiny.denoiser, tiny.vae, tiny.text_encoders = unet.eval(), vae.eval(), [te1.eval(), te2.eval()]
    return tiny


# ---------------------------------------------------------------------------------------------------------
# FLUX.1
# ---------------------------------------------------------------------------------------------------------


def _write_flux(size: str, folder: Path, blocks: tuple[int, int]) -> list[str]:
    files = {name: folder / f"{name}.safetensors" for name in ("flux1", "clip_l", "t5xxl", "ae")}
    if not all(path.exists() for path in files.values()):
        from lorakit.families.flux.tiny import save_bfl_files

        save_bfl_files(build_flux(size, blocks), folder)
    return [f"--pretrained_model_name_or_path={files['flux1']}", f"--clip_l={files['clip_l']}",
            f"--t5xxl={files['t5xxl']}", f"--ae={files['ae']}"]


def build_flux(size: str, blocks: tuple[int, int] = FLUX_REAL_BLOCKS):
    from lorakit.families.flux.tiny import build_tiny_flux

    if size == "tiny":
        return build_tiny_flux(seed=0)
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from lorakit.families.flux.loading import bundled_config

    comps = build_tiny_flux(seed=0)  # for its tokenizers; the tiny T5 tokenizer's 1,000 pieces fit the T5 below
    torch.manual_seed(0)
    with _default_dtype(torch.bfloat16):
        transformer = FluxTransformer2DModel.from_config(
            {**bundled_config("transformer_dev"), "num_layers": blocks[0], "num_single_layers": blocks[1]}
        )
        vae = AutoencoderKL.from_config(bundled_config("ae"))
        clip = CLIPTextModel(CLIPTextConfig(**_clean(bundled_config("clip_l"))))
        t5_config = {**_clean(bundled_config("t5xxl")), "num_layers": FLUX_BENCH_T5_LAYERS, "vocab_size": 1000}
        t5 = T5EncoderModel(T5Config(**t5_config))
    comps.denoiser, comps.vae, comps.text_encoders = transformer.eval(), vae.eval(), [clip.eval(), t5.eval()]
    return comps
