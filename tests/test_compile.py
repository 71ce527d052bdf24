"""--compile: each block of the denoiser compiled (training/compiled.py) on the CPU.

The backends here are dynamo's `eager` for SD 1.5 (graph capture, guards and dynamic shapes: what decides what is
traced and when it recompiles) and `aot_eager` for FLUX.1 (AOT autograd on top: the traced backward), without
inductor's C++ code generation, which takes minutes per model on a small CPU; AOT autograd through the U-Net's
checkpointed blocks alone takes 1.5-2 minutes here, so SD 1.5 uses the capture-only backend.
`benchmarks/compile_check.py` runs the same comparison with inductor (numbers in benchmarks/README.md).

The compiled model gives the eager loss (and adapter gradients) within 1e-5 on tiny SD 1.5 and FLUX.1 at three
bucket sizes, with gradient checkpointing and a LoRA attached, and the new sizes reuse the dynamic-shape graphs
(the recompilations are counted and stay within the bound). Compiling takes a while on a small CPU, so the models
are the smallest there are.
"""

from __future__ import annotations

import pytest
import torch
from accelerate.state import AcceleratorState

from helpers import write_dreambooth_folder
from lorakit.config import parse_train_args
from lorakit.families.registry import fixtures, get_family
from lorakit.training.compiled import RECOMPILE_LIMIT
from lorakit.training.run import make_accelerator
from lorakit.training.setup import setup_session

SIDES = (32, 48, 64)  # three bucket resolutions (pixels)


def _session(name: str, tmp_path, *extra: str):
    model_args, _ = fixtures(name).bench_files("tiny", tmp_path / "model")
    data = tmp_path / "data"
    if not data.exists():
        write_dreambooth_folder(data, count=1, repeats=1)
    cfg, _ = parse_train_args([*model_args, f"--family={name}", f"--train_data_dir={data}", "--resolution=64",
                               f"--output_dir={tmp_path / 'out'}", "--network_dim=4", "--network_alpha=4",
                               "--gradient_checkpointing", *extra])
    AcceleratorState._reset_state(reset_partial_state=True)
    return setup_session(cfg, get_family(name), make_accelerator(cfg))


def _loss_and_grads(session, side: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    family, comps = session.family, session.comps
    with torch.no_grad():
        text = family.encode_text(comps, ["a red square"])
    scale = 2 ** (len(comps.vae.config.block_out_channels) - 1)
    generator = torch.Generator().manual_seed(side)
    latents = torch.randn(1, comps.vae.config.latent_channels, side // scale, side // scale, generator=generator)
    noised = session.objective.noise(latents, generator=torch.Generator().manual_seed(side + 1))
    prediction = family.predict(comps, noised.noisy, noised.timesteps, text, None)
    loss = torch.nn.functional.mse_loss(prediction.float(), noised.target.float())
    parameters = session.trainable.trainable_parameters()
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    return loss.detach(), [torch.zeros(()) if g is None else g.detach() for g in grads]


@pytest.mark.parametrize(("name", "backend"), [("sd", "eager"), ("flux", "aot_eager")])
def test_compiled_blocks_give_the_eager_loss_at_three_bucket_sizes(name, backend, tmp_path):
    torch._dynamo.reset()
    eager = _session(name, tmp_path)
    compiled = _session(name, tmp_path, "--compile", f"--dynamo_backend={backend}")
    blocks = compiled.comps.extras["compiled"]
    assert blocks is not None and blocks.blocks
    with torch.no_grad():  # the same non-zero LoRA on both (a fresh LoRA's up factors are zero)
        torch.manual_seed(0)
        for parameter in eager.trainable.trainable_parameters():
            parameter.normal_(0, 0.05)
    compiled.trainable.module.load_state_dict(eager.trainable.module.state_dict())
    for side in SIDES:
        loss, grads = _loss_and_grads(eager, side)
        loss_c, grads_c = _loss_and_grads(compiled, side)
        assert abs(float(loss_c) - float(loss)) <= 1e-5 * max(1.0, abs(float(loss))), (side, float(loss), float(loss_c))
        for grad, grad_c in zip(grads, grads_c):
            torch.testing.assert_close(grad_c, grad, rtol=1e-4, atol=1e-5)
    codes = len({type(block) for block in blocks.blocks})
    assert 0 < blocks.graphs() and blocks.recompiles() <= RECOMPILE_LIMIT * codes
    assert "recompilations" in blocks.report()


def test_compiled_blocks_stream_under_block_swap():
    """Block swap's hooks stay outside the compiled forward: the swapped, compiled chain equals the eager one."""
    from test_block_swap import Chain

    from lorakit.families.common.block_swap import install_block_swap

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Chain(4, False)
    model.blocks.requires_grad_(False)
    x = torch.randn(3, 8, requires_grad=True)
    reference = model(x)
    reference.backward()
    grad = model.adapter.weight.grad.clone()
    model.adapter.weight.grad = None
    for block in model.blocks:
        block.forward = torch.compile(block.forward, backend="aot_eager", dynamic=True)
    install_block_swap(model, [("blocks", model.blocks, 2)], "cpu")
    loss = model(x)
    loss.backward()
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(model.adapter.weight.grad, grad)
