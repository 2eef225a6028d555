"""kino's DiT against diffusers' Wan DiT at one size on one device: time and memory of a call.

    python benchmarks/bench_dit_peer.py [--size wan2.1-1.3b|wan2.1-vace-1.3b|...] [--latent 21x60x104] [--text 512]
        [--batch 1] [--device cpu|cuda] [--dtype fp32|bf16] [--repeats 5] [--compile]

Both models hold the same random weights. kino's DiT is built with `--size` and its state dict
goes through kino's adapter into diffusers' `WanTransformer3DModel` of the same size (the peer;
for a VACE size its `WanVACETransformer3DModel`, both given the same random context).
They run in one process on the same inputs, one after the other. Before anything is timed,
their outputs are compared. The relative L2 difference is printed (fp32 ~1e-7, bf16 ~1e-2),
and a difference above 5% stops the run: the ratio must compare the same computation.

Reported, per model: the median wall time of one call (`--repeats` calls after one warm-up,
the device synchronized), and on CUDA the allocator's peak during a call. Then kino's time
over diffusers' time (below 1: kino faster). `--compile` also times kino with each block under
`torch.compile`; the peer stays eager, the way diffusers runs by default, with the modules
diffusers keeps in fp32 (`_keep_in_fp32_modules`) in fp32, as its `from_pretrained(torch_dtype=)`
leaves them. One JSON line with everything goes to stdout last.

Issue 7's GPU target is one call at Wan's 832x480x81 (`--latent 21x60x104`: 32,760 tokens)
with the 1.3B size in bf16 on CUDA: time ratio <= 0.8. On a CPU, use a reduced size, e.g.
`--latent 3x16x16 --text 64`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import median_time, wan_peer  # noqa: E402

from kino.models.dit import DIT_SIZES, DiT  # noqa: E402

MIB = 2**20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _latent(s: str) -> tuple[int, int, int]:
    try:
        t, h, w = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--latent takes FRAMESxHEIGHTxWIDTH (latent units), got {s!r}") from None
    return t, h, w


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float | None]:
    """(median seconds of one call, peak MiB allocated during a call on CUDA, else None)."""
    def call():
        with torch.no_grad():
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    peak = None
    if device.type == "cuda":
        call()  # warm-up outside the peak (kernels, allocator pools)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call()
        peak = (torch.cuda.max_memory_allocated(device) - base) / MIB
    return median_time(call, repeats), peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="wan2.1-1.3b", choices=sorted(DIT_SIZES))
    ap.add_argument("--latent", type=_latent, default=(21, 60, 104), help="latent frames x height x width")
    ap.add_argument("--text", type=int, default=512, help="text tokens (Wan pads to 512)")
    ap.add_argument("--batch", type=int, default=1, help="clips per call (2 = a guided step's batch)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time kino with torch.compile on each block")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.dtype == "bf16" and device.type == "cpu":
        print("note: bf16 on a CPU without bf16 instructions is very slow", file=sys.stderr)

    torch.manual_seed(0)
    config = DIT_SIZES[args.size]
    dit = DiT(config).eval().requires_grad_(False)
    for p in dit.parameters():  # random weights: speed and memory do not depend on their values
        p.data.normal_(0, 0.02)
    peer = wan_peer(dit).requires_grad_(False)  # built from the fp32 weights, then both cast
    dit.to(device, dtype)
    peer.to(device, dtype)
    keep = set(getattr(peer, "_keep_in_fp32_modules", None) or ())
    for name, module in peer.named_modules():  # as diffusers' from_pretrained(torch_dtype=...) leaves them
        if keep.intersection(name.split(".")):
            module.float()

    t, h, w = args.latent
    b = args.batch
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, config.in_channels, t, h, w, generator=g).to(device, dtype)
    text = torch.randn(b, args.text, config.text_dim, generator=g).to(device, dtype)
    mask = torch.ones(b, args.text, dtype=torch.bool, device=device)
    step = torch.full((b,), 500.0, device=device)
    p = config.patch_size
    tokens = (t // p[0]) * (h // p[1]) * (w // p[2])

    ours_kw, theirs_kw = {}, {}
    if config.vace_layers:  # a VACE DiT (e.g. --size wan2.1-vace-1.3b) takes its context as well
        context = torch.randn(b, config.vace_in_channels, t, h, w, generator=g).to(device, dtype)
        ours_kw, theirs_kw = {"vace": context}, {"control_hidden_states": context}

    def kino_call():
        return dit(x, step, text, mask, **ours_kw)

    def peer_call():
        return peer(x, step, text, return_dict=False, **theirs_kw)

    with torch.no_grad():  # diffusers' Wan takes unpadded text (no mask): every token here is real
        ours, theirs = kino_call().float(), peer_call()[0].float()
    rel = ((ours - theirs).norm() / theirs.norm()).item()  # relative L2: steadier than the max in bf16
    del ours, theirs
    if not rel < 0.05:
        raise SystemExit(f"kino and diffusers disagree (relative L2 difference {rel:.3g}): not the same computation")

    out = {"size": args.size, "latent": "x".join(map(str, args.latent)), "tokens": tokens, "text": args.text,
           "batch": b, "dtype": args.dtype, "device": str(device), "torch": torch.__version__,
           "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
           or platform.machine(), "relative_l2_diff": rel, "repeats": args.repeats,
           "date": time.strftime("%Y-%m-%d")}
    out["kino_s"], out["kino_peak_mib"] = timed(kino_call, device, args.repeats)
    out["diffusers_s"], out["diffusers_peak_mib"] = timed(peer_call, device, args.repeats)
    out["ratio"] = out["kino_s"] / out["diffusers_s"]
    rows = [("kino", out["kino_s"], out["kino_peak_mib"]), ("diffusers", out["diffusers_s"], out["diffusers_peak_mib"])]
    if args.compile:
        for block in dit.all_blocks():
            block.compile()
        t0 = time.perf_counter()
        with torch.no_grad():
            kino_call()  # compiles
        out["compile_s"] = time.perf_counter() - t0
        out["kino_compiled_s"], out["kino_compiled_peak_mib"] = timed(kino_call, device, args.repeats)
        out["ratio_compiled"] = out["kino_compiled_s"] / out["diffusers_s"]
        rows.insert(1, ("kino, blocks compiled", out["kino_compiled_s"], out["kino_compiled_peak_mib"]))

    print(f"# {out['machine']}, torch {torch.__version__}, {args.size} {args.dtype}, batch {b}, {tokens} tokens, "
          f"{args.text} text tokens; medians of {args.repeats}; outputs agree to {rel:.2g} (relative L2)")
    print("| model | call s | peak MiB during a call | time / diffusers' |")
    print("|---|---|---|---|")
    for name, secs, peak in rows:
        print(f"| {name} | {secs:.4f} | {'-' if peak is None else f'{peak:.0f}'} | {secs / out['diffusers_s']:.3f} |")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
