"""Causal 3D convolutional video VAE of the Wan2.1 family.

Time is compressed x4, space x8, into 16 latent channels. Every temporal
operation looks only backwards, so frame 0 is encoded on its own (an image is a
1-frame video) and the rest of a clip streams through in chunks of 4 frames
(decoding: one latent frame at a time); each chunk sees the past only through a
`CausalCache` made for that call. Memory is therefore bounded whatever the
clip's length, and the first k + 1 latent frames depend only on the first
4k + 1 pixel frames.

Input sizes:
- Frames: F = 4k + 1 frames give k + 1 latent frames. Any other F >= 1 is
  padded at the end by repeating the last frame up to the next 4k + 1, so F
  frames give 1 + ceil((F - 1) / 4) latent frames (`VAEConfig.latent_frames`);
  `reconstruct` trims the decoded clip back to F frames.
- Height and width must be multiples of 8 in `encode` (a `VAEInputError`, a
  ValueError, names the nearest allowed sizes): silently padding there would
  hand the diffusion model a latent grid the caller did not ask for.
  `reconstruct` pads by edge replication and crops back.

Parameter names follow Wan2.1's original release (encoder.conv1,
encoder.downsamples.N, middle.{0,1,2}, head, conv1/conv2 for the quant convs),
with the nn.Sequential indices inside Wan's blocks replaced by names;
`adapters.py` maps other layouts (diffusers) onto these.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from kino.errors import KinoUserError
from kino.models.folder import reject_unknown_fields

if TYPE_CHECKING:
    from kino.models.vae.refine import Refinement

# Same bounds as diffusers' DiagonalGaussianDistribution: exp(logvar / 2) stays finite in fp16.
LOGVAR_RANGE = (-30.0, 20.0)
INIT_LOGVAR = -6.0
NORM_EPS = 1e-12  # F.normalize's default, as Wan's RMS norm uses it


class VAEInputError(KinoUserError, ValueError):
    """A video or latent the VAE cannot take; the message names what is allowed."""


def _per_frame(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D op to every frame of (B, C, T, H, W)."""
    b, t = x.shape[0], x.shape[2]
    y = fn(x.transpose(1, 2).flatten(0, 1))  # (B*T, C', H', W')
    return y.unflatten(0, (b, t)).transpose(1, 2)  # (B, C', T, H', W')


def _upsample_nearest_2x(x: torch.Tensor) -> torch.Tensor:
    # Interpolate in fp32 (nearest-exact is not implemented for bf16 on every backend), as Wan does.
    return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").to(x.dtype)  # (N, C, 2H, 2W)


def pad_frames(video: torch.Tensor, time_stride: int) -> torch.Tensor:
    """Repeat the last frame until the clip has 1 + time_stride * k frames."""
    missing = -(video.shape[2] - 1) % time_stride
    if missing == 0:
        return video
    tail = video[:, :, -1:].expand(-1, -1, missing, -1, -1)
    return torch.cat([video, tail], dim=2)  # (B, C, 1 + stride*k, H, W)


def time_chunks(video: torch.Tensor, time_stride: int) -> Iterator[torch.Tensor]:
    """Frame 0 alone, then chunks of `time_stride` frames (the clip is already 1 + stride*k long)."""
    yield video[:, :, :1]
    for start in range(1, video.shape[2], time_stride):
        yield video[:, :, start : start + time_stride]


# ---------------------------------------------------------------------------- causal building blocks


class CausalCache:
    """The temporal context one chunk leaves for the next: one slot per causal layer.

    Make a fresh one per encode/decode call (and per spatial tile) and pass it down
    with each chunk; nothing about a clip is kept on the modules themselves. A slot
    holds at most the last two input frames of its layer, so the cache's size does
    not grow with clip length. Tensors keep their autograd history, so gradients flow
    from later chunks into earlier ones.
    """

    def __init__(self) -> None:
        self._frames: dict[int, torch.Tensor] = {}

    def get(self, layer: nn.Module) -> torch.Tensor | None:
        return self._frames.get(id(layer))

    def put(self, layer: nn.Module, frames: torch.Tensor) -> None:
        self._frames[id(layer)] = frames

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._frames.values())

    def copy(self) -> CausalCache:
        """A cache holding the same context, whose slots the next chunk replaces without touching
        this one's (a chunk can be decoded again and again from one state: latent refinement)."""
        other = CausalCache()
        other._frames = dict(self._frames)
        return other


