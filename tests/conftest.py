"""Shared test fixtures."""

import hashlib
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def import_script(folder: str, name: str):
    """A module from the repository's benchmarks/ or tools/ (scripts, not a package)."""
    sys.path.insert(0, str(ROOT / folder))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / folder))


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread: on a busy 2-core machine two OpenMP threads run 10-30x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def save_tiny_pipeline(root, name: str, dit_dtype=None, text_clauses=False, **defaults):
    """A tiny random pipeline (tiny VAE, tiny DiT, the real MiniLM text encoder) saved as a model
    folder; `dit_dtype`: the dtype the DiT's weights are stored in (default float32);
    `text_clauses`: MiniLM encodes each clause on its own."""
    from kino.models.dit import DIT_SIZES, DiT, DiTConfig
    from kino.models.text import MiniLMEncoder
    from kino.models.vae import VAE_SIZES, VideoVAE
    from kino.pipeline import GenerationDefaults, Pipeline

    torch.manual_seed(0)
    vae = VideoVAE(VAE_SIZES["tiny"]).eval()
    dit = DiT(DiTConfig.from_dict({**DIT_SIZES["tiny"].to_dict(), "text_dim": 384}))
    with torch.no_grad():  # a zero-initialised head would make every video the same
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if dit_dtype is not None:
        dit.to(dit_dtype)
    pipe = Pipeline(vae, dit.eval(), MiniLMEncoder(max_length=16, clauses=text_clauses), GenerationDefaults(**defaults), name=name)
    pipe.save_pretrained(root)
    return root


def tampered_default_copy(root, component: str):
    """A copy of the shipped model folder under `root` with one bit of `component`'s weights flipped."""
    import shutil

    from kino.models.folder import default_model_dir

    copy = root / "default"
    shutil.copytree(default_model_dir(), copy)
    w = copy / component / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x10
    w.write_bytes(bytes(data))
    return copy


class FakeTextEncoder:
    """Deterministic per-word features from a hash of the word; "" has no real token."""

    name = "fake-hash-encoder"
    dim = 24
    max_length = 8

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        text = torch.zeros(len(prompts), self.max_length, self.dim)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        for i, prompt in enumerate(prompts):
            for j, word in enumerate(prompt.split()[: self.max_length]):
                seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
                text[i, j] = torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))
                mask[i, j] = True
        return text, mask
