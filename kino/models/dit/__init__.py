"""Diffusion transformer over spacetime latent patches (Wan2.1 DiT family): 3D RoPE, per-frame timesteps."""

from kino.models.dit.adapters import (config_from_diffusers, config_from_wan, config_to_diffusers, config_to_wan,
                                     from_diffusers, from_wan, to_diffusers, to_wan)
from kino.models.dit.model import DIT_SIZES, DiT, DiTConfig, DiTInputError, attention

__all__ = [
    "DIT_SIZES",
    "DiT",
    "DiTConfig",
    "DiTInputError",
    "attention",
    "config_from_diffusers",
    "config_to_diffusers",
    "from_diffusers",
    "to_diffusers",
    "config_from_wan",
    "config_to_wan",
    "from_wan",
    "to_wan",
]
