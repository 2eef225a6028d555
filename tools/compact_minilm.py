"""A compact copy of the default text encoder (all-MiniLM-L6-v2) for a machine it cannot reach.

The device machine lent for GPU runs takes the working tree and at most 64 MiB in all: the tree
is ~47 MiB (the shipped DiT and VAE), MiniLM's weights file is 91 MB. Shapes World captions use
about thirty words, so this keeps only their rows of the 30,522-row token embedding, the first
`max_length` position embeddings, and the six layers' matrices as int8 with one float scale per
output row (everything else float32): ~11 MB instead of 91. The features it gives differ from
MiniLM's by what `--check` prints (relative RMS error; measured in BENCHMARKS.md, "Training on
a lent GPU"), enough to train on, not to replace the real encoder at generation: a model trained
on them is used, as always, with the real MiniLM.

    python tools/compact_minilm.py --out .gpu/minilm [--check 2000]

The folder holds weights.safetensors (with the BERT config and the kept token ids in it) and the
tokenizer's files. `CompactMiniLM(folder)` reads it: `encode(prompts) -> (tokens, mask)` as
`kino.models.text.encoder.MiniLMEncoder`, refusing any prompt with a token outside the kept ones.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kino.errors import KinoUserError
from kino.models.text.encoder import MiniLMEncoder, minilm_folder, quiet_loading
from kino.world.captions import BACKGROUNDS, COLORS, MOTIONS, OBJECT_SIZES, SHAPES

WEIGHTS = "weights.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def world_words() -> list[str]:
    """Every word a Shapes World caption can hold (kino/world/captions.py's grammar)."""
    words = ["a", "and", "on", "background", *OBJECT_SIZES, *COLORS, *SHAPES, *BACKGROUNDS]
    return words + [w for m in MOTIONS for w in m.split()]


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: w ~ q * scale[:, None]."""
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale.float()


def write_compact(out: str | Path, words: list[str], max_length: int = 32) -> Path:
    """Write the compact encoder for captions made of `words` into the folder `out`."""
    from transformers import AutoTokenizer

    src = minilm_folder()
    MiniLMEncoder(src, max_length=max_length)  # checks the package's weights against their sha256 first
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    ids = sorted(set(tok.all_special_ids) | {i for w in words for i in tok(w, add_special_tokens=False)["input_ids"]})
    sd = load_file(str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    tensors = {"kept_ids": torch.tensor(ids, dtype=torch.int64)}
    for name, w in sd.items():
        key = name.removeprefix("bert.")
        if key.startswith("pooler.") or key.endswith("position_ids"):
            continue  # kino uses the last hidden state; positions are 0..L-1
        if key == "embeddings.word_embeddings.weight":
            w = w[ids]
        elif key == "embeddings.position_embeddings.weight":
            w = w[:max_length]
        if w.ndim == 2 and key.startswith("encoder."):
            tensors[key + ".q8"], tensors[key + ".scale"] = _quantize(w.float())
        else:
            tensors[key] = w.float().contiguous()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.update(vocab_size=len(ids), max_position_embeddings=max_length)
    save_file(tensors, str(out / WEIGHTS), metadata={"config": json.dumps(config), "max_length": str(max_length),
                                                     "source_vocab_size": str(tok.vocab_size)})
    for f in TOKENIZER_FILES:
        shutil.copy(src / f, out / f)
    return out


class CompactMiniLM:
    """The compact encoder `write_compact` wrote: MiniLMEncoder's interface, for the kept words."""

    # what a latent cache and the exported DiT's training.json record: not MiniLM's own features
    name = "compact all-MiniLM-L6-v2 (int8, Shapes World's words; tools/compact_minilm.py)"

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        from safetensors import safe_open
        from transformers import AutoTokenizer, BertConfig, BertModel

        folder = Path(folder)
        with safe_open(str(folder / WEIGHTS), "pt") as f:
            meta = f.metadata()
        sd = load_file(str(folder / WEIGHTS))
        kept = sd.pop("kept_ids")
        self.lookup = torch.full((int(meta["source_vocab_size"]),), -1, dtype=torch.int64)
        self.lookup[kept] = torch.arange(len(kept))
        weights = {}
        for key, t in sd.items():
            if key.endswith(".q8"):
                base = key.removesuffix(".q8")
                weights[base] = t.float() * sd[base + ".scale"][:, None]
            elif not key.endswith(".scale"):
                weights[key] = t
        self.max_length = int(meta["max_length"])
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        with quiet_loading():
            self.model = BertModel(BertConfig(**json.loads(meta["config"])), add_pooling_layer=False)
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if "position_ids" not in k]:
            raise KinoUserError(f"{folder / WEIGHTS} does not fit MiniLM: missing {missing}, unexpected {unexpected}")
        self.model.to(device).eval().requires_grad_(False)
        self.dim = self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        ids = self.lookup[tok["input_ids"]]
        if (ids < 0).any():
            unknown = sorted(set(self.tokenizer.convert_ids_to_tokens(tok["input_ids"][ids < 0].tolist())))
            raise KinoUserError(f"the compact text encoder keeps only Shapes World's words; {unknown} are not among "
                                "them (tools/compact_minilm.py)")
        device = next(self.model.parameters()).device
        mask = tok["attention_mask"].to(device)
        hidden = self.model(input_ids=ids.to(device), attention_mask=mask).last_hidden_state
        mask = mask.bool()  # (B, L)
        return hidden.float() * mask[..., None], mask  # (B, L, D), (B, L)


def feature_error(compact: CompactMiniLM, prompts: list[str], batch: int = 64) -> float:
    """Relative RMS difference of the compact encoder's features from MiniLM's own."""
    full = MiniLMEncoder(max_length=compact.max_length)
    num = den = 0.0
    for i in range(0, len(prompts), batch):
        a, ma = full.encode(prompts[i:i + batch])
        b, mb = compact.encode(prompts[i:i + batch])
        if not torch.equal(ma, mb):
            raise AssertionError("the compact encoder's mask differs from MiniLM's")
        num += float((a - b).square().sum())
        den += float(a.square().sum())
    return (num / den) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder to write")
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--check", type=int, default=0, metavar="N",
                    help="then compare features with MiniLM's on N train-split captions")
    args = ap.parse_args()
    out = write_compact(args.out, world_words(), args.max_length)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")
    if args.check:
        from kino.world.generator import scene_at

        prompts = [scene_at("train", 7, i, frames=17, size=(64, 64)).text for i in range(args.check)] + [""]
        error = feature_error(CompactMiniLM(out), prompts)
        print(f"relative RMS feature error on {len(prompts)} captions: {error:.2e}")


if __name__ == "__main__":
    main()
