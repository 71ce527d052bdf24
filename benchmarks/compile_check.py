"""`--compile` against eager on the CPU with any backend (the unit test uses the light ones; this runs inductor).

    python benchmarks/compile_check.py                          # SD 1.5 and FLUX.1 tiny, inductor
    python benchmarks/compile_check.py --backend aot_eager --family flux

For each tiny model: the same LoRA (non-zero) on an eager and a compiled session set up by the trainer's code
(gradient checkpointing on), the loss and the LoRA's gradients at three bucket sizes, the time of each compiled
step (the first includes compiling) and the graphs and recompilations the run reports.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def check(name: str, backend: str, work: Path) -> dict:
    from test_compile import SIDES, _loss_and_grads, _session

    torch._dynamo.reset()
    eager = _session(name, work)
    compiled = _session(name, work, "--compile", f"--dynamo_backend={backend}")
    with torch.no_grad():
        torch.manual_seed(0)
        for parameter in eager.trainable.trainable_parameters():
            parameter.normal_(0, 0.05)
    compiled.trainable.module.load_state_dict(eager.trainable.module.state_dict())
    rows = []
    for side in SIDES:
        loss, grads = _loss_and_grads(eager, side)
        start = time.perf_counter()
        loss_c, grads_c = _loss_and_grads(compiled, side)
        seconds = time.perf_counter() - start
        grad_error = max(float((a - b).abs().max()) for a, b in zip(grads, grads_c))
        rows.append({"side": side, "loss": float(loss), "loss_difference": abs(float(loss_c) - float(loss)),
                     "max_grad_difference": grad_error, "compiled_step_s": round(seconds, 2)})
    blocks = compiled.comps.extras["compiled"]
    return {"model": f"{name} tiny", "backend": backend, "sizes": rows, "report": blocks.report()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--family", nargs="*", default=["sd", "flux"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.family:
            print(json.dumps(check(name, args.backend, Path(tmp) / name)), flush=True)


if __name__ == "__main__":
    main()
