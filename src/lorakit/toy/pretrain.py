"""Pretrain the toy base model (a tiny SD-1.5-architecture pipeline) from scratch on the BASE toy world.

    python -m lorakit.toy.pretrain --out DIR --minutes 30

Two phases, both on images from `toy.world` (never the held-out concept's word or colour):
1. The VAE (AutoencoderKL, 8x downsampling, 4 latent channels as in SD 1.5) is trained as a plain autoencoder
   (MSE + a small KL term, Kingma & Welling 2014). A random VAE cannot be used: its decoder maps latents to
   texture, not pictures, so neither a base sample nor a LoRA sample would ever look like anything.
   Its latents' scale is then measured and stored as `scaling_factor`, as for SD 1.5's 0.18215.
2. The UNet (UNet2DConditionModel with cross-attention) is trained in full with the DDPM epsilon objective of
   `lorakit.objectives.ddpm` (Ho et al. 2020) on cached latents, conditioned on a small CLIPTextModel that is
   randomly initialised and kept frozen: every token embedding is equally arbitrary, so the held-out word
   "magenta" starts exactly as "red" did, and text embeddings of the fixed captions can be cached. 10 % of
   captions are dropped to "" so that classifier-free guidance works (Ho & Salimans 2022).

The result is saved as a diffusers StableDiffusionPipeline folder with safetensors weights.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lorakit.objectives.ddpm import DDPMSchedule, add_noise, sample_timesteps, training_target
from lorakit.toy.world import DEFAULT_SPEC, base_prompts, render, sample_items

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "clip_tokenizer"
CLIP_VOCAB_SIZE = 49408  # the real CLIP BPE vocabulary, so the real tokenizer's ids are valid
TEXT_WIDTH = 32


@dataclass
class PretrainConfig:
    """Knobs of a pretraining run; the defaults are the recommended shipping run."""

    out: Path
    minutes: float = 30.0
    vae_fraction: float = 0.2  # share of the time budget spent on the VAE
    vae_steps: int | None = None  # fixed step counts override the time budget (tests, reproducible runs)
    unet_steps: int | None = None
    pool_size: int = 6000  # distinct base-world images rendered once and reused
    resolution: int = 64
    vae_batch: int = 16
    unet_batch: int = 32
    vae_lr: float = 1e-3
    unet_lr: float = 6e-4
    caption_dropout: float = 0.1
    seed: int = 0
    threads: int | None = None
    log_every: int = 100
    preview: bool = False  # write preview.png of base prompts next to the weights
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


def build_vae() -> AutoencoderKL:
    """8x downsampling (64 px -> 8x8x4 latents), ~0.3 M parameters."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def build_unet() -> UNet2DConditionModel:
    """Two resolution levels (8x8, 4x4) with cross-attention everywhere, so a LoRA on attention reaches every
    block; ~1.5 M parameters. (64, 128) channels with one layer per block was 4.1 M parameters and 40 % slower.
    """
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        attention_head_dim=8,
        norm_num_groups=8,
        cross_attention_dim=TEXT_WIDTH,
    )


def build_text_encoder(seed: int) -> CLIPTextModel:
    """A 2-layer CLIP text transformer over the full CLIP vocabulary (random, frozen)."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_WIDTH,
    )
    return CLIPTextModel(config).eval().requires_grad_(False)


def load_tokenizer() -> CLIPTokenizer:
    """The bundled CLIP BPE tokenizer; its files carry no length limit, so set SD's 77 (the pipeline pads to it)."""
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True, model_max_length=77)


def render_pool(cfg: PretrainConfig) -> tuple[torch.Tensor, list[str]]:
    """`pool_size` base-world images as a (N, 3, H, W) tensor in [-1, 1], with their captions."""
    items = sample_items(cfg.pool_size, concept=False, seed=cfg.seed, spec=DEFAULT_SPEC)
    arrays = np.stack([np.asarray(render(scene, cfg.resolution)) for scene, _ in items])
    return _to_pixels(arrays), [text for _, text in items]


