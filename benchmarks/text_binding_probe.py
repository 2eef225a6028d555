"""Does the text encoder's feature of a direction word say which object it belongs to?

    OMP_NUM_THREADS=1 python benchmarks/text_binding_probe.py [--model DIR] [--n 3000] [--seed 0] [--clauses]

Random two-object captions ("a {size} {color} {shape} moving {dir} and a {size} {color} {shape}
moving {dir} on a black background"), encoded by the model's text encoder; for each object's
direction word (the token after its "moving"), a linear probe (multinomial logistic regression
on standardized features, L-BFGS) is fitted on 80% of the captions and scored on the rest,
once for the colour of that word's own object and once for the other object's colour. A DiT
can bind a direction to its object through cross-attention only if the own colour is in the
feature, apart from the other's. Prints one JSON line: the four held-out accuracies and chance.
`--clauses` encodes each clause on its own (`MiniLMEncoder(clauses=True)`), as a model trained
with `[cache] text_clauses` does anyway.
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from kino.models.text.encoder import caption_clauses
from kino.pipeline import Pipeline
from kino.world.captions import COLORS, OBJECT_SIZES, SHAPES

DIRECTIONS = ("left", "right", "up", "down")


def probe(x: torch.Tensor, y: torch.Tensor, classes: int, train: int) -> float:
    """Held-out accuracy of a linear classifier from x (N, D) to y (N,) fitted on the first `train` rows."""
    mean, std = x[:train].mean(0), x[:train].std(0) + 1e-6
    z = (x - mean) / std
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=300)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z[:train] @ weight + bias, y[:train]) + 1e-3 * weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((z[train:] @ weight + bias).argmax(1) == y[train:]).float().mean().item()


def token_ids(encoder, caption: str) -> list[int]:
    """The token ids in the order of the encoder's features: the caption's, or its clauses' end to end."""
    texts = caption_clauses(caption) if getattr(encoder, "clauses", False) else [caption]
    return [i for t in texts for i in encoder.tokenizer(t)["input_ids"]][:encoder.max_length]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="pipeline folder (default: the shipped model)")
    ap.add_argument("--n", type=int, default=3000, help="captions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clauses", action="store_true", help="encode each clause on its own")
    args = ap.parse_args()

    encoder = Pipeline.from_pretrained(args.model).text_encoder
    if args.clauses:  # only MiniLM has the option; other encoders are probed as they are
        encoder.clauses = True
    rng, colors = random.Random(args.seed), list(COLORS)
    captions, own = [], []
    for _ in range(args.n):
        pair = rng.sample(colors, 2)
        objects = [f"a {rng.choice(list(OBJECT_SIZES))} {c} {rng.choice(SHAPES)} moving {rng.choice(DIRECTIONS)}"
                   for c in pair]
        captions.append(" and ".join(objects) + " on a black background")
        own.append([colors.index(c) for c in pair])
    moving = encoder.tokenizer.convert_tokens_to_ids("moving")
    feats = []
    for start in range(0, args.n, 250):
        batch = captions[start:start + 250]
        text, _ = encoder.encode(batch)
        for row, tokens in enumerate(token_ids(encoder, c) for c in batch):
            after = [k + 1 for k, token in enumerate(tokens) if token == moving]
            feats.append(text[row, after[:2]].float())
    x = torch.stack(feats)  # (N, 2, D): the two direction words
    y = torch.tensor(own)  # (N, 2): the two objects' colours
    train = int(0.8 * args.n)
    result = {f"word {k + 1} -> {which} colour": round(probe(x[:, k], y[:, k if which == "own" else 1 - k],
                                                             len(colors), train), 4)
              for k in range(2) for which in ("own", "other")}
    print(json.dumps({**result, "chance": round(1 / len(colors), 4), "captions": args.n}))


if __name__ == "__main__":
    main()
