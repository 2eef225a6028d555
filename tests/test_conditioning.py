"""Conditioning: layouts and masks per task, the frame and size rules, the sampler keeping
given frames exact, and the conditioning patterns of DiT training. Tiny random models only."""

from __future__ import annotations

import pytest
import torch

from kino.data.latent_cache import LOOP_RENDER
from kino.errors import KinoUserError
from kino.models.dit import DIT_SIZES, DiT
from kino.pipeline import T_SCALE, sample_latents
from kino.tasks.conditioning import (LOOP_DECODE_CYCLES, Conditioning, Given, Layout, default_size, fit_video,
                                     loop_cycle, loop_frames, plan_connect, plan_edit, plan_extend, plan_generate,
                                     to_model_range)
from kino.training.config import TrainConfig
from kino.training.dit import (PATTERNS, CacheConfig, ConditioningMix, DiTDataConfig, DiTRunConfig, DiTTask,
                               FlowConfig, draw_patterns, frame_times)

S = 4  # the VAE's time stride


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    pass


def video(frames: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, frames, h, w, generator=g) * 2 - 1  # (3, F, H, W) in [-1, 1]


def mask(layout: Layout) -> list[bool]:
    return layout.clean_mask()[0].tolist()


# ---------------------------------------------------------------------------- layouts per task


def test_layouts_masks_and_timesteps_per_task():
    image = Given(video(1), 0, "image")
    cases = {
        # task: (layout, output frames, clean latent frames)
        "text-to-video": (plan_generate(9, 32, 32, S), 9, [False] * 3),
        "image-to-video": (plan_generate(9, 32, 32, S, image=image), 9, [True, False, False]),
        "loop": (plan_generate(8, 32, 32, S, loop=True), 8, [False] * 4),  # + the tied latent frame
        "image loop": (plan_generate(8, 32, 32, S, image=image, loop=True), 8, [True, False, False, False]),
        "extend forward": (plan_extend(video(11), 8, S), 17, [True, True, True, False, False]),
        "extend backward": (plan_extend(video(11), 5, S, backward=True), 13, [False, False, True, True]),
        "connect": (plan_connect(video(9), video(10), 4, S), 21, [True, True, True, False, True, True]),
        "edit": (plan_edit(video(7), 0.5, S), 7, [False, False, False]),
    }
    for task, (layout, frames, clean) in cases.items():
        assert layout.frames == frames and mask(layout) == clean, task
        assert layout.latent_frames == len(clean) and layout.needs_refine == (task in ("extend backward", "connect"))
        # the sampler's view: t = 0 on given frames, t elsewhere
        latents = torch.randn(1, 16, len(clean), 4, 4)
        cond = Conditioning(latents, layout.clean_mask(), loop=layout.loop)
        t = cond.frame_times(700.0)
        assert t.shape == (1, len(clean))
        assert torch.equal(cond.clean[0], torch.tensor(clean)), task  # an image loop: the tie is after it
        assert (t[cond.clean] == 0).all() and (t[~cond.clean] == 700.0).all(), task


def test_a_loop_is_decoded_as_a_cycle():
    z = torch.randn(1, 16, 4, 2, 2)  # latent 0, the loop's latents 1 and 2, the tied one
    cycle = loop_cycle(z, cycles=3)
    assert torch.equal(cycle, torch.cat([z[:, :, :1]] + [z[:, :, 1:3]] * 3, dim=2))
    assert torch.equal(loop_cycle(z), loop_cycle(z, LOOP_DECODE_CYCLES)) and LOOP_DECODE_CYCLES >= 2
    with pytest.raises(KinoUserError, match="3 latent frames"):
        loop_cycle(z[:, :, :2])
    pixels = torch.arange(25.0).view(1, 25, 1, 1)  # 1 + 3 cycles of 8 frames
    assert loop_frames(pixels, 8).flatten().tolist() == list(range(17, 25))  # the last cycle's frames 1..8
    # through an image: frame 8 (frame 0's place) first, then 1..7
    assert loop_frames(pixels, 8, image_first=True).flatten().tolist() == [24] + list(range(17, 24))


