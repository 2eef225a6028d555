"""Latent refinement (kino/models/vae/refine.py): fitting a clip's latents through the frozen decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kino.errors import KinoUserError
from kino.models.vae import CausalCache, TileConfig, VideoVAE
from kino.models.vae.pretrained import load_vae
from kino.models.vae.refine import Refinement, refine_latents
from kino.tasks.reconstruct import psnr_uint8, reconstruct_video
from kino.world.generator import render, scene_at
from kino.world.palette import WORLD_PALETTE, palette_loss
from test_vae_model import _model
from test_vae_model import one_thread as one_thread  # the autouse fixture: one thread here too


@pytest.fixture(scope="module")
def tiny() -> VideoVAE:
    return _model()  # the tiny VAE with every layer perturbed, as in test_vae_model


def _video(frames: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, 16, 24, generator=gen) * 2 - 1


def _chunk_errors(vae: VideoVAE, z: torch.Tensor, video: torch.Tensor) -> list[float]:
    """The decoder's MSE per pixel chunk (frame 0, then 4 frames per latent frame)."""
    with torch.no_grad():
        rec = vae.decode(z, clamp=False)
    bounds = [0, 1] + list(range(5, rec.shape[2] + 1, 4))
    return [F.mse_loss(rec[:, :, a:b], video[:, :, a:b]).item() for a, b in zip(bounds, bounds[1:])]


def test_zero_steps_is_the_posterior_mean(tiny):
    video = _video(9)
    with torch.no_grad():
        mean = tiny.encode(video)[0]
    assert torch.equal(refine_latents(tiny, video, 0), mean)


@pytest.mark.parametrize("method", ["adam", "lbfgs"])
@pytest.mark.parametrize("frames,window", [(1, 4), (9, 1), (11, 2), (17, 4)])
def test_refined_latents_decode_closer_to_the_clip_in_every_chunk(tiny, frames, window, method):
    """Each window of latent frames is fitted through the context the refined frames before it
    leave, so every chunk of the decoded clip gets closer to its pixels (11 frames: padded to
    13 as `encode` pads them, and the latent grid is the encoder's)."""
    video = _video(frames)
    with torch.no_grad():
        mean = tiny.encode(video)[0]
    refined = refine_latents(tiny, video, 15, window=window, method=method)
    assert refined.shape == mean.shape and refined.dtype == mean.dtype and not refined.requires_grad
    padded = torch.cat([video, video[:, :, -1:].expand(-1, -1, -(frames - 1) % 4, -1, -1)], dim=2)
    before, after = _chunk_errors(tiny, mean, padded), _chunk_errors(tiny, refined, padded)
    assert all(a < b for a, b in zip(after, before)), (before, after)
    assert sum(after) < 0.9 * sum(before), (before, after)


@pytest.mark.parametrize("palette", [0.0, 0.5])
def test_a_window_as_long_as_the_clip_is_adam_on_the_whole_decode(tiny, palette):
    """window >= T: the same Adam steps as on the whole clip's decode (`VideoVAE.decode`), so
    windows cover the right pixels and the cache carries the context the whole decode has; with
    `palette`, on MSE plus that weight of Shapes World's palette loss."""
    video = _video(9, seed=2)
    with torch.no_grad():
        z = tiny.encode(video)[0].clone()
    z.requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(4):
        rec = tiny.decode(z, clamp=False)
        loss = F.mse_loss(rec, video) + palette * palette_loss(rec, video, 0.05)
        (z.grad,) = torch.autograd.grad(loss, z)
        opt.step()
    fit = refine_latents(tiny, video, 4, window=3, palette=palette, method="adam")
    torch.testing.assert_close(fit, z.detach(), rtol=1e-4, atol=1e-5)
    one = refine_latents(tiny, video, 4, window=1, palette=palette, method="adam")
    assert not torch.allclose(one, fit, rtol=1e-4, atol=1e-5)
    if palette:  # the term is not a no-op
        assert not torch.allclose(refine_latents(tiny, video, 4, window=3, method="adam"), fit, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [1, 2])
def test_windows_are_fitted_one_after_another_in_causal_order(tiny, window):
    """window < T, against a reference built from the whole decode alone: window by window,
    Adam on that window's latents with the ones before it fixed at their fitted values, on the
    MSE of that window's own pixels (frame 0, then 4 per latent frame) in the decode of all
    latents up to it."""
    video = _video(13, seed=6)  # 4 latent frames: pixels [0, 1), [1, 5), [5, 9), [9, 13)
    with torch.no_grad():
        z = tiny.encode(video)[0].clone()
    pixels = [0, 1, 5, 9, 13]
    for start in range(0, z.shape[2], window):
        stop = min(start + window, z.shape[2])
        part = z[:, :, start:stop].clone().requires_grad_(True)
        opt = torch.optim.Adam([part], lr=0.05)
        for _ in range(3):
            rec = tiny.decode(torch.cat([z[:, :, :start], part], dim=2), clamp=False)
            a, b = pixels[start], pixels[stop]
            (part.grad,) = torch.autograd.grad(F.mse_loss(rec[:, :, a:b], video[:, :, a:b]), part)
            opt.step()
        z[:, :, start:stop] = part.detach()
    fit = refine_latents(tiny, video, 3, window=window, method="adam")
    torch.testing.assert_close(fit, z, rtol=1e-4, atol=1e-5)


def test_refinement_leaves_the_model_alone(tiny):
    """The decoder's weights get no gradient and do not change; the model stays usable as before."""
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    refine_latents(tiny, _video(5, seed=3), 3)
    assert all(p.grad is None for p in tiny.parameters())
    assert all(torch.equal(v, state[k]) for k, v in tiny.state_dict().items())


