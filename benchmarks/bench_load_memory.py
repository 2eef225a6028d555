"""Private (anonymous) host memory of loading a DiT: read in its file's dtype (memory-mapped,
what each process does under `kino generate --fsdp`) against converted as it is read.

    python benchmarks/bench_load_memory.py [--size wan2.1-1.3b] [--dtype bfloat16]

Writes a DiT of `--size` with random weights in fp32 to a temporary folder, then in a fresh
process each (a long-lived process reuses memory it freed, which hides growth) loads it with
`load_module(dtype=None)` and with `load_module(dtype=--dtype)`, touches every weight, and
reports how much the process's RssAnon (/proc/self/status: memory that is the process's own,
not the page cache a machine's processes share) grew, in MiB, beside the file's size. Linux
only. One JSON line with everything goes to stdout last.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kino.models.dit import DIT_SIZES, DiT  # noqa: E402
from kino.models.folder import save_component  # noqa: E402

CHILD = """
import json, sys, torch
from kino.models.dit import DIT_SIZES, DiT, DiTConfig
from kino.models.folder import load_module

def anon_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon:")).split()[1]) / 1024

with torch.device("meta"):  # torch's first model on the meta device costs ~65 MiB once, whatever its size
    DiT(DIT_SIZES["tiny"])
dtype = None if sys.argv[2] == "file" else getattr(torch, sys.argv[2])
before = anon_mib()
model = load_module(sys.argv[1], "dit", DiTConfig, DiT, dtype=dtype)
with torch.no_grad():
    sum(float(p.float().sum()) for p in model.parameters())  # every page read
print(json.dumps({"growth_mib": anon_mib() - before, "dtype": str(model.patch_embedding.weight.dtype)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="wan2.1-1.3b", choices=sorted(DIT_SIZES))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    args = ap.parse_args()
    if not Path("/proc/self/status").is_file():
        raise SystemExit("needs /proc (Linux) to read a process's private memory")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_component(Path(tmp) / "dit", DIT_SIZES[args.size].to_dict(), DiT(DIT_SIZES[args.size]).state_dict())
        file_mib = (Path(tmp) / "dit" / "model.safetensors").stat().st_size / 2**20
        out = {"size": args.size, "file_mib": file_mib, "machine": platform.processor() or platform.machine(),
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
        for mode in ("file", args.dtype):
            res = subprocess.run([sys.executable, "-c", CHILD, str(Path(tmp) / "dit"), mode], capture_output=True,
                                 text=True, check=True)
            out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"# {out['machine']}, torch {torch.__version__}, {args.size}: file {file_mib:.0f} MiB (fp32)")
    print("| read | dtype | private memory added MiB |")
    print("|---|---|---|")
    for mode in ("file", args.dtype):
        print(f"| {'in the file dtype (mapped)' if mode == 'file' else 'converted'} | {out[mode]['dtype']} | "
              f"{out[mode]['growth_mib']:.0f} |")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
