"""VideoVAE (kino.models.vae): shapes, causality, streaming, tiling, diffusers parity, goldens.

All on CPU with the tiny size and random weights.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from kino.models.vae import (
    VAE_SIZES,
    CausalCache,
    TileConfig,
    VAEConfig,
    VAEInputError,
    VideoVAE,
    config_from_diffusers,
    from_diffusers,
    to_diffusers,
)
from kino.models.vae.model import INIT_LOGVAR, RMSNorm, _time_last_is_faster, blend_tiles, conv3d, tile_regions

TINY = VAE_SIZES["tiny"]


def _perturb(model: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Add seeded noise to every parameter, so zero-initialised ones (residual conv2, attention
    proj, biases) take part and a wrong mapping or a skipped layer shows up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


def _model(config: VAEConfig = TINY, seed: int = 0) -> VideoVAE:
    torch.manual_seed(seed)
    return _perturb(VideoVAE(config), seed + 1).eval()


def _video(frames: int, height: int = 32, width: int = 48, seed: int = 0, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, generator=gen) * 2 - 1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are so small that OpenMP barriers dominate, and with a second process on
    the cores (a training run, another test) two threads run ~50x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> VideoVAE:
    return _model()


# ---------------------------------------------------------------------------- config


def test_config_json_roundtrip_and_sizes():
    for name, config in VAE_SIZES.items():
        d = json.loads(json.dumps(config.to_dict()))
        assert VAEConfig.from_dict(d) == config, name
        strides = {"wan2.2": (4, 16, 48), "small-s4": (4, 4, 16)}  # every other size: 4 x 8 x 8 to 16
        assert (config.time_stride, config.space_stride, config.z_dim) == strides.get(name, (4, 8, 16)), name
    with pytest.raises(ValueError, match="unknown VAEConfig fields"):
        VAEConfig.from_dict({**TINY.to_dict(), "temperal_downsample": [True]})
    with pytest.raises(ValueError, match="z_dim"):
        VAEConfig(z_dim=8)
    assert sum(p.numel() for p in VideoVAE(VAE_SIZES["tiny"]).parameters()) == 220_107


# ---------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("frames", [1, 2, 3, 5, 6, 9, 13])
def test_shapes_and_reconstruct_keeps_shape(tiny, frames):
    video = _video(frames)
    with torch.no_grad():
        mean, logvar = tiny.encode(video)
        latent_frames = 1 + math.ceil((frames - 1) / 4)
        assert mean.shape == logvar.shape == (1, 16, latent_frames, 4, 6)
        assert TINY.latent_frames(frames) == latent_frames
        out = tiny.decode(mean)
        assert out.shape == (1, 3, 1 + 4 * (latent_frames - 1), 32, 48)
        assert out.abs().max() <= 1.0
        assert tiny.reconstruct(video).shape == video.shape


def test_reconstruct_any_size_and_batch(tiny):
    video = _video(6, 30, 44, batch=2)  # neither 4k+1 frames nor multiples of 8
    with torch.no_grad():
        assert tiny.reconstruct(video).shape == video.shape


def test_image_is_a_one_frame_video(tiny):
    image = _video(1)
    with torch.no_grad():
        mean, _ = tiny.encode(image)
        assert mean.shape == (1, 16, 1, 4, 6)
        assert tiny.decode(mean).shape == (1, 3, 1, 32, 48)


def test_odd_frame_counts_are_padded_with_the_last_frame(tiny):
    video = _video(6)
    padded = torch.cat([video, video[:, :, -1:].expand(-1, -1, 3, -1, -1)], dim=2)  # 9 frames
    with torch.no_grad():
        torch.testing.assert_close(tiny.encode(video), tiny.encode(padded), rtol=0, atol=0)


# ---------------------------------------------------------------------------- causality and streaming


def test_encoder_is_causal(tiny):
    video = _video(13)
    with torch.no_grad():
        full, _ = tiny.encode(video)
        for k in range(3):
            part, _ = tiny.encode(video[:, :, : 4 * k + 1])
            torch.testing.assert_close(part, full[:, :, : k + 1], rtol=0, atol=1e-5)


def test_decoder_is_causal(tiny):
    z = torch.randn(1, 16, 4, 4, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = tiny.decode(z)
        torch.testing.assert_close(tiny.decode(z[:, :, :2]), full[:, :, :5], rtol=0, atol=1e-5)


def test_streaming_equals_whole_clip(tiny):
    """Chunks + cache == one pass over the whole clip (no cache), within 1e-5 in fp32."""
    video = _video(9)
    with torch.no_grad():
        mean, logvar = tiny.encode(video)
        whole_mean, whole_logvar = tiny.conv1(tiny.encoder(video)).chunk(2, dim=1)
        torch.testing.assert_close(mean, whole_mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(logvar, whole_logvar, rtol=0, atol=1e-5)

        decoded = tiny.decode(mean, clamp=False)
        torch.testing.assert_close(decoded, tiny.decoder(tiny.conv2(mean)), rtol=0, atol=1e-5)
        chunks = list(tiny.decode_chunks(mean, clamp=False))
        assert [c.shape[2] for c in chunks] == [1, 4, 4]
        torch.testing.assert_close(torch.cat(chunks, dim=2), decoded, rtol=0, atol=0)


def test_cache_does_not_grow_with_clip_length(tiny):
    cache = CausalCache()
    sizes = []
    with torch.no_grad():
        tiny.encoder(_video(1), cache)
        for chunk in range(4):
            tiny.encoder(_video(4, seed=chunk), cache)
            sizes.append(cache.nbytes())
    assert sizes[0] > 0 and len(set(sizes)) == 1


# ---------------------------------------------------------------------------- tiling


def test_blend_tiles_reassembles_exact_crops():
    full = torch.randn(1, 2, 3, 40, 56)
    regions = tile_regions(40, 56, 24, 24, 8)
    assert {(r[1], r[3]) for r in regions} >= {(40, 56)}  # the last tiles are flush with the edges
    tiles = [full[..., y0:y1, x0:x1] for y0, y1, x0, x1 in regions]
    torch.testing.assert_close(blend_tiles(tiles, regions, 40, 56, ramp=8), full)


def _spatially_pointwise(model: VideoVAE) -> VideoVAE:
    """Keep only the centre spatial tap of every conv: each 8x8 pixel block then maps to its own
    latent and back, so tiling on the 8-pixel grid must be exact (temporal taps stay)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)) and m.weight.shape[-1] == 3:
                centre = m.weight[..., 1:2, 1:2].clone()
                m.weight.zero_()
                m.weight[..., 1:2, 1:2] = centre
    return model


