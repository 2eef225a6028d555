"""Memory of Wan's UMT5-XXL text encoder on the CPU: its weights as Wan ships them (bf16) against
GGUF files read with `--text-encoder FILE` (kept quantized, dequantized one layer at a time).

    python benchmarks/bench_text_memory.py [--plans bf16 gguf-Q8_0 gguf-Q4_K] [--text 512]
                                           [--layers 24] [--gguf-dir DIR]

Each plan runs in a fresh process with random weights (their values do not change memory or
speed) at UMT5-XXL's size (vocabulary 256,384, 4096 wide, 24 layers of 64 heads, FFN 10,240:
5.7B parameters, a billion of them the token table):

- bf16: transformers' UMT5EncoderModel with bf16 weights, as Wan's .pth holds them. Reported:
  the resident set after setup. It is not run: on a CPU without bf16 instructions a bf16
  encode is hundreds of times slower than fp32, and fp32 weights (22.7 GB) are what a CPU
  user would otherwise need.
- gguf-TYPE: `UMT5Encoder.from_file` on a GGUF file in llama.cpp's t5encoder layout whose
  matrices (and token table) are of TYPE (written once into --gguf-dir, random blocks with
  small scales), computing in fp32. Reported: the resident set after one encode of --text
  tokens (the file's mapped pages are resident from then on), the peak resident set during a
  second encode, and that encode's seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_memory import _peak_rss_mib, _reset_peak_rss, _trim, write_random_gguf  # noqa: E402
from timing import proc_status_kib  # noqa: E402

XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, relative_attention_num_buckets=32)
TINY = dict(vocab_size=1024, d_model=256, d_kv=32, d_ff=512, num_heads=8, relative_attention_num_buckets=32)  # --tiny


def config(layers: int):
    from transformers import UMT5Config

    return UMT5Config(**XXL, num_layers=layers, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                      dropout_rate=0.0, is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)


def write_gguf(path: Path, layers: int, qtype_name: str) -> None:
    """A UMT5-XXL-sized GGUF file in llama.cpp's t5encoder names: every matrix (token table
    included) of `qtype_name`, random blocks with small scales; norms and position tables F32."""
    d, ff, inner = XXL["d_model"], XXL["d_ff"], XXL["num_heads"] * XXL["d_kv"]
    shapes = {"token_embd.weight": (XXL["vocab_size"], d), "enc.output_norm.weight": (d,)}
    for i in range(layers):
        b = f"enc.blk.{i}."
        shapes.update({b + "attn_norm.weight": (d,), b + "attn_rel_b.weight": (32, XXL["num_heads"]),
                       b + "attn_q.weight": (inner, d), b + "attn_k.weight": (inner, d),
                       b + "attn_v.weight": (inner, d), b + "attn_o.weight": (d, inner),
                       b + "ffn_norm.weight": (d,), b + "ffn_gate.weight": (ff, d),
                       b + "ffn_up.weight": (ff, d), b + "ffn_down.weight": (d, ff)})
    write_random_gguf(path, "t5encoder", shapes, lambda key, shape: "rel_b" not in key, qtype_name,
                      lambda writer: writer.add_name("umt5-xxl benchmark (random)"))


def gguf_path(args, plan: str) -> Path:
    return Path(args.gguf_dir) / f"umt5-{'tiny' if args.tiny else 'xxl'}-{args.layers}-{plan[5:]}.gguf"


def child(args) -> dict:
    out = {"plan": args.plan, "layers": args.layers, "text": args.text}
    ids = torch.randint(0, XXL["vocab_size"], (1, args.text), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if args.plan == "bf16":
        from transformers import UMT5EncoderModel

        with torch.device("meta"):
            model = UMT5EncoderModel(config(args.layers))
        model.encoder.embed_tokens = model.shared  # one token table, as Wan's checkpoint holds
        model.to_empty(device="cpu").to(torch.bfloat16)  # values do not change memory
        out["parameters"] = sum(p.numel() for p in model.parameters())  # shared ones once
        _trim()
        out["setup_mib"] = proc_status_kib("VmRSS") / 1024
        return out
    import kino.models.text.umt5 as umt5

    path = gguf_path(args, args.plan)
    umt5._tokenizer = lambda folder: None  # ids are given directly: no tokenizer (none is built offline)
    model = umt5.UMT5Encoder.from_file(path, "unused", dtype="float32").model

    def run():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)

    run()  # warm-up: the mapped file's pages are read (resident) from the first encode on
    _trim()
    out["setup_mib"] = proc_status_kib("VmRSS") / 1024
    out["peak_reset"] = _reset_peak_rss()
    t0 = time.perf_counter()
    run()
    out["encode_s"] = time.perf_counter() - t0
    out["peak_mib"] = _peak_rss_mib()
    out["file_mib"] = path.stat().st_size / 2**20
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", nargs="+", default=["bf16", "gguf-Q8_0", "gguf-Q4_K"])
    ap.add_argument("--layers", type=int, default=24, help="encoder layers (UMT5-XXL: 24)")
    ap.add_argument("--text", type=int, default=512, help="text tokens (Wan pads to 512)")
    ap.add_argument("--gguf-dir", default="/tmp/kino-bench-gguf", help="where gguf-TYPE plans' files are written")
    ap.add_argument("--tiny", action="store_true", help="a 256-wide encoder instead (a smoke test of the script)")
    ap.add_argument("--plan", default=None, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.tiny:
        XXL.update(TINY)
    if args.plan is not None:
        print(json.dumps(child(args)))
        return
    rows = []
    for plan in args.plans:
        if plan != "bf16" and not plan.startswith("gguf-"):
            raise SystemExit(f"unknown plan {plan!r}: bf16 or gguf-TYPE")
        path = gguf_path(args, plan)
        if plan.startswith("gguf-") and not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_gguf(path, args.layers, plan[5:])
        cmd = [sys.executable, __file__, "--plan", plan, "--layers", str(args.layers), "--text", str(args.text),
               "--gguf-dir", args.gguf_dir, *(["--tiny"] if args.tiny else [])]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            raise SystemExit(f"plan {plan} failed")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"UMT5-{'tiny' if args.tiny else 'XXL'} encoder ({args.layers} layers), {args.text} tokens, CPU, "
          "fp32 compute for GGUF")
    print("| plan | file MiB | resident set after setup MiB | peak during an encode MiB | encode s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['plan']} | {r.get('file_mib', 0):.0f} | {r['setup_mib']:.0f} | {r.get('peak_mib', 0):.0f} | "
              f"{r.get('encode_s', 0):.1f} |")


if __name__ == "__main__":
    main()
