"""First-block caching: skip most of the DiT on sampling steps where little changes.

Between neighbouring sampling steps the DiT's input changes little, and so does what its
blocks add to it. `FirstBlockCache` (the idea of ParaAttention's first-block cache, a
relative of TeaCache) runs the first block on every call and compares what that block adds
(its residual) with the residual it added at the last call that ran every block. While the
relative L1 distance, mean |r - r_ref| / mean |r_ref|, stays under `threshold`, the other
blocks are skipped and the residual they added at that last full call is added instead;
the head then runs on the result with this step's own timestep modulation. The distance is
always measured against the last full call, so small changes add up until a full call comes.

This is an approximation that trades quality for speed: threshold 0 is off (nothing is
installed and the DiT runs exactly as without), larger thresholds skip more. The cache keeps
one entry per kind of call: input shape, skipped blocks (skip-layer guidance) and text (so
the conditional, the unconditional and a batch of both never reuse each other's residuals).
Under sequence parallelism the distance is reduced over the ranks, so every rank decides the
same. One cache serves one sampling run (`sample_latents` installs a fresh one).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class FirstBlockCache:
    def __init__(self, threshold: float) -> None:
        if not threshold >= 0.0:
            raise ValueError(f"cache threshold must be >= 0, got {threshold}")
        self.threshold = float(threshold)
        # key -> [(text, first residual, rest residual)], one per text seen with that key
        self.entries: dict[tuple, list[tuple[Tensor, Tensor, Tensor]]] = {}
        self.calls = 0  # DiT calls that went through the cache
        self.reused = 0  # of which skipped every block after the first

    def _distance(self, residual: Tensor, reference: Tensor, group) -> float:
        sums = torch.stack([(residual - reference).abs().sum(), reference.abs().sum()]).double()
        if group is not None:
            dist.all_reduce(sums, group=group)  # every rank holds part of the tokens
        return float(sums[0] / sums[1].clamp_min(1e-30))

    def run(self, blocks, tokens: Tensor, block_args: tuple, key: tuple, text: Tensor, group=None) -> Tensor:
        """tokens through `blocks` (at least two), the later ones replaced by their cached
        residual when the first block's residual is close enough to the last full call's."""
        self.calls += 1
        first = blocks[0](tokens, *block_args)
        residual = first - tokens
        same = self.entries.setdefault(key, [])
        k = next((k for k, entry in enumerate(same) if torch.equal(entry[0], text)), None)
        if k is not None and self._distance(residual, same[k][1], group) < self.threshold:
            self.reused += 1
            return first + same[k][2]
        out = first
        for block in blocks[1:]:
            out = block(out, *block_args)
        entry = (text, residual, out - first)
        if k is None:
            same.append(entry)
        else:
            same[k] = entry
        return out