def test_input_frames_are_trimmed_to_whole_latent_frames():
    x = video(11)
    fwd = plan_extend(x, 8, S)  # at the start: the last 4k + 1 frames
    assert fwd.given[0].used == (2, 11, 11) and torch.equal(fwd.given[0].pixels, x[:, 2:])
    bwd = plan_extend(x, 5, S, backward=True)  # at the end: the first 4k frames
    assert bwd.given[0].used == (0, 8, 11) and bwd.given[0].at == 5 and torch.equal(bwd.given[0].pixels, x[:, :8])
    con = plan_connect(video(12), x, 8, S)
    assert [g.used for g in con.given] == [(3, 12, 12), (0, 8, 11)] and con.given[1].at == 9 + 8
    assert con.frames == 9 + 8 + 8 and (con.frames - 1) % S == 0
    # an image extends forward as image-to-video
    assert mask(plan_extend(video(1), 4, S)) == [True, False]
    # the guide clip fills gaps with the first frame of the given frames after them
    guide = bwd.guide()
    assert guide.shape == (1, 3, 13, 32, 32)
    assert all(torch.equal(guide[0, :, f], x[:, 0]) for f in range(5)) and torch.equal(guide[0, :, 5:], x[:, :8])
    guide = con.guide()
    assert torch.equal(guide[0, :, 9:17], con.given[1].pixels[:, :1].expand(-1, 8, -1, -1))


@pytest.mark.parametrize("call,needle", [
    (lambda: plan_extend(video(9), 6, S), "nearest allowed: --frames 4 or 8"),
    (lambda: plan_extend(video(9), 8, S, backward=True), "nearest allowed: --frames 5 or 9"),
    (lambda: plan_extend(video(9), 0, S), "--frames 4"),
    (lambda: plan_extend(video(9), None, S), "required"),
    (lambda: plan_extend(video(3), 5, S, backward=True), "at least 4"),
    (lambda: plan_connect(video(9), video(2), 4, S), "at least 4"),
    (lambda: plan_connect(video(9), video(9), 5, S), "multiple of 4"),
    (lambda: plan_generate(6, 32, 32, S, loop=True), "got 6 (nearest allowed: --frames 4 or 8)"),
    (lambda: plan_generate(17, 32, 32, S, loop=True), "nearest allowed: --frames 16 or 20"),
    (lambda: plan_generate(1, 32, 32, S, loop=True), "nearest allowed: --frames 4"),
    (lambda: plan_generate(1, 32, 32, S, image=Given(video(1), 0, "image")), "nothing to generate"),
    (lambda: plan_edit(video(5), 1.5, S), "[0, 1]"),
    (lambda: plan_edit(video(5), None, S), "required"),
    (lambda: plan_edit(video(5), 0.5, S, frames=6), "only 5"),
])
def test_bad_requests_are_user_errors(call, needle):
    with pytest.raises(KinoUserError, match=None) as e:
        call()
    assert needle in str(e.value)


def test_fit_video_resizes_to_cover_and_center_crops():
    x = video(2, 32, 32)
    assert fit_video(x, 32, 32) is x or torch.equal(fit_video(x, 32, 32), x)  # the right size: untouched
    thirds = torch.cat([torch.full((3, 1, 32, 32), v) for v in (-1.0, 0.5, 1.0)], dim=-1)  # (3, 1, 32, 96)
    assert torch.equal(fit_video(thirds, 32, 32), torch.full((3, 1, 32, 32), 0.5))  # wide: the middle is kept
    big = torch.cat([torch.full((3, 1, 64, 64), v) for v in (-1.0, 0.5, 1.0)], dim=-1)  # (3, 1, 64, 192)
    small = fit_video(big, 32, 32)  # halved to 32x96, then the middle 32 columns
    assert small.shape == (3, 1, 32, 32) and torch.allclose(small[..., 2:-2], torch.tensor(0.5))
    tall = fit_video(video(1, 80, 40), 32, 48)  # scaled by 48/40 to 96x48, cropped to 32 rows
    assert tall.shape == (3, 1, 32, 48)
    assert default_size(video(1, 70, 100), 16) == (64, 96) and default_size(video(1, 8, 40), 16) == (16, 32)
    u8 = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    assert to_model_range(u8).shape == (3, 2, 8, 8) and to_model_range(u8[0]).shape == (3, 1, 8, 8)
    with pytest.raises(KinoUserError, match="uint8"):
        to_model_range(u8.float())


