"""Output error of each `--base_quant` mode against the unquantized base (the tables in docs/memory.md).

    python benchmarks/quant_error.py            # every family's tiny model, and the real-size SD 1.5 U-Net's layers
    python benchmarks/quant_error.py sd flux real   # some families; "real": the SD 1.5 U-Net's layers

Per family: the denoiser's prediction for one fixed noisy latent, timestep and caption, set up by the trainer's
own code (`setup_session`, bf16 mixed precision, a LoRA attached with zero up factors so it changes nothing),
quantized against not: ‖ŷ_q − ŷ‖ / ‖ŷ‖. Real-size SD 1.5 (random weights from its config, the benchmark file):
every linear and convolution weight of the U-Net, ‖W_q·x − W·x‖ / ‖W·x‖ for Gaussian x, over the whole layer set.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

MODES = ("fp8", "fp8_scaled", "int8", "nf4")


def family_errors(name: str, work: Path) -> dict[str, float]:
    from accelerate.state import AcceleratorState
    from helpers import write_dreambooth_folder

    from lorakit.config import parse_train_args
    from lorakit.families.registry import fixtures, get_family
    from lorakit.training.run import make_accelerator
    from lorakit.training.setup import setup_session

    model_args, _ = fixtures(name).bench_files("tiny", work / name)
    data = work / "data"
    if not data.exists():
        write_dreambooth_folder(data, count=1, repeats=1)
    outputs = {}
    for mode in (None, *MODES):  # each a fresh set-up from the same file (the random draws are seeded)
        cfg, _ = parse_train_args([*model_args, f"--family={name}", f"--train_data_dir={data}", "--resolution=64",
                                   f"--output_dir={work / 'out'}", "--mixed_precision=bf16", "--network_dim=4",
                                   *([f"--base_quant={mode}"] if mode else [])])
        AcceleratorState._reset_state(reset_partial_state=True)
        session = setup_session(cfg, get_family(name), make_accelerator(cfg))
        family, comps = session.family, session.comps
        with torch.no_grad(), session.accelerator.autocast():
            text = family.encode_text(comps, ["a red square on a blue background"])
            shape = family.encode_images(comps, torch.zeros(1, 3, 64, 64, device=comps.vae.device, dtype=comps.vae.dtype)).shape
            latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
            noised = session.objective.noise(latents, generator=torch.Generator().manual_seed(1))
            outputs[mode] = family.predict(comps, noised.noisy, noised.timesteps, text, None).float()
    reference = outputs[None]
    return {mode: round(float((outputs[mode] - reference).norm() / reference.norm()), 4) for mode in MODES}


def sd15_layer_errors(cache: Path) -> dict[str, float]:
    from safetensors import safe_open

    from lorakit.bench_models import bench_model
    from lorakit.families.common.quant import dequantized_copy

    path = bench_model("sd", "real", cache).model_args[0].split("=", 1)[1]
    totals = {mode: [0.0, 0.0] for mode in MODES}
    generator = torch.Generator().manual_seed(0)
    with safe_open(path, framework="pt") as handle:
        for key in handle.keys():
            if not key.startswith("model.diffusion_model.") or not key.endswith(".weight") or handle.get_slice(key).get_shape().__len__() not in (2, 4):
                continue
            weight = handle.get_tensor(key).float().flatten(1)
            x = torch.randn(weight.shape[1], 16, generator=generator)
            reference = weight @ x
            for mode in MODES:
                quantized = dequantized_copy(handle.get_tensor(key).float(), mode).flatten(1)
                totals[mode][0] += float((quantized @ x - reference).pow(2).sum())
                totals[mode][1] += float(reference.pow(2).sum())
    return {mode: round((error / size) ** 0.5, 4) for mode, (error, size) in totals.items()}


def main() -> None:
    from lorakit.families.registry import family_names

    names = sys.argv[1:] or family_names()
    cache = Path(os.environ.get("LORAKIT_BENCH_CACHE", Path(tempfile.gettempdir()) / "lorakit-bench"))
    with tempfile.TemporaryDirectory() as tmp:
        for name in (n for n in names if n != "real"):
            print(json.dumps({"model": f"{name} tiny (denoiser output)", **family_errors(name, Path(tmp))}), flush=True)
    if "real" in names or not sys.argv[1:]:
        print(json.dumps({"model": "sd real-size U-Net (every layer's output)", **sd15_layer_errors(cache)}), flush=True)


if __name__ == "__main__":
    main()
