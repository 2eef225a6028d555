"""Latent refinement: latents that the frozen decoder turns back into the clip more exactly.

The encoder is amortised: one pass maps any clip to latents, and the decoder's output from them
is not the closest to the clip that the decoder can produce. `refine_latents` closes part of
that gap for one clip at a time. It starts from the encoder's posterior mean and spends `steps`
loss evaluations (L-BFGS by default, or Adam) on the latents so that the frozen decoder
reproduces the clip's pixels (mean squared error; for Shapes World clips, optionally plus the
world's palette term, which charges pixels that would read as another world colour). The
encoder and decoder are unchanged, and so is the latent space: a refined latent is still a
latent of this VAE, only a better one for this clip.

The clip is worked through in windows of `window` latent frames in the decoder's causal
order. Each window is fitted to its own pixels (frame 0, then `time_stride` frames per latent
frame), decoding from a copy of the causal cache that the already refined windows left, so a
step differentiates one window's decode and memory stays bounded whatever the clip's length.
Across windows it is greedy: a window is not changed for the sake of later ones, but each later
window is fitted through the context it actually gets. One window as long as the clip is plain
L-BFGS (or Adam) on the whole decode.

L-BFGS is the default because the fit is a smooth, badly conditioned least-squares problem
where curvature pairs go further per gradient than Adam's per-coordinate steps: for the same
evaluations it fits Shapes World clips about 0.3 dB closer in about the same time.

Cost: about 3 x `steps` decodes of the clip (forward and backward per evaluation). Measured on
Shapes World in BENCHMARKS.md ("Latent refinement", under "Video VAE: quality").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kino.errors import KinoUserError
from kino.models.vae.model import CausalCache, TileConfig, VideoVAE, pad_frames
from kino.world.palette import palette_loss

METHODS = {"adam": 0.05, "lbfgs": 1.0}  # optimizer -> its default learning rate (chosen on Shapes World, BENCHMARKS.md)
DEFAULT_METHOD = "lbfgs"
LBFGS_HISTORY = 10  # curvature pairs L-BFGS keeps
DEFAULT_WINDOW = 4  # latent frames fitted together (13-16 pixel frames)
DEFAULT_PALETTE_TEMPERATURE = 0.05  # as the VAE's training loss uses it


@dataclass(frozen=True)
class Refinement:
    """Latent refinement as `VideoVAE.reconstruct` and `kino vae reconstruct` apply it: `steps`
    loss evaluations per window (0: off, the encoder's mean as it is), the weight of Shapes
    World's palette term (0: MSE alone), and the optimizer (`METHODS`)."""

    steps: int = 0
    palette: float = 0.0
    method: str = DEFAULT_METHOD

    def __post_init__(self):
        _check(self.steps, self.palette, self.method)


def _check(steps, palette, method, palette_temperature: float = DEFAULT_PALETTE_TEMPERATURE) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise KinoUserError(f"latent refinement steps must be an integer >= 0, got {steps!r}")
    if method not in METHODS:
        raise KinoUserError(f"latent refinement method must be one of {', '.join(METHODS)}, got {method!r}")
    if not palette >= 0 or not palette_temperature > 0:
        raise KinoUserError(f"latent refinement palette weight must be >= 0 and its temperature > 0, "
                            f"got {palette!r} and {palette_temperature!r}")


def refine_latents(vae: VideoVAE, video: torch.Tensor, steps: int, lr: float | None = None,
                   latents: torch.Tensor | None = None, window: int = DEFAULT_WINDOW,
                   tile: TileConfig | None = None, palette: float = 0.0,
                   palette_temperature: float = DEFAULT_PALETTE_TEMPERATURE,
                   method: str = DEFAULT_METHOD) -> torch.Tensor:
    """Latents (B, Z, T, h, w) of `video` (B, 3, F, H, W) in [-1, 1], as `vae.encode`'s mean,
    refined per window of `window` latent frames by `steps` loss evaluations (0: the mean
    itself) of `method`: "lbfgs" (one L-BFGS run with a strong-Wolfe line search, lr 1, its
    line search's evaluations counted) or "adam" (one Adam step per evaluation, lr 0.05), each
    evaluation a decode of the window and its gradient. `latents` (default: the encoder's
    mean) is where the search starts. Frames are padded to 4k + 1 as `encode` pads them, and H, W
    must be multiples of 8 (`encode`'s rule).
    Whole frames only: a `tile` or the VAE's own tiling is an error (the tiles' decodes are blended).
    `palette` > 0 adds Shapes World's palette term with that weight to the MSE
    (`kino.world.palette.palette_loss`: each pixel should keep its nearest world colour), for
    clips of that world only; 0.2 is the weight chosen and measured in BENCHMARKS.md."""
    _check(steps, palette, method, palette_temperature)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise KinoUserError(f"latent refinement window must be an integer >= 1 (latent frames), got {window!r}")
    lr = METHODS[method] if lr is None else lr
    if not lr > 0:
        raise KinoUserError(f"latent refinement learning rate must be > 0, got {lr!r}")
    if tile is not None or vae.tiling is not None:
        raise KinoUserError("latent refinement decodes whole frames: it does not combine with spatial tiling "
                            "(turn tiling off for it)")
    with torch.no_grad():
        mean = vae.encode(video)[0] if latents is None else latents
    if steps == 0:
        return mean
    stride, dtype = vae.config.time_stride, mean.dtype
    target = pad_frames(video, stride).float()
    cache = CausalCache()
    refined = []
    for start in range(0, mean.shape[2], window):
        stop = min(start + window, mean.shape[2])
        goal = target[:, :, max(0, 1 + stride * (start - 1)) : 1 + stride * (stop - 1)]  # the window's pixels
        z = mean[:, :, start:stop].detach().float().clone().requires_grad_(True)

        def closure():  # the window's fit: loss and gradient on z (the decoder's weights get none)
            with torch.enable_grad():
                rec = _decode(vae, z.to(dtype), cache.copy()).float()
                loss = F.mse_loss(rec, goal)
                if palette:
                    loss = loss + palette * palette_loss(rec, goal, palette_temperature)
                (z.grad,) = torch.autograd.grad(loss, z)
            return loss.detach()

        if method == "adam":
            opt = torch.optim.Adam([z], lr=lr)
            for _ in range(steps):
                closure()
                opt.step()
        else:  # one L-BFGS run of at most `steps` loss evaluations, strong-Wolfe line search
            torch.optim.LBFGS([z], lr=lr, max_iter=steps, max_eval=steps, history_size=LBFGS_HISTORY,
                              line_search_fn="strong_wolfe").step(closure)
        with torch.no_grad():
            _decode(vae, z.to(dtype), cache)  # the window's context for the next one
        refined.append(z.detach().to(dtype))
    return torch.cat(refined, dim=2)


def _decode(vae: VideoVAE, z: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    """Latent frames z (B, Z, t, h, w) decoded one at a time through `cache` -> (B, 3, F', H, W)."""
    x = vae.conv2(z)
    return torch.cat([vae.decoder(x[:, :, t : t + 1], cache) for t in range(x.shape[2])], dim=2)
