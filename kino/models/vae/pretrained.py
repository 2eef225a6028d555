"""Loading a VAE from a model folder (the shipped default when no path is given)."""

from __future__ import annotations

from pathlib import Path

import torch

from kino.errors import KinoUserError
from kino.models.folder import default_model_dir, load_component
from kino.models.vae.model import VAEConfig, VideoVAE


def load_vae(path: str | Path | None = None, device: str | torch.device = "cpu") -> VideoVAE:
    """A VideoVAE in eval mode from a model folder or a bare vae folder; sha256-checked when
    the folder's kino.json records the sums (the shipped default always does)."""
    comp = load_component(default_model_dir() if path is None else path, "vae")
    try:
        config = VAEConfig.from_dict(comp.config)
    except (TypeError, ValueError) as e:
        raise KinoUserError(f"{comp.folder / 'config.json'} is not a valid VAE config: {e}") from None
    model = VideoVAE(config)
    try:
        model.load_state_dict(comp.state_dict, strict=True)
    except RuntimeError as e:
        raise KinoUserError(f"{comp.folder} holds weights that do not fit its config: {e}") from None
    return model.to(device).eval().requires_grad_(False)