# PyTorch (2.x, `use_mkldnn` in ATen's ConvUtils) gives a CPU fp32 convolution of one clip (batch 1,
# kernel 3x3x3 or 3x1x1) to oneDNN only when C * D1 * D2 of its input (1, C, D1, D2, D3) exceeds
# 20480; below that it runs slow_conv3d, an unfused im2col + GEMM. A VAE decodes one clip at a
# time, a few frames a chunk, so its full-resolution layers land there ((1, 16, 6, 66, 66): 6,336)
# and run 3-11x slower than oneDNN runs them, forwards and backwards (BENCHMARKS.md, "Video VAE:
# speed"). The same convolution laid out as (N, C, H, W, T), its weight permuted alike, is the
# same sum and passes that test.
ONEDNN_MIN_ELEMENTS = 20480


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.conv3d(x, weight, bias) with stride 1 and no padding, through oneDNN on CPU where PyTorch
    would take its slow path and a (N, C, H, W, T) layout gets oneDNN's kernel instead."""
    if _time_last_is_faster(x, weight):
        y = F.conv3d(x.permute(0, 1, 3, 4, 2), weight.permute(0, 1, 3, 4, 2), bias)  # (B, C', H, W, T)
        return y.permute(0, 1, 4, 2, 3)
    return F.conv3d(x, weight, bias)


def _time_last_is_faster(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """PyTorch would take slow_conv3d, the (N, C, H, W, T) layout would take oneDNN, and the layer is
    one where that pays: a chunk of at least 4 output frames at 32x32 or more. oneDNN has a fixed
    cost per call (its reorders), so a 1-frame chunk or a deep, small layer runs as fast or faster
    through slow_conv3d (measured on the shipped VAE's layers; 2-core AMD EPYC, one and two threads)."""
    n, c, t, h, w = x.shape
    return (x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and weight.shape[2:] != (1, 1, 1)
            and n == 1 and c * t * h <= ONEDNN_MIN_ELEMENTS < c * h * w
            and t - weight.shape[2] + 1 >= 4 and h * w >= 32 * 32)


class CausalConv3d(nn.Conv3d):
    """Conv3d whose temporal padding all goes before the clip: output t sees frames <= t.

    Spatial padding is symmetric ('same'). With a cache, the last `context` input frames
    of the previous chunk stand in for the zero padding, so a clip fed in chunks gives
    exactly what the whole clip gives in one call.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int]) -> None:
        k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        super().__init__(in_channels, out_channels, k)
        self.context = k[0] - 1
        self._spatial_pad = (k[2] // 2, k[2] // 2, k[1] // 2, k[1] // 2)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        past = cache.get(self) if cache is not None and self.context else None
        if past is not None:
            x = torch.cat([past, x], dim=2)  # (B, C, P + T, H, W)
        if cache is not None and self.context:
            # clone: a view would keep the whole chunk's storage alive until the next chunk
            cache.put(self, x[:, :, -self.context :].clone())
        missing = self.context - (0 if past is None else past.shape[2])
        x = F.pad(x, (*self._spatial_pad, missing, 0))  # zeros stand for frames before the clip
        return conv3d(x, self.weight, self.bias)  # (B, C_out, T, H, W)


class RMSNorm(nn.Module):
    """Channel-wise RMS norm (Wan's): x / rms_over_channels(x) * gamma, no bias."""

    def __init__(self, channels: int, spatial_dims: int) -> None:
        super().__init__()
        self.scale = channels**0.5
        # gamma broadcasts over (T, H, W) or (H, W): shape (C, 1, 1[, 1]), as in Wan's checkpoints
        self.gamma = nn.Parameter(torch.ones(channels, *([1] * spatial_dims)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # L2-normalise over channels (F.normalize's x / max(|x|, 1e-12)), times sqrt(C) = divide by
        # the RMS; fp32 so bf16 does not underflow. Written out: on CPU, torch's vector norm over
        # dim 1 of a video is ~70x slower than this sum of squares (3.3 ms against 0.05 ms for
        # (1, 16, 4, 64, 64)), and it was a fifth of a decode's time.
        x32 = x.float()
        y = (x32 * x32.square().sum(dim=1, keepdim=True).clamp_min(NORM_EPS**2).rsqrt()).to(x.dtype)
        return y * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_dim, spatial_dims=3)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3)
        self.norm2 = RMSNorm(out_dim, spatial_dims=3)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3)
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)  # (B, C_out, T, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))), cache)
        return self.shortcut(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no temporal mixing, so no cache)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).flatten(0, 1)  # (B*T, C, H, W)
        qkv = self.to_qkv(self.norm(frames)).flatten(2).transpose(1, 2)  # (B*T, H*W, 3C)
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # each (B*T, 1, H*W, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B*T, 1, H*W, C)
        out = self.proj(out.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))  # (B*T, C, H, W)
        return x + out.unflatten(0, (b, t)).transpose(1, 2)  # (B, C, T, H, W)


class NoAttention(nn.Module):
    """Stands in for the middle attention in fully convolutional sizes, keeping middle.0 / middle.2 names."""

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        return x


