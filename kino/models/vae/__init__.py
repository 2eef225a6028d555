"""Causal 3D convolutional video VAE (Wan2.1 family: time x4, space x8, 16 latent channels; Wan2.2's
layout: space x16, 48 channels)."""

from kino.models.vae.adapters import (config_from_diffusers, config_from_wan, from_diffusers, from_wan, to_diffusers,
                                     to_wan)
from kino.models.vae.model import (
    VAE_SIZES,
    CausalCache,
    TileConfig,
    VAEConfig,
    VAEInputError,
    VideoVAE,
)

__all__ = [
    "VAE_SIZES",
    "CausalCache",
    "TileConfig",
    "VAEConfig",
    "VAEInputError",
    "VideoVAE",
    "config_from_diffusers",
    "from_diffusers",
    "to_diffusers",
    "config_from_wan",
    "from_wan",
    "to_wan",
]
