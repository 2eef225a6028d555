"""K-quant writers: float matrices -> GGUF Q6_K, Q5_K, Q4_K, Q3_K and Q2_K blocks, in torch.

The `gguf` package quantizes only the 32-element types (Q8_0, Q5_x, Q4_x); the K-quants most
published Wan DiTs use (Q4_K_M, Q5_K_M, Q6_K files) need llama.cpp's C tools. kino writes
them itself: the block layouts are ggml's (the same ones kino/models/gguf.py reads and
tests/test_gguf.py checks against the gguf package's reference dequantizers), the choice of
scales is kino's own:

- every sub-block (16 or 32 values) gets a scale (and, for the asymmetric types, a minimum),
  chosen among candidate grids by the least-squares error of its rounded values, each
  candidate's scale and minimum refitted in closed form to its rounded integers;
- the sub-blocks' scales (and minimums) are then stored as 4-, 6- or 8-bit multiples of the
  super-block's float16 scales, and the values are rounded again against those stored scales.

Rows are quantized in chunks, so a 14B DiT's largest matrix needs a few hundred MB at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor

QK_K = 256
CHUNK = 1 << 22  # values quantized at a time


def _f16_bytes(x: Tensor) -> Tensor:
    """(n,) float -> (n, 2) little-endian float16 bytes."""
    return x.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _pack(fields: Tensor, width: int) -> Tensor:
    """(..., count, k) fields of `width` bits -> (..., k) bytes, field i at bits [i*width, (i+1)*width)."""
    shifts = torch.arange(0, width * fields.shape[-2], width, dtype=torch.int32).view(-1, 1)
    return (fields.to(torch.int32) << shifts).sum(-2).to(torch.uint8)


def _fit(x: Tensor, nmax: int, asymmetric: bool, steps: int = 9) -> tuple[Tensor, Tensor]:
    """Per row of x (m, k): the scale a and offset b (b <= 0; 0 when symmetric) of
    x ~ a * q + b with integer q in [0, nmax] (symmetric: q in [-(nmax+1)/2, (nmax-1)/2]),
    the best of `steps` candidate ranges, each refitted by least squares to its rounding."""
    if asymmetric:
        lo, hi = x.min(-1).values.clamp(max=0), x.max(-1).values
        best_err = torch.full_like(lo, float("inf"))
        best_a, best_b = (hi - lo) / nmax, lo
        for shrink in torch.linspace(0.7, 1.0, steps).tolist():
            a = ((hi - lo) * shrink / nmax).clamp(min=1e-12)
            b = lo * shrink
            q = ((x - b[:, None]) / a[:, None]).round().clamp(0, nmax)
            # least squares of x = a q + b given q, then b clamped to <= 0 (ggml stores -min >= 0)
            n = x.shape[-1]
            sq, sx, sqq, sqx = q.sum(-1), x.sum(-1), (q * q).sum(-1), (q * x).sum(-1)
            den = n * sqq - sq * sq
            a2 = torch.where(den > 0, (n * sqx - sq * sx) / den.clamp(min=1e-20), a)
            b2 = ((sx - a2 * sq) / n).clamp(max=0)
            a2 = torch.where(sqq > 0, (sqx - b2 * sq) / sqq.clamp(min=1e-20), a2).clamp(min=0)
            err = ((a2[:, None] * q + b2[:, None] - x) ** 2).sum(-1)
            better = err < best_err
            best_err, best_a, best_b = torch.where(better, err, best_err), torch.where(better, a2, best_a), \
                torch.where(better, b2, best_b)
        return best_a, best_b
    half = (nmax + 1) // 2  # q in [-half, half - 1]
    amax = x.abs().max(-1).values
    best_err = torch.full_like(amax, float("inf"))
    best_a = amax / half
    for shrink in torch.linspace(0.8, 1.1, steps).tolist():
        a = (amax * shrink / half).clamp(min=1e-12)
        q = (x / a[:, None]).round().clamp(-half, half - 1)
        sqq = (q * q).sum(-1)
        a2 = torch.where(sqq > 0, (q * x).sum(-1) / sqq.clamp(min=1e-20), a)
        err = ((a2[:, None] * q - x) ** 2).sum(-1)
        better = err < best_err
        best_err, best_a = torch.where(better, err, best_err), torch.where(better, a2, best_a)
    return best_a, torch.zeros_like(best_a)


def _super(values: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Per super-block (n, s) non-negative sub-block values -> float16 super scale (n,) and
    the sub-blocks' `bits`-bit integer multiples of it (n, s)."""
    top = (1 << bits) - 1
    d = (values.max(-1).values / top).to(torch.float16).float()
    ints = torch.where(d[:, None] > 0, values / d[:, None].clamp(min=1e-30), torch.zeros_like(values))
    return d, ints.round().clamp(0, top)


def _k_asymmetric(x: Tensor, sub: int, qbits: int, sbits: int) -> tuple[Tensor, ...]:
    """Shared by Q2_K / Q4_K / Q5_K: x (n, 256) -> d, dmin (n,), scale and min integers
    (n, 256 / sub), q (n, 256) in [0, 2^qbits)."""
    n = x.shape[0]
    nmax = (1 << qbits) - 1
    a, b = _fit(x.reshape(-1, sub), nmax, asymmetric=True)
    d, sc = _super(a.reshape(n, -1), sbits)
    dmin, mn = _super(-b.reshape(n, -1), sbits)
    scale = (d[:, None] * sc).repeat_interleave(sub, dim=1)
    offset = (dmin[:, None] * mn).repeat_interleave(sub, dim=1)
    q = torch.where(scale > 0, (x + offset) / scale.clamp(min=1e-30), torch.zeros_like(x)).round().clamp(0, nmax)
    return d, dmin, sc, mn, q


