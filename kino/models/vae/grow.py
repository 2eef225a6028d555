"""Grow a trained VAE's decoder wider without changing what it computes (Net2WiderNet).

    wide = widen_decoder(vae, factor=2)   # decoder_base_dim 16 -> 32; encoder and latents as they were

Every decoder channel is repeated `factor` times (channel c of copy a sits at a * C + c), a
layer's weights on a widened input are divided by `factor`, and its outputs are repeated the
same way. Wan's channel RMS norm is unchanged by repetition (the RMS over `factor` identical
copies is the RMS of one), and in the attention, queries shrink by sqrt(factor) to cancel the
longer dot products, so the wider decoder decodes exactly what the narrow one did. Exact copies
would get identical gradients and stay copies for ever; `noise` (relative to each weight
tensor's standard deviation) breaks that symmetry at the cost of a tiny change of output.

Only whole factors keep the RMS norm exact, hence `factor` is an integer. The encoder is
copied bit for bit: a diffusion model trained on the VAE's latents stays valid.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from kino.models.vae.model import AttentionBlock, RMSNorm, Upsample, VideoVAE


def _repeat_out(t: torch.Tensor, factor: int, groups: int) -> torch.Tensor:
    """Repeat the output channels (dim 0) of a weight or bias `factor` times within each of
    `groups` consecutive groups: (groups * C, ...) -> (groups * factor * C, ...)."""
    g = t.reshape(groups, t.shape[0] // groups, *t.shape[1:])
    return g.repeat(1, factor, *([1] * (t.dim() - 1))).reshape(groups * factor * (t.shape[0] // groups), *t.shape[1:])


def _widen_conv(new: nn.Module, old: nn.Module, groups: int = 1, query_scale: float | None = None) -> None:
    fan_in = new.in_channels // old.in_channels
    fan_out = (new.out_channels // groups) // (old.out_channels // groups)
    w = _repeat_out(old.weight.detach(), fan_out, groups)
    w = w.repeat(1, fan_in, *([1] * (w.dim() - 2))) / fan_in  # the widened input holds fan_in copies
    b = _repeat_out(old.bias.detach(), fan_out, groups)
    if query_scale is not None:  # the first of the (q, k, v) groups
        q = w.shape[0] // groups
        w[:q] *= query_scale
        b[:q] *= query_scale
    if w.shape != new.weight.shape:
        raise ValueError(f"cannot widen {tuple(old.weight.shape)} into {tuple(new.weight.shape)}")
    with torch.no_grad():
        new.weight.copy_(w)
        new.bias.copy_(b)


def widen_decoder(vae: VideoVAE, factor: int, noise: float = 1e-3, seed: int = 0) -> VideoVAE:
    """A new VideoVAE: `vae`'s encoder and quant convs as they are, its decoder `factor` times
    wider and decoding the same (exactly with noise = 0). `noise` is added to every widened
    decoder weight, scaled by that tensor's standard deviation, from a generator seeded `seed`."""
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a whole number >= 1 (the RMS norm stays exact only then), got {factor!r}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    wide = VideoVAE(replace(vae.config, decoder_base_dim=vae.config.decoder_dim * factor))
    with torch.no_grad():
        for name in ("encoder", "conv1", "conv2"):
            getattr(wide, name).load_state_dict(getattr(vae, name).state_dict())
    old_modules = dict(vae.decoder.named_modules())
    for name, new in wide.decoder.named_modules():
        old = old_modules[name]
        if isinstance(new, RMSNorm):
            with torch.no_grad():
                new.gamma.copy_(old.gamma.detach().repeat(factor, *([1] * (old.gamma.dim() - 1))))
        elif isinstance(new, AttentionBlock):
            _widen_conv(new.to_qkv, old.to_qkv, groups=3, query_scale=factor ** -0.5)
            _widen_conv(new.proj, old.proj)
        elif isinstance(new, Upsample):
            _widen_conv(new.conv, old.conv)
            if new.time_conv is not None:  # two sub-frames, (2, C) channels
                _widen_conv(new.time_conv, old.time_conv, groups=2)
        elif isinstance(new, (nn.Conv2d, nn.Conv3d)):
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            if isinstance(old_modules.get(parent), (AttentionBlock, Upsample)):
                continue  # done with its block
            _widen_conv(new, old)
    if noise and factor > 1:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in wide.decoder.parameters():
                if p.dim() > 1:
                    p.add_(torch.randn(p.shape, generator=gen) * (noise * float(p.std())))
    return wide.train(vae.training)