TILE = TileConfig(tile_h=64, tile_w=64, overlap=48)  # on 32x80 frames: two 32x64 tiles


@pytest.mark.parametrize("wan22", [False, True])
def test_tiling_is_exact_for_a_spatially_local_model(wan22):
    """Also for Wan2.2's layout: patches, AvgDown and DupUp stay inside 16 x 16 pixel cells."""
    config = dataclasses.replace(TINY, mid_attention=False, residual=wan22, patch_size=2 if wan22 else 1)
    model = _spatially_pointwise(_model(config))
    video, tile = _video(5, 32, 80), TILE
    with torch.no_grad():
        mean, _ = model.encode(video)
        tiled_mean, _ = model.encode(video, tile)
        torch.testing.assert_close(tiled_mean, mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.decode(mean, tile), model.decode(mean), rtol=0, atol=1e-5)


def test_tiling_approximates_untiled():
    """A real model sees past a tile's edge, so seams differ; blending keeps that small.

    Stated tolerance (fully convolutional tiny size, kino's init, smooth input, two 32x64 tiles
    overlapping by 48 on a 32x80 frame): mean |tiled - untiled| < 5% of the mean |output|
    (measured 3%), max < 0.5 (measured 0.35). A misplaced tile gives errors of the size of
    the signal.
    """
    torch.manual_seed(0)
    model = VideoVAE(dataclasses.replace(TINY, mid_attention=False)).eval()
    video = torch.nn.functional.avg_pool3d(_video(5, 32, 80), (1, 9, 9), 1, (0, 4, 4)) * 3
    tile = TILE
    with torch.no_grad():
        mean, _ = model.encode(video)
        tiled_mean, _ = model.encode(video, tile)
        out, tiled_out = model.decode(mean, clamp=False), model.decode(mean, tile, clamp=False)
    for ref, got in [(mean, tiled_mean), (out, tiled_out)]:
        err = (got - ref).abs()
        assert err.mean() < 0.05 * ref.abs().mean() and err.max() < 0.5


