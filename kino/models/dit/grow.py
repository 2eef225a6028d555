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
import math

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



# ---------------------------------------------------------------------------- another VAE's latents


def latent_tokens(z: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """Latents (B, C, T, H, W) -> (tokens, C*pt*ph*pw), each token's values in the order the
    patch embedding's kernel reads them: channel, then time, height, width inside the patch."""
    pt, ph, pw = patch
    b, c, t, h, w = z.shape
    z = z.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
    return z.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(-1, c * pt * ph * pw)


def fit_latent_map(source: torch.Tensor, target: torch.Tensor, ridge: float = 1e-3
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares (with a small ridge on the weights) for target ~ A @ source + a over paired
    token rows (N, K_source), (N, K_target): returns A (K_target, K_source) and a (K_target,)."""
    if source.shape[0] != target.shape[0]:
        raise ValueError(f"paired rows needed; got {source.shape[0]} and {target.shape[0]}")
    s_mean, t_mean = source.mean(0), target.mean(0)
    s, t = (source - s_mean).double(), (target - t_mean).double()
    gram = s.T @ s + ridge * s.shape[0] * torch.eye(s.shape[1], dtype=s.dtype)
    weight = torch.linalg.solve(gram, s.T @ t).T.to(source.dtype)  # (K_target, K_source)
    return weight, t_mean - weight @ s_mean


def change_latents(model: DiT, wanted: DiTConfig, to_old: tuple[torch.Tensor, torch.Tensor],
                   to_new: tuple[torch.Tensor, torch.Tensor]) -> DiT:
    """A DiT of `wanted` that reads and writes another VAE's latents, started from `model`.

    Only the patch size and the latent channels may differ, and one new token must cover the
    pixels one old token covered (the caller's VAEs: old stride x old patch = new stride x new
    patch), so positions, text and every block keep their meaning. The two latent spaces are
    related by linear maps fitted on paired latents of the same clips (`fit_latent_map` over
    `latent_tokens` rows, patch-embedding order): `to_old` = (A, a), an old token ~ A @ new + a,
    and `to_new` = (B, b), a new token ~ B @ old + b. The new patch embedding is the old one
    after A (so it embeds a new-latent token as the old one embedded its image under A), and the
    new head is B after the old head, less b (a velocity is noise minus data, so the data's
    offset enters negated). The start is approximate, as the maps are and as noise drawn in the
    new space is not the old noise under A; training from it keeps what the blocks learned."""
    diff = config_diff(model.config, wanted)
    if set(diff) - {"patch_size", "in_channels", "out_channels"}:
        raise ValueError(f"change_latents changes only patch_size and the latent channels; these differ too "
                         f"(has, wanted): {diff}")
    (a_w, a_b), (b_w, b_b) = to_old, to_new
    old_k, new_k = (c.in_channels * math.prod(c.patch_size) for c in (model.config, wanted))
    old_out, new_out = (c.out_channels * math.prod(c.patch_size) for c in (model.config, wanted))
    if a_w.shape != (old_k, new_k) or a_b.shape != (old_k,) or b_w.shape != (new_out, old_out) \
            or b_b.shape != (new_out,):
        raise ValueError(f"maps of the wrong shape: to_old needs ({old_k}, {new_k}) and ({old_k},), to_new "
                         f"({new_out}, {old_out}) and ({new_out},); got {tuple(a_w.shape)}, {tuple(a_b.shape)}, "
                         f"{tuple(b_w.shape)}, {tuple(b_b.shape)}")
    changed = DiT(wanted).to(next(model.parameters()).device)
    state = dict(model.state_dict())
    kernel = state["patch_embedding.weight"].flatten(1)  # (D, old_k), kernel order
    state["patch_embedding.weight"] = (kernel @ a_w).reshape(changed.patch_embedding.weight.shape)
    state["patch_embedding.bias"] = state["patch_embedding.bias"] + kernel @ a_b
    # head rows are per token (pt, ph, pw, C), the kernel's order is (C, pt, ph, pw): reorder B
    b_w, b_b = _head_order(b_w, b_b, model.config, wanted)
    state["head.head.weight"] = b_w @ state["head.head.weight"]
    state["head.head.bias"] = b_w @ state["head.head.bias"] - b_b
    changed.load_state_dict(state)
    return changed.train(model.training)


def _head_order(weight: torch.Tensor, bias: torch.Tensor, old: DiTConfig, new: DiTConfig
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A map between kernel-ordered tokens (C, pt, ph, pw) as one between head-ordered ones."""
    def order(c: DiTConfig) -> torch.Tensor:  # head position -> kernel position
        return torch.arange(c.out_channels * math.prod(c.patch_size)).reshape(
            c.out_channels, *c.patch_size).permute(1, 2, 3, 0).flatten()
    rows, cols = order(new), order(old)
    return weight[rows][:, cols], bias[rows]
