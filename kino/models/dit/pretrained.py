"""Loading a DiT from a model folder (the shipped default when no path is given)."""

from __future__ import annotations

from pathlib import Path

import torch

from kino.models.dit.model import DiT, DiTConfig
from kino.models.folder import load_module


def load_dit(path: str | Path | None = None, device: str | torch.device = "cpu", component: str = "dit") -> DiT:
    """A frozen DiT from a model folder or a bare dit folder (sha256-checked via kino.json);
    `component` "dit_2": a two-expert model's second DiT."""
    return load_module(path, component, DiTConfig, DiT, device)
