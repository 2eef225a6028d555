"""Training throughput of the default ("small") DiT: one process vs N-process FSDP2.

    python benchmarks/bench_train.py [--nproc 1 2] [--steps 8] [--warmup 2] [--batch 8]
        [--model small] [--latent 5x8x8] [--text-len 32] [--device cpu|cuda] [--precision fp32|bf16]
        [--ac] [--compile] [--peak-tflops T]

Each configuration runs in fresh processes started as torchrun starts them (gloo on CPU,
nccl on CUDA), through the real `Trainer` on the synthetic DiT task (kino/training/
synthetic.py: random latents, same model, loss and step as `kino train dit`). The global
batch is the same in every configuration (N ranks take batch/N rows each); by default the
clip is the shipped default's 17x64x64 bucket: 5x8x8 latents, 80 tokens, 32 text tokens
(the GPU target: --model wan2.1-1.3b --latent 21x60x104 --text-len 512, ~32k tokens). Reported:
the median over the measured steps of the trainer's own logged tokens/s and samples/s
(the first `--warmup` steps are dropped), and MFU when --peak-tflops is given or the GPU is
known. One JSON line per configuration on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    import torch

    from kino.models.dit import DIT_SIZES
    from kino.training.config import TrainConfig
    from kino.training.distributed import ParallelConfig, shutdown_processes
    from kino.training.synthetic import SyntheticDiT
    from kino.training.trainer import Trainer

    torch.set_num_threads(args.threads)
    task = SyntheticDiT(DIT_SIZES[args.model], batch_size=args.batch, latent=_latent(args.latent),
                        text_len=args.text_len, seed=0, perturb=0.02)
    cfg = TrainConfig(out_dir=args.out, max_steps=args.warmup + args.steps, lr=1e-4, checkpoint_every=0,
                      log_every=1, device=args.device, precision=args.precision, progress=False,
                      peak_tflops=args.peak_tflops,
                      parallel=ParallelConfig(activation_checkpointing=args.ac, compile=args.compile))
    Trainer(task, cfg).fit()
    shutdown_processes()


def _latent(text: str) -> tuple[int, int, int]:
    t, h, w = (int(n) for n in text.lower().split("x"))
    return t, h, w


def launch(nproc: int, args, out: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, __file__, "--worker", "--out", str(out), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch", str(args.batch), "--threads", str(args.threads),
           "--device", args.device, "--precision", args.precision, "--model", args.model,
           "--latent", args.latent, "--text-len", str(args.text_len)]
    cmd += ["--ac"] * args.ac + ["--compile"] * args.compile
    if args.peak_tflops:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": str(args.threads)}
        if nproc > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(cmd, env=env))
    if any(p.wait() for p in procs):
        raise SystemExit(f"a {nproc}-process run failed")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][args.warmup:]
    result = {
        "nproc": nproc,
        "batch": args.batch,
        "model": args.model,
        "latent": args.latent,
        "tokens_per_step": round(rows[0]["tokens_per_s"] / rows[0]["steps_per_s"]),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
        "samples_per_s": statistics.median(r["samples_per_s"] for r in rows),
        "step_s": statistics.median(1.0 / r["steps_per_s"] for r in rows),
        "tflops_per_s": statistics.median(r["tflops_per_s"] for r in rows),
    }
    if "mfu" in rows[0]:
        result["mfu"] = statistics.median(r["mfu"] for r in rows)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--model", default="small", help="a DiT size (kino.models.dit.DIT_SIZES)")
    p.add_argument("--latent", default="5x8x8", help="latent frames x height x width")
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"))
    p.add_argument("--ac", action="store_true", help="activation checkpointing")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--peak-tflops", type=float, default=None, help="one device's peak, for MFU")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    import torch

    print(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "torch": torch.__version__, "device": args.device, "precision": args.precision}))
    for nproc in args.nproc:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(launch(nproc, args, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