# ---------------------------------------------------------------------------- diffusers parity


def _diffusers_wan(seed: int, **config):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKLWan(**config).eval()
    return _perturb(model, seed + 1)  # RMS gammas start at 1: make a wrong gamma mapping visible


DIFFUSERS_CONFIGS = {
    "nrb1": dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                 temperal_downsample=[False, True, True]),
    "nrb2-early-time": dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=2, attn_scales=[],
                            temperal_downsample=[True, True, False]),
    "wide-decoder": dict(base_dim=8, decoder_base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                         attn_scales=[], temperal_downsample=[False, True, True]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(DIFFUSERS_CONFIGS))
def test_matches_diffusers_autoencoder_kl_wan(name):
    reference = _diffusers_wan(3, **DIFFUSERS_CONFIGS[name])
    state = reference.state_dict()
    model = VideoVAE(config_from_diffusers(dict(reference.config))).eval()
    model.load_state_dict(from_diffusers(state), strict=True)

    for frames in (1, 9):
        video = _video(frames, seed=frames)
        with torch.no_grad():
            posterior = reference.encode(video).latent_dist
            mean, logvar = model.encode(video)
            torch.testing.assert_close(mean, posterior.mean, rtol=0, atol=1e-4)
            torch.testing.assert_close(logvar, posterior.logvar, rtol=0, atol=1e-4)
            expected = reference.decode(posterior.mean).sample
            decoded = model.decode(mean)
            assert 0.05 < (expected.abs() < 1).float().mean()  # not all saturated by the clamp
            torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-4)

    back = to_diffusers(from_diffusers(state))
    assert list(back) == list(state) and all(back[k] is state[k] for k in state)


WAN22_CONFIGS = {
    # Wan2.2's VAE (TI2V-5B): residual stages, 2x2 pixel patches, 48 latent channels, wider decoder
    "wan2.2-like": dict(base_dim=8, decoder_base_dim=12, z_dim=6, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                        temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
                        out_channels=12, scale_factor_spatial=16, latents_mean=[0.0] * 6, latents_std=[1.0] * 6),
    "nrb2-early-time": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=2,
                            temperal_downsample=[True, True], is_residual=True, patch_size=2, in_channels=12,
                            out_channels=12, latents_mean=[0.0] * 4, latents_std=[1.0] * 4),
}  # fmt: skip


