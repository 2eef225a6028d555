"""Shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this folder is on sys.path)."""

from __future__ import annotations

import statistics
import time


def proc_status_kib(field: str) -> int:
    """A memory field of /proc/self/status (e.g. VmRSS, VmHWM) in KiB; 0 where there is none."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def median_time(fn, repeats: int) -> float:
    """Median wall time in seconds of `repeats` calls of fn, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def wan_peer(dit):
    """diffusers' WanTransformer3DModel (the peer) built with `dit`'s size and loaded with its
    weights, in eval mode on the CPU in fp32. kino's absolute-position layer (abs_pos_embed)
    has no diffusers counterpart: the peer runs without it, so kino's time includes that extra
    (small) work."""
    from diffusers import WanTransformer3DModel, WanVACETransformer3DModel

    from kino.models.dit.adapters import to_diffusers

    c = dit.config
    kind, vace = WanTransformer3DModel, {}
    if c.vace_layers:  # a VACE DiT: diffusers' VACE class
        kind, vace = WanVACETransformer3DModel, {"vace_layers": list(c.vace_layers),
                                                 "vace_in_channels": c.vace_in_channels}
    peer = kind(
        patch_size=c.patch_size, num_attention_heads=c.num_heads, attention_head_dim=c.head_dim,
        in_channels=c.in_channels, out_channels=c.out_channels, text_dim=c.text_dim, freq_dim=c.freq_dim,
        ffn_dim=c.ffn_dim, num_layers=c.num_layers, cross_attn_norm=c.cross_attn_norm,
        qk_norm="rms_norm_across_heads", eps=c.eps, rope_max_seq_len=c.rope_max_len, **vace).eval()
    state = {k: v for k, v in dit.state_dict().items() if not k.startswith("pos_embedding.")}
    missing, unexpected = peer.load_state_dict(to_diffusers(state), strict=False)
    if unexpected or any("rope" not in k for k in missing):
        raise RuntimeError(f"weights do not map onto diffusers' Wan DiT: {missing[:4]} {unexpected[:4]}")
    return peer
