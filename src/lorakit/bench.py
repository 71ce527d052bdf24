"""`lorakit bench`: the trainer's step time against the physical limit, the bare model step.

The bare step is the same U-Net with the same LoRA modules: forward on latents of the same shape with a fixed
text context, MSE loss, backward, AdamW step — nothing else. The trainer's step is measured inside a real
`lorakit train` run (data loading, text encoding, noising, logging included) on cached latents. Their ratio is
what the trainer adds; 1.0 is the limit.

Sizes: `tiny` (the test model), `sd15` (real SD 1.5 shapes, random weights, written once as an LDM single file so
model loading is measured from a real file).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

SIZES = ("tiny", "sd15")


@dataclass
class BenchResult:
    size: str
    device: str
    resolution: int
    batch: int
    rank: int
    precision: str
    gradient_checkpointing: bool
    bare_step_s: float
    trainer_step_s: float
    ratio: float
    time_to_first_step_s: float
    peak_memory_gib: float


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def checkpoint_for(size: str, cache: Path) -> Path:
    """A single-file LDM checkpoint of the requested size, written once and reused."""
    from lorakit.families.sd.ldm_keys import save_sd_single_file

    path = cache / f"bench_{size}.safetensors"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    save_sd_single_file(build_components(size), path)
    return path


def build_components(size: str):
    from lorakit.toy.tiny_models import build_tiny_sd

    if size == "tiny":
        return build_tiny_sd("sd1", seed=0)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorakit.families.base import Components
    from lorakit.families.common.tokenizers import bundled_clip_tokenizer
    from lorakit.families.sd.loading import bundled_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**_config("unet", bundled_config("sd15", "unet")))
    vae = AutoencoderKL(**_config("vae", bundled_config("sd15", "vae")))
    text = CLIPTextModel(CLIPTextConfig(**_config("text", bundled_config("sd15", "text_encoder"))))
    return Components(unet.eval(), vae.eval(), [text.eval()], [bundled_clip_tokenizer()], {"prediction_type": "epsilon"})


def _config(kind: str, config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "transformers_version", "model_type")}


def bare_step_seconds(size: str, resolution: int, batch: int, rank: int, precision: str, checkpointing: bool, device: torch.device, steps: int) -> float:
    """Median seconds of forward + backward + AdamW on the U-Net with LoRA attached, nothing else."""
    from types import SimpleNamespace

    from lorakit.adapters.network import LoRANetwork
    from lorakit.families.sd.family import StableDiffusionFamily

    comps = build_components(size)
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    unet = comps.denoiser.to(device=device, dtype=dtype).requires_grad_(False)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    options = SimpleNamespace(network_dim=rank, network_alpha=float(rank), network_args=None, network_kwargs=dict,
                              network_train_unet_only=True, network_train_text_encoder_only=False)
    network = LoRANetwork(StableDiffusionFamily().adapter_targets(comps, options))
    network.apply_to()
    network.to(device)
    unet.train()
    optimizer = torch.optim.AdamW(network.trainable_parameters(), lr=1e-4)
    latent = resolution // 8
    x = torch.randn(batch, 4, latent, latent, device=device, dtype=dtype)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), device=device)
    times = []
    for _ in range(steps + 2):
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = unet(x, t, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(out.float(), x.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:])


def trainer_run(checkpoint: Path, work: Path, resolution: int, batch: int, rank: int, precision: str, checkpointing: bool, steps: int) -> tuple[list[float], float]:
    """(seconds per step, seconds from the call to the end of the first step) of a real `lorakit train` run."""
    from lorakit.config import parse_train_args
    from lorakit.training.loop import train

    data = work / "data" / "1_bench"
    data.mkdir(parents=True, exist_ok=True)
    for i in range(max(batch * 4, 8)):
        Image.new("RGB", (resolution, resolution), (40 * (i % 6), 90, 160)).save(data / f"{i}.png")
        (data / f"{i}.caption").write_text("a benchmark image of a square")
    argv = [
        f"--pretrained_model_name_or_path={checkpoint}", f"--train_data_dir={work / 'data'}", f"--resolution={resolution}",
        f"--output_dir={work / 'out'}", "--network_module=networks.lora", f"--network_dim={rank}", f"--network_alpha={rank}",
        "--network_train_unet_only", f"--train_batch_size={batch}", f"--max_train_steps={steps}", "--cache_latents",
        f"--mixed_precision={precision}", "--max_data_loader_n_workers=0", "--seed=0", "--learning_rate=1e-4",
    ] + (["--gradient_checkpointing"] if checkpointing else [])
    cfg, _ = parse_train_args(argv)
    started = time.perf_counter()
    result = train(cfg)
    ends = result.step_end_times
    return [b - a for a, b in zip(ends, ends[1:])], ends[0] - started


def steady_step_seconds(step_times: list[float]) -> float:
    """Mean seconds per step after the first 4 (warm-up, caches); the loss is read every 5 steps, which
    synchronises the device, so a mean over whole 5-step windows is exact on a GPU too."""
    steady = step_times[4:] or step_times
    usable = len(steady) - len(steady) % 5 or len(steady)
    return sum(steady[:usable]) / usable


def run(size: str, resolution: int, batch: int, rank: int, precision: str, checkpointing: bool, steps: int) -> BenchResult:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cache = Path(os.environ.get("LORAKIT_BENCH_CACHE", Path(tempfile.gettempdir()) / "lorakit-bench"))
    checkpoint = checkpoint_for(size, cache)
    with tempfile.TemporaryDirectory() as tmp:
        step_times, first = trainer_run(checkpoint, Path(tmp), resolution, batch, rank, precision, checkpointing, steps)
    trainer = steady_step_seconds(step_times)
    bare = bare_step_seconds(size, resolution, batch, rank, precision, checkpointing, device, max(3, min(steps, 10)))
    return BenchResult(size, device.type, resolution, batch, rank, precision, checkpointing, round(bare, 5), round(trainer, 5),
                       round(trainer / bare, 3), round(first, 2), round(peak_memory_gib(device), 2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorakit bench", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    result = run(args.size, args.resolution, args.batch, args.rank, args.precision, args.gradient_checkpointing, args.steps)
    print(f"{'size':6} {'device':6} {'reso':>5} {'batch':>5} {'bare s/step':>12} {'trainer s/step':>15} {'ratio':>6} {'first step s':>12} {'peak GiB':>9}")
    print(f"{result.size:6} {result.device:6} {result.resolution:5} {result.batch:5} {result.bare_step_s:12.4f} {result.trainer_step_s:15.4f} "
          f"{result.ratio:6.3f} {result.time_to_first_step_s:12.1f} {result.peak_memory_gib:9.2f}")
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=2))
    return 0
