"""--blocks_to_swap on a GPU: seconds per training step and peak VRAM with and without block swap, on FLUX's real
width (3072, 24 heads of 128, T5 width 4096) with a few random blocks, LoRA on every block linear, bf16.

    python benchmarks/block_swap_gpu.py                       # 2 double + 4 single blocks, swap 0 and 2
    python benchmarks/block_swap_gpu.py --double 4 --single 8 --swap 0 2 4 --fp8_base --gradient_checkpointing

`--swap N` uses sd-scripts' split (N//2 double, 2·(N − N//2) single blocks); it must leave 2 blocks of each kind
on the GPU. The swapped runs must give the same loss as the unswapped one (printed as `max |Δloss|`).
"""

from __future__ import annotations

import argparse
import time

import torch

from lorakit.adapters.lora import LoRAModule
from lorakit.families.common.block_swap import install_block_swap
from lorakit.families.common.layers import to_fp8
from lorakit.families.flux.family import image_position_ids, max_blocks_to_swap, swapped_blocks


def build(args, device):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=args.double, num_single_layers=args.single, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ).to(torch.bfloat16)
    model.requires_grad_(False)
    if args.fp8_base:
        to_fp8(model)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    loras = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "blocks" in name:
            lora = LoRAModule("lora_" + name.replace(".", "_"), module, args.rank)
            lora.apply_to()
            loras.append(lora)
    return model, torch.nn.ModuleList(loras)


def inputs(args, device):
    generator = torch.Generator().manual_seed(1)
    side = args.resolution // 16  # 8x VAE, 2x2 packing
    tokens = side * side
    make = lambda *shape: torch.randn(*shape, generator=generator).to(device, torch.bfloat16)  # noqa: E731
    return {
        "hidden_states": make(1, tokens, 64),
        "encoder_hidden_states": make(1, args.text_tokens, 4096),
        "pooled_projections": make(1, 768),
        "timestep": torch.tensor([0.5], device=device, dtype=torch.bfloat16),
        "img_ids": image_position_ids(2 * side, 2 * side, device, torch.bfloat16),
        "txt_ids": torch.zeros(args.text_tokens, 3, device=device, dtype=torch.bfloat16),
        "guidance": torch.tensor([3.5], device=device, dtype=torch.bfloat16),
        "return_dict": False,
    }


def run(args, swap: int, device) -> tuple[float, float, list[float]]:
    model, loras = build(args, device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    if swap:
        double, single = swapped_blocks(swap)
        loras.to(device)  # the adapters stay on the GPU; only the frozen block weights are swapped
        install_block_swap(model, [("double", model.transformer_blocks, double), ("single", model.single_transformer_blocks, single)], device)
    else:
        model.to(device)
        loras.to(device)
    optimizer = torch.optim.AdamW(loras.parameters(), lr=1e-4)
    batch = inputs(args, device)
    losses, times = [], []
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**batch)[0]
        loss = out.float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        losses.append(float(loss))
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    del model, loras, optimizer
    torch.cuda.empty_cache()
    return sum(times) / len(times), peak, losses


def main() -> int:
    # PyTorch 2.11 + cuDNN on the H100 test machine failed inside cuDNN's fused attention backward
    # ("mha_graph.execute ... is_good()") at these shapes; the flash/efficient SDPA kernels are used instead
    torch.backends.cuda.enable_cudnn_sdp(False)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--swap", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--text_tokens", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--fp8_base", action="store_true")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("block_swap_gpu.py needs a CUDA GPU")
        return 1
    device = torch.device("cuda", torch.cuda.current_device())
    most = max_blocks_to_swap(args.double, args.single)
    print(f"FLUX width 3072: {args.double} double + {args.single} single blocks, {args.resolution} px, "
          f"{'fp8' if args.fp8_base else 'bf16'} base, checkpointing {args.gradient_checkpointing}, {torch.cuda.get_device_name(device)}")
    reference = None
    for swap in args.swap:
        if swap > most:
            print(f"--swap {swap}: this model allows at most {most}; skipped")
            continue
        seconds, peak, losses = run(args, swap, device)
        reference = reference or losses
        split = "" if not swap else " (%d double, %d single)" % swapped_blocks(swap)
        delta = max(abs(a - b) for a, b in zip(losses, reference))
        print(f"blocks_to_swap {swap:2d}{split}: {seconds:.3f} s/step, peak {peak:.2f} GiB, max |Δloss| {delta:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
