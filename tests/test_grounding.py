"""The grounding loss (kino/training/grounding.py): each object's phrase tokens, each DiT
token's share of each object's pixels, the recorded cross-attention, the loss's values, and
training with it on a tiny world cache."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from conftest import FakeTextEncoder

from kino.data.latent_cache import LatentCache, build_world_cache
from kino.errors import KinoUserError
from kino.models.dit import DIT_SIZES, DiT
from kino.models.vae import VAE_SIZES, VideoVAE
from kino.training.config import TrainConfig
from kino.training.distributed import ParallelConfig
from kino.training.dit import CacheConfig, DiTDataConfig, DiTRunConfig, DiTTask
from kino.training.grounding import (CrossAttentionRecorder, GroundingConfig, grounding_loss, object_cover,
                                     phrase_masks)
from kino.training.trainer import Trainer
from kino.world.generator import scene_at, shape_masks, trajectory

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


PAIR = "a large red circle moving left and a small cyan triangle moving up on a black background"


class WordTokenizer:
    """Whitespace tokens with character offsets, padded to max_length: FakeTextEncoder's tokens."""

    def __call__(self, texts, padding, truncation, max_length, return_offsets_mapping):
        offsets = []
        for text in texts:
            spans = [m.span() for m in re.finditer(r"\S+", text)][:max_length]
            offsets.append(spans + [(0, 0)] * (max_length - len(spans)))
        return {"offset_mapping": offsets}


class LongFakeEncoder(FakeTextEncoder):
    max_length = 24  # a whole two-object caption


def test_phrase_masks_hold_each_objects_words_under_minilms_tokenizer():
    from transformers import AutoTokenizer

    from kino.models.text.encoder import minilm_folder

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True)
    single = "a small green square growing on a white background"
    masks = phrase_masks(tokenizer, [PAIR, single], 32)
    assert masks.shape == (2, 2, 32) and not masks[1].any()
    ids = tokenizer([PAIR], padding="max_length", max_length=32)["input_ids"][0]
    words = [tokenizer.decode([i for i, m in zip(ids, masks[0, k]) if m]) for k in range(2)]
    assert words == ["a large red circle moving left", "a small cyan triangle moving up"]


def test_object_cover_is_each_objects_share_of_a_tokens_pixels():
    scene = scene_at("train", 0, 3, frames=9, size=(64, 96), objects=2)
    cover = object_cover(scene, (3, 8, 12), 4)  # 8x8-pixel tokens, latent frames 0 | 1-4 | 5-8
    assert cover.shape == (2, 3, 8, 12) and cover.min() >= 0 and cover.max() <= 1
    for k, (obj, center) in enumerate(zip(scene.caption.objects, scene.centers)):
        mask = shape_masks(obj.shape, *trajectory(obj, center, 9, 64, 96), 64, 96).astype(np.float64)
        per_latent = [mask[0], mask[1:5].mean(0), mask[5:9].mean(0)]
        for j, pixels in enumerate(per_latent):
            assert cover[k, j].sum().item() * 64 == pytest.approx(pixels.sum(), rel=1e-5)
        assert cover[k, 0, 3, 5].item() == pytest.approx(mask[0, 24:32, 40:48].mean(), abs=1e-6)
    coarse = object_cover(scene, (1, 4, 6), 4)  # tokens over 16x16 pixels and all three latent frames
    assert torch.allclose(coarse, cover.reshape(2, 1, 3, 4, 2, 6, 2).mean(dim=(2, 4, 6)), atol=1e-6)
    one = object_cover(scene_at("train", 0, 3, frames=1, size=(64, 64), objects=1), (1, 8, 8), 4)
    assert one[0].sum() > 0 and not one[1].any()
    with pytest.raises(ValueError, match="token grid"):
        object_cover(scene, (2, 8, 12), 4)


def test_grounding_loss_is_zero_when_each_object_attends_its_own_phrase():
    phrases = torch.zeros(1, 2, 6, dtype=torch.bool)
    phrases[0, 0, 1:3] = True
    phrases[0, 1, 3:5] = True
    cover = torch.tensor([[[1.0, 0.5, 0.0], [0.0, 0.5, 0.0]]])  # token 2 covers nothing
    own = torch.zeros(1, 3, 6)
    own[0, 0, 1], own[0, 1, 2], own[0, 1, 3], own[0, 2, 0] = 1.0, 0.5, 0.5, 1.0
    crossed = own.clone()
    crossed[0, 0] = 0.0
    crossed[0, 0, 4] = 1.0  # object 1's pixels attend to object 2's words
    assert grounding_loss([own], phrases, cover).item() < 0.4  # token 1 is half of each: log 2 / 2
    assert grounding_loss([own], phrases, cover).item() == pytest.approx(math.log(2) / 2, rel=1e-4)
    assert grounding_loss([crossed], phrases, cover).item() > 5
    assert grounding_loss([own, crossed], phrases, cover).item() == pytest.approx(
        (grounding_loss([own], phrases, cover) + grounding_loss([crossed], phrases, cover)).item() / 2)
    assert grounding_loss([crossed], phrases, torch.zeros_like(cover)).item() == 0.0


