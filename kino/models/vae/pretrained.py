"""Loading a VAE from a model folder (the shipped default when no path is given)."""

from __future__ import annotations

from pathlib import Path

import torch

from kino.models.folder import load_module
from kino.models.vae.model import VAEConfig, VideoVAE


def load_vae(path: str | Path | None = None, device: str | torch.device = "cpu") -> VideoVAE:
    """A frozen VideoVAE from a model folder or a bare vae folder; sha256-checked when the
    folder's kino.json records the sums (the shipped default always does). A Wan2.1 / Wan2.2
    folder (either layout, or its Hub id) gives its VAE."""
    if path is not None:
        from kino.convert.wan import detect_layout, load_wan_vae
        from kino.models.hub import resolve_model

        root = resolve_model(path)
        if root.is_dir() and detect_layout(root) in ("original", "diffusers"):
            return load_wan_vae(root, device)
        path = root
    return load_module(path, "vae", VAEConfig, VideoVAE, device)