class Downsample(nn.Module):
    """Halve H and W, and T when `temporal`."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2)
        # Not a CausalConv3d: it is unpadded, frame 0 bypasses it and its context is one frame.
        self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        # Pad right/bottom only (Wan's choice): output pixel i then covers input pixels 2i..2i+2.
        x = _per_frame(lambda f: self.conv(F.pad(f, (0, 1, 0, 1))), x)  # (B, C, T, H/2, W/2)
        return x if self.time_conv is None else self._downsample_time(x, cache)

    def _downsample_time(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        # Output frame 0 is input frame 0; output k >= 1 sees input frames 2k-2, 2k-1, 2k.
        # So 1 + 2m frames become 1 + m, and a later chunk needs only the previous last frame.
        past = cache.get(self) if cache is not None else None
        if past is None:  # the clip's first chunk: frame 0 has no past and passes through
            head, seq = x[:, :, :1], x
        else:
            head, seq = x[:, :, :0], torch.cat([past, x], dim=2)  # (B, C, 1 + T, H, W)
        if (seq.shape[2] - 1) % 2:
            raise ValueError(
                f"temporal downsampling needs an even number of frames in every chunk after the first; got {x.shape[2]}"
            )
        if cache is not None:
            cache.put(self, seq[:, :, -1:].clone())
        if seq.shape[2] < 3:
            return head
        return torch.cat([head, self.time_conv(seq)], dim=2)  # (B, C, 1 + T/2 | T/2, H, W)


class Upsample(nn.Module):
    """Double H and W (to `out_dim` channels), and T when `temporal`."""

    def __init__(self, dim: int, out_dim: int, temporal: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, padding=1)
        # Predicts two sub-frames (2*dim channels) per frame from the current and two past frames.
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if self.time_conv is not None:
            x = self._upsample_time(x, cache)  # (B, C, T', H, W)
        return _per_frame(lambda f: self.conv(_upsample_nearest_2x(f)), x)  # (B, C_out, T', 2H, 2W)

    def _upsample_time(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        # Mirror of Downsample: frame 0 stays one frame, every later frame becomes two,
        # so 1 + m frames become 1 + 2m. Frame 0 is not part of the time conv's stream:
        # the second frame sees zeros as its past, as in Wan.
        started = cache is not None and cache.get(self.time_conv) is not None
        if started:
            head, rest = x[:, :, :0], x
        else:
            head, rest = x[:, :, :1], x[:, :, 1:]
            if cache is not None:
                cache.put(self.time_conv, rest[:, :, :0])  # stream begun, no past frames yet
        if rest.shape[2] == 0:
            return head
        y = self.time_conv(rest, cache)  # (B, 2C, T, H, W)
        b, c2, t, h, w = y.shape
        y = y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        return torch.cat([head, y], dim=2)  # (B, C, (1) + 2T, H, W)


class Head(nn.Module):
    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, spatial_dims=3)
        self.conv = CausalConv3d(dim, out_dim, 3)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        return self.conv(F.silu(self.norm(x)), cache)


# ---------------------------------------------------------------------------- Wan2.2's residual stages


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C*p*p, T, H/p, W/p): each p x p pixel patch folded into channels,
    channel c*p*p + r*p + q holding row offset q and column offset r (Wan2.2's order)."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)  # (B, C, r, q, T, h, w)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of `patchify`."""
    if p == 1:
        return x
    b, cpp, t, h, w = x.shape
    x = x.view(b, cpp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)  # (B, C, T, h, q, w, r)
    return x.reshape(b, cpp // (p * p), t, h * p, w * p)


class AvgDown(nn.Module):
    """The parameter-free shortcut of a Wan2.2 encoder stage: every factor_t x factor_s x
    factor_s block of positions folded into channels, then channels averaged in equal groups
    down to `out_dim`. A chunk whose frame count factor_t does not divide gets zero frames in
    front (Wan's rule; with kino's 1 + 4 + 4 ... chunks that is the first frame only)."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        folded = in_dim * factor_t * factor_s * factor_s
        if folded % out_dim:
            raise ValueError(f"AvgDown: {in_dim} channels x {factor_t * factor_s**2} positions do not split "
                             f"into {out_dim} groups")
        self.out_dim, self.group, self.factor_t, self.factor_s = out_dim, folded // out_dim, factor_t, factor_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        x = F.pad(x, (0, 0, 0, 0, -x.shape[2] % ft, 0))
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)  # folded channels
        return x.reshape(b, self.out_dim, self.group, t // ft, h // fs, w // fs).mean(dim=2)


class DupUp(nn.Module):
    """The parameter-free shortcut of a Wan2.2 decoder stage, AvgDown's mirror: channels
    repeated, then unfolded into factor_t x factor_s x factor_s positions. On the clip's first
    latent frame only the last of the factor_t frames is kept (frame 0 stays one frame)."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        unfolded = out_dim * factor_t * factor_s * factor_s
        if unfolded % in_dim:
            raise ValueError(f"DupUp: {out_dim} channels x {factor_t * factor_s**2} positions are no multiple of "
                             f"{in_dim}")
        self.out_dim, self.repeats, self.factor_t, self.factor_s = out_dim, unfolded // in_dim, factor_t, factor_s

    def forward(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        x = x.repeat_interleave(self.repeats, dim=1)
        b, _, t, h, w = x.shape
        x = x.view(b, self.out_dim, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)  # (B, C, T, ft, H, fs, W, fs)
        x = x.reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1 :] if first else x


class ResidualDownStage(nn.Module):
    """A Wan2.2 encoder stage: residual blocks and the stage's downsample, plus AvgDown of the
    stage's input as a shortcut around all of them."""

    def __init__(self, in_dim: int, out_dim: int, config: VAEConfig, temporal: bool, down: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(config.num_res_blocks):
            layers.append(ResidualBlock(dim, out_dim, config.dropout))
            dim = out_dim
        if down:
            layers.append(Downsample(out_dim, temporal=temporal))
        self.downsamples = nn.ModuleList(layers)
        self.avg_shortcut = AvgDown(in_dim, out_dim, 2 if temporal else 1, 2 if down else 1)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        y = x
        for layer in self.downsamples:
            y = layer(y, cache)
        return y + self.avg_shortcut(x)


class ResidualUpStage(nn.Module):
    """A Wan2.2 decoder stage: residual blocks and the stage's upsample, plus DupUp of the
    stage's input as a shortcut (on upsampling stages)."""

    def __init__(self, in_dim: int, out_dim: int, config: VAEConfig, temporal: bool, up: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(config.num_res_blocks + 1):
            layers.append(ResidualBlock(dim, out_dim, config.dropout))
            dim = out_dim
        if up:
            layers.append(Upsample(out_dim, out_dim, temporal=temporal))
        self.upsamples = nn.ModuleList(layers)
        self.avg_shortcut = DupUp(in_dim, out_dim, 2 if temporal else 1, 2) if up else None

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        y = x
        for layer in self.upsamples:
            y = layer(y, cache)
        if self.avg_shortcut is None:
            return y
        first = cache is None or cache.get(self) is None  # the clip's first latent frame
        if cache is not None:
            cache.put(self, x.new_empty(0))  # a mark: the first frame has been through
        return y + self.avg_shortcut(x, first)


def _middle(dim: int, config: VAEConfig) -> nn.ModuleList:
    attention = AttentionBlock(dim) if config.mid_attention else NoAttention()
    return nn.ModuleList([ResidualBlock(dim, dim, config.dropout), attention, ResidualBlock(dim, dim, config.dropout)])


# ---------------------------------------------------------------------------- encoder and decoder


class Encoder(nn.Module):
    """(B, 3, T, H, W) pixels -> (B, 2Z, latent T, H/8, W/8) moments."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        dims = [config.base_dim * m for m in [1, *config.dim_mult]]
        self.patch = config.patch_size
        self.conv1 = CausalConv3d(3 * self.patch**2, dims[0], 3)
        blocks: list[nn.Module] = []
        scale = 1.0  # resolution relative to the input, as attn_scales counts it
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if config.residual:  # Wan2.2: one module per stage, with a shortcut around it
                down = i < len(config.dim_mult) - 1
                blocks.append(ResidualDownStage(in_dim, out_dim, config, down and config.temporal_downsample[i], down))
                continue
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, config.dropout))
                if scale in config.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i < len(config.dim_mult) - 1:
                blocks.append(Downsample(out_dim, temporal=config.temporal_downsample[i]))
                scale /= 2.0
        self.downsamples = nn.ModuleList(blocks)
        self.middle = _middle(dims[-1], config)
        self.head = Head(dims[-1], 2 * config.z_dim)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        x = self.conv1(patchify(x, self.patch), cache)  # (B, D, T, H/p, W/p)
        for block in (*self.downsamples, *self.middle):
            x = block(x, cache)
        return self.head(x, cache)  # (B, 2Z, T', H/8, W/8)


class Decoder(nn.Module):
    """(B, Z, latent T, h, w) -> (B, 3, 1 + 4(T - 1), 8h, 8w) pixels (unclamped)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        stages = len(config.dim_mult)
        dims = [config.decoder_dim * m for m in [config.dim_mult[-1], *config.dim_mult[::-1]]]
        temporal_upsample = config.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3)
        self.middle = _middle(dims[0], config)
        blocks: list[nn.Module] = []
        # Wan labels decoder stage i with scale 2**(i - (stages - 2)), one octave above the
        # stage's real resolution; kept so Wan-family checkpoints using attn_scales load unchanged.
        scale = 1.0 / 2 ** (stages - 2)
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if config.residual:  # Wan2.2: one module per stage, no halving of the channels
                up = i < stages - 1
                blocks.append(ResidualUpStage(in_dim, out_dim, config, up and temporal_upsample[i], up))
                continue
            if i > 0:
                in_dim //= 2  # every upsample halves the channels
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim, config.dropout))
                if scale in config.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i < stages - 1:
                blocks.append(Upsample(out_dim, out_dim // 2, temporal=temporal_upsample[i]))
                scale *= 2.0
        self.upsamples = nn.ModuleList(blocks)
        self.patch = config.patch_size
        self.head = Head(dims[-1], 3 * self.patch**2)

    def forward(self, z: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        x = self.conv1(z, cache)  # (B, D, T, h, w)
        for block in (*self.middle, *self.upsamples):
            x = block(x, cache)
        return unpatchify(self.head(x, cache), self.patch)  # (B, 3, T', 8h, 8w) (x p with patches)


# ---------------------------------------------------------------------------- spatial tiling


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]  # the last tile is flush with the edge rather than cut short


def tile_regions(height: int, width: int, tile_h: int, tile_w: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of overlapping tiles covering a height x width grid."""
    return [
        (y, min(y + tile_h, height), x, min(x + tile_w, width))
        for y in _tile_starts(height, tile_h, overlap)
        for x in _tile_starts(width, tile_w, overlap)
    ]


def _ramp(size: int, ramp: int, rise: bool, fall: bool) -> torch.Tensor:
    w = torch.ones(size)
    r = min(ramp, size)
    up = torch.arange(1, r + 1, dtype=torch.float32) / (r + 1)  # never 0: every pixel keeps some weight
    if rise:
        w[:r] = torch.minimum(w[:r], up)
    if fall:
        w[size - r :] = torch.minimum(w[size - r :], up.flip(0))
    return w


def blend_tiles(
    tiles: list[torch.Tensor], regions: list[tuple[int, int, int, int]], height: int, width: int, ramp: int
) -> torch.Tensor:
    """Weighted average of overlapping tiles, weights ramping linearly over `ramp` pixels at inner edges.

    Edges on the border of the frame get full weight, so a pixel covered by one tile is that tile's value.
    """
    b, c, t = tiles[0].shape[:3]
    out = tiles[0].new_zeros(b, c, t, height, width)
    total = tiles[0].new_zeros(height, width)
    for tile, (y0, y1, x0, x1) in zip(tiles, regions):
        wy = _ramp(y1 - y0, ramp, rise=y0 > 0, fall=y1 < height)
        wx = _ramp(x1 - x0, ramp, rise=x0 > 0, fall=x1 < width)
        weight = (wy[:, None] * wx[None, :]).to(out)  # (h, w)
        out[..., y0:y1, x0:x1] += tile * weight
        total[y0:y1, x0:x1] += weight
    return out / total  # (B, C, T, H, W)


# ---------------------------------------------------------------------------- the model


class VideoVAE(nn.Module):
    """Causal video VAE: (B, 3, F, H, W) in [-1, 1] <-> (B, 16, 1 + ceil((F-1)/4), H/8, W/8)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        z = config.z_dim
        self.encoder = Encoder(config)
        self.conv1 = CausalConv3d(2 * z, 2 * z, 1)  # moments -> moments ("quant conv")
        self.conv2 = CausalConv3d(z, z, 1)  # latent -> decoder input ("post-quant conv")
        self.decoder = Decoder(config)
        # tiles used when encode/decode are called without `tile` (enable_tiling); None = whole frames
        self.tiling: TileConfig | None = None
        self.init_weights()

    def enable_tiling(self, tile: TileConfig | None = None) -> None:
        """Encode and decode frames larger than the tile in blended spatial tiles by default
        (a `tile` argument still wins): bounds the activations' memory by the tile, not the frame."""
        self.tiling = tile if tile is not None else TileConfig()

    def disable_tiling(self) -> None:
        self.tiling = None

    def init_weights(self) -> None:
        if next(self.parameters()).is_meta:  # built to be given a file's tensors (load_module):
            return  # nothing to draw, and meta-device init would import torch._dynamo (~1 s)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                # LeCun normal: unit variance in, unit variance out; the RMSNorm in front of
                # every block re-normalises anyway, so no gain for the SiLU is needed.
                nn.init.normal_(m.weight, std=m.weight[0].numel() ** -0.5)
                nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.gamma)
        for m in self.modules():
            if isinstance(m, ResidualBlock):
                # Each block starts as its shortcut, so the deep stack starts as a short,
                # well-conditioned path and blocks switch on as they learn.
                nn.init.zeros_(m.conv2.weight)
            elif isinstance(m, AttentionBlock):
                nn.init.zeros_(m.proj.weight)  # attention starts as the identity, for the same reason
            elif isinstance(m, Downsample) and m.time_conv is not None:
                # Start as a box filter over the two frames each window adds (2k-1, 2k)
                # rather than random temporal mixing.
                eye = torch.eye(m.time_conv.out_channels)
                with torch.no_grad():
                    m.time_conv.weight.zero_()
                    m.time_conv.weight[:, :, 1:, 0, 0] = 0.5 * eye[:, :, None]
            elif isinstance(m, Upsample) and m.time_conv is not None:
                # Both sub-frames start as copies of the current frame: nearest-neighbour in time.
                c = m.time_conv.in_channels
                eye = torch.eye(c)
                with torch.no_grad():
                    m.time_conv.weight.zero_()
                    m.time_conv.weight[:c, :, -1, 0, 0] = eye
                    m.time_conv.weight[c:, :, -1, 0, 0] = eye
        # The posterior starts nearly deterministic (std e^-3 = 0.05): with logvar at 0 the
        # sampled noise drowns the young encoder's signal and training stalls on blurry
        # reconstructions. The small KL weight of kino's recipe barely pulls it back.
        with torch.no_grad():
            self.conv1.bias[self.config.z_dim:] = INIT_LOGVAR

    # -- encode

    def encode(self, video: torch.Tensor, tile: TileConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, F, H, W) in [-1, 1] -> mean, logvar, each (B, Z, 1 + ceil((F-1)/4), H/8, W/8).

        Frames are padded at the end (last frame repeated) up to 4k + 1. Frame 0 is encoded
        alone, then chunks of 4 frames. With `tile`, frames larger than the tile are encoded
        in overlapping spatial tiles blended in latent space.
        """
        self._check_video(video)
        video = pad_frames(video, self.config.time_stride)
        moments = torch.cat(list(self._encode_chunks(video, tile)), dim=2)  # (B, 2Z, T', h, w)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def _encode_chunks(self, video: torch.Tensor, tile: TileConfig | None) -> Iterator[torch.Tensor]:
        s = self.config.space_stride
        h, w = video.shape[-2] // s, video.shape[-1] // s
        tile = tile if tile is not None else self.tiling
        regions = self._tile_regions(h, w, tile)
        caches = [CausalCache() for _ in regions]
        for chunk in time_chunks(video, self.config.time_stride):
            outs = [
                self.conv1(self.encoder(chunk[..., y0 * s : y1 * s, x0 * s : x1 * s], cache))
                for (y0, y1, x0, x1), cache in zip(regions, caches)
            ]  # each (B, 2Z, t, tile_h/8, tile_w/8)
            yield outs[0] if len(outs) == 1 else blend_tiles(outs, regions, h, w, tile.overlap // s)

    # -- decode

    def decode_chunks(
        self, z: torch.Tensor, tile: TileConfig | None = None, clamp: bool = True
    ) -> Iterator[torch.Tensor]:
        """Yield pixel frames latent frame by latent frame: 1 frame, then 4 per latent frame.

        Only one latent frame's activations (and the cache) are alive at a time, so a caller
        can write a long clip to disk as it is decoded.
        """
        self._check_latents(z)
        s = self.config.space_stride
        x = self.conv2(z)  # (B, Z, T, h, w)
        h, w = x.shape[-2:]
        tile = tile if tile is not None else self.tiling
        regions = self._tile_regions(h, w, tile)
        caches = [CausalCache() for _ in regions]
        for t in range(x.shape[2]):
            frame = x[:, :, t : t + 1]  # (B, Z, 1, h, w)
            outs = [
                self.decoder(frame[..., y0:y1, x0:x1], cache) for (y0, y1, x0, x1), cache in zip(regions, caches)
            ]  # each (B, 3, 1 | 4, 8*tile_h, 8*tile_w)
            if len(outs) == 1:
                out = outs[0]
            else:
                pixel_regions = [(y0 * s, y1 * s, x0 * s, x1 * s) for y0, y1, x0, x1 in regions]
                out = blend_tiles(outs, pixel_regions, h * s, w * s, tile.overlap)
            yield out.clamp(-1.0, 1.0) if clamp else out  # (B, 3, 1 | 4, H, W)

    def decode(self, z: torch.Tensor, tile: TileConfig | None = None, clamp: bool = True) -> torch.Tensor:
        """(B, Z, T, h, w) -> (B, 3, 1 + 4(T-1), 8h, 8w), clamped to [-1, 1] unless clamp=False.

        Train with clamp=False: clamping zeroes the gradient of every pixel that overshoots.
        """
        out: torch.Tensor | None = None
        start = 0
        for chunk in self.decode_chunks(z, tile, clamp):
            if out is None:  # filled in place: no list of chunks plus a concatenated copy at the peak
                frames = self.config.pixel_frames(z.shape[2])
                out = chunk.new_empty(chunk.shape[0], chunk.shape[1], frames, *chunk.shape[3:])
            out[:, :, start : start + chunk.shape[2]] = chunk
            start += chunk.shape[2]
        return out  # (B, 3, F', H, W)

    # -- whole clips

    def reconstruct(self, video: torch.Tensor, tile: TileConfig | None = None,
                    refine: int | Refinement = 0) -> torch.Tensor:
        """Encode (posterior mean) and decode; same shape as `video`, for any F >= 1, H, W >= 1.
        `refine`: latent refinement before decoding (`kino.models.vae.refine`; whole frames, no
        tiling), a `Refinement` or its step count (the other settings at their defaults; 0: off)."""
        self._check_video(video, spatial=False)
        frames, height, width = video.shape[2:]
        s = self.config.space_stride
        padded = F.pad(video, (0, -width % s, 0, -height % s, 0, 0), mode="replicate")  # (B, 3, F, H8, W8)
        from kino.models.vae.refine import Refinement, refine_latents  # refine builds on this module

        refine = refine if isinstance(refine, Refinement) else Refinement(refine)
        if refine.steps:
            mean = refine_latents(self, padded, refine.steps, tile=tile, palette=refine.palette, method=refine.method)
        else:
            mean, _ = self.encode(padded, tile)
        return self.decode(mean, tile)[:, :, :frames, :height, :width]

    def forward(
        self, video: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction sampled from the posterior, unclamped, F frames; mean; logvar)."""
        mean, logvar = self.encode(video)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * logvar) * noise  # (B, Z, T', h, w)
        recon = self.decode(z, clamp=False)[:, :, : video.shape[2]]
        return recon, mean, logvar

    # -- latent normalisation (statistics live in the config)

    def normalize(self, mean: torch.Tensor) -> torch.Tensor:
        m, s = self._latent_stats(mean)
        return (mean - m) / s

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        m, s = self._latent_stats(z)
        return z * s + m

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def as_tensor(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)

        return as_tensor(self.config.latents_mean), as_tensor(self.config.latents_std)

    # -- checks

    def _tile_regions(self, h: int, w: int, tile: TileConfig | None) -> list[tuple[int, int, int, int]]:
        """Tiles in latent units; one region (the whole frame) when no tiling is needed."""
        s = self.config.space_stride
        if tile is None or (h * s <= tile.tile_h and w * s <= tile.tile_w):
            return [(0, h, 0, w)]
        if tile.tile_h % s or tile.tile_w % s or tile.overlap % s:
            raise VAEInputError(f"tile sizes and overlap must be multiples of {s} pixels; got {tile}")
        return tile_regions(h, w, tile.tile_h // s, tile.tile_w // s, tile.overlap // s)

    def _check_video(self, video: torch.Tensor, spatial: bool = True) -> None:
        if video.ndim != 5 or video.shape[1] != 3 or video.shape[2] < 1:
            raise VAEInputError(
                "video must be a (B, 3, F, H, W) tensor with F >= 1 and values in [-1, 1] "
                f"(an image is (B, 3, 1, H, W)); got shape {tuple(video.shape)}"
            )
        s = self.config.space_stride
        height, width = video.shape[-2:]
        if spatial and (height % s or width % s or height == 0 or width == 0):
            def near(n: int) -> str:
                lo, hi = n // s * s, -(-n // s) * s
                return f"{hi}" if lo in (0, hi) else f"{lo} or {hi}"

            raise VAEInputError(
                f"height and width must be positive multiples of {s}; got {height}x{width} "
                f"(nearest allowed: height {near(height)}, width {near(width)}); "
                "VideoVAE.reconstruct pads other sizes itself"
            )

    def _check_latents(self, z: torch.Tensor) -> None:
        if z.ndim != 5 or z.shape[1] != self.config.z_dim or z.shape[2] < 1:
            raise VAEInputError(
                f"latents must be a (B, {self.config.z_dim}, T, h, w) tensor with T >= 1; got shape {tuple(z.shape)}"
            )


# ---------------------------------------------------------------------------- configs and sizes


@dataclass(frozen=True)
class TileConfig:
    """Spatial tiling in pixels: tiles of tile_h x tile_w overlapping by `overlap`, blended linearly.

    All three must be multiples of 8; frames no larger than a tile are not tiled.
    """

    tile_h: int = 256
    tile_w: int = 256
    overlap: int = 64

    def __post_init__(self) -> None:
        if min(self.tile_h, self.tile_w) <= 0 or not 0 <= self.overlap < min(self.tile_h, self.tile_w):
            raise VAEInputError(f"need tile sizes > 0 and 0 <= overlap < tile size; got {self}")


# Wan2.1's published per-channel latent statistics (its VAE config).
WAN21_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
WAN21_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip


# Wan2.2's VAE (TI2V-5B): its published per-channel latent statistics (48 channels).
WAN22_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.157, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.123, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.052, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]  # fmt: skip
WAN22_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.499, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.06, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]  # fmt: skip


