"""Frozen text encoders: prompts in, (tokens, mask) out."""

from kino.models.text.encoder import (MiniLMEncoder, TextEncoder, load_text_encoder, minilm_folder,
                                      text_encoder_config)

__all__ = ["MiniLMEncoder", "TextEncoder", "load_text_encoder", "minilm_folder", "text_encoder_config"]
