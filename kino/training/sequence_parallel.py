"""Ulysses sequence parallelism: one clip's tokens split across the ranks of a group.

The DiT's tokens (B, F*S, D) are in (frame, spatial) order, S = h*w tokens per frame. Each
of the P ranks of a sequence-parallel group keeps the same slice of S/P spatial tokens of
every frame, (B, F*S/P, D): the per-frame AdaLN modulation (`modulate`, `gate`, the head)
then needs no change, because each local frame still holds a whole number of tokens.

In self-attention, one all-to-all turns (B, F*S/P, H, Dh) tokens with every head into
(B, F*S, H/P, Dh): the whole sequence for H/P heads. Each rank attends with its heads, and
the reverse all-to-all brings each rank its own tokens back with every head. The gathered
sequence is rank-major (rank 0's tokens, then rank 1's) rather than (t, h, w) order, which
full attention does not care about: RoPE has already rotated q and k by their global
positions before the exchange, and no mask depends on order. Cross-attention needs no
exchange: every rank holds the whole text. The head runs on the local tokens, and its
outputs are gathered into the full (B, F*S, C) at the end.

Gradients: every rank of the group computes the same loss from the same gathered output,
so the backward of the gather is each rank's own slice of the output's gradient (not a sum
over ranks), and the all-to-alls carry the gradient of each token back to the rank that
computed it. Summed over the group, the ranks' parameter gradients are those of the whole
clip on one device; the trainer scales the loss by P before backward so that FSDP2's average
over all ranks keeps that sum over the sequence ranks (kino/training/distributed.py).

The exchanges are `all_to_all_single` and an all-gather, which NCCL and gloo both provide;
the tests run them on gloo with two CPU processes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from kino.errors import KinoUserError

Rope = tuple[Tensor, Tensor]


def _all_to_all(x: Tensor, group) -> Tensor:
    """Exchange dim-0 chunks: chunk j of x goes to rank j; chunk i of the result came from rank i."""
    x = x.contiguous()
    out = torch.empty_like(x)  # after .contiguous(): empty_like would copy a permuted input's strides
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x: Tensor, group, world: int) -> Tensor:
    """(B, Ll, H, Dh) local tokens, every head -> (B, P*Ll, H/P, Dh) every token, this rank's heads."""
    chunks = x.unflatten(2, (world, -1)).permute(2, 0, 1, 3, 4)  # (P, B, Ll, H/P, Dh): chunk j -> rank j
    received = _all_to_all(chunks, group)  # (P, B, Ll, H/P, Dh): chunk i = rank i's tokens
    return received.permute(1, 0, 2, 3, 4).flatten(1, 2)  # (B, P*Ll, H/P, Dh)


def _heads_to_seq(x: Tensor, group, world: int) -> Tensor:
    """The inverse of `_seq_to_heads`: (B, P*Ll, H/P, Dh) -> (B, Ll, H, Dh)."""
    chunks = x.unflatten(1, (world, -1)).permute(1, 0, 2, 3, 4)  # (P, B, Ll, H/P, Dh): chunk j = rank j's tokens
    received = _all_to_all(chunks, group)  # (P, B, Ll, H/P, Dh): chunk i = heads of rank i
    return received.permute(1, 2, 0, 3, 4).flatten(2, 3)  # (B, Ll, H, Dh)


# torch >= 2.13 renamed all_gather_into_tensor (same semantics); older releases have only the old name
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _SeqToHeads(torch.autograd.Function):
    # An all-to-all is a permutation of data across ranks; its adjoint is the inverse permutation.
    @staticmethod
    def forward(ctx, x: Tensor, group, world: int) -> Tensor:
        ctx.group, ctx.world = group, world
        return _seq_to_heads(x, group, world)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _heads_to_seq(grad, ctx.group, ctx.world), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group, world: int) -> Tensor:
        ctx.group, ctx.world = group, world
        return _heads_to_seq(x, group, world)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _seq_to_heads(grad, ctx.group, ctx.world), None, None


class _GatherSpatial(torch.autograd.Function):
    """(B, F, S/P, C) per rank -> (B, F, S, C) on every rank; backward: this rank's slice (see module doc)."""

    @staticmethod
    def forward(ctx, x: Tensor, group, world: int, rank: int) -> Tensor:
        ctx.rank, ctx.local = rank, x.shape[2]
        # dim-0 concatenation (P*B, ...): the layout every backend (gloo included) accepts
        parts = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather(parts, x.contiguous(), group=group)
        parts = parts.unflatten(0, (world, -1))  # (P, B, F, S/P, C)
        return parts.permute(1, 2, 0, 3, 4).flatten(2, 3)  # (B, F, S, C), rank r's slice at [r*S/P, (r+1)*S/P)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.narrow(2, ctx.rank * ctx.local, ctx.local), None, None, None


class UlyssesSequenceParallel:
    """What `parallelize` hands the DiT: shard tokens and RoPE, attend across ranks, gather.

    `group` is the sequence-parallel process group (P ranks holding the same clips).
    """

    def __init__(self, group) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def _check(self, grid: tuple[int, int, int]) -> int:
        spatial = grid[1] * grid[2]
        if spatial % self.world:
            raise KinoUserError(
                f"sequence parallelism over {self.world} ranks splits each latent frame's {grid[1]}x{grid[2]} = "
                f"{spatial} tokens evenly; {spatial} is not divisible by {self.world}"
            )
        return spatial // self.world

    def shard(self, tokens: Tensor, rope: Rope, grid: tuple[int, int, int]) -> tuple[Tensor, Rope]:
        """This rank's tokens (B, F*S/P, D) of (B, F*S, D), and RoPE tables for their global positions."""
        local = self._check(grid)
        start = self.rank * local

        def take(u: Tensor) -> Tensor:  # (..., F*S, X) -> (..., F*S/P, X)
            return u.unflatten(-2, (grid[0], -1)).narrow(-2, start, local).flatten(-3, -2)

        return take(tokens), (take(rope[0]), take(rope[1]))

    def gather(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """(B, F*S/P, C) local outputs -> (B, F*S, C) in (t, h, w) order, on every rank of the group."""
        self._check(grid)
        full = _GatherSpatial.apply(x.unflatten(1, (grid[0], -1)), self.group, self.world, self.rank)
        return full.flatten(1, 2)  # (B, F*S, C)

    def attention(self, attend, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Self-attention of the group's whole sequence: q, k, v (B, Ll, H, Dh) local -> (B, Ll, H, Dh)."""
        if q.shape[2] % self.world:
            raise KinoUserError(f"sequence parallelism over {self.world} ranks needs the head count "
                                f"{q.shape[2]} to be divisible by {self.world}")
        if mask is not None:
            raise ValueError("sequence-parallel self-attention takes no key mask")
        q, k, v = (_SeqToHeads.apply(u, self.group, self.world) for u in (q, k, v))  # (B, L, H/P, Dh)
        out = attend(q, k, v, None)  # (B, L, H/P, Dh)
        return _HeadsToSeq.apply(out, self.group, self.world)  # (B, Ll, H, Dh)