@pytest.mark.parametrize("name", list(WAN22_CONFIGS))
def test_wan22_vae_matches_diffusers(name):
    """Wan2.2's VAE in kino's class (`residual`, `patch_size`): diffusers' AutoencoderKLWan with
    is_residual and patch_size gives the same moments and frames, first frame and 4-frame
    chunks alike (the shortcuts' first-frame rules), for 1, 5 and 9 frames."""
    reference = _diffusers_wan(5, **WAN22_CONFIGS[name])
    config = config_from_diffusers(dict(reference.config))
    assert config.residual and config.patch_size == 2
    assert config.space_stride == 2 ** (len(config.dim_mult) - 1) * 2
    model = VideoVAE(config).eval()
    model.load_state_dict(from_diffusers(reference.state_dict()), strict=True)
    s = config.space_stride
    for frames in (1, 5, 9):
        video = torch.rand(1, 3, frames, 2 * s, 3 * s, generator=torch.Generator().manual_seed(frames)) * 2 - 1
        with torch.no_grad():
            posterior = reference.encode(video).latent_dist
            mean, logvar = model.encode(video)
            assert mean.shape == (1, config.z_dim, config.latent_frames(frames), 2, 3)
            torch.testing.assert_close(mean, posterior.mean, rtol=0, atol=1e-4)
            torch.testing.assert_close(logvar, posterior.logvar, rtol=0, atol=1e-4)
            expected = reference.decode(posterior.mean).sample
            decoded = model.decode(mean)
            assert decoded.shape == video.shape and 0.05 < (expected.abs() < 1).float().mean()
            torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-4)


def test_wan22_vae_original_layout_round_trip():
    """Wan2.2_VAE.pth's names (the stages nested as downsamples.i.downsamples.j, Wan's
    Sequential indices) to kino and back, and its config read off the shapes."""
    from kino.models.vae import from_wan, to_wan
    from kino.models.vae.adapters import config_from_wan

    reference = _diffusers_wan(5, **WAN22_CONFIGS["wan2.2-like"])
    kino_state = from_diffusers(reference.state_dict())
    wan_state = to_wan(kino_state)
    assert "encoder.downsamples.1.downsamples.1.resample.1.weight" in wan_state
    assert "decoder.upsamples.0.upsamples.0.residual.6.weight" in wan_state
    back = from_wan(wan_state)
    assert back.keys() == kino_state.keys() and all(back[k] is kino_state[k] for k in back)
    config = config_from_wan(wan_state)
    expected = config_from_diffusers(dict(reference.config))
    assert dataclasses.replace(config, latents_mean=expected.latents_mean, latents_std=expected.latents_std) == expected
    released = VAE_SIZES["wan2.2"]  # the released size: Wan2.2's 48 latent statistics come with it
    model = VideoVAE(dataclasses.replace(released, base_dim=8, decoder_base_dim=8, dim_mult=[1, 1, 1, 1],
                                         num_res_blocks=1))
    assert config_from_wan(to_wan(model.state_dict())).latents_mean == released.latents_mean


def test_config_from_diffusers_rejects_other_families():
    with pytest.raises(ValueError, match="in_channels / out_channels"):
        config_from_diffusers({"is_residual": True, "patch_size": 2})  # 3 channels cannot hold 2x2 patches
    # diffusers' AutoencoderKLWan cannot run attn_scales (its encoder passes a cache its attention
    # blocks do not take; its decoder drops them), so there is no such layout to convert.
    with pytest.raises(ValueError, match="attn_scales"):
        config_from_diffusers({"attn_scales": [0.5]})
    assert config_from_diffusers({}) == VAE_SIZES["wan2.1"]  # diffusers' defaults are Wan2.1's
    assert config_from_diffusers({"decoder_base_dim": 96}).decoder_base_dim is None  # = base_dim
    assert config_from_diffusers({"decoder_base_dim": 128}).decoder_dim == 128


