"""Memory of the small-GPU mode (kino/models/memory.py) on a Wan2.1-sized DiT.

    python benchmarks/bench_memory.py [--size wan2.1-1.3b] [--latent 3x16x16] [--text 512]
                                      [--device cpu|cuda] [--plans fp32 bf16 fp8 ...]

Each plan runs in a fresh process: build the DiT with random weights (weights' values do
not change memory or speed), apply the plan, then one guided denoising step (a batch of two
for the guided and unguided branches, or two calls with `cfg=sequential`) at the given
latent size. Reported per plan:

- CPU: resident set after setup and one warm-up step (what the weights keep, a GGUF file's
  mapped pages included) and peak resident set during the next step (the kernel's
  high-water mark, reset before it), in MiB; that step's seconds.
- CUDA: memory allocated after setup and peak allocated during the step, in MiB (torch's
  allocator counters); step seconds. Wan's 832x480x81 is `--latent 21x60x104`.

Plans: fp32 (all weights in fp32), bf16 / fp8 (block weights stored so, computed in the
compute dtype), gguf-TYPE (the DiT read from a GGUF file whose block matrices are of that
type, e.g. gguf-Q8_0, gguf-Q4_K: kept quantized, dequantized one layer at a time; the file
is written once into --gguf-dir with random blocks, whose values do not change memory or
speed), and with a "+swapN" suffix N blocks kept in CPU memory (GPU only matters there),
"+seq" for sequential guidance, e.g. `fp8+swap30+seq`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import proc_status_kib  # noqa: E402

from kino.models.dit import DIT_SIZES, DiT  # noqa: E402
from kino.models.memory import MemoryPlan  # noqa: E402

MIB = 2**20


def gguf_type(name: str) -> str | None:
    """The GGUF type of a gguf-TYPE plan (None for the others)."""
    first = name.split("+")[0]
    return first[5:] if first.startswith("gguf-") else None


def parse_plan(name: str) -> MemoryPlan:
    parts = name.split("+")
    weights = None if gguf_type(name) else {"fp32": None, "bf16": "bf16", "fp8": "fp8"}[parts[0]]
    swap, cfg = 0, "batch"
    for p in parts[1:]:
        if p.startswith("swap"):
            swap = int(p[4:])
        elif p == "seq":
            cfg = "sequential"
        else:
            raise SystemExit(f"unknown plan part {p!r}")
    return MemoryPlan(weights=weights, swap_blocks=swap, cfg=cfg)


def _reset_peak_rss() -> bool:
    try:  # Linux: writing 5 resets VmHWM (the peak resident set) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak_rss_mib() -> float:
    return (proc_status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def write_random_gguf(path: Path, arch: str, shapes: dict, quantized, qtype_name: str, setup=None) -> None:
    """A GGUF file of tensors `shapes` (name -> shape): those `quantized(name, shape)` picks (with
    rows of whole blocks) of `qtype_name`, random blocks with small scales (their values do not
    change memory or speed), the rest F32 random normals; `setup(writer)` adds metadata."""
    import gguf
    import numpy as np

    from kino.models.gguf import QUANT_TYPES

    qtype = next(k for k, q in QUANT_TYPES.items() if q.name == qtype_name)
    q = QUANT_TYPES[qtype]
    half = {"Q2_K": 80, "Q3_K": 108, "Q6_K": 208}.get(qtype_name, 0)  # where the block's f16 scale sits
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch, use_temp_file=True)
    if setup is not None:
        setup(writer)
    for key, shape in shapes.items():
        if len(shape) == 2 and shape[1] % q.block == 0 and quantized(key, shape):  # else F32, as converters do
            raw = rng.integers(0, 256, size=(shape[0] * shape[1] // q.block, q.nbytes), dtype=np.uint8)
            raw[:, half:half + 2] = np.full((len(raw), 1), 1e-3, np.float16).view(np.uint8)
            if qtype_name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"):  # and the min / dmin field
                raw[:, 2:4] = raw[:, 0:2]
            writer.add_tensor(key, raw.reshape(shape[0], -1), raw_dtype=gguf.GGMLQuantizationType(qtype))
        else:
            writer.add_tensor(key, rng.normal(0, 0.02, size=shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf(path: Path, size: str, qtype_name: str) -> None:
    """A GGUF file of a `size` DiT (Wan's names) laid out as published ones are: block matrices
    of `qtype_name`, everything else F32."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in DiT(DIT_SIZES[size]).state_dict().items()}
    write_random_gguf(path, "wan", shapes, lambda key, shape: key.startswith("blocks."), qtype_name)


def build(args, dtype: torch.dtype) -> DiT:
    """The plan's DiT in `dtype` on the CPU: random weights, or read from the plan's GGUF file."""
    qtype = gguf_type(args.plan)
    if qtype is not None:
        from kino.models.dit.pretrained import build_dit, read_dit_file

        path = Path(args.gguf_dir) / f"{args.size}-{qtype}.gguf"
        config = DIT_SIZES[args.size]
        return build_dit(config, read_dit_file(path, dtype, config), path, "cpu", dtype)
    torch.manual_seed(0)
    with torch.device("meta"):
        dit = DiT(DIT_SIZES[args.size])
    dit.to_empty(device="cpu")  # random values: memory and speed do not depend on them
    for p in dit.parameters():
        p.data.normal_(0, 0.02)
    return dit.eval().requires_grad_(False).to(dtype)


def child(args) -> dict:
    from kino.models.memory import BlockStreamer

    device = torch.device(args.device)
    plan = parse_plan(args.plan)
    dtype = plan.compute_dtype(device)
    dit = build(args, dtype)
    if plan.streams_blocks:
        streamer = BlockStreamer(dit.blocks, device, dtype, plan.weights, plan.swap_blocks)
    dit.to(device)  # the blocks' placeholders and the non-block weights
    if plan.streams_blocks:
        assert streamer.stores
    c = dit.config
    t, h, w = args.latent
    x = torch.randn(1, c.in_channels, t, h, w, device=device, dtype=dtype)
    text = torch.randn(1, args.text, c.text_dim, device=device, dtype=dtype)
    mask = torch.ones(1, args.text, dtype=torch.bool, device=device)
    step = torch.tensor([500.0], device=device)

    def run():
        with torch.no_grad():
            if plan.cfg == "batch":
                dit(torch.cat([x, x]), torch.cat([step, step]), torch.cat([text, text]), torch.cat([mask, mask]))
            else:
                dit(x, step, text, mask)
                dit(x, step, text, mask)
        if device.type == "cuda":
            torch.cuda.synchronize()

    out = {"plan": args.plan, "size": args.size, "latent": "x".join(map(str, args.latent)), "device": str(device)}
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["setup_mib"] = torch.cuda.memory_allocated(device) / MIB
        torch.cuda.reset_peak_memory_stats(device)
        run()  # warm-up (kernels, allocator)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        run()
        out["step_s"] = time.perf_counter() - t0
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / MIB
    else:
        run()  # warm-up: a GGUF file's mapped pages are read (resident) from the first step on
        _trim()  # hand the freed fp32 build copies and the warm-up's activations back to the OS
        out["setup_mib"] = proc_status_kib("VmRSS") / 1024
        out["peak_reset"] = _reset_peak_rss()
        t0 = time.perf_counter()
        run()
        out["step_s"] = time.perf_counter() - t0
        out["peak_mib"] = _peak_rss_mib()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="wan2.1-1.3b", choices=sorted(DIT_SIZES))
    ap.add_argument("--latent", default="3x16x16", help="latent frames x height x width (pixels / 4, 8, 8)")
    ap.add_argument("--text", type=int, default=512, help="text tokens (Wan pads to 512)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--plans", nargs="+", default=["fp32", "bf16", "fp8"])
    ap.add_argument("--gguf-dir", default="/tmp/kino-bench-gguf", help="where gguf-TYPE plans' files are written")
    ap.add_argument("--plan", default=None, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    args.latent = tuple(int(v) for v in args.latent.split("x"))
    if args.plan is not None:
        print(json.dumps(child(args)))
        return
    rows = []
    for plan in args.plans:
        parse_plan(plan)
        qtype = gguf_type(plan)
        if qtype is not None and not (Path(args.gguf_dir) / f"{args.size}-{qtype}.gguf").is_file():
            Path(args.gguf_dir).mkdir(parents=True, exist_ok=True)
            write_gguf(Path(args.gguf_dir) / f"{args.size}-{qtype}.gguf", args.size, qtype)
        cmd = [sys.executable, __file__, "--plan", plan, "--size", args.size, "--latent", "x".join(map(str, args.latent)),
               "--text", str(args.text), "--device", args.device, "--gguf-dir", args.gguf_dir]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            raise SystemExit(f"plan {plan} failed")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    what = "GPU allocated" if args.device.startswith("cuda") else "resident set (RSS)"
    print(f"{args.size} DiT, latent {rows[0]['latent']}, {args.text} text tokens, one guided step, {args.device}")
    print(f"| plan | {what} after setup MiB | peak during the step MiB | step s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['plan']} | {r['setup_mib']:.0f} | {r['peak_mib']:.0f} | {r['step_s']:.2f} |")


if __name__ == "__main__":
    main()
