"""One process of a small distributed training run, for tests/test_distributed.py.

    python tests/dist_worker.py OUT MAX_STEPS [--stall STEP] [--sp P] [--checkpoint-every N] [--ac]
                                [--peek N] [--meta-init] [--accum K]

Rank, world size and the rendezvous come from the environment, as torchrun sets them. At the
end every rank takes part in gathering the weights; rank 0 writes OUT/final.safetensors.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch
from safetensors.torch import save_file

from kino.models.dit import DIT_SIZES
from kino.training.config import TrainConfig
from kino.training.distributed import ParallelConfig, shutdown_processes
from kino.training.synthetic import SyntheticDiT
from kino.training.trainer import Trainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("max_steps", type=int)
    p.add_argument("--stall", type=int, default=None)
    p.add_argument("--sp", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--ac", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--peek", type=int, default=0, help="validate and sample every N steps")
    p.add_argument("--meta-init", action="store_true")
    p.add_argument("--accum", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(1)
    task = task_for_tests(stall_at=args.stall)
    cfg = TrainConfig(
        out_dir=args.out, max_steps=args.max_steps, lr=3e-3, warmup_steps=2, lr_schedule="cosine", decay_steps=8,
        ema_decay=0.9, checkpoint_every=args.checkpoint_every, keep_last=2, log_every=1, seed=3, device="cpu",
        precision=args.precision, progress=False, peak_tflops=args.peak_tflops,
        validate_every=args.peek, sample_every=args.peek, grad_accum=args.accum,
        parallel=ParallelConfig(sequence_parallel=args.sp, activation_checkpointing=args.ac, meta_init=args.meta_init),
    )
    trainer = Trainer(task, cfg)
    result = trainer.fit()
    weights = trainer.export_state_dict(ema=False)
    ema = trainer.export_state_dict(ema=True)
    if trainer.procs.is_main:
        save_file(weights, f"{args.out}/final.safetensors")
        save_file(ema, f"{args.out}/final_ema.safetensors")
        print(f"done {result.step}")
    shutdown_processes()


def task_for_tests(stall_at: int | None = None) -> SyntheticDiT:
    config = dataclasses.replace(DIT_SIZES["tiny"], num_layers=2)
    return SyntheticDiT(config, batch_size=4, latent=(2, 4, 4), text_len=4, seed=1, perturb=0.05, stall_at=stall_at)


if __name__ == "__main__":
    main()
    # Every result is on disk and the process group is destroyed; skip the interpreter's
    # teardown, where gloo's threads can still abort a busy machine's process with
    # 'terminate called without an active exception' (seen only under CPU contention).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