def test_recorder_reads_each_chosen_blocks_text_attention_while_open():
    torch.manual_seed(0)
    dit = DiT(DIT_SIZES["tiny"])  # text_dim 24
    x = torch.randn(2, dit.config.in_channels, 2, 4, 4)
    text, mask = torch.randn(2, 5, 24), torch.tensor([[True] * 5, [True, True, False, False, False]])
    plain = dit(x, torch.tensor([500.0, 100.0]), text, mask)
    with CrossAttentionRecorder(dit, [0]) as rec:
        out = dit(x, torch.tensor([500.0, 100.0]), text, mask)
    assert torch.equal(out, plain) and len(rec.probs) == 1
    p = rec.probs[0]
    assert p.shape == (2, 2 * 2 * 2, 5)  # 1x2x2 patches: 2 x 2 x 2 tokens
    assert torch.allclose(p.sum(-1), torch.ones(2, 8)) and not p[1, :, 2:].any()
    with CrossAttentionRecorder(dit, [1]) as rec:  # a prompt without a real token: no NaN, in the gradient too
        dit(x, 500.0, text, torch.zeros_like(mask))
        grounding_loss(rec.probs, torch.ones(2, 2, 5, dtype=torch.bool), torch.ones(2, 2, 8)).backward()
    assert all(torch.isfinite(p.grad).all() for p in dit.parameters() if p.grad is not None)
    with CrossAttentionRecorder(dit, []) as rec:
        dit(x, 500.0, text, mask)
    assert len(rec.probs) == len(dit.blocks)
    dit(x, 500.0, text, mask)
    assert len(rec.probs) == len(dit.blocks)  # closed: nothing more recorded
    with pytest.raises(KinoUserError, match="do not exist"):
        CrossAttentionRecorder(dit, [len(dit.blocks)])


def test_training_with_grounding_lowers_it(tmp_path):
    torch.manual_seed(0)
    vae = VideoVAE(VAE_SIZES["tiny"]).eval()
    cache_dir = build_world_cache(tmp_path / "cache", vae, LongFakeEncoder(), clips_per_bucket=8,
                                  buckets=[(5, 32, 32)])
    cfg = DiTRunConfig(
        model="tiny", cache=CacheConfig(dir=str(cache_dir), clips_per_bucket=8, buckets=["5x32x32"]),
        data=DiTDataConfig(batch_size=4), grounding=GroundingConfig(weight=1.0),
        train=TrainConfig(out_dir=str(tmp_path / "run"), max_steps=80, lr=3e-3, log_every=1, checkpoint_every=0,
                          progress=False))
    cache = LatentCache(cache_dir)
    with pytest.raises(KinoUserError, match="tokenizer"):
        DiTTask(cfg, cache)
    task = DiTTask(cfg, cache, tokenizer=WordTokenizer())
    batches = [task.batch(10_000 + i) for i in range(6)]
    _, _, t, h, w = batches[0]["latents"].shape  # 1x2x2 patches
    assert all(b["ground_cover"].shape == (4, 2, t * (h // 2) * (w // 2)) for b in batches)
    assert any(b["ground_cover"][:, 1].sum() > 0 for b in batches)  # two-object clips were drawn
    for b in batches:  # one-object clips have no phrases to bind, and no targets
        assert ((b["ground_cover"].sum((1, 2)) > 0) <= b["ground_phrases"].any(-1).all(-1)).all()

    def grounding(model):
        with torch.no_grad():
            return sum(task.loss(model, b)[1]["grounding"].item() for b in batches) / len(batches)

    torch.manual_seed(0)
    before = grounding(task.build_model())
    trainer = Trainer(task, cfg.train)
    result = trainer.fit()
    assert math.isfinite(result.losses["grounding"])
    after = grounding(trainer.model)
    # the same steps without the loss (the batches' targets are ignored)
    off_cfg = DiTRunConfig(**{**cfg.__dict__, "grounding": GroundingConfig(),
                              "train": TrainConfig(**{**cfg.train.__dict__, "out_dir": str(tmp_path / "off")})})
    off = DiTTask(off_cfg, cache)
    assert "ground_cover" not in off.batch(0)
    torch.manual_seed(0)
    plain = Trainer(off, off_cfg.train)
    plain.fit()
    without = grounding(plain.model)
    assert after < 0.85 * before and after < 0.85 * without, (before, after, without)
    with pytest.raises(KinoUserError, match="grounding.weight"):
        GroundingConfig(weight=-1.0)
    with pytest.raises(KinoUserError, match="sequence_parallel = 1"):
        DiTRunConfig(grounding=GroundingConfig(weight=0.1),
                     train=TrainConfig(out_dir=str(tmp_path), parallel=ParallelConfig(sequence_parallel=2)))