def test_layout_refuses_misaligned_frames():
    with pytest.raises(KinoUserError, match="whole latent frames"):
        Layout(13, 32, 32, S, [Given(video(4), 4, "video")])  # starts mid-chunk
    with pytest.raises(KinoUserError, match="whole latent frames"):
        Layout(13, 32, 32, S, [Given(video(3), 0, "video")])  # ends mid-chunk


# ---------------------------------------------------------------------------- the sampler's math


def test_conditioning_velocity_start_and_schedule():
    latents = torch.randn(2, 4, 5, 2, 2)
    clean = torch.tensor([[False, True, False, False, False], [True, False, False, False, False]])
    cond = Conditioning(latents, clean, loop=True)
    # a loop ties latent frame 1 to the last: one of them given makes both given, with the same value
    assert cond.clean.tolist() == [[False, True, False, False, True], [True, False, False, False, False]]
    assert torch.equal(cond.latents[0, :, -1], latents[0, :, 1])
    v = torch.randn(2, 4, 5, 2, 2)
    w = cond.constrain(v)
    assert (w[0, :, [1, -1]] == 0).all() and torch.equal(w[0, :, [0, 2, 3]], v[0, :, [0, 2, 3]])
    assert (w[1, :, 0] == 0).all() and torch.equal(w[1, :, 2:4], v[1, :, 2:4])
    assert torch.equal(w[1, :, 1], w[1, :, -1]) and torch.allclose(w[1, :, 1], (v[1, :, 1] + v[1, :, -1]) / 2)
    noise = torch.randn(2, 4, 5, 2, 2)
    x = cond.start(noise, 1.0)
    assert torch.equal(x[0, :, 1], latents[0, :, 1]) and torch.equal(x[1, :, 0], latents[1, :, 0])
    assert torch.equal(x[1, :, -1], x[1, :, 1]) and torch.equal(x[0, :, -1], x[0, :, 1])
    ts = torch.linspace(1, 0, 11, dtype=torch.float64)
    sde = Conditioning(torch.zeros_like(latents), torch.zeros(2, 5, dtype=torch.bool), start_latents=latents,
                       strength=0.3)
    assert sde.schedule(ts).tolist() == ts[7:].tolist()
    assert torch.equal(sde.start(noise, 0.0), latents)  # strength 0: the input itself
    full = Conditioning(torch.zeros_like(latents), sde.clean, start_latents=latents, strength=1.0)
    assert full.schedule(ts).tolist() == ts.tolist() and torch.equal(full.start(noise, 1.0), noise)
    assert sde.starts_part_way and not full.starts_part_way and not cond.starts_part_way
    with pytest.raises(KinoUserError, match="3 latent frames"):
        Conditioning(torch.zeros(1, 4, 2, 2, 2), torch.zeros(1, 2, dtype=torch.bool), loop=True)
    with pytest.raises(KinoUserError, match="bool"):
        Conditioning(latents, clean.float())


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    model = DiT(DIT_SIZES["tiny"])
    with torch.no_grad():  # a zero-initialised head would predict zero velocity everywhere
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


class Spy:
    """Records the latents and per-frame times of every DiT call."""

    def __init__(self, dit):
        self.dit, self.calls = dit, []
        self.config = dit.config

    def __call__(self, x, t, text, mask):
        self.calls.append((x.clone(), t.clone()))
        return self.dit(x, t, text, mask)


