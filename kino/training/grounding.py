"""Grounding loss: each object's words attended from its own pixels (an experiment).

Two-object Shapes World clips fail on binding: the shipped DiT draws the named colours and
motions but hands an object the other object's direction as often as its own (BENCHMARKS.md,
"Two objects: attribute binding"). Its flow-matching loss barely charges for that (swapping the
motion words between the objects costs ~1% of it), so the binding is learnt slowly if at all.
This loss charges for it directly, after TokenCompose (Wang et al. 2024), which adds a
token-level grounding loss on a text-to-image model's cross-attention maps: in the
cross-attention of the chosen blocks (averaged over heads), of the attention a video token pays
to the two objects' phrases ("a large red circle moving left" and "a small blue square moving
up"), the share paid to the phrase of the object whose pixels the token covers should be 1.

    loss = - sum_tokens sum_k cover_k log(share_k) / sum_tokens sum_k cover_k

`cover_k` is the fraction of the token's pixels (over the frames of its latent frames) inside
object k, rendered from the clip's scene, which a world cache records by index. Only
two-object clips that kept their caption (not dropped for guidance) count. The attention
probabilities are recomputed from each block's cross-attention projections in a forward hook
(the model's own attention stays one fused SDPA call), so gradients flow into the same q and k
weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from kino.errors import KinoUserError
from kino.world.captions import parse_caption
from kino.world.generator import Scene, shape_masks, trajectory

OBJECTS = 2  # a Shapes World scene has at most two objects


@dataclass
class GroundingConfig:
    """`[grounding]`: the weight of the grounding loss beside the flow-matching loss (0: off),
    and the DiT blocks whose cross-attention it reads (empty: every block)."""

    weight: float = 0.0
    blocks: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not (self.weight >= 0 and math.isfinite(self.weight)):
            raise KinoUserError(f"grounding.weight must be a finite number >= 0, got {self.weight}")
        if any(b < 0 for b in self.blocks) or len(set(self.blocks)) != len(self.blocks):
            raise KinoUserError(f"grounding.blocks must be distinct block indices >= 0, got {self.blocks}")


def phrase_masks(tokenizer, captions: list[str], max_length: int) -> Tensor:
    """(B, 2, L) bool: the text tokens of each object's phrase, for captions tokenized as the
    text encoder does (padding to `max_length`); all False for a one-object caption."""
    tok = tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_length,
                    return_offsets_mapping=True)
    out = torch.zeros(len(captions), OBJECTS, max_length, dtype=torch.bool)
    for i, (text, offsets) in enumerate(zip(captions, tok["offset_mapping"])):
        objects = parse_caption(text).objects
        if len(objects) != OBJECTS:
            continue
        start = 0
        for k, obj in enumerate(objects):
            start = text.index(obj.phrase(), start)
            end = start + len(obj.phrase())
            for j, (a, b) in enumerate(offsets):
                out[i, k, j] = b > a and start <= a and b <= end
            start = end
    return out


def object_cover(scene: Scene, grid: tuple[int, int, int], time_stride: int) -> Tensor:
    """(2, T', h', w') float: the share of each token's pixels inside each object, for a DiT token
    grid (T', h', w') over the clip's latents (latent frame 0 is pixel frame 0, latent frame j
    the `time_stride` frames before and at time_stride * j; a token may span several latent
    frames). Zeros for a missing second object."""
    F, H, W = scene.frames, scene.height, scene.width
    tt, gh, gw = grid
    latent_frames = 1 + (F - 1) // time_stride
    if latent_frames % tt or H % gh or W % gw:
        raise ValueError(f"a {F}x{H}x{W} clip does not split into a {tt}x{gh}x{gw} token grid")
    out = torch.zeros(OBJECTS, tt, gh, gw)
    for k, (obj, center) in enumerate(zip(scene.caption.objects, scene.centers)):
        cx, cy, side = trajectory(obj, center, F, H, W)
        mask = shape_masks(obj.shape, cx, cy, side, H, W).astype(np.float32)  # (F, H, W)
        per_latent = np.concatenate([mask[:1], mask[1:].reshape(latent_frames - 1, time_stride, H, W).mean(1)])
        pooled = per_latent.reshape(tt, latent_frames // tt, gh, H // gh, gw, W // gw).mean(axis=(1, 3, 5))
        out[k] = torch.from_numpy(pooled)
    return out


class CrossAttentionRecorder:
    """While open, records the head-averaged text attention probabilities (B, Lq, Lk) of the
    chosen blocks' cross-attention, recomputed from their own projections."""

    def __init__(self, model: torch.nn.Module, blocks: list[int]):
        all_blocks = list(model.blocks)
        bad = [b for b in blocks if b >= len(all_blocks)]
        if bad:
            raise KinoUserError(f"grounding.blocks {bad} do not exist: the DiT has {len(all_blocks)} blocks")
        self.modules = [all_blocks[b].cross_attn for b in (blocks or range(len(all_blocks)))]
        self.probs: list[Tensor] = []
        self.handles = []

    def __enter__(self) -> CrossAttentionRecorder:
        self.handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, module, args, kwargs, output) -> None:
        x, context = args[0], args[1] if len(args) > 1 else kwargs["context"]
        mask = args[2] if len(args) > 2 else kwargs.get("context_mask")
        heads = module.num_heads
        q = module.norm_q(module.q(x)).unflatten(-1, (heads, -1)).float()  # (B, Lq, H, Dh)
        k = module.norm_k(module.k(context)).unflatten(-1, (heads, -1)).float()  # (B, Lk, H, Dh)
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        if mask is not None:  # finite, so a prompt with no real token (the empty one) gives no NaN
            logits = logits.masked_fill(~mask[:, None, None, :], torch.finfo(logits.dtype).min)
        self.probs.append(logits.softmax(-1).mean(1))  # (B, Lq, Lk)


def grounding_loss(probs: list[Tensor], phrases: Tensor, cover: Tensor, eps: float = 1e-6) -> Tensor:
    """The loss above from recorded attention `probs` (each (B, Lq, Lk)), phrase masks (B, 2, Lk)
    and token cover (B, 2, Lq); 0 (with a gradient path) where no token covers an object."""
    total = cover.sum()
    loss = probs[0].new_zeros(())
    for p in probs:
        mass = torch.einsum("bqk,bnk->bqn", p, phrases.to(p.dtype))  # (B, Lq, 2)
        share = mass / (mass.sum(-1, keepdim=True) + eps)
        loss = loss - (cover.transpose(1, 2) * torch.log(share + eps)).sum()
    return loss / (len(probs) * total.clamp(min=1e-6))