# ---------------------------------------------------------------------------- a wider decoder


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_widen_decoder_decodes_the_same(size):
    """tiny has the middle attention and the temporal upsampling; both stay exact."""
    from kino.models.vae.grow import widen_decoder

    torch.manual_seed(0)
    vae = _perturb(VideoVAE(VAE_SIZES[size]).eval(), 1)
    z = torch.randn(1, 16, 3, 4, 4)
    with torch.no_grad():
        ref = vae.decode(z, clamp=False)
        for factor in (2, 3):
            wide = widen_decoder(vae, factor, noise=0.0)
            assert wide.config.decoder_dim == factor * vae.config.decoder_dim
            assert wide.config.base_dim == vae.config.base_dim
            torch.testing.assert_close(wide.decode(z, clamp=False), ref, rtol=0, atol=1e-4)
            assert sum(p.numel() for p in wide.decoder.parameters()) > 3 * sum(
                p.numel() for p in vae.decoder.parameters())
            # the encoder and the quant convs are the same tensors' values: the latents do not move
            old = vae.state_dict()
            assert all(torch.equal(v, old[k]) for k, v in wide.state_dict().items()
                       if not k.startswith("decoder."))
        noisy = widen_decoder(vae, 2, noise=1e-3, seed=5)
        out = noisy.decode(z, clamp=False)
    err = (out - ref).abs()
    assert 0 < err.max() < 0.1  # symmetry broken, output barely moved
    w = noisy.decoder.head.conv.weight  # (3, 2C, ...): the two copies of each input channel differ
    c = w.shape[1] // 2
    assert not torch.equal(w[:, :c], w[:, c:])
    with pytest.raises(ValueError, match="whole number"):
        widen_decoder(vae, 1.5)


# ---------------------------------------------------------------------------- numerics and training


def test_golden_values():
    """Seeded tiny model (kino's init, no perturbation) on a seeded input: catches silent numeric changes."""
    torch.manual_seed(0)
    model = VideoVAE(TINY).eval()
    video = _video(5, seed=123)
    with torch.no_grad():
        mean, logvar = model.encode(video)
        out = model.decode(mean)
    got = [mean[0, 0, 0, 0, 0], mean[0, 5, 1, 1, 1], logvar[0, 3, 1, 0, 1], out[0, 0, 0, 3, 4], out[0, 2, 4, 10, 7]]
    expected = [0.20533, 1.07949, 0.13337 + INIT_LOGVAR, 0.27464, 0.31816]
    torch.testing.assert_close(torch.stack(got), torch.tensor(expected), rtol=0, atol=1e-4)


@pytest.mark.parametrize("shape, kernel, time_last", [
    ((1, 16, 6, 66, 66), (3, 3, 3), True),  # a decoder chunk at 64x64
    ((1, 8, 7, 66, 50), (3, 3, 3), True),  # odd sizes
    ((1, 32, 6, 32, 48), (3, 1, 1), True),  # a temporal upsampling conv
    ((1, 16, 3, 66, 66), (3, 3, 3), False),  # a 1-frame chunk
    ((2, 4, 6, 18, 18), (3, 3, 3), False),  # a batch
])
def test_conv3d_equals_torch_forwards_and_backwards(shape, kernel, time_last):
    """kino's conv3d (oneDNN through a time-last layout where PyTorch would run slow_conv3d) is
    F.conv3d: the same output and the same gradients for input, weight and bias, on shapes that
    take the time-last path and on shapes that do not."""
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    weight = torch.randn(5, shape[1], *kernel, requires_grad=True)
    bias = torch.randn(5, requires_grad=True)
    assert _time_last_is_faster(x, weight) == time_last
    expected = F.conv3d(x, weight, bias)
    got = conv3d(x, weight, bias)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # sums of ~400 terms of size ~20
    grad = torch.randn_like(expected)
    want = torch.autograd.grad(expected, (x, weight, bias), grad)
    have = torch.autograd.grad(got, (x, weight, bias), grad)
    for a, b in zip(have, want):  # a weight's gradient sums thousands of products: float32 rounding
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_time_last_layout_where_torch_would_run_slow_conv3d():
    """Which layers take the time-last layout, and that it is oneDNN's kernel they then get (a torch
    release that changes its choice of kernel shows here, not as a silent slowdown)."""
    weight = torch.zeros(16, 16, 3, 3, 3)
    full_res = torch.zeros(1, 16, 6, 66, 66)  # a decoder chunk of 4 frames at 64x64: 6,336 <= 20,480
    assert _time_last_is_faster(full_res, weight)
    assert not _time_last_is_faster(torch.zeros(1, 16, 3, 66, 66), weight)  # a 1-frame chunk
    assert not _time_last_is_faster(torch.zeros(1, 16, 6, 18, 18), weight)  # a small, deep layer
    assert not _time_last_is_faster(torch.zeros(2, 16, 6, 66, 66), weight)  # a batch: oneDNN already
    assert not _time_last_is_faster(full_res.double(), weight.double())
    assert not _time_last_is_faster(full_res, torch.zeros(16, 16, 1, 1, 1))
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    with torch.no_grad(), torch.profiler.profile() as prof:
        conv3d(full_res, weight, None)
    kernels = {e.key for e in prof.key_averages()}
    assert "aten::mkldnn_convolution" in kernels and "aten::slow_conv3d_forward" not in kernels


