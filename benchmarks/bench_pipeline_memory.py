"""Peak device memory of a whole generation (text, every sampling step, VAE decode) in small-GPU mode.

    python benchmarks/bench_pipeline_memory.py [--dit wan2.1-1.3b] [--vae wan2.1]
        [--frames 81] [--height 480] [--width 832] [--steps 2] [--device cuda]
        [--weights-dtype bf16|fp8] [--swap-blocks N] [--offload none|model] [--vae-tile P]
        [--cfg batch|sequential] [--text-device cpu]

This runs kino's real `Pipeline.generate` with the memory plan the flags name, the way
`kino generate` applies them (`Pipeline.set_memory`). The DiT and the VAE keep their random
initial weights: memory and speed do not depend on their values. The text encoder is a real transformers
UMT5 encoder at UMT5-XXL's width (4,096) but with one layer and a vocabulary of the prompt's
words. With `--text-device cpu` it runs on the CPU, as `kino generate --text-device cpu` runs
UMT5-XXL, so its size does not touch the device.

Reported on CUDA: the allocator's peak of allocated and of reserved memory over the whole
`generate` call. Reserved is what the process holds from the driver, less the CUDA context.
Also the wall time, and where in the call the peak fell. On a CPU: the peak RSS. The defaults
are issue 7's target: Wan2.1-1.3B at 832x480x81 in at most 6 GB (Wan reports 8.19 GB for its
own offloaded run). Steps: the peak of one sampling step is the peak of all of them, so 2
steps measure what 50 would. One JSON line goes to stdout last.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kino.convert.wan import wan_defaults  # noqa: E402
from kino.models.dit import DIT_SIZES, DiT  # noqa: E402
from kino.models.memory import MemoryPlan  # noqa: E402
from kino.models.text.umt5 import UMT5Encoder  # noqa: E402
from kino.models.vae import VAE_SIZES, VideoVAE  # noqa: E402
from kino.pipeline import Pipeline  # noqa: E402

MIB = 2**20
PROMPT = "a cat walks on the grass, realistic"


def text_encoder(dim: int, words: list[str]) -> UMT5Encoder:
    """A one-layer UMT5 encoder of width `dim` whose vocabulary is `words`."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(words))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                     unk_token="<unk>")
    config = transformers.UMT5Config(vocab_size=len(vocab), d_model=dim, d_kv=64, d_ff=256, num_layers=1,
                                     num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                     is_encoder_decoder=False, use_cache=False)
    torch.manual_seed(3)
    return UMT5Encoder(transformers.UMT5EncoderModel(config), tokenizer)


def random_pipeline(dit_size: str, vae_size: str, perturb: float = 0.0) -> Pipeline:
    """A pipeline of the given sizes with the models' own random initialisation (seeded), Wan2.1's
    defaults and the one-layer UMT5 above. `perturb` adds seeded noise of that scale to every
    DiT parameter: the zero-initialised output layer would otherwise make every video the same."""
    torch.manual_seed(0)
    dit = DiT(DIT_SIZES[dit_size]).eval().requires_grad_(False)
    if perturb:
        with torch.no_grad():
            for p in dit.parameters():
                p.add_(perturb * torch.randn_like(p))
    vae = VideoVAE(VAE_SIZES[vae_size]).eval().requires_grad_(False)
    defaults = wan_defaults("t2v")
    return Pipeline(vae, dit, text_encoder(dit.config.text_dim, (PROMPT + " " + defaults.negative).split()),
                    defaults=defaults, name="random")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dit", default="wan2.1-1.3b", choices=sorted(DIT_SIZES))
    ap.add_argument("--vae", default="wan2.1", choices=sorted(VAE_SIZES))
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="auto", help="DiT compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--weights-dtype", default=None, choices=("bf16", "fp8"))
    ap.add_argument("--swap-blocks", type=int, default=0)
    ap.add_argument("--offload", default="none", choices=("none", "model"))
    ap.add_argument("--vae-tile", type=int, default=None)
    ap.add_argument("--cfg", default="batch", choices=("batch", "sequential"))
    ap.add_argument("--text-device", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    plan = MemoryPlan(dtype=args.dtype, weights=args.weights_dtype, swap_blocks=args.swap_blocks,
                      offload=args.offload, vae_tile=args.vae_tile, cfg=args.cfg)

    t0 = time.perf_counter()
    pipe = random_pipeline(args.dit, args.vae)  # memory and speed do not depend on the weights' values
    pipe.set_memory(plan, device, args.text_device)
    setup_s = time.perf_counter() - t0

    out = {"dit": args.dit, "vae": args.vae, "clip": f"{args.frames}x{args.height}x{args.width}",
           "steps": args.steps, "device": str(device), "plan": vars(args) | {"dtype": str(plan.compute_dtype(device))},
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "setup_s": setup_s}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["gpu"] = torch.cuda.get_device_name(device)
        out["resident_mib"] = torch.cuda.memory_allocated(device) / MIB
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    gen = pipe.generate(PROMPT, frames=args.frames, height=args.height, width=args.width, steps=args.steps, seed=0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out["generate_s"] = time.perf_counter() - t0
    out["video"] = list(gen.video.shape)
    if device.type == "cuda":
        out["peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / MIB
        out["peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / MIB
        print(f"# {out['gpu']}: {args.dit} + {args.vae} VAE, {out['clip']}, {args.steps} steps, plan {plan}")
        print(f"peak allocated {out['peak_allocated_mib']:.0f} MiB, peak reserved {out['peak_reserved_mib']:.0f} MiB "
              f"(resident before the call {out['resident_mib']:.0f} MiB); generate {out['generate_s']:.1f} s")
    else:
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"# CPU: peak RSS {out['peak_rss_mib']:.0f} MiB; generate {out['generate_s']:.1f} s")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
