"""Grow a trained DiT into a larger one that computes exactly what it computed.

    grown = grow(dit, DIT_SIZES["small-abspos-12"])   # 8 -> 12 blocks, the same function

Two ways are supported, alone or together:

- **Absolute positions** (`abs_pos_embed`): the new position layer starts at zero, so it adds
  nothing until it trains.
- **Depth** (`num_layers`): new blocks are spread evenly between the old ones. A block adds
  its self-attention, cross-attention and feed-forward outputs to the residual stream, each
  through its own output projection (`self_attn.o`, `cross_attn.o`, `ffn[2]`); with those
  three zero, a new block is the identity, so the deeper model starts as the trained one.
  Its other weights are drawn as a fresh DiT draws them, so the new blocks train from the
  first step that moves their output projections off zero (their gradient is not zero: it
  is the block's input activations times the loss's gradient). Depth is where a small
  model's capacity is cheapest to add on a CPU: width would need the Net2Wider copies and
  noise of `kino.models.vae.grow`, and costs attention and every matmul quadratically.

Everything else (widths, heads, text width, the image branch) must match: those would change
what the trained weights mean.
"""

from __future__ import annotations

import dataclasses

import torch

from kino.models.dit.model import DiT, DiTConfig


def can_grow(found: DiTConfig, wanted: DiTConfig) -> bool:
    """Whether a DiT of `found` grows into one of `wanted` (`grow`): the same but for an
    absolute-position layer it lacks and/or more blocks. Equal configs grow trivially."""
    if found.abs_pos_embed and not wanted.abs_pos_embed or wanted.num_layers < found.num_layers:
        return False
    return dataclasses.replace(found, abs_pos_embed=wanted.abs_pos_embed, num_layers=wanted.num_layers) == wanted


def new_block_slots(old: int, new: int) -> list[int]:
    """For each block of the grown model, the index of the old block it copies, or -1 for a
    new (identity) block; the new ones spread evenly, each after the old block it follows."""
    added = new - old
    if added < 0 or old < 1:
        raise ValueError(f"a DiT of {old} blocks cannot grow to {new}")
    # new block j goes after old block ceil((j + 1) * old / added) - 1: evenly, the last at the end
    after = [-(-(j + 1) * old // added) - 1 for j in range(added)]
    slots = []
    for i in range(old):
        slots.append(i)
        slots.extend([-1] * after.count(i))
    return slots


def grow(model: DiT, wanted: DiTConfig) -> DiT:
    """A DiT of `wanted` computing what `model` computes (module doc); `model` is not changed."""
    if not can_grow(model.config, wanted):
        want = wanted.to_dict()
        diff = {k: (v, want[k]) for k, v in model.config.to_dict().items() if want[k] != v}
        raise ValueError(f"a DiT grows only an absolute-position layer and more blocks; these differ "
                         f"(has, wanted): {diff}")
    grown = DiT(wanted).to(next(model.parameters()).device)
    old_state = model.state_dict()
    state = grown.state_dict()
    for key, value in old_state.items():
        if not key.startswith("blocks."):
            state[key] = value
    for i, src in enumerate(new_block_slots(model.config.num_layers, wanted.num_layers)):
        prefix = f"blocks.{i}."
        if src >= 0:
            for key, value in old_state.items():
                if key.startswith(f"blocks.{src}."):
                    state[prefix + key[len(f"blocks.{src}."):]] = value
        else:
            for name in ("self_attn.o", "cross_attn.o", "ffn.2"):
                for part in ("weight", "bias"):
                    state[f"{prefix}{name}.{part}"] = torch.zeros_like(state[f"{prefix}{name}.{part}"])
    grown.load_state_dict(state)
    return grown.train(model.training)