def _k_scales_bytes(sc: Tensor, mn: Tensor) -> Tensor:
    """Q4_K / Q5_K: eight 6-bit scales and mins (n, 8) -> 12 bytes (the reader's `_k_scales`)."""
    sc, mn = sc.to(torch.int32), mn.to(torch.int32)
    a = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    m = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return torch.cat([a, m, hi], dim=1).to(torch.uint8)


def _q4_k(x: Tensor) -> Tensor:
    n = x.shape[0]
    d, dmin, sc, mn, q = _k_asymmetric(x, 32, 4, 6)
    qs = _pack(q.reshape(n, 4, 2, 32), 4).reshape(n, 128)  # byte group g: sub-block 2g low, 2g+1 high
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _k_scales_bytes(sc, mn), qs], dim=1)


def _q5_k(x: Tensor) -> Tensor:
    n = x.shape[0]
    d, dmin, sc, mn, q = _k_asymmetric(x, 32, 5, 6)
    q = q.to(torch.int32)
    qh = _pack((q >> 4).reshape(n, 8, 32), 1)  # bit j of byte i: sub-block j, element i
    qs = _pack((q & 15).reshape(n, 4, 2, 32), 4).reshape(n, 128)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _k_scales_bytes(sc, mn), qh, qs], dim=1)


def _q2_k(x: Tensor) -> Tensor:
    n = x.shape[0]
    d, dmin, sc, mn, q = _k_asymmetric(x, 16, 2, 4)
    scales = (sc.to(torch.int32) | (mn.to(torch.int32) << 4)).to(torch.uint8)  # (n, 16): low scale, high min
    # 2-bit q: two halves of 128 values, each 4 fields (shifts 0, 2, 4, 6) of 32 bytes
    qs = _pack(q.reshape(n, 2, 4, 32), 2).reshape(n, 64)
    return torch.cat([scales, qs, _f16_bytes(d), _f16_bytes(dmin)], dim=1)


def _q6_k(x: Tensor) -> Tensor:
    n = x.shape[0]
    a, _ = _fit(x.reshape(-1, 16), 63, asymmetric=False)
    a = a.reshape(n, 16)
    d = (a.abs().max(-1).values / 127).to(torch.float16).float()
    sc = torch.where(d[:, None] > 0, a / d[:, None].clamp(min=1e-30), torch.zeros_like(a)).round().clamp(-128, 127)
    scale = (d[:, None] * sc).repeat_interleave(16, dim=1)
    q = torch.where(scale != 0, x / torch.where(scale != 0, scale, 1), torch.zeros_like(x)).round().clamp(-32, 31)
    q = (q + 32).to(torch.int32).reshape(n, 2, 128)  # two halves of 128 values
    ql = _pack((q & 15).reshape(n, 2, 2, 64), 4).reshape(n, 128)  # half h: values h*128 + f*64 + k
    qh = _pack((q >> 4).reshape(n, 2, 4, 32), 2).reshape(n, 64)  # half h: values h*128 + f*32 + k
    return torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), _f16_bytes(d)], dim=1)


def _q3_k(x: Tensor) -> Tensor:
    n = x.shape[0]
    a, _ = _fit(x.reshape(-1, 16), 7, asymmetric=False)  # q in [-4, 3]
    a = a.reshape(n, 16)
    d = (a.abs().max(-1).values / 31).to(torch.float16).float()  # 6-bit signed scales, stored + 32
    sc = torch.where(d[:, None] > 0, a / d[:, None].clamp(min=1e-30), torch.zeros_like(a)).round().clamp(-32, 31)
    scale = (d[:, None] * sc).repeat_interleave(16, dim=1)
    q = torch.where(scale != 0, x / torch.where(scale != 0, scale, 1), torch.zeros_like(x)).round().clamp(-4, 3)
    q = (q + 4).to(torch.int32)  # 0..7: the high bit set means "no -4"
    hmask = _pack((q >> 2).reshape(n, 8, 32), 1)  # bit j of byte i: values j*32 + i
    qs = _pack((q & 3).reshape(n, 2, 4, 32), 2).reshape(n, 64)
    s = (sc + 32).to(torch.int32)  # (n, 16) 6-bit
    low = _pack((s & 15).reshape(n, 2, 8), 4)  # bytes 0-7: scale j low nibble at byte j % 8, field j // 8
    high = _pack((s >> 4).reshape(n, 4, 4), 2)  # bytes 8-11: scale j high bits at byte j % 4, field j // 4
    return torch.cat([hmask, qs, low, high, _f16_bytes(d)], dim=1)


K_WRITERS = {"Q6_K": _q6_k, "Q5_K": _q5_k, "Q4_K": _q4_k, "Q3_K": _q3_k, "Q2_K": _q2_k}


def quantize_k(values: Tensor, type_name: str) -> Tensor:
    """A float matrix (rows of whole 256-value super-blocks) as `type_name` bytes (rows, row bytes)."""
    if values.ndim != 2 or values.shape[1] % QK_K:
        raise ValueError(f"{type_name} rows hold blocks of {QK_K}; got shape {tuple(values.shape)}")
    write = K_WRITERS[type_name]
    x = values.detach().float().reshape(-1, QK_K)
    step = max(1, CHUNK // QK_K)
    out = torch.cat([write(x[i:i + step]) for i in range(0, x.shape[0], step)])
    return out.reshape(values.shape[0], -1)