@dataclass
class VAEConfig:
    """Size of a VideoVAE. Defaults are kino's "small" size.

    `temporal_downsample[i]` says whether encoder stage i also halves time (Wan's
    `temperal_downsample`); the decoder mirrors it. `attn_scales` lists the resolutions
    (1.0, 0.5, ...) whose stages get attention after each residual block;
    `mid_attention` is the attention in the middle block (Wan: always on).
    `latents_mean` / `latents_std` normalise latents per channel for the diffusion model.
    `decoder_base_dim` widens the decoder alone (diffusers' name; None: `base_dim`, as in
    Wan2.1): a decoder can grow (`widen_decoder`) while the encoder, hence every latent, stays.
    """

    base_dim: int = 16
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 1
    attn_scales: list[float] = field(default_factory=list)
    temporal_downsample: list[bool] = field(default_factory=lambda: [False, True, True])
    mid_attention: bool = False
    dropout: float = 0.0
    latents_mean: list[float] = field(default_factory=lambda: [0.0] * 16)
    latents_std: list[float] = field(default_factory=lambda: [1.0] * 16)
    # Wan2.2's VAE: each stage one module with a parameter-free shortcut around it (AvgDown /
    # DupUp), decoder stages keeping their width; and pixels folded p x p into channels
    # before the encoder (and unfolded after the decoder), so space shrinks by p more.
    residual: bool = False
    patch_size: int = 1

    def __post_init__(self) -> None:
        if self.decoder_base_dim is not None and self.decoder_base_dim < 1:
            raise ValueError(f"decoder_base_dim must be a positive width or None, got {self.decoder_base_dim}")
        if self.decoder_base_dim == self.base_dim:
            self.decoder_base_dim = None  # one spelling of "as wide as the encoder", so one config hash
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample needs one flag per downsampling stage ({len(self.dim_mult) - 1}); "
                f"got {self.temporal_downsample}"
            )
        if not len(self.latents_mean) == len(self.latents_std) == self.z_dim:
            raise ValueError(
                f"latents_mean and latents_std need z_dim={self.z_dim} values; "
                f"got {len(self.latents_mean)} and {len(self.latents_std)}"
            )
        if min(self.latents_std) <= 0:
            raise ValueError("latents_std must be positive")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.residual and self.attn_scales:
            raise ValueError("Wan2.2's residual stages have no attention inside them (attn_scales)")

    @property
    def decoder_dim(self) -> int:
        return self.base_dim if self.decoder_base_dim is None else self.decoder_base_dim

    @property
    def time_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def space_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1) * self.patch_size

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames for a clip of `num_frames` pixel frames (padded up to 1 + 4k)."""
        return 1 + math.ceil((num_frames - 1) / self.time_stride)

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + self.time_stride * (latent_frames - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        reject_unknown_fields(cls, d)
        return cls(**{k: list(v) if isinstance(v, (list, tuple)) else v for k, v in d.items()})


VAE_SIZES: dict[str, VAEConfig] = {
    # Cheapest thing that still has every block kind (middle attention included): tests only.
    # 0.22M params; fwd+bwd, batch 1, one CPU thread: 5x32x32 0.08 s, 17x64x64 1.0 s.
    "tiny": VAEConfig(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1, mid_attention=True),
    # kino's default, trained on CPU. Fully convolutional (no attention anywhere), so it is
    # translation equivariant and tiles cleanly. Latent statistics are placeholders (0, 1)
    # until measured on training data. 2.5M params; fwd+bwd (forward() + MSE/KL), batch 1,
    # 2-core CPU: 17x64x64 1.7 s, 5x32x32 0.15 s (2 threads, quiet machine); 2.1 s and 0.24 s
    # with 1 thread beside another busy process (2 threads there: 10-30x slower, OpenMP waits).
    "small": VAEConfig(),
    # "small" with one spatial stage fewer: time x4, space x4 (16x16 latents for a 64x64
    # frame, 12x fewer numbers than pixels against small's 48x), for worlds whose objects are
    # a latent pixel or two across at x8. 1.85M params. Same classes, keys and adapters.
    "small-s4": VAEConfig(dim_mult=[1, 2, 4], temporal_downsample=[True, True]),
    # Wan2.1's released VAE; its weights load into this size (via adapters). 127M params.
    "wan2.1": VAEConfig(
        base_dim=96,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attn_scales=[],
        temporal_downsample=[False, True, True],
        mid_attention=True,
        latents_mean=list(WAN21_LATENTS_MEAN),
        latents_std=list(WAN21_LATENTS_STD),
    ),
    # Wan2.2's released VAE (TI2V-5B): 4 x 16 x 16 compression to 48 channels.
    "wan2.2": VAEConfig(
        base_dim=160,
        decoder_base_dim=256,
        z_dim=48,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        temporal_downsample=[False, True, True],
        mid_attention=True,
        latents_mean=list(WAN22_LATENTS_MEAN),
        latents_std=list(WAN22_LATENTS_STD),
        residual=True,
        patch_size=2,
    ),
}
