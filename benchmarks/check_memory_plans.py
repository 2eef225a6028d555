"""Small-GPU mode on a real device: every memory plan against the plain pipeline, on CUDA.

    python benchmarks/check_memory_plans.py [--device cuda] [--dit tiny] [--vae tiny]
        [--frames 9] [--height 64] [--width 64] [--steps 3]

tests/test_memory.py checks the plans on the CPU, where the CUDA parts never run: the side
stream that prefetches swapped blocks, pinned host copies, non-blocking transfers and the
device-to-CPU moves of model offload. This runs the same comparisons on `--device`, with a
small random pipeline (benchmarks/bench_pipeline_memory.py's), generating one clip per plan
from the same seed:

- fp32 compute with blocks swapped to the CPU, or with the whole model offloaded: the same
  arithmetic, so the latents must be bitwise equal to the plain pipeline's;
- sequential guidance: the same arithmetic in two calls, within 1e-4 (relative L2);
- bf16 / fp8 block storage (bf16 compute, swapped or offloaded): close, within 5% (relative L2),
  and not equal (equal would mean the storage was never applied).

Prints one line per plan and exits 1 if any plan misses its bound. It is the first step of
benchmarks/gpu_suite.sh.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline_memory import PROMPT, random_pipeline  # noqa: E402

from kino.models.memory import MemoryPlan  # noqa: E402

# (plan, bound): 0 = bitwise equal, else the largest relative L2 difference allowed
PLANS = [
    (MemoryPlan(dtype="float32", swap_blocks=1), 0.0),
    (MemoryPlan(dtype="float32", offload="model"), 0.0),
    (MemoryPlan(dtype="float32", swap_blocks=1, offload="model"), 0.0),
    (MemoryPlan(dtype="float32", cfg="sequential"), 1e-4),
    (MemoryPlan(dtype="bfloat16", weights="bf16", swap_blocks=1), 0.05),
    (MemoryPlan(dtype="bfloat16", weights="fp8", offload="model", cfg="sequential"), 0.05),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dit", default="tiny")
    ap.add_argument("--vae", default="tiny")
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()

    def clip(plan: MemoryPlan) -> torch.Tensor:
        pipe = random_pipeline(args.dit, args.vae, perturb=0.05)
        pipe.set_memory(plan, args.device, "cpu")
        gen = pipe.generate(PROMPT, frames=args.frames, height=args.height, width=args.width, steps=args.steps,
                            seed=3)
        return gen.latents.float().cpu()

    base = clip(MemoryPlan(dtype="float32"))
    failed = 0
    for plan, bound in PLANS:
        got = clip(plan)
        rel = ((got - base).norm() / base.norm()).item()
        ok = torch.equal(got, base) if bound == 0 else rel <= bound
        ok = ok and (rel > 0 or plan.weights is None)  # rounded weights that change nothing were not applied
        failed += not ok
        want = "bitwise equal" if bound == 0 else f"relative L2 <= {bound:g}"
        print(f"{'ok  ' if ok else 'FAIL'} {plan}: relative L2 {rel:.3g} ({want})", flush=True)
    print(f"{len(PLANS) - failed}/{len(PLANS)} plans as expected on {args.device}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
