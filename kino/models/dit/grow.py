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

- **Finer patches** (`patch_size`, each axis dividing the old one; `rope_scale` must shrink
  by the same factor): every old token becomes k = kt * kh * kw tokens, one per sub-patch.
  This one is *not* exact, but close: the new patch embedding is the old kernel summed over
  its k sub-patches, so a latent that is constant over each old patch embeds every sub-token
  as its old token; `rope_scale` keeps neighbouring old tokens as far apart as before; and
  self-attention over k equal copies of each key gives what it gave over one. The new head
  predicts each sub-patch as the mean of the old head's k sub-patch outputs (a sub-token
  cannot know which of the k it is until it trains), so the regrown model starts as the old
  one's prediction averaged over each old patch, then learns the detail inside it. Smaller
  patches cost k times the tokens (more in attention): it is the lever for a world whose
  frames are only 8x8 latents, where a 2x2 patch is a quarter of a 64-pixel frame's width.

Everything else (widths, heads, text width, the image branch) must match: those would change
what the trained weights mean.
"""

from __future__ import annotations

import dataclasses

import torch

from kino.models.dit.model import DiT, DiTConfig


def config_diff(found: DiTConfig, wanted: DiTConfig) -> dict[str, tuple]:
    """{field: (found's, wanted's)} for every field where the two configs differ."""
    return {f.name: (getattr(found, f.name), getattr(wanted, f.name)) for f in dataclasses.fields(DiTConfig)
            if getattr(found, f.name) != getattr(wanted, f.name)}


def patch_factors(found: DiTConfig, wanted: DiTConfig) -> tuple[int, int, int] | None:
    """Per axis, how many of `wanted`'s patches make one of `found`'s, when `wanted`'s patches
    divide `found`'s and its RoPE positions shrink by the same factors; None otherwise."""
    factors = []
    for old, new, old_scale, new_scale in zip(found.patch_size, wanted.patch_size, found.rope_scale,
                                              wanted.rope_scale):
        if old % new or abs(new_scale * (old // new) - old_scale) > 1e-9:
            return None
        factors.append(old // new)
    return tuple(factors)


def can_grow(found: DiTConfig, wanted: DiTConfig) -> bool:
    """Whether a DiT of `found` grows into one of `wanted` (`grow`): the same but for an
    absolute-position layer it lacks, more blocks and/or finer patches. Equal configs grow
    trivially."""
    if found.abs_pos_embed and not wanted.abs_pos_embed or wanted.num_layers < found.num_layers:
        return False
    if patch_factors(found, wanted) is None:
        return False
    return dataclasses.replace(found, abs_pos_embed=wanted.abs_pos_embed, num_layers=wanted.num_layers,
                               patch_size=wanted.patch_size, rope_scale=wanted.rope_scale) == wanted


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


def finer_patches(state: dict[str, torch.Tensor], old: DiTConfig, factors: tuple[int, int, int]
                  ) -> dict[str, torch.Tensor]:
    """`state`'s patch embedding and head for patches `factors` times smaller (module doc):
    the kernel summed over its sub-patches, the head averaged over them."""
    if factors == (1, 1, 1):
        return state
    kt, kh, kw = factors
    pt, ph, pw = (p // k for p, k in zip(old.patch_size, factors))
    state = dict(state)
    kernel = state["patch_embedding.weight"]  # (D, C, kt*pt, kh*ph, kw*pw)
    kernel = kernel.unflatten(2, (kt, pt)).unflatten(4, (kh, ph)).unflatten(6, (kw, pw))
    # (D, C, kt, pt, kh, ph, kw, pw)
    state["patch_embedding.weight"] = kernel.sum(dim=(2, 4, 6)).contiguous()
    for part in ("weight", "bias"):  # rows ordered (pt, ph, pw, C) per token, as unpatchify reads them
        value = state[f"head.head.{part}"]
        rows = value.unflatten(0, (kt, pt, kh, ph, kw, pw, old.out_channels))
        state[f"head.head.{part}"] = rows.mean(dim=(0, 2, 4)).flatten(0, 3).contiguous()
    return state


def grow(model: DiT, wanted: DiTConfig) -> DiT:
    """A DiT of `wanted` computing what `model` computes, exactly for an absolute-position
    layer and depth, approximately for finer patches (module doc); `model` is not changed."""
    if not can_grow(model.config, wanted):
        raise ValueError(f"a DiT grows only an absolute-position layer, more blocks and finer patches (with "
                         f"rope_scale shrunk alike); these differ (has, wanted): {config_diff(model.config, wanted)}")
    grown = DiT(wanted).to(next(model.parameters()).device)
    old_state = finer_patches(model.state_dict(), model.config, patch_factors(model.config, wanted))
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

