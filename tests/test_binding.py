"""The binding contrast (kino/training/binding.py): swapped captions, the rows that take part,
the loss's values and gradient, and training with it on a tiny world cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import FakeTextEncoder

from kino.data.latent_cache import LatentCache, build_world_cache
from kino.errors import KinoUserError
from kino.models.vae import VAE_SIZES, VideoVAE
from kino.training.binding import BindingConfig, binding_loss, pick_swaps, swapped_caption
from kino.training.config import TrainConfig
from kino.training.distributed import ParallelConfig
from kino.training.dit import CacheConfig, DiTDataConfig, DiTRunConfig, DiTTask
from kino.training.trainer import Trainer
from kino.world.captions import parse_caption

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

PAIR = "a large red circle moving left and a small cyan triangle moving up on a black background"


class OrderedFakeEncoder(FakeTextEncoder):
    """FakeTextEncoder's word features plus a feature of each word's place, so that the same
    words in another order encode differently (as MiniLM's contextual features do; the DiT's
    cross-attention itself does not see the order)."""

    max_length = 24

    def encode(self, prompts):
        text, mask = super().encode(prompts)
        places = torch.randn(self.max_length, self.dim, generator=torch.Generator().manual_seed(7))
        return text + mask[..., None] * places, mask


def test_swapped_caption_exchanges_one_differing_attribute():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        s = swapped_caption(PAIR, ["motion", "shape", "color", "size"], rng)
        a, b = parse_caption(PAIR).objects
        sa, sb = parse_caption(s).objects
        changed = [f for f in ("size", "color", "shape", "motion") if getattr(sa, f) != getattr(a, f)]
        assert len(changed) == 1, s
        f = changed[0]
        assert getattr(sa, f) == getattr(b, f) and getattr(sb, f) == getattr(a, f)
        assert sorted(s.split()) == sorted(PAIR.split())  # the same words, other owners
        seen.add(f)
    assert seen == {"motion", "shape", "color", "size"}
    assert swapped_caption(PAIR, ["motion"], rng) == \
        "a large red circle moving up and a small cyan triangle moving left on a black background"
    alike = "a large red circle growing and a large blue circle growing on a white background"
    assert swapped_caption(alike, ["motion", "shape", "size"], rng) is None  # alike in every field named
    assert swapped_caption(alike, ["shape", "color"], rng) == \
        "a large blue circle growing and a large red circle growing on a white background"
    assert swapped_caption("a small blue square moving down on a gray background", ["motion"], rng) is None
    assert swapped_caption("a cat playing the piano", ["motion"], rng) is None


def test_pick_swaps_takes_eligible_rows_in_range():
    single = "a small blue square moving down on a gray background"
    captions = [PAIR, single, PAIR, PAIR, PAIR]
    t = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.95, 0.95], [0.4, 0.3], [0.6, 0.6]])
    eligible = torch.tensor([True, True, True, False, True])
    cfg = BindingConfig(weight=1.0, rows=2, max_t=0.9)
    rows, swapped = pick_swaps(captions, t, eligible, cfg, np.random.default_rng(0))
    assert rows.tolist() == [0, 4] and len(swapped) == 2  # 1 one object, 2 too noisy, 3 not eligible
    rows, _ = pick_swaps(captions, t, eligible, BindingConfig(weight=1.0, rows=5, min_t=0.55),
                         np.random.default_rng(0))
    assert rows.tolist() == [2, 4]


def test_binding_loss_values_and_gradient():
    e_c = torch.tensor([1.0, 2.0], requires_grad=True)
    e_s = torch.tensor([1.2, 2.05], requires_grad=True)
    loss = binding_loss(e_c, e_s, margin=0.1)  # row 0 clears its margin of 0.1; row 1 misses 0.2 by 0.15
    assert loss.item() == pytest.approx(0.15 / 2)
    loss.backward()
    assert e_s.grad.tolist() == pytest.approx([0.0, -0.5])
    assert e_c.grad.tolist() == pytest.approx([0.0, 0.5])  # the margin's scale carries no gradient
    assert binding_loss(torch.zeros(0), torch.zeros(0), 0.1).item() == 0.0
    for bad, match in (({"weight": -1.0}, "binding.weight"), ({"margin": math.inf}, "binding.margin"),
                       ({"rows": 0}, "binding.rows"), ({"min_t": 0.5, "max_t": 0.5}, "min_t < max_t"),
                       ({"fields": ["colour"]}, "binding.fields"), ({"fields": []}, "binding.fields")):
        with pytest.raises(KinoUserError, match=match):
            BindingConfig(**bad)


def _gap(task, model, batches):
    """Mean over the batches' binding rows of (e_s - e_c) / e_c."""
    with torch.no_grad():
        logs = [task.loss(model, b)[1] for b in batches]
    return sum(lg["binding_gap_sum"].item() for lg in logs) / sum(lg["binding_rows"].item() for lg in logs)


def test_training_with_binding_widens_the_gap(tmp_path):
    torch.manual_seed(0)
    vae = VideoVAE(VAE_SIZES["tiny"]).eval()
    encoder = OrderedFakeEncoder()
    cache_dir = build_world_cache(tmp_path / "cache", vae, encoder, clips_per_bucket=8, buckets=[(5, 32, 32)])
    cfg = DiTRunConfig(
        model="tiny", cache=CacheConfig(dir=str(cache_dir), clips_per_bucket=8, buckets=["5x32x32"]),
        data=DiTDataConfig(batch_size=4), binding=BindingConfig(weight=10.0, margin=0.5, rows=4),
        train=TrainConfig(out_dir=str(tmp_path / "run"), max_steps=60, lr=3e-3, log_every=1, checkpoint_every=0,
                          progress=False))
    cache = LatentCache(cache_dir)
    with pytest.raises(KinoUserError, match="text encoder"):
        DiTTask(cfg, cache)
    task = DiTTask(cfg, cache, text_encoder=encoder)
    batches = [task.batch(10_000 + i) for i in range(8)]
    assert sum(len(b["bind_rows"]) for b in batches) >= 4  # two-object clips were drawn
    again = task.batch(10_000)
    assert torch.equal(again["bind_rows"], batches[0]["bind_rows"])  # a pure function of the step
    for b in batches:
        for r in b["bind_rows"].tolist():
            assert not b["clean"][r].any()
            assert torch.equal(b["mask"][r], b["bind_mask"][b["bind_rows"].tolist().index(r)])  # same words

    torch.manual_seed(0)
    before = _gap(task, task.build_model(), batches)
    trainer = Trainer(task, cfg.train)
    result = trainer.fit()
    assert math.isfinite(result.losses["binding_sum"])
    after = _gap(task, trainer.model, batches)
    # the same steps without the loss
    off_cfg = DiTRunConfig(**{**cfg.__dict__, "binding": BindingConfig(),
                              "train": TrainConfig(**{**cfg.train.__dict__, "out_dir": str(tmp_path / "off")})})
    off = DiTTask(off_cfg, cache)
    assert "bind_rows" not in off.batch(0)
    torch.manual_seed(0)
    plain = Trainer(off, off_cfg.train)
    plain.fit()
    without = _gap(task, plain.model, batches)
    assert after > before + 0.08 and after > without + 0.08, (before, after, without)
    with pytest.raises(KinoUserError, match="sequence_parallel = 1"):
        DiTRunConfig(binding=BindingConfig(weight=0.1),
                     train=TrainConfig(out_dir=str(tmp_path), parallel=ParallelConfig(sequence_parallel=2)))

