"""DiT training: the latent cache (layout, resume, VAE identity), the DiT task's batches and
loss, training through the generic Trainer (learning, exact resume) and export.

Everything is tiny: a random-weight tiny VAE saved as a model folder, a hash-based fake text
encoder (no MiniLM), the tiny DiT and 32x32 buckets.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import FakeTextEncoder
import torch

from kino.data.latent_cache import (CACHE_JSON, EMPTY_PROMPT, LOOP_RENDER, LatentCache, bucket_name,
                                    build_world_cache, clip_index, default_buckets)
from kino.errors import KinoUserError
from kino.models.dit import DiT, DiTConfig
from kino.models.folder import load_component, save_component, write_manifest
from kino.models.vae import VAE_SIZES, VideoVAE
from kino.models.vae.pretrained import load_vae
from kino.training.config import TrainConfig, load_config
from kino.training.dit import (CacheConfig, ConditioningMix, DiTDataConfig, DiTRunConfig, DiTTask, FlowConfig,
                               export_dit, frame_times, run_train_dit, time_bin_probability)
from kino.training.trainer import Trainer
from kino.world.generator import loop_progress, render, scene_at

REPO = Path(__file__).resolve().parents[1]
BUCKETS = [(1, 32, 32), (5, 32, 32)]
CLIPS = 6
SHARD = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class CountingVAE:
    """A VAE wrapper counting encode calls (to see which shards a rebuild touches)."""

    def __init__(self, vae: VideoVAE):
        self.vae, self.config, self.calls = vae, vae.config, 0

    def encode(self, x):
        self.calls += 1
        return self.vae.encode(x)

    def __getattr__(self, name):
        return getattr(self.vae, name)


def tiny_vae(seed: int = 0) -> VideoVAE:
    torch.manual_seed(seed)
    return VideoVAE(VAE_SIZES["tiny"]).eval()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vae")
    vae = tiny_vae()
    save_component(out / "vae", vae.config.to_dict(), vae.state_dict())
    write_manifest(out, "tiny-vae", {"vae": ("vae", "VideoVAE")})
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, vae_dir) -> Path:
    out = tmp_path_factory.mktemp("cache") / "world"
    build_world_cache(out, load_vae(vae_dir), FakeTextEncoder(), clips_per_bucket=CLIPS, buckets=BUCKETS,
                      shard_size=SHARD)
    return out


def run_config(tmp: Path, cache: Path, **train) -> DiTRunConfig:
    return DiTRunConfig(
        model="tiny",
        cache=CacheConfig(dir=str(cache), clips_per_bucket=CLIPS, buckets=["1x32x32", "5x32x32"]),
        data=DiTDataConfig(batch_size=4),
        train=TrainConfig(**{"out_dir": str(tmp / "run"), "max_steps": 4, "lr": 3e-3, "log_every": 1,
                             "checkpoint_every": 0, "progress": False, **train}),
    )


# ---------------------------------------------------------------------------- the cache


def test_cache_layout_and_shapes(cache_dir, vae_dir):
    meta = json.loads((cache_dir / CACHE_JSON).read_text())
    assert meta["complete"] and meta["text_encoder"] == {"name": "fake-hash-encoder", "dim": 24, "max_length": 8}
    assert meta["vae"]["config"] == json.loads((vae_dir / "vae" / "config.json").read_text())
    assert [b["name"] for b in meta["buckets"]] == ["1x32x32", "5x32x32"]
    assert (cache_dir / EMPTY_PROMPT).is_file()

    from safetensors.torch import load_file

    shard = load_file(str(cache_dir / "5x32x32" / "shard-00000.safetensors"))
    assert shard["latents"].shape == (SHARD, 16, 2, 4, 4) and shard["latents"].dtype == torch.bfloat16
    assert shard["text"].shape == (SHARD, 8, 24) and shard["text"].dtype == torch.float16
    assert shard["mask"].shape == (SHARD, 8) and shard["mask"].dtype == torch.bool
    side = json.loads((cache_dir / "5x32x32" / "shard-00001.json").read_text())
    assert side["indices"] == [clip_index((5, 32, 32), i) for i in (4, 5)]
    assert side["captions"] == [scene_at("train", 0, j, frames=5, size=(32, 32)).text for j in side["indices"]]

    cache = LatentCache(cache_dir)
    assert cache.buckets == BUCKETS and len(cache) == 2 * CLIPS
    assert cache.num_clips((1, 32, 32)) == CLIPS and cache.latent_shape((1, 32, 32)) == (16, 1, 4, 4)
    got = cache.get((5, 32, 32), [5, 0])
    assert got["latents"].shape == (2, 16, 2, 4, 4) and got["text"].dtype == torch.float32
    # the stored latents are the normalised posterior means of the rendered clips
    vae = load_vae(vae_dir)
    from kino.training.vae import to_model_range
    from kino.world.generator import render

    video = to_model_range(render(scene_at("train", 0, clip_index((5, 32, 32), 5), frames=5, size=(32, 32))))
    expected = vae.normalize(vae.encode(video[None])[0])[0]
    assert torch.allclose(got["latents"][0], expected, rtol=2**-7, atol=1e-6)  # up to bf16 rounding
    # the empty prompt has no real token with this encoder
    assert cache.empty_text.shape == (1, 8, 24) and not cache.empty_mask.any()
    # every clip is a distinct scene, across buckets too
    indices = cache.scene_indices((1, 32, 32)) + cache.scene_indices((5, 32, 32))
    assert len(set(indices)) == len(indices)
    assert len(default_buckets()) == 15 and (1, 64, 96) in default_buckets()


def test_rebuild_only_redoes_missing_shards(cache_dir, vae_dir, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    vae = CountingVAE(load_vae(vae_dir))
    build_world_cache(copy, vae, FakeTextEncoder(), clips_per_bucket=CLIPS, buckets=BUCKETS, shard_size=SHARD)
    assert vae.calls == 0  # complete: nothing to do

    victim = copy / "1x32x32" / "shard-00001.safetensors"
    before = victim.read_bytes()
    kept = copy / "5x32x32" / "shard-00000.safetensors"
    kept_mtime = kept.stat().st_mtime_ns
    victim.unlink()
    with pytest.raises(KinoUserError, match="missing"):
        LatentCache(copy)
    build_world_cache(copy, vae, FakeTextEncoder(), clips_per_bucket=CLIPS, buckets=BUCKETS, shard_size=SHARD)
    assert vae.calls == 1  # one shard of 2 clips: one encode batch
    assert victim.read_bytes() == before  # rebuilt bit for bit
    assert kept.stat().st_mtime_ns == kept_mtime
    LatentCache(copy)

    # growing the cache keeps full shards and redoes the partial last one of each bucket
    build_world_cache(copy, vae, FakeTextEncoder(), clips_per_bucket=CLIPS + 2, buckets=BUCKETS, shard_size=SHARD)
    assert vae.calls == 3 and kept.stat().st_mtime_ns == kept_mtime
    cache = LatentCache(copy)
    assert cache.num_clips((5, 32, 32)) == CLIPS + 2
    assert cache.scene_indices((5, 32, 32))[-1] == clip_index((5, 32, 32), CLIPS + 1)


def test_cache_refuses_another_vae(cache_dir, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    with pytest.raises(KinoUserError, match="another VAE"):
        build_world_cache(copy, tiny_vae(seed=1), FakeTextEncoder(), clips_per_bucket=CLIPS, buckets=BUCKETS,
                          shard_size=SHARD)


def test_loop_cache_holds_clips_that_loop(cache_dir, vae_dir, tmp_path):
    vae = load_vae(vae_dir)
    root = build_world_cache(tmp_path / "loops", vae, FakeTextEncoder(), clips_per_bucket=2, buckets=[(9, 32, 32)],
                             motion="loop")
    loops = LatentCache(root)
    assert loops.meta["motion"] == "loop" and "motion" not in LatentCache(cache_dir).meta
    assert loops.meta["loop"] == LOOP_RENDER
    scene = scene_at("train", 0, clip_index((9, 32, 32), 1), frames=9, size=(32, 32))
    video = render(scene, loop_progress(9, 4))  # period 4: frames 5..8 (latent 2) show frames 1..4 (latent 1)
    assert np.array_equal(video[5:], video[1:5])
    with torch.no_grad():
        expected = vae.normalize(vae.encode(torch.from_numpy(video).permute(3, 0, 1, 2)[None].float() / 127.5 - 1)[0])
    torch.testing.assert_close(loops.get((9, 32, 32), [1])["latents"], expected, atol=0.02, rtol=0.02)  # bf16
    with pytest.raises(KinoUserError, match="motion"):  # a folder holds one kind of clip
        build_world_cache(root, vae, FakeTextEncoder(), clips_per_bucket=2, buckets=[(9, 32, 32)])
    with pytest.raises(KinoUserError, match="three latent frames"):
        build_world_cache(tmp_path / "x", vae, FakeTextEncoder(), clips_per_bucket=2, buckets=[(5, 32, 32)],
                          motion="loop")
    with pytest.raises(KinoUserError, match="unknown cache motion"):
        build_world_cache(tmp_path / "x", vae, FakeTextEncoder(), clips_per_bucket=2, motion="palindrome")


def test_cache_is_kept_for_a_vae_with_another_decoder(cache_dir, vae_dir, tmp_path):
    """A decoder fine-tune leaves every latent the same, so the cache stays (and grows); a
    changed encoder, conv1 or latent statistics is another VAE. A cache written before caches
    recorded the latent identity is matched on the whole model."""
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    base = load_vae(vae_dir)
    meta = json.loads((copy / CACHE_JSON).read_text())
    assert meta["vae"]["latent_sha256"] != meta["vae"]["sha256"]

    def changed(prefix: str) -> VideoVAE:
        vae = load_vae(vae_dir)
        with torch.no_grad():
            next(p for n, p in vae.named_parameters() if n.startswith(prefix)).add_(0.01)
        return vae

    new_decoder = CountingVAE(changed("decoder."))
    before = torch.cat([LatentCache(copy).get(b, range(CLIPS))["latents"] for b in BUCKETS[:1]])
    build_world_cache(copy, new_decoder, FakeTextEncoder(), clips_per_bucket=CLIPS + 2, buckets=BUCKETS,
                      shard_size=SHARD)
    assert new_decoder.calls == 2  # only the grown last shard of each bucket
    cache = LatentCache(copy)
    assert cache.num_clips((1, 32, 32)) == CLIPS + 2
    assert torch.equal(cache.get((1, 32, 32), range(CLIPS))["latents"], before)
    assert cache.vae_latent_sha256 == meta["vae"]["latent_sha256"] and cache.vae_sha256 != meta["vae"]["sha256"]
    for prefix in ("encoder.", "conv1."):
        with pytest.raises(KinoUserError, match="another VAE"):
            build_world_cache(copy, changed(prefix), FakeTextEncoder(), clips_per_bucket=CLIPS + 2, buckets=BUCKETS,
                              shard_size=SHARD)
    # a widened decoder (kino/models/vae/grow.py) makes the same latents: the cache stays valid
    from kino.data.latent_cache import vae_identity
    from kino.models.vae.grow import widen_decoder

    wide, narrow = vae_identity(widen_decoder(base, 2)), vae_identity(base)
    assert wide["latent_sha256"] == narrow["latent_sha256"] == meta["vae"]["latent_sha256"]
    assert wide["sha256"] != narrow["sha256"]
    stats = load_vae(vae_dir)
    stats.config.latents_mean = [m + 0.5 for m in stats.config.latents_mean]
    with pytest.raises(KinoUserError, match="another VAE"):
        build_world_cache(copy, stats, FakeTextEncoder(), clips_per_bucket=CLIPS + 2, buckets=BUCKETS,
                          shard_size=SHARD)

    old_style = tmp_path / "old"
    shutil.copytree(cache_dir, old_style)
    del meta["vae"]["latent_sha256"]
    (old_style / CACHE_JSON).write_text(json.dumps(meta))
    with pytest.raises(KinoUserError, match="another VAE"):
        build_world_cache(old_style, changed("decoder."), FakeTextEncoder(), clips_per_bucket=CLIPS, buckets=BUCKETS,
                          shard_size=SHARD)
    build_world_cache(old_style, base, FakeTextEncoder(), clips_per_bucket=CLIPS, buckets=BUCKETS, shard_size=SHARD)


# ---------------------------------------------------------------------------- batches and timesteps


def test_caption_filter_draws_only_matching_clips(cache_dir, tmp_path):
    cache = LatentCache(cache_dir)
    cfg = run_config(tmp_path, cache_dir)
    cfg.data.caption_filter = "moving (left|right|up|down)"
    task = DiTTask(cfg, cache)
    # images only ever stand still: their bucket has no match and is left out
    assert [bucket_name(b) for b in task.buckets] == ["5x32x32"] and task.bucket_probs.tolist() == [1.0]
    bucket = task.buckets[0]
    captions = cache.captions(bucket)
    match = [i for i, c in enumerate(captions) if re.search(cfg.data.caption_filter, c)]
    assert 0 < len(match) < len(captions)
    allowed = cache.get(bucket, match)["text"]
    for step in range(20):
        batch = task.batch(step)
        for text, mask in zip(batch["text"], batch["mask"]):
            if mask.any():  # not a dropped caption
                assert any(torch.equal(text, a) for a in allowed)
    cfg.data.caption_filter = "purple elephant"
    with pytest.raises(KinoUserError, match="caption_filter"):
        DiTTask(cfg, cache)
    with pytest.raises(KinoUserError, match="regular expression"):
        DiTDataConfig(caption_filter="moving (left")


def test_batches_are_deterministic_and_bucket_pure(cache_dir, tmp_path):
    task = DiTTask(run_config(tmp_path, cache_dir), LatentCache(cache_dir))
    a, b = task.batch(3), task.batch(3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    drops = clips = 0
    seen = {}
    empty = task.cache.empty_text
    for step in range(300):
        batch = task.batch(step)
        x0, t = batch["latents"], batch["t"]
        assert x0.shape[0] == 4 and batch["noise"].shape == x0.shape  # one shape per batch
        clean = batch["clean"]  # conditioning patterns: given frames are at t = 0
        assert t.shape == (4, x0.shape[2]) and (t[~clean] > 0).all() and (t < 1).all() and (t[clean] == 0).all()
        per_clip = t.amax(dim=1, keepdim=True).expand_as(t)
        assert torch.equal(t, per_clip.masked_fill(clean, 0.0))  # one t per clip, on every generated frame
        seen[x0.shape[2]] = seen.get(x0.shape[2], 0) + 1
        dropped = (batch["text"] == empty).all(dim=(1, 2)) & ~batch["mask"].any(dim=1)
        drops += int(dropped.sum())
        clips += 4
    assert 0.06 < drops / clips < 0.14  # caption_dropout 0.1
    # P ~ tokens^-0.5: 16 tokens (image) vs 32 (2 latent frames) -> 0.586 vs 0.414
    assert abs(seen[1] / 300 - task.bucket_probs[0]) < 0.09 and task.bucket_probs[0] == pytest.approx(0.586, abs=1e-3)
    assert not torch.equal(task.batch(4)["noise"][:, :, :1], a["noise"][:, :, :1])


def test_a_token_budget_sets_each_buckets_batch(cache_dir, tmp_path):
    """data.batch_tokens: images (4 tokens) come 2x as many rows per step as 2-latent-frame
    clips (8 tokens), both multiples of batch_size; a step trains on them."""
    cfg = run_config(tmp_path, cache_dir, max_steps=2)
    cfg.data = DiTDataConfig(batch_size=2, batch_tokens=33)
    task = DiTTask(cfg, LatentCache(cache_dir))
    assert task.tokens == [4, 8] and task.batch_sizes == [8, 4]  # 2 * (33 // 8), 2 * (33 // 16)
    rows = {task.batch(step)["latents"].shape[2]: task.batch(step)["latents"].shape[0] for step in range(20)}
    assert rows == {1: 8, 2: 4}
    cfg.data = DiTDataConfig(batch_size=2, batch_tokens=7)  # under one batch_size of any bucket: batch_size
    assert DiTTask(cfg, LatentCache(cache_dir)).batch_sizes == [2, 2]
    with pytest.raises(KinoUserError, match="batch_tokens must be >= 1"):
        DiTDataConfig(batch_tokens=0)
    cfg.data = DiTDataConfig(batch_size=2, batch_tokens=33)
    result = Trainer(DiTTask(cfg, LatentCache(cache_dir)), cfg.train).fit()
    assert result.step == 2


def test_frame_times_and_bin_probabilities():
    flow = FlowConfig()
    t = frame_times(torch.Generator().manual_seed(0), 20000, 3, flow)
    assert t.shape == (20000, 3)
    for lo, hi in ((0.0, 0.25), (0.25, 0.5), (0.75, 1.0)):
        p = time_bin_probability(lo, hi, flow)
        assert ((t[:, 0] >= lo) & (t[:, 0] < hi)).float().mean().item() == pytest.approx(p, abs=0.015)
    shifted = frame_times(torch.Generator().manual_seed(0), 20000, 1, flow, shift=2.0)
    assert ((shifted >= 0.5).float().mean().item() == pytest.approx(time_bin_probability(0.5, 1.0, flow, 2.0),
                                                                    abs=0.015))
    assert sum(time_bin_probability(a, b, flow, 2.0) for a, b in ((0, 0.3), (0.3, 0.9), (0.9, 1))) == pytest.approx(1)
    # a training range (one Wan2.2 expert's): times mapped into [0.4, 0.9], bins counted there
    ranged = frame_times(torch.Generator().manual_seed(5), 20000, 1, flow, 2.0, t_range=(0.4, 0.9))[:, 0]
    assert ranged.min() >= 0.4 and ranged.max() <= 0.9
    for a, b in ((0.0, 0.5), (0.5, 0.7), (0.7, 1.0)):
        assert ((ranged >= a) & (ranged < b)).float().mean().item() == pytest.approx(
            time_bin_probability(a, b, flow, 2.0, (0.4, 0.9)), abs=0.01)


# ---------------------------------------------------------------------------- training


def test_training_reduces_loss_on_a_couple_of_clips(tmp_path):
    small = build_world_cache(tmp_path / "cache", tiny_vae(), FakeTextEncoder(), clips_per_bucket=2, buckets=BUCKETS)
    cfg = run_config(tmp_path, small, max_steps=60, lr=3e-3)
    task = DiTTask(cfg, LatentCache(small))
    eval_batches = [task.batch(10_000 + i) for i in range(8)]

    def mean_loss(model):
        with torch.no_grad():
            return sum(task.loss(model, b)[0].item() for b in eval_batches) / len(eval_batches)

    torch.manual_seed(0)
    before = mean_loss(task.build_model())
    trainer = Trainer(task, cfg.train)
    result = trainer.fit()
    after = mean_loss(trainer.model)
    assert result.step == 60 and math.isfinite(result.losses["loss"])
    assert any(k.startswith("loss_t") for k in result.losses)
    assert after < 0.8 * before, (before, after)


def test_resume_is_exact(cache_dir, tmp_path):
    def train(out: Path, steps: list[int]):
        trainer, starts = None, []
        for n in steps:
            cfg = run_config(out, cache_dir, max_steps=n, ema_decay=0.9)
            trainer = Trainer(DiTTask(cfg, LatentCache(cache_dir)), cfg.train, run_config=cfg)
            starts.append(trainer.fit().start_step)
        return trainer.export_state_dict(ema=False), trainer.export_state_dict(ema=True), starts

    straight = train(tmp_path / "a", [6])
    resumed = train(tmp_path / "b", [3, 6])
    assert straight[2] == [0] and resumed[2] == [0, 3]  # the second fit resumed, it did not start again
    for one, two in zip(straight[:2], resumed[:2]):
        assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


# ---------------------------------------------------------------------------- export and the run


def test_run_trains_and_exports_a_loadable_dit(vae_dir, tmp_path):
    cfg = run_config(tmp_path, tmp_path / "cache", max_steps=2, ema_decay=0.9, sample_every=2)
    cfg.vae = str(vae_dir)
    out = run_train_dit(cfg, text_encoder=FakeTextEncoder())
    assert out == tmp_path / "run" / "model"
    comp = load_component(out, "dit")  # sha256-checked through kino.json
    config = DiTConfig.from_dict(comp.config)
    assert config.text_dim == FakeTextEncoder.dim and config.dim == 32
    model = DiT(config)
    model.load_state_dict(comp.state_dict, strict=True)
    training = json.loads((out / "dit" / "training.json").read_text())
    assert training["steps"] == 2 and training["ema"] and training["text_encoder"]["name"] == "fake-hash-encoder"
    assert training["vae_sha256"] == LatentCache(tmp_path / "cache").vae_sha256
    text, mask = FakeTextEncoder().encode(["a small red circle moving left on a black background"])
    assert model(torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), text, mask).shape == (1, 16, 2, 4, 4)
    assert any((tmp_path / "run" / "tb").iterdir())  # samples were logged beside the scalars
    # export_dit alone writes the same layout
    export_dit(comp.state_dict, config, tmp_path / "again")
    assert load_component(tmp_path / "again", "dit").state_dict.keys() == comp.state_dict.keys()


def test_shipped_config_loads():
    cfg = load_config(REPO / "configs" / "dit_small.toml", DiTRunConfig)
    assert cfg.model == "small" and len(cfg.cache.bucket_list()) == 15
    stages = {p.name: load_config(p, DiTRunConfig) for p in sorted((REPO / "configs").glob("dit_small*.toml"))}
    assert len(stages) >= 6 and all(len(c.cache.bucket_list()) == 15 for c in stages.values())
    assert stages["dit_small_stage5.toml"].model == "small-abspos"  # grows from stage 4's "small"
    loops = stages["dit_small_stage6.toml"]
    assert loops.cache.loop_dir and loops.conditioning.loop > ConditioningMix().loop
    decoder = stages["dit_small_stage16_decoder.toml"].decoder_loss  # the shipped stage 16
    assert decoder.weight > 0 and decoder.target == "frames"
    with pytest.raises(KinoUserError, match="allowed"):
        DiTRunConfig(model="huge")
    with pytest.raises(KinoUserError, match="caption_dropout"):
        FlowConfig(caption_dropout=1.0)


def test_a_fine_tune_keeps_its_parents_generation_defaults(tmp_path):
    """The exported pipeline of a fine-tune carries init_from's kino.json "pipeline" settings
    (steps, guidance interval, ...), so it is used and measured as its parent was."""
    from kino.pipeline import GenerationDefaults
    from kino.training.dit import init_from_defaults

    shipped = json.loads((Path(__file__).resolve().parents[1] / "kino/weights/default/kino.json").read_text())
    assert init_from_defaults("default") == GenerationDefaults.from_dict(shipped["pipeline"])
    assert init_from_defaults("default") != GenerationDefaults()  # the shipped model has its own settings
    assert init_from_defaults(None) == GenerationDefaults()
    parent = tmp_path / "parent"
    parent.mkdir()
    assert init_from_defaults(str(parent)) == GenerationDefaults()  # a DiT folder without a manifest
    (parent / "kino.json").write_text(json.dumps({"name": "x", "pipeline": {"steps": 7,
                                                                             "guidance_interval": [0.5, 1.0]}}))
    got = init_from_defaults(str(parent))
    assert got.steps == 7 and tuple(got.guidance_interval) == (0.5, 1.0) and got.guidance == GenerationDefaults().guidance


# ---------------------------------------------------------------------------- validation


def test_validation_scores_held_out_clips_with_fixed_noise(vae_dir, tmp_path):
    from kino.training.dit import ValidationConfig

    def config(out: Path, steps: int) -> DiTRunConfig:
        cfg = run_config(out, tmp_path / "cache", max_steps=steps, ema_decay=0.9, validate_every=2)
        cfg.vae = str(vae_dir)
        cfg.validation = ValidationConfig(clips_per_bucket=3, batch_size=2, times=[0.2, 0.8])
        return cfg

    run_train_dit(config(tmp_path / "a", 4), text_encoder=FakeTextEncoder())
    rows = [json.loads(line) for line in (tmp_path / "a" / "run" / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert set(rows[0]) == {"step", "val_loss", "val_loss_t0.20", "val_loss_t0.80",
                            "ema_val_loss", "ema_val_loss_t0.20", "ema_val_loss_t0.80"}
    assert all(math.isfinite(v) and v > 0 for r in rows for v in r.values())
    r = rows[-1]  # every time holds the same clips: the whole is the mean of the parts
    assert r["val_loss"] == pytest.approx((r["val_loss_t0.20"] + r["val_loss_t0.80"]) / 2, rel=1e-6)
    val = LatentCache(tmp_path / "cache-val")  # the eval split, beside the training cache
    assert val.meta["split"] == "eval" and all(val.num_clips(b) == 3 for b in val.buckets)
    # fixed: the same model scores the same; resumed runs log the same rows as a straight one
    cfg = config(tmp_path / "a", 4)
    task = DiTTask(cfg, LatentCache(tmp_path / "cache"), val_cache=val)
    model = task.build_model().eval()
    with torch.no_grad():
        one, two = ({k: float(s / c) for batch in [list(task.validation_batches())]
                     for k, (s, c) in task.validation_losses(model, batch[0]).items()} for _ in range(2))
    assert one == two
    run_train_dit(config(tmp_path / "b", 2), text_encoder=FakeTextEncoder())
    run_train_dit(config(tmp_path / "b", 4), text_encoder=FakeTextEncoder())
    again = [json.loads(line) for line in (tmp_path / "b" / "run" / "validation.jsonl").read_text().splitlines()]
    assert again == [{k: v for k, v in r.items()} for r in rows]
    with pytest.raises(KinoUserError, match="flow times in"):
        ValidationConfig(times=[0.0, 0.5])
