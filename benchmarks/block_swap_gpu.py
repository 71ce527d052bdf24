"""--blocks_to_swap on a GPU: seconds per training step and peak VRAM with and without block swap, on FLUX's real
width (3072, 24 heads of 128, T5 width 4096) with a few random blocks, LoRA on every block linear, bf16.

    python benchmarks/block_swap_gpu.py                       # 2 double + 4 single blocks, swap 0 and 2
    python benchmarks/block_swap_gpu.py --double 4 --single 8 --swap 0 2 4 --fp8_base --gradient_checkpointing

`--swap N` uses sd-scripts' split (N//2 double, 2·(N − N//2) single blocks); it must leave 2 blocks of each kind
on the GPU. The swapped runs must give the same loss as the unswapped one (printed as `max |Δloss|`).
Each run reports the peak while placing the model (`setup peak`: the swapped weights must never reach the GPU),
what stays allocated after it (`resident`), and the training peak measured from there; a swap of N blocks
should lower both by about the `swapped` weight bytes printed beside them.
"""

from __future__ import annotations

import argparse
import gc
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


def run(args, swap: int, device) -> dict:
    """One setup and training run; peaks are measured from what was allocated before it (nothing, see `unlink`)."""
    gib = 2**30
    base = torch.cuda.memory_allocated(device)
    model, loras = build(args, device)  # on the CPU: the weights go from there straight to their final place
    torch.cuda.reset_peak_memory_stats(device)
    swappers = []
    if swap:
        double, single = swapped_blocks(swap)
        loras.to(device)  # the adapters stay on the GPU; only the frozen block weights are swapped
        plan = [("double", model.transformer_blocks, double), ("single", model.single_transformer_blocks, single)]
        swappers = install_block_swap(model, plan, device)
    else:
        model.to(device)
        loras.to(device)
    torch.cuda.synchronize(device)
    setup_peak = (torch.cuda.max_memory_allocated(device) - base) / gib
    resident = (torch.cuda.memory_allocated(device) - base) / gib
    torch.cuda.reset_peak_memory_stats(device)
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
        losses.append(loss.item())
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    train_peak = (torch.cuda.max_memory_allocated(device) - base) / gib
    unlink(loras, swappers)
    del model, loras, swappers, optimizer, batch, out, loss
    gc.collect()
    torch.cuda.empty_cache()
    left = (torch.cuda.memory_allocated(device) - base) / gib
    if left > 0.01:
        print(f"warning: {left:.2f} GiB still allocated after the run")
    return {"seconds": sum(times) / len(times), "setup_peak": setup_peak, "resident": resident, "train_peak": train_peak, "losses": losses}


def unlink(loras, swappers) -> None:
    """Break the reference cycles that keep a finished run's weights on the GPU. A LoRA module and the layer it
    patches refer to each other (and the swap hooks to the blocks), so `del` alone leaves the weights allocated
    until Python's cyclic collector happens to run: an earlier version of this script measured the swapped run
    with the previous run's block weights still allocated (+2.25 GiB bf16, +1.25 GiB fp8 at 4 double + 8 single)."""
    for lora in loras:
        lora.restore()
    for swapper in swappers:
        swapper.detach()


def weight_gib(args, swap: int) -> tuple[float, float]:
    """(all block linear weights, the swapped ones) in GiB at the benchmark's storage dtype, from the shapes."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=args.double, num_single_layers=args.single, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
    size = 1 if args.fp8_base else 2
    count = lambda blocks: sum(m.weight.numel() for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear))  # noqa: E731
    double, single = swapped_blocks(swap) if swap else (0, 0)
    everything = count(model.transformer_blocks) + count(model.single_transformer_blocks)
    swapped = count(model.transformer_blocks[args.double - double:]) + count(model.single_transformer_blocks[args.single - single:])
    return everything * size / 2**30, swapped * size / 2**30


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
        result = run(args, swap, device)
        losses = result["losses"]
        reference = reference or losses
        split = "" if not swap else " (%d double, %d single)" % swapped_blocks(swap)
        delta = max(abs(a - b) for a, b in zip(losses, reference))
        blocks, swapped = weight_gib(args, swap)
        print(f"blocks_to_swap {swap:2d}{split}: {result['seconds']:.3f} s/step, setup peak {result['setup_peak']:.2f} GiB, "
              f"resident after setup {result['resident']:.2f} GiB, training peak {result['train_peak']:.2f} GiB, "
              f"max |Δloss| {delta:.2e} (block weights {blocks:.2f} GiB, swapped {swapped:.2f} GiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
