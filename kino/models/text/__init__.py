"""Frozen text encoders: prompts in, (tokens, mask) out."""

from kino.models.text.encoder import MiniLMEncoder, TextEncoder, minilm_folder

__all__ = ["MiniLMEncoder", "TextEncoder", "minilm_folder"]
