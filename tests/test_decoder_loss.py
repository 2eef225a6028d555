"""The decoder-space loss (kino/training/decoder_loss.py): the clean-latent estimate, the rows
it picks, its value and gradient through a VAE decoder, its targets in a batch, and training
with it on a tiny world cache."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FakeTextEncoder

from kino.data.latent_cache import LatentCache, build_world_cache
from kino.diffusion.flow import interpolate, velocity_target
from kino.errors import KinoUserError
from kino.models.vae import VAE_SIZES, VideoVAE
from kino.training.config import TrainConfig
from kino.training.decoder_loss import DecoderLossConfig, clean_estimate, decoded_target, decoder_loss, pick_rows
from kino.training.distributed import ParallelConfig
from kino.training.dit import CacheConfig, DiTDataConfig, DiTRunConfig, DiTTask
from kino.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_clean_estimate_inverts_the_flow_and_rows_are_low_noise_eligible_ones():
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 3, 3), torch.randn(3, 4, 2, 3, 3)
    t = torch.tensor([[0.9, 0.9], [0.3, 0.0], [0.05, 0.6]])  # per-frame times, a clean frame in row 1
    xt = interpolate(x0, eps, t)
    assert torch.allclose(clean_estimate(xt, velocity_target(x0, eps), t), x0, atol=1e-6)
    assert not torch.allclose(clean_estimate(xt, velocity_target(x0, eps) + 0.1, t), x0, atol=1e-3)
    t = torch.tensor([[0.2, 0.3], [0.6, 0.1], [0.4, 0.4], [0.1, 0.1], [0.5, 0.5]])
    eligible = torch.tensor([True, True, False, True, True])
    assert pick_rows(t, eligible, 0.5, 8).tolist() == [0, 3, 4]  # row 1 has a frame above 0.5
    assert pick_rows(t, eligible, 0.5, 2).tolist() == [0, 3]
    assert pick_rows(t, eligible, 0.1, 2).tolist() == [3]
    assert pick_rows(t, torch.zeros(5, dtype=torch.bool), 1.0, 2).numel() == 0


def test_decoder_loss_is_the_pixel_error_and_its_gradient_leads_to_the_target():
    torch.manual_seed(0)
    vae = VideoVAE(VAE_SIZES["tiny"]).eval().requires_grad_(False)
    z = torch.randn(2, vae.config.z_dim, 2, 4, 4)
    drawn = vae.decode(vae.denormalize(z), clamp=False)
    target = decoded_target(vae, z)  # clamped to the pixel range, as a clip is
    assert target.shape == (2, 3, 5, 32, 32) and torch.equal(target, drawn.clamp(-1, 1))
    assert decoder_loss(vae, z, drawn).item() < 1e-10  # the latents that drew it
    target = drawn.clamp(-1, 1)
    start = z + 0.5 * torch.randn_like(z)
    by_hand = (vae.decode(vae.denormalize(start), clamp=False) - target).pow(2).mean()
    assert decoder_loss(vae, start, target).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert decoder_loss(vae, start, target[:, :, :3, :30, :31]).item() != pytest.approx(by_hand.item(), rel=1e-3)
    x = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(30):  # the gradient reaches the latents through the frozen decoder
        opt.zero_grad()
        decoder_loss(vae, x, target).backward()
        opt.step()
    assert decoder_loss(vae, x.detach(), target).item() < 0.5 * by_hand.item()
    assert all(p.grad is None for p in vae.parameters())


def _run_config(tmp_path, cache_dir, name, decoder=None, steps=60):
    return DiTRunConfig(
        model="tiny", cache=CacheConfig(dir=str(cache_dir), clips_per_bucket=8, buckets=["5x32x32", "1x32x32"]),
        data=DiTDataConfig(batch_size=4), decoder_loss=decoder or DecoderLossConfig(),
        train=TrainConfig(out_dir=str(tmp_path / name), max_steps=steps, lr=3e-3, log_every=1, checkpoint_every=0,
                          progress=False))


def test_training_with_the_decoder_loss_lowers_it(tmp_path):
    torch.manual_seed(0)
    vae = VideoVAE(VAE_SIZES["tiny"]).eval().requires_grad_(False)
    cache_dir = build_world_cache(tmp_path / "cache", vae, FakeTextEncoder(), clips_per_bucket=8,
                                  buckets=[(5, 32, 32), (1, 32, 32)])
    cache = LatentCache(cache_dir)
    dec = DecoderLossConfig(weight=100.0, max_t=1.0, rows=3)
    cfg = _run_config(tmp_path, cache_dir, "run", dec)
    with pytest.raises(KinoUserError, match="needs the VAE"):
        DiTTask(cfg, cache)
    task = DiTTask(cfg, cache, vae=vae)
    batches = [task.batch(10_000 + i) for i in range(8)]
    assert sum(len(b["decoder_rows"]) for b in batches) >= 8
    for b in batches:  # the target is the clip itself: it encodes to the cached latents
        rows = b["decoder_rows"]
        assert len(rows) <= 3 and not b["clean"][rows].any()
        frames = b["decoder_frames"]
        assert frames.shape == (len(rows), 3, *[1 + 4 * (n - 1) for n in b["latents"].shape[2:3]], 32, 32)
        if len(rows):
            latents = vae.normalize(vae.encode(frames)[0])
            assert torch.allclose(latents, b["latents"][rows].float(), atol=2e-2)

    rows = sum(len(b["decoder_rows"]) for b in batches)
    with torch.no_grad():  # what the cached latents themselves score: the random decoder's own error
        floor = sum(decoder_loss(vae, b["latents"][b["decoder_rows"]], b["decoder_frames"]).item()
                    * len(b["decoder_rows"]) for b in batches if len(b["decoder_rows"])) / rows

    def pixel_error(model):  # the decoder loss over the fixed batches (rows weighted alike) above that floor
        with torch.no_grad():
            logs = [task.loss(model, b)[1] for b in batches]
        return sum(log["decoder_sum"].item() for log in logs) / rows - floor

    torch.manual_seed(0)
    before = pixel_error(task.build_model())
    trainer = Trainer(task, cfg.train)
    result = trainer.fit()
    assert math.isfinite(result.losses["decoder_sum"]) and result.losses["decoder_rows"] >= 0
    after = pixel_error(trainer.model)
    off_cfg = _run_config(tmp_path, cache_dir, "off")  # the same steps without it
    off = DiTTask(off_cfg, cache, vae=vae)
    assert "decoder_rows" not in off.batch(0)
    torch.manual_seed(0)
    plain = Trainer(off, off_cfg.train)
    plain.fit()
    without = pixel_error(plain.model)
    # (with a random decoder the cached latents are far from the best ones: the excess goes below 0)
    assert before - after > 0.05 and without - after > 0.05, (before, after, without)
    decoded = _run_config(tmp_path, cache_dir, "decoded", DecoderLossConfig(weight=1.0, max_t=1.0, target="decoded"))
    b = DiTTask(decoded, cache, vae=vae).batch(3)
    assert "decoder_frames" not in b and len(b["decoder_rows"])
    assert math.isfinite(DiTTask(decoded, cache, vae=vae).loss(plain.model, b)[1]["decoder_sum"].item())


@pytest.mark.parametrize("kwargs, match", [
    ({"weight": -1.0}, "decoder_loss.weight"), ({"weight": math.inf}, "decoder_loss.weight"),
    ({"max_t": 0.0}, "max_t"), ({"max_t": 1.5}, "max_t"), ({"rows": 0}, "rows"), ({"target": "latents"}, "target"),
])
def test_decoder_loss_config_errors(kwargs, match):
    with pytest.raises(KinoUserError, match=match):
        DecoderLossConfig(**kwargs)


def test_decoder_loss_needs_whole_clips(tmp_path):
    with pytest.raises(KinoUserError, match="sequence_parallel = 1"):
        DiTRunConfig(decoder_loss=DecoderLossConfig(weight=1.0),
                     train=TrainConfig(out_dir=str(tmp_path), parallel=ParallelConfig(sequence_parallel=2)))