def render_hue_pool(cfg: PretrainConfig) -> torch.Tensor:
    """Base-world images with their hue rotated at random: the VAE's training set.

    The VAE is a general image codec, as SD's is (trained on every colour there is): it must be able to draw a
    magenta shape, or no LoRA could ever produce one. What stays held out is the diffusion model's knowledge:
    the UNet and the text encoder never see a magenta latent or the word.
    """
    rng = np.random.default_rng(cfg.seed + 7)
    items = sample_items(cfg.pool_size, concept=False, seed=cfg.seed + 7, spec=DEFAULT_SPEC)
    arrays = []
    for scene, _ in items:
        hsv = np.asarray(render(scene, cfg.resolution).convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(rng.integers(0, 256))) % 256
        arrays.append(np.asarray(Image.fromarray(hsv, "HSV").convert("RGB")))
    return _to_pixels(np.stack(arrays))


def _to_pixels(arrays: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _budget(steps: int | None, seconds: float) -> tuple[int, float]:
    """(max steps, deadline): a fixed step count, or unlimited steps until the time runs out."""
    if steps is not None:
        return steps, math.inf
    return 10**9, time.monotonic() + seconds


def _report(losses: list, step: int, every: int, label: str) -> None:
    """Every `every` steps: read the latest losses off the device (one sync) and print their mean."""
    if step % every == 0:
        losses[-every:] = [float(v) for v in losses[-every:]]
        print(f"{label} step {step}: loss {np.mean(losses[-every:]):.4f}", flush=True)


def train_vae(vae: AutoencoderKL, pixels: torch.Tensor, cfg: PretrainConfig) -> list[float]:
    """Autoencoder training: reconstruction MSE + 1e-6 KL, as in the SD VAE recipe minus the GAN and LPIPS."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    max_steps, deadline = _budget(cfg.vae_steps, cfg.minutes * 60 * cfg.vae_fraction)
    generator = torch.Generator(device=pixels.device).manual_seed(cfg.seed)
    losses: list[float] = []
    vae.train()
    step = 0
    while step < max_steps and time.monotonic() < deadline:
        batch = pixels[torch.randint(0, len(pixels), (cfg.vae_batch,), generator=generator, device=pixels.device)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        step += 1
        _report(losses, step, cfg.log_every, "vae")
    return losses


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of every pool image, and set the VAE's `scaling_factor`."""
    vae.eval()
    means, stds = [], []
    for chunk in pixels.split(256):
        posterior = vae.encode(chunk).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    mean, std = torch.cat(means), torch.cat(stds)
    scale = 1.0 / float(mean.std())  # unit-variance diffusion inputs, as SD 1.5's 0.18215 gives
    vae.register_to_config(scaling_factor=round(scale, 5))
    return mean * scale, std * scale


@torch.no_grad()
def encode_captions(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of each distinct caption (the frozen encoder makes this exact) and each caption's index."""
    distinct = sorted(set(captions) | {""})
    ids = tokenizer(distinct, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    device = next(text_encoder.parameters()).device
    states = torch.cat([text_encoder(chunk.to(device))[0] for chunk in ids.split(256)])
    lookup = {text: i for i, text in enumerate(distinct)}
    return states, torch.tensor([lookup[c] for c in captions])


def train_unet(unet: UNet2DConditionModel, latents: tuple[torch.Tensor, torch.Tensor], texts: tuple[torch.Tensor, torch.Tensor], empty_index: int, cfg: PretrainConfig) -> list[float]:
    """Full-parameter DDPM epsilon training on cached latents and text states, with a short warm-up."""
    schedule = DDPMSchedule.scaled_linear()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=1e-2)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 200))
    max_steps, deadline = _budget(cfg.unet_steps, cfg.minutes * 60 * (1 - cfg.vae_fraction))
    (means, stds), (states, caption_index) = latents, texts
    device = means.device
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    caption_index = caption_index.to(device)
    losses: list[float] = []
    unet.train()
    step = 0
    while step < max_steps and time.monotonic() < deadline:
        pick = torch.randint(0, len(means), (cfg.unet_batch,), generator=generator, device=device)
        x0 = means[pick] + stds[pick] * torch.randn(means[pick].shape, generator=generator, device=device)
        drop = torch.rand(cfg.unet_batch, generator=generator, device=device) < cfg.caption_dropout
        text = states[torch.where(drop, torch.full_like(pick, empty_index), caption_index[pick])]
        noise = torch.randn(x0.shape, generator=generator, device=device)
        t = sample_timesteps(cfg.unet_batch, schedule, None, None, x0.device)
        prediction = unet(add_noise(schedule, x0, noise, t), t, encoder_hidden_states=text).sample
        loss = F.mse_loss(prediction, training_target(schedule, x0, noise, t))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        losses.append(loss.detach())
        step += 1
        _report(losses, step, cfg.log_every, "unet")
    return losses


