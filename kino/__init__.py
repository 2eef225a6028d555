"""kino: Sora-class video generation: a causal video VAE, a diffusion transformer
over spacetime latent patches, flow matching, and an embedded default model."""

__version__ = "0.1.0"