def test_rms_norm_is_wan_normalize():
    """The VAE's RMS norm is Wan's F.normalize(x, dim=1) * sqrt(C) * gamma, an all-zero pixel
    included (zero out, and a finite gradient)."""
    torch.manual_seed(0)
    norm = RMSNorm(6, spatial_dims=3)
    norm.gamma.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 6, 3, 4, 5)
    x[0, :, 1, 2, 3] = 0.0
    x.requires_grad_(True)
    y = norm(x)
    torch.testing.assert_close(y, F.normalize(x, dim=1) * 6**0.5 * norm.gamma, rtol=1e-6, atol=1e-6)
    assert torch.equal(y[0, :, 1, 2, 3], torch.zeros(6))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_gradients_flow_through_chunks(tiny):
    """Each cache passes gradients back: a loss on later chunks alone reaches frame 0 through
    the encoder's cache, and latent frame 0 through the decoder's."""
    video = _video(5).requires_grad_(True)
    mean = tiny.encode(video)[0]
    mean[:, :, 1:].pow(2).sum().backward()  # latent frame 1 is frames 1-4, encoded after frame 0
    assert torch.isfinite(video.grad).all() and video.grad[:, :, 0].abs().sum() > 0
    z = mean.detach().clone().requires_grad_(True)
    tiny.decode(z, clamp=False)[:, :, 1:].pow(2).sum().backward()  # frames 1-4: latent frame 1's chunk
    assert torch.isfinite(z.grad).all() and z.grad[:, :, 0].abs().sum() > 0


def test_forward_samples_the_posterior(tiny):
    video = _video(5)
    with torch.no_grad():
        a, mean, logvar = tiny(video, generator=torch.Generator().manual_seed(0))
        b, _, _ = tiny(video, generator=torch.Generator().manual_seed(0))
    assert a.shape == video.shape and mean.shape == logvar.shape == (1, 16, 2, 4, 6)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_normalize_uses_config_statistics():
    config = dataclasses.replace(TINY, latents_mean=[float(i) for i in range(16)], latents_std=[2.0] * 16)
    model = VideoVAE(config)
    z = torch.randn(2, 16, 3, 4, 5)
    normalized = model.normalize(z)
    torch.testing.assert_close(normalized[:, 3], (z[:, 3] - 3.0) / 2.0)
    torch.testing.assert_close(model.denormalize(normalized), z)


# ---------------------------------------------------------------------------- bad input


def test_bad_inputs_name_what_is_allowed(tiny):
    with pytest.raises(ValueError, match=r"\(B, 3, F, H, W\)"):
        tiny.encode(torch.zeros(1, 4, 5, 32, 48))
    with pytest.raises(ValueError, match=r"\(B, 3, F, H, W\)"):
        tiny.encode(torch.zeros(3, 32, 48))
    with pytest.raises(ValueError, match=r"multiples of 8.*height 24 or 32, width 48"):
        tiny.encode(torch.zeros(1, 3, 5, 30, 48))
    with pytest.raises(ValueError, match=r"\(B, 16, T, h, w\)"):
        tiny.decode(torch.zeros(1, 8, 2, 4, 4))
    with pytest.raises(VAEInputError, match="overlap"):
        TileConfig(tile_h=32, tile_w=32, overlap=32)