def test_a_copied_cache_is_not_changed_by_decoding_from_the_copy(tiny):
    """What refinement relies on: decoding a chunk from a copy leaves the original's context, so
    decoding again from it gives the same frames."""
    with torch.no_grad():
        z = tiny.encode(_video(9, seed=4))[0]
        cache = CausalCache()
        tiny.decoder(tiny.conv2(z[:, :, :1]), cache)
        first = tiny.decoder(tiny.conv2(z[:, :, 1:2]), cache.copy())
        tiny.decoder(tiny.conv2(z[:, :, 1:2] * 3), cache.copy())
        again = tiny.decoder(tiny.conv2(z[:, :, 1:2]), cache.copy())
        without_context = tiny.decoder(tiny.conv2(z[:, :, 1:2]), CausalCache())
        from_original = tiny.decoder(tiny.conv2(z[:, :, 1:2]), cache)
    assert torch.equal(first, again)
    assert torch.equal(first, from_original)  # the copy holds the original's context ...
    # ... and that context matters (without it the chunk is decoded as a clip's first)
    assert first.shape != without_context.shape or not torch.allclose(first, without_context, atol=1e-4)


def test_a_window_as_long_as_the_clip_is_lbfgs_on_the_whole_decode(tiny):
    """The L-BFGS method: one torch L-BFGS run (lr 1, strong-Wolfe line search, at most `steps`
    loss evaluations) on the whole clip's decode when the window covers it."""
    video = _video(9, seed=5)
    with torch.no_grad():
        z = tiny.encode(video)[0].clone()
    z.requires_grad_(True)
    evaluations = []

    def closure():
        with torch.enable_grad():
            rec = tiny.decode(z, clamp=False)
            loss = F.mse_loss(rec, video) + 0.5 * palette_loss(rec, video, 0.05)
            (z.grad,) = torch.autograd.grad(loss, z)
        evaluations.append(loss.item())
        return loss.detach()

    torch.optim.LBFGS([z], lr=1.0, max_iter=6, max_eval=6, history_size=10, line_search_fn="strong_wolfe").step(closure)
    assert len(evaluations) == 6 and min(evaluations) < evaluations[0]
    fit = refine_latents(tiny, video, 6, window=3, palette=0.5)  # the default method
    torch.testing.assert_close(fit, z.detach(), rtol=1e-4, atol=1e-5)
    adam = refine_latents(tiny, video, 6, window=3, palette=0.5, method="adam")
    assert not torch.allclose(adam, fit, rtol=1e-4, atol=1e-5)


def test_reconstruct_with_refinement_keeps_the_shape(tiny):
    video = torch.rand(1, 3, 6, 13, 21) * 2 - 1  # any frame count and size, as reconstruct takes
    plain = tiny.reconstruct(video)
    refined = tiny.reconstruct(video, refine=5)
    assert refined.shape == plain.shape == video.shape
    assert F.mse_loss(refined, video) < F.mse_loss(plain, video)


@pytest.mark.parametrize("method", ["adam", "lbfgs"])
def test_reconstruct_passes_the_refinement_settings_on(tiny, method):
    video = WORLD_PALETTE[torch.randint(0, len(WORLD_PALETTE), (1, 5, 16, 24))].permute(0, 4, 1, 2, 3)
    with torch.no_grad():
        assert torch.equal(tiny.reconstruct(video, refine=Refinement(3, palette=0.5, method=method)),
                           tiny.decode(refine_latents(tiny, video, 3, palette=0.5, method=method)))
        assert torch.equal(tiny.reconstruct(video, refine=3), tiny.decode(refine_latents(tiny, video, 3)))


def test_bad_settings_are_user_errors(tiny):
    video = _video(1)
    for steps in (-1, 2.5, True):
        with pytest.raises(KinoUserError, match="steps"):
            refine_latents(tiny, video, steps)
    for window in (0, 1.5):
        with pytest.raises(KinoUserError, match="window"):
            refine_latents(tiny, video, 2, window=window)
    with pytest.raises(KinoUserError, match="learning rate"):
        refine_latents(tiny, video, 2, lr=0.0)
    for palette, temperature in ((-0.1, 0.05), (float("nan"), 0.05), (0.05, 0.0)):
        with pytest.raises(KinoUserError, match="palette"):
            refine_latents(tiny, video, 2, palette=palette, palette_temperature=temperature)
    for method in ("sgd", None):
        with pytest.raises(KinoUserError, match="method must be one of adam, lbfgs"):
            refine_latents(tiny, video, 2, method=method)
    for bad in ({"steps": -1}, {"steps": 2, "palette": -1.0}, {"steps": 2, "method": "Adam"}):
        with pytest.raises(KinoUserError, match="latent refinement"):
            Refinement(**bad)
    with pytest.raises(KinoUserError, match="tiling"):
        tiny.reconstruct(video, tile=TileConfig(), refine=2)
    tiny.enable_tiling()
    try:
        with pytest.raises(KinoUserError, match="tiling"):
            refine_latents(tiny, video, 2)
    finally:
        tiny.disable_tiling()


def test_shipped_vae_refined_reconstruction_is_closer():
    """On a Shapes World clip the shipped VAE's refined reconstruction gains PSNR (measured on
    200 eval clips in BENCHMARKS.md; this clip, seed 778: about +3 dB at 10 steps)."""
    vae = load_vae()
    scene = scene_at("eval", 778, 0, frames=9, size=(64, 64))
    video = render(scene)
    plain = psnr_uint8(video, reconstruct_video(vae, video))
    refined = psnr_uint8(video, reconstruct_video(vae, video, refine=10))
    assert refined > plain + 1.5, (plain, refined)
    assert np.isfinite(refined)