@pytest.mark.parametrize("sampler", ["euler", "dpm++2m", "unipc", "ddim-eta"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sampling_keeps_clean_frames_exact_at_every_step(dit, sampler, guidance):
    g = torch.Generator().manual_seed(1)
    text, mask_ = torch.randn(1, 4, 24, generator=g), torch.ones(1, 4, dtype=torch.bool)
    c = torch.randn(1, 16, 5, 4, 4, generator=g)
    clean = torch.tensor([[True, True, False, False, True]])
    cond = Conditioning(c, clean)
    spy, steps_done = Spy(dit), []
    with torch.no_grad():
        out = sample_latents(spy, text, mask_, text * 0, mask_, torch.randn(1, 16, 5, 4, 4, generator=g), steps=6,
                             guidance=guidance, sampler=sampler, callback=steps_done.append, conditioning=cond)
    assert steps_done == list(range(6)) and len(spy.calls) == 6
    for x, t in spy.calls:  # every model call: clean frames exactly c at t = 0, the rest at the step's t
        assert torch.equal(x[:, :, [0, 1, 4]], c[:, :, [0, 1, 4]].expand(x.shape[0], -1, -1, -1, -1))
        assert (t[:, [0, 1, 4]] == 0).all() and (t[:, 2:4] == t[:, 2:3]).all() and (t[:, 2] > 0).all()
    assert torch.equal(out[:, :, [0, 1, 4]], c[:, :, [0, 1, 4]])
    assert not torch.equal(out[:, :, 2:4], c[:, :, 2:4])
    # loop: the tied frames are equal at every step and at the end
    spy.calls.clear()
    with torch.no_grad():
        out = sample_latents(spy, text, mask_, text * 0, mask_, torch.randn(1, 16, 5, 4, 4, generator=g), steps=4,
                             guidance=guidance, sampler=sampler,
                             conditioning=Conditioning(c, torch.zeros(1, 5, dtype=torch.bool), loop=True))
    assert all(torch.equal(x[:, :, 1], x[:, :, -1]) for x, _ in spy.calls) and torch.equal(out[:, :, 1], out[:, :, -1])
    assert not torch.equal(out[:, :, 0], out[:, :, -1]) and not torch.equal(out[:, :, 1], out[:, :, 2])


def test_sdedit_strength_ends(dit):
    g = torch.Generator().manual_seed(2)
    text, mask_ = torch.randn(1, 4, 24, generator=g), torch.ones(1, 4, dtype=torch.bool)
    z, noise = torch.randn(1, 16, 3, 4, 4, generator=g), torch.randn(1, 16, 3, 4, 4, generator=g)
    none = torch.zeros(1, 3, dtype=torch.bool)
    kw = dict(steps=5, guidance=2.0, sampler="dpm++2m")
    with torch.no_grad():
        t2v = sample_latents(dit, text, mask_, text, mask_, noise, **kw)
        s1 = sample_latents(dit, text, mask_, text, mask_, noise, **kw,
                            conditioning=Conditioning(torch.zeros_like(z), none, start_latents=z, strength=1.0))
        spy = Spy(dit)
        s0 = sample_latents(spy, text, mask_, text, mask_, noise, **kw,
                            conditioning=Conditioning(torch.zeros_like(z), none, start_latents=z, strength=0.0))
        half = sample_latents(spy, text, mask_, text, mask_, noise, **kw,
                              conditioning=Conditioning(torch.zeros_like(z), none, start_latents=z, strength=0.6))
    assert torch.equal(s1, t2v) and torch.equal(s0, z)
    assert len(spy.calls) == 3 and not torch.equal(half, z)  # round(0.6 * 5) steps, none at strength 0
    assert float(spy.calls[0][1][0, 0]) < T_SCALE


# ---------------------------------------------------------------------------- training patterns


def test_patterns_follow_the_mix():
    mix = ConditioningMix(none=0.3, first=0.1, first_k=0.15, last_k=0.2, first_last=0.1, loop=0.15)
    n, T = 20000, 5
    patterns, clean, tie = draw_patterns(torch.Generator().manual_seed(0), mix, n, T)
    for i, name in enumerate(PATTERNS):
        share = (patterns == i).float().mean().item()
        assert share == pytest.approx(mix.probabilities()[i], abs=0.012), name
    by = {name: patterns == i for i, name in enumerate(PATTERNS)}
    assert not clean[by["none"]].any() and tie.equal(by["loop"])
    # loops: latent frame 0 given (a loop through an image) for half of them, nothing else
    assert not clean[by["loop"]][:, 1:].any() and clean[by["loop"]][:, 0].float().mean() == pytest.approx(0.5, abs=0.04)
    assert (clean[by["first"]] == torch.tensor([True, False, False, False, False])).all()
    k = clean.sum(1)
    prefix = clean == (torch.arange(T)[None] < k[:, None])
    suffix = clean == (torch.arange(T)[None] >= T - k[:, None])
    assert prefix[by["first_k"]].all() and suffix[by["last_k"]].all()
    assert set(k[by["first_k"]].tolist()) == set(range(1, T)) == set(k[by["last_k"]].tolist())
    ends = clean[by["first_last"]]
    assert ends[:, 0].all() and ends[:, -1].all() and (~ends).any(dim=1).all()  # always something to generate
    # every clean frame is at t = 0, the others at the clip's t
    t = frame_times(torch.Generator().manual_seed(1), n, T, FlowConfig(), clean=clean)
    assert (t[clean] == 0).all() and (t[~clean] > 0).all()
    # patterns that do not fit fall back to text-to-video
    p1, c1, t1 = draw_patterns(torch.Generator().manual_seed(0), mix, 500, 1)
    assert (p1 == 0).all() and not c1.any() and not t1.any()
    p2, c2, t2 = draw_patterns(torch.Generator().manual_seed(0), mix, 500, 2)
    assert not t2.any() and not (c2.all(dim=1)).any()
    assert {PATTERNS[i] for i in p2.tolist()} == {"none", "first", "first_k", "last_k"}


def test_mix_is_validated_and_mostly_text_to_video():
    assert ConditioningMix().none >= 0.5 and sum(ConditioningMix().probabilities()) == pytest.approx(1.0)
    with pytest.raises(KinoUserError, match="sum to 1"):
        ConditioningMix(none=0.9)
    with pytest.raises(KinoUserError, match=">= 0"):
        ConditioningMix(none=1.1, first=-0.1, first_k=0, last_k=0, first_last=0, loop=0)


class FakeCache:
    """The LatentCache interface DiTTask uses, over random latents (one bucket, 3 latent frames)."""

    root = "fake"
    text_dim = 24
    latent_channels = 16
    buckets = [(9, 32, 32)]

    def __init__(self, seed: int = 0, vae: str = "v", loop: dict | None = None):
        g = torch.Generator().manual_seed(seed)
        self.latents = torch.randn(6, 16, 3, 4, 4, generator=g)
        self.text = torch.randn(6, 8, 24, generator=g)
        self.empty_text, self.empty_mask = torch.zeros(1, 8, 24), torch.zeros(1, 8, dtype=torch.bool)
        self.meta = {"vae": {"sha256": vae, "latent_sha256": vae}, "text_encoder": {"dim": 24}}
        if loop is not None:
            self.meta.update(motion="loop", loop=loop)

    def latent_shape(self, bucket):
        return (16, 3, 4, 4)

    def num_clips(self, bucket):
        return 6

    def get(self, bucket, indices):
        idx = torch.as_tensor(indices)
        return {"latents": self.latents[idx], "text": self.text[idx], "mask": torch.ones(len(idx), 8, dtype=torch.bool)}


def fake_task(mix: ConditioningMix, loop_cache=None) -> DiTTask:
    cfg = DiTRunConfig(model="tiny", cache=CacheConfig(buckets=["9x32x32"]), data=DiTDataConfig(batch_size=8),
                       conditioning=mix, train=TrainConfig(out_dir="unused"))
    return DiTTask(cfg, FakeCache(), loop_cache=loop_cache)


def test_loop_rows_come_from_the_loop_cache():
    mix = ConditioningMix(none=0.5, first=0.1, first_k=0.1, last_k=0.1, first_last=0.0, loop=0.2)
    plain, looped = fake_task(mix), fake_task(mix, loop_cache=FakeCache(seed=1, loop=LOOP_RENDER))
    loops = looped.loop_cache
    seen = 0
    for step in range(30):
        a, b = plain.batch(step), looped.batch(step)
        tie = b["pattern"] == PATTERNS.index("loop")
        assert torch.equal(a["pattern"], b["pattern"]) and torch.equal(a["t"], b["t"])  # same draws otherwise
        assert torch.equal(a["latents"][~tie], b["latents"][~tie]) and torch.equal(a["text"][~tie], b["text"][~tie])
        for row in b["latents"][tie]:  # a loop clip, its last latent frame tied to frame 1
            assert torch.equal(row[:, -1], row[:, 1])
            assert any(torch.equal(row[:, :-1], clip[:, :-1]) for clip in loops.latents)
        for text, mask in zip(b["text"][tie], b["mask"][tie]):  # its caption (unless dropped)
            assert any(torch.equal(text, x) for x in loops.text) if mask.any() else not text.any()
        seen += int(tie.sum())
    assert seen > 10
    with pytest.raises(KinoUserError, match="another VAE"):
        fake_task(mix, loop_cache=FakeCache(seed=1, vae="w", loop=LOOP_RENDER))
    for old in (None, {"wave": "triangle", "period": "frames - time_stride"}):  # not loops, or the old kind
        with pytest.raises(KinoUserError, match="not a loop cache of this kino"):
            fake_task(mix, loop_cache=FakeCache(seed=1, loop=old))
    no_bucket = FakeCache(seed=1, loop=LOOP_RENDER)
    no_bucket.buckets = [(17, 32, 32)]
    with pytest.raises(KinoUserError, match="has no bucket 9x32x32"):
        fake_task(mix, loop_cache=no_bucket)


def test_training_batches_and_loss_ignore_clean_frames(dit):
    task = fake_task(ConditioningMix(none=0.2, first=0.2, first_k=0.1, last_k=0.2, first_last=0.1, loop=0.2))
    batch = task.batch(0)
    assert torch.equal(batch["latents"], task.batch(0)["latents"])  # a pure function of the step
    clean, t = batch["clean"], batch["t"]
    assert clean.any() and (~clean).any() and (t[clean] == 0).all() and (t[~clean] > 0).all()
    for step in range(20):  # loops: the last latent frame is frame 1 (clean latent and noise)
        b = task.batch(step)
        loop = b["pattern"] == PATTERNS.index("loop")
        assert torch.equal(b["latents"][loop, :, -1], b["latents"][loop, :, 1])
        assert torch.equal(b["noise"][loop, :, -1], b["noise"][loop, :, 1])

    free = ~clean

    def perturbed(where: torch.Tensor, by: float):
        def model(x, t_, text, m):
            v = dit(x, t_, text, m)
            return torch.where(where[:, None, :, None, None], v + by, v)
        return model

    base, _ = task.loss(dit, batch)
    same, _ = task.loss(perturbed(clean, 100.0), batch)
    nan, _ = task.loss(perturbed(clean, float("nan")), batch)
    other, _ = task.loss(perturbed(free, 1.0), batch)
    assert torch.equal(base, same) and torch.equal(base, nan) and not torch.equal(base, other)
    # the gradient never reaches the clean frames' outputs
    out = dit(batch["latents"], 1000.0 * t, batch["text"], batch["mask"]).detach().requires_grad_()
    task.loss(lambda *a: out, batch)[0].backward()
    assert (out.grad[clean[:, None, :, None, None].expand_as(out)] == 0).all() and out.grad.abs().sum() > 0
