"""Probe (not a pipeline feature): segregated cross-attention for two-object prompts.

    OMP_NUM_THREADS=1 python benchmarks/probe_segregate.py [--t-max T] [--off]
                                 [--n 120 --held-out 24 --seed 5353] [--workers 2] [--out DIR]

Training-free binding in the manner of bounded attention (Dahary et al. 2024): in every
block's cross-attention, each video token is given to the object phrase it already attends to
more (attention summed over the phrase's text tokens, averaged over heads), and the other
object's phrase is masked out of its attention; the words the objects share ("and", "on a ...
background", [CLS], [SEP]) stay visible to all. Only the two-object prompts among eval_t2v.py's
are generated (same seeds and sizes), and only their conditional branch is segregated; the
unconditional one and one-object prompts run as shipped. `--t-max T`: only on the steps whose
solver time is at most T (after the layout is drawn at high noise). `--off`: the same prompts
with the shipped pipeline, for the comparison. Scored as eval_t2v.py scores, with its binding
and placement diagnostics.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import tempfile
from pathlib import Path

import torch

from eval_t2v import prompt_rows, run_probe
from kino.world.captions import parse_caption

SHARED, FIRST, SECOND = 0, 1, 2


def phrase_labels(tokenizer, caption: str, max_length: int) -> tuple[torch.Tensor, int]:
    """Per text token (padded to max_length): FIRST / SECOND for the first / second object's
    phrase, SHARED otherwise; and the caption's token count."""
    enc = tokenizer(caption, padding="max_length", truncation=True, max_length=max_length,
                    return_offsets_mapping=True)
    split, tail = caption.find(" and "), caption.rfind(" on a ")
    labels = []
    for (start, end), real in zip(enc["offset_mapping"], enc["attention_mask"]):
        if not real or end == 0:  # padding and the special tokens
            labels.append(SHARED)
        elif end <= split:
            labels.append(FIRST)
        elif start >= split + len(" and ") and end <= tail:
            labels.append(SECOND)
        else:
            labels.append(SHARED)
    return torch.tensor(labels), sum(enc["attention_mask"])


class Segregation:
    """The state the patched cross-attentions read: the current caption's labels (None for a
    one-object caption) and the solver time of the current DiT call."""

    def __init__(self, t_max: float):
        self.labels, self.tokens, self.t, self.t_max = None, 0, 1.0, t_max

    def attention(self, attn, x, context, context_mask, rope=None, image=None, *, inner):
        if (self.labels is None or self.t > self.t_max or context_mask is None
                or not (rows := context_mask.sum(-1) == self.tokens).any()):
            return inner(x, context, context_mask, rope, image)
        heads = attn.num_heads
        q = attn.norm_q(attn.q(x)).unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, H, Lq, Dh)
        k = attn.norm_k(attn.k(context)).unflatten(-1, (heads, -1)).transpose(1, 2)
        v = attn.v(context).unflatten(-1, (heads, -1)).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
        keys = context_mask[:, None, None, :]
        probs = scores.masked_fill(~keys, float("-inf")).softmax(-1)
        first, second = (self.labels == FIRST).to(x.device), (self.labels == SECOND).to(x.device)
        to_first = probs[..., first].sum(-1).mean(1) > probs[..., second].sum(-1).mean(1)  # (B, Lq)
        hidden = torch.where(to_first[..., None], second, first) & rows[:, None, None]  # (B, Lq, Lk)
        out = scores.masked_fill(~(keys & ~hidden[:, None]), float("-inf")).softmax(-1) @ v
        return attn.o(out.transpose(1, 2).flatten(2))


def segregate(pipe, t_max: float) -> None:
    """eval_t2v's per-process setup: patch the text encoder (labels from each prompt), the DiT
    (the step's time) and every block's cross-attention."""
    state = Segregation(t_max)
    encoder, encode, forward = pipe.text_encoder, pipe.text_encoder.encode, pipe.dit.forward

    def labelled_encode(prompts):
        two = len(parse_caption(prompts[0]).objects) == 2
        state.labels, state.tokens = (phrase_labels(encoder.tokenizer, prompts[0], encoder.max_length) if two
                                      else (None, 0))
        return encode(prompts)

    def timed_forward(x, t, *args, **kw):
        state.t = float(t.max()) / 1000.0  # DiT time -> solver time
        return forward(x, t, *args, **kw)

    encoder.encode, pipe.dit.forward = labelled_encode, timed_forward
    for block in pipe.dit.blocks:
        attn = block.cross_attn
        attn.forward = functools.partial(state.attention, attn, inner=attn.forward)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--t-max", type=float, default=1.0, help="segregate on steps at solver times <= T")
    ap.add_argument("--off", action="store_true", help="the shipped pipeline on the same prompts")
    ap.add_argument("--model", default=None, help="pipeline folder (default: the shipped model)")
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--held-out", type=int, default=24)
    ap.add_argument("--seed", type=int, default=5353)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix="kino-segregate-"))
    rows = [r for r in prompt_rows(args.n, args.held_out, args.seed) if len(parse_caption(r["caption"]).objects) == 2]
    setup = None if args.off else functools.partial(segregate, t_max=args.t_max)
    report = run_probe(rows, out, {}, args.workers, args.model, setup, vars(args))
    print(f"binding {json.dumps(report['binding'])}\nplacement {json.dumps(report['placement']['pair'])}"
          f"\ndirection {json.dumps(report['direction']['pair'])}")


if __name__ == "__main__":
    main()