def make_scheduler() -> DDIMScheduler:
    """The SD 1.5 noise schedule (same betas as DDPMSchedule.scaled_linear) with DDIM sampling."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def assemble_pipeline(vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=make_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def untrained_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The toy base model's architecture with random weights (the demo's stand-in when the trained weights are
    not installed)."""
    torch.manual_seed(seed)
    return assemble_pipeline(build_vae(), build_unet(), build_text_encoder(seed), load_tokenizer())


def save_preview(pipeline: StableDiffusionPipeline, path: Path, prompts: list[str], seed: int = 0) -> None:
    """A row of samples, one per prompt, enlarged 4x for viewing."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    images = pipeline(prompts, num_inference_steps=25, guidance_scale=4.0, generator=generator, height=64, width=64).images
    sheet = Image.new("RGB", (64 * len(images), 64))
    for i, image in enumerate(images):
        sheet.paste(image, (64 * i, 0))
    sheet.resize((sheet.width * 4, sheet.height * 4), Image.Resampling.NEAREST).save(path)


def pretrain(cfg: PretrainConfig) -> StableDiffusionPipeline:
    """Run both phases and save the pipeline folder to `cfg.out`; returns the pipeline."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    started = time.monotonic()
    device = torch.device(cfg.device)
    pixels, captions = render_pool(cfg)
    vae, unet, text_encoder, tokenizer = build_vae(), build_unet(), build_text_encoder(cfg.seed), load_tokenizer()
    vae, unet, text_encoder = vae.to(device), unet.to(device), text_encoder.to(device)
    vae_losses = [float(v) for v in train_vae(vae, render_hue_pool(cfg).to(device), cfg)]
    latents = encode_pool(vae.requires_grad_(False), pixels.to(device))
    states, caption_index = encode_captions(text_encoder, tokenizer, captions)
    empty_index = 0  # "" sorts first among the distinct captions
    unet_losses = [float(v) for v in train_unet(unet, latents, (states, caption_index), empty_index, cfg)]
    pipeline = assemble_pipeline(vae.cpu(), unet.cpu(), text_encoder.cpu(), tokenizer)
    cfg.out.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(cfg.out, safe_serialization=True)
    if cfg.preview:
        save_preview(pipeline, cfg.out / "preview.png", base_prompts())
    elapsed = time.monotonic() - started
    print(
        f"saved {cfg.out}: {len(vae_losses)} VAE steps (last loss {np.mean(vae_losses[-50:] or [math.nan]):.4f}), "
        f"{len(unet_losses)} UNet steps (last loss {np.mean(unet_losses[-50:] or [math.nan]):.4f}), {elapsed:.0f} s",
        flush=True,
    )
    return pipeline


def parse_args(argv: list[str] | None = None) -> PretrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (diffusers pipeline layout)")
    parser.add_argument("--minutes", type=float, default=30.0, help="wall-clock budget for both phases")
    parser.add_argument("--vae_fraction", type=float, default=0.2, help="share of --minutes spent on the VAE")
    parser.add_argument("--vae_steps", type=int, default=None, help="fixed VAE steps instead of the time budget")
    parser.add_argument("--unet_steps", type=int, default=None, help="fixed UNet steps instead of the time budget")
    parser.add_argument("--pool_size", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--preview", action="store_true", help="also write preview.png of base prompts")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--vae_batch", type=int, default=16)
    parser.add_argument("--unet_batch", type=int, default=32)
    args = parser.parse_args(argv)
    cfg = PretrainConfig(
        out=args.out, minutes=args.minutes, vae_fraction=args.vae_fraction, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
        pool_size=args.pool_size, seed=args.seed, threads=args.threads, preview=args.preview,
        vae_batch=args.vae_batch, unet_batch=args.unet_batch,
    )
    if args.device:
        cfg.device = args.device
    return cfg


def main(argv: list[str] | None = None) -> None:
    pretrain(parse_args(argv))


if __name__ == "__main__":
    main()
