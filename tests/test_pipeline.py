"""Text to video end to end with tiny random components (and the real MiniLM text encoder)."""

import json
import types
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import save_tiny_pipeline

from kino.cli import main
from kino.data.video_io import read_metadata, read_video
from kino.errors import KinoUserError
from kino.pipeline import MAX_STEPS, SHAPES_WORLD_NAME, Pipeline, sample_latents


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("model"), "tiny-test", frames=5, height=32, width=32,
                              steps=3, guidance=3.0)


def test_from_pretrained_round_trip_and_determinism(model_dir):
    pipe = Pipeline.from_pretrained(model_dir)
    assert pipe.name == "tiny-test" and pipe.defaults.steps == 3
    a = pipe.generate("a small red circle moving left on a black background", seed=1)
    b = pipe.generate("a small red circle moving left on a black background", seed=1)
    c = pipe.generate("a small red circle moving left on a black background", seed=2)
    assert a.video.shape == (5, 32, 32, 3) and a.video.dtype == torch.uint8
    assert torch.equal(a.video, b.video) and not torch.equal(a.video, c.video)
    assert a.metadata["prompt"].startswith("a small red") and a.metadata["seed"] == "1"
    assert a.metadata["model"] == "tiny-test" and a.metadata["steps"] == "3"


def test_the_stochastic_sampler_is_seeded_and_checked(model_dir):
    pipe = Pipeline.from_pretrained(model_dir)
    run = lambda seed, eta: pipe.generate("a small red circle moving left on a black background", seed=seed,  # noqa
                                          sampler="ddim-eta", eta=eta).video
    a, b = run(1, 1.0), run(1, 1.0)
    assert torch.equal(a, b) and not torch.equal(a, run(1, 0.0)) and not torch.equal(a, run(2, 1.0))
    assert pipe.generate("x", seed=1, sampler="ddim-eta", eta=1.0).metadata["eta"] == "1.0"
    with pytest.raises(KinoUserError, match="eta"):
        run(1, 1.5)


def test_sizes_frames_and_images(model_dir):
    pipe = Pipeline.from_pretrained(model_dir)
    assert pipe.generate("x", frames=1, height=32, width=48).video.shape == (1, 32, 48, 3)
    assert pipe.generate("x", frames=6, steps=1).video.shape == (6, 32, 32, 3)  # not 4k+1: trimmed
    with pytest.raises(KinoUserError, match="multiples of 16"):
        pipe.generate("x", height=40)


def test_guidance_one_skips_the_unconditional_branch(model_dir):
    pipe = Pipeline.from_pretrained(model_dir)
    calls = []
    orig = pipe.dit.forward
    pipe.dit.forward = lambda x, t, text, mask: (calls.append(x.shape[0]), orig(x, t, text, mask))[1]
    pipe.generate("x", guidance=1.0, steps=2)
    pipe.generate("x", guidance=2.0, steps=2)
    assert calls == [1, 1, 2, 2]


def test_guidance_interval_guides_only_the_steps_inside_it(model_dir):
    pipe = Pipeline.from_pretrained(model_dir)
    calls = []
    orig = pipe.dit.forward
    pipe.dit.forward = lambda x, t, text, mask: (calls.append((x.shape[0], round(float(t[0, -1]) / 1000, 3))),
                                                 orig(x, t, text, mask))[1]
    prompt = "a small red circle moving left on a black background"
    ref = pipe.generate(prompt, guidance=3.0, steps=4, shift=1.0, seed=4)
    calls.clear()
    # shift 1, 4 steps: solver times 1, 0.75, 0.5, 0.25; guide the middle two
    part = pipe.generate(prompt, guidance=3.0, steps=4, shift=1.0, seed=4, guidance_interval=(0.4, 0.8))
    assert calls == [(1, 1.0), (2, 0.75), (2, 0.5), (1, 0.25)]
    assert part.metadata["guidance_interval"] == "(0.4, 0.8)"
    assert not torch.equal(part.latents, ref.latents)
    # the whole range is plain guidance; an interval no step falls in is no guidance at all
    full = pipe.generate(prompt, guidance=3.0, steps=4, shift=1.0, seed=4, guidance_interval=(0.0, 1.0))
    assert torch.equal(full.latents, ref.latents)
    none = pipe.generate(prompt, guidance=3.0, steps=4, shift=1.0, seed=4, guidance_interval=(0.0, 0.1))
    off = pipe.generate(prompt, guidance=1.0, steps=4, shift=1.0, seed=4)
    assert torch.equal(none.latents, off.latents)


def test_a_model_folder_carries_its_guidance_interval(model_dir, tmp_path):
    folder = save_tiny_pipeline(tmp_path / "gi", "tiny-gi", frames=5, height=32, width=32, steps=4, guidance=3.0,
                                shift=1.0, guidance_interval=(0.4, 0.8))
    assert json.loads((folder / "kino.json").read_text())["pipeline"]["guidance_interval"] == [0.4, 0.8]
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.defaults.guidance_interval == (0.4, 0.8)
    calls = []
    orig = pipe.dit.forward
    pipe.dit.forward = lambda x, t, text, mask: (calls.append(x.shape[0]), orig(x, t, text, mask))[1]
    pipe.generate("a small red circle moving left on a black background", seed=4)
    assert calls == [1, 2, 2, 1]
    calls.clear()  # a call's own interval overrides the folder's
    pipe.generate("a small red circle moving left on a black background", seed=4, guidance_interval=(0.0, 1.0))
    assert calls == [2, 2, 2, 2]
    # an edit at strength 0.5 runs from t = 0.5: the folder's interval is for runs from noise, so
    # every step is guided; an interval given with the call still applies
    from kino.tasks.conditioning import Conditioning

    c = pipe.vae.config
    shape = (1, c.z_dim, c.latent_frames(5), 32 // c.space_stride, 32 // c.space_stride)
    edit = Conditioning(torch.zeros(shape), torch.zeros(1, shape[2], dtype=torch.bool),
                        start_latents=torch.randn(shape), strength=0.5)
    calls.clear()
    clip = pipe.generate("a small red circle moving left on a black background", seed=4, conditioning=edit)
    assert calls == [2, 2] and clip.metadata["guidance_interval"] == ""
    calls.clear()
    pipe.generate("a small red circle moving left on a black background", seed=4, conditioning=edit,
                  guidance_interval=(0.4, 0.8))
    assert calls == [2, 1]


class ConstantVelocity(torch.nn.Module):
    """A velocity model whose output says which branch ran: the text's mean, plus 5 when blocks
    are skipped."""

    config = types.SimpleNamespace(patch_size=(1, 1, 1))

    def forward(self, x, t, text, mask, skip_blocks=()):
        v = text.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1) + (5.0 if skip_blocks else 0.0)
        return v.expand_as(x)


def test_skip_layer_guidance_moves_away_from_the_weakened_pass():
    noise = torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    cond, neg, m = torch.full((1, 3, 4), 2.0), torch.full((1, 3, 4), 0.5), torch.ones(1, 3, dtype=torch.bool)
    kw = dict(steps=1, guidance=3.0, sampler="euler", shift=1.0)
    out = sample_latents(ConstantVelocity(), cond, m, neg, m, noise, **kw, skip_guidance=0.5, skip_blocks=(1,))
    # one Euler step from t = 1 to 0: x0 = noise - v, v = v_u + g (v_c - v_u) + s (v_c - v_skip)
    v = 0.5 + 3.0 * (2.0 - 0.5) + 0.5 * (2.0 - 7.0)
    assert torch.allclose(out, noise - v)
    plain = sample_latents(ConstantVelocity(), cond, m, neg, m, noise, **kw)
    assert torch.allclose(plain, noise - (0.5 + 3.0 * 1.5))
    assert torch.equal(sample_latents(ConstantVelocity(), cond, m, neg, m, noise, **kw, skip_guidance=0.0,
                                      skip_blocks=(1,)), plain)
    with pytest.raises(KinoUserError, match="blocks to skip"):
        sample_latents(ConstantVelocity(), cond, m, neg, m, noise, **kw, skip_guidance=1.0)
    with pytest.raises(KinoUserError, match=">= 0"):
        sample_latents(ConstantVelocity(), cond, m, neg, m, noise, **kw, skip_guidance=-1.0, skip_blocks=(1,))


class ScaledVelocity(torch.nn.Module):
    """Conditional velocity x + 1 for the prompt (text all 2), c times it for the negative (text
    all 0.5): the unconditional prediction is an exact multiple of the conditional one."""

    config = types.SimpleNamespace(patch_size=(1, 1, 1))

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x, t, text, mask, skip_blocks=()):
        factor = torch.where(text.mean(dim=(1, 2)) > 1.0, 1.0, self.c).view(-1, 1, 1, 1, 1)
        return factor * (x + 1.0)


def test_cfg_zero_star_scale_and_zero_init():
    """CFG-Zero*: with v_u = c v_c its optimized scale is 1/c, so the guided velocity is v_c for
    any guidance (plain CFG is not); zero-init steps leave the state as it is; both with any
    sampler, and guidance 1 unchanged."""
    noise = torch.randn(1, 4, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    cond, neg, m = torch.full((1, 3, 4), 2.0), torch.full((1, 3, 4), 0.5), torch.ones(1, 3, dtype=torch.bool)
    model = ScaledVelocity(c=0.25)
    for sampler in ("euler", "dpm++2m", "unipc"):
        kw = dict(steps=4, shift=1.0, sampler=sampler)
        alone = sample_latents(model, cond, m, neg, m, noise, guidance=1.0, **kw)
        star = sample_latents(model, cond, m, neg, m, noise, guidance=5.0, cfg_star=True, **kw)
        plain = sample_latents(model, cond, m, neg, m, noise, guidance=5.0, **kw)
        torch.testing.assert_close(star, alone)
        assert (plain - alone).abs().max() > 0.1
        assert torch.equal(sample_latents(model, cond, m, neg, m, noise, guidance=1.0, cfg_star=True, **kw), alone)
        still = sample_latents(model, cond, m, neg, m, noise, guidance=5.0, zero_steps=4, **kw)
        torch.testing.assert_close(still, noise, rtol=0, atol=1e-6)  # every step zero: nothing moves
        one = sample_latents(model, cond, m, neg, m, noise, guidance=1.0, zero_steps=1, **kw)
        assert not torch.equal(one, alone) and not torch.equal(one, noise)


def test_skip_layer_guidance_runs_at_its_steps_and_folders_carry_it(model_dir, tmp_path):
    pipe = Pipeline.from_pretrained(model_dir)
    calls = []
    orig = pipe.dit.forward

    def spy(x, t, text, mask, skip_blocks=()):
        calls.append((x.shape[0], round(float(t[0, -1]) / 1000, 3), tuple(skip_blocks)))
        return orig(x, t, text, mask, skip_blocks=skip_blocks)

    pipe.dit.forward = spy
    prompt = "a small red circle moving left on a black background"
    kw = dict(guidance=3.0, steps=4, shift=1.0, seed=4, guidance_interval=(0.4, 0.8))
    ref = pipe.generate(prompt, **kw)
    calls.clear()
    # shift 1, 4 steps: solver times 1, 0.75, 0.5, 0.25; by default where guidance is
    slg = pipe.generate(prompt, **kw, skip_guidance=2.0, skip_blocks=(1,))
    assert calls == [(1, 1.0, ()), (2, 0.75, ()), (1, 0.75, (1,)), (2, 0.5, ()), (1, 0.5, (1,)), (1, 0.25, ())]
    assert not torch.equal(slg.latents, ref.latents) and slg.metadata["skip_blocks"] == "(1,)"
    calls.clear()
    pipe.generate(prompt, **kw, skip_guidance=2.0, skip_blocks=(0, 1), skip_interval=(0.9, 1.0))
    assert calls == [(1, 1.0, ()), (1, 1.0, (0, 1)), (2, 0.75, ()), (2, 0.5, ()), (1, 0.25, ())]
    with pytest.raises(KinoUserError, match="no block 9"):
        pipe.generate(prompt, steps=1, skip_guidance=1.0, skip_blocks=(9,))
    with pytest.raises(KinoUserError, match="skip-layer guidance interval needs"):
        pipe.generate(prompt, steps=1, skip_guidance=1.0, skip_blocks=(1,), skip_interval=(0.5, 0.2))
    # a folder's defaults carry it
    pipe.dit.forward = orig
    pipe.defaults = replace(pipe.defaults, skip_guidance=2.0, skip_blocks=(1,), guidance_interval=(0.4, 0.8))
    pipe.save_pretrained(tmp_path / "slg")
    again = Pipeline.from_pretrained(tmp_path / "slg")
    assert (again.defaults.skip_guidance, again.defaults.skip_blocks) == (2.0, (1,))
    assert torch.equal(again.generate(prompt, guidance=3.0, steps=4, shift=1.0, seed=4).latents, slg.latents)


@pytest.mark.parametrize("interval", [(0.6, 0.2), (-0.1, 0.5), (0.2, 1.5)])
def test_guidance_interval_out_of_range_is_refused(model_dir, interval):
    pipe = Pipeline.from_pretrained(model_dir)
    with pytest.raises(KinoUserError, match="0 <= LO <= HI <= 1"):
        pipe.generate("x", steps=1, guidance_interval=interval)


def test_negative_prompt_changes_the_result(model_dir):
    pipe = Pipeline.from_pretrained(model_dir)
    a = pipe.generate("a large blue square growing on a white background", seed=0)
    b = pipe.generate("a large blue square growing on a white background", seed=0, negative="red")
    assert not torch.equal(a.video, b.video)


def test_sample_latents_rejects_unknown_sampler(model_dir):
    pipe = Pipeline.from_pretrained(model_dir)
    t, m = pipe.text_encoder.encode(["x"])
    with pytest.raises(KinoUserError, match="sampler"):
        sample_latents(pipe.dit, t, m, t, m, torch.zeros(1, 16, 1, 4, 4), steps=2, guidance=1, sampler="ddim")


def test_tampered_model_is_refused(model_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    w = bad / "dit" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(KinoUserError, match="sha256"):
        Pipeline.from_pretrained(bad)


def test_generate_cli_skip_layer_guidance(model_dir, tmp_path, capsys):
    out = tmp_path / "s.mp4"
    args = ["generate", "a small red circle moving left on a black background", "--model", str(model_dir),
            "--steps", "2", "-q"]
    assert main([*args, "-o", str(out), "--skip-guidance", "1.5", "--skip-blocks", "0", "1",
                 "--skip-interval", "0.5", "1"]) == 0
    meta = read_metadata(out)
    assert (meta["skip_guidance"], meta["skip_blocks"], meta["skip_interval"]) == ("1.5", "(0, 1)", "(0.5, 1.0)")
    capsys.readouterr()
    for bad, says in ((["--skip-guidance", "-1", "--skip-blocks", "1"], "--skip-guidance must be >= 0"),
                      (["--skip-guidance", "1", "--skip-blocks", "7"], "no block 7 to skip"),
                      (["--skip-guidance", "1"], "needs the blocks to skip"),
                      (["--skip-blocks", "1", "--skip-interval", "1", "0"], "skip-layer guidance interval needs")):
        assert main([*args, "-o", str(tmp_path / "bad.mp4"), *bad]) == 2
        assert says in capsys.readouterr().err


def test_first_block_cache_in_generation(model_dir, tmp_path, capsys):
    pipe = Pipeline.from_pretrained(model_dir)
    prompt = "a small red circle moving left on a black background"
    kw = dict(steps=6, seed=1, guidance=3.0)
    ref = pipe.generate(prompt, **kw)
    off = pipe.generate(prompt, **kw, cache_threshold=0.0)
    assert torch.equal(off.latents, ref.latents) and "cache_reused" not in off.metadata
    every = pipe.generate(prompt, **kw, cache_threshold=1e9)  # after the first call, every call reuses
    assert every.metadata["cache_reused"] == "5/6" and not torch.equal(every.latents, ref.latents)
    assert pipe.dit.step_cache is None  # only for the run
    out = tmp_path / "c.mp4"
    assert main(["generate", prompt, "--model", str(model_dir), "-o", str(out), "--cache-threshold", "1e9", "-q"]) == 0
    assert read_metadata(out)["cache_reused"] == "2/3" and read_metadata(out)["cache_threshold"] == "1000000000.0"
    capsys.readouterr()
    assert main(["generate", prompt, "--model", str(model_dir), "-o", str(out), "--cache-threshold", "-1", "-q"]) == 2
    assert "--cache-threshold must be >= 0" in capsys.readouterr().err


def test_generate_cli_shift_and_fps(model_dir, tmp_path, capsys):
    args = ["generate", "a small red circle moving left on a black background", "--model", str(model_dir),
            "--steps", "3", "--seed", "2", "-q"]
    assert main([*args, "-o", str(tmp_path / "a.mp4")]) == 0
    assert main([*args, "-o", str(tmp_path / "b.mp4"), "--shift", "3", "--fps", "16"]) == 0
    (a, fps_a), (b, fps_b) = read_video(tmp_path / "a.mp4"), read_video(tmp_path / "b.mp4")
    assert (fps_a, fps_b) == (8, 16) and not np.array_equal(a, b)
    assert read_metadata(tmp_path / "b.mp4")["shift"] == "3.0"
    capsys.readouterr()
    for bad in (["--shift", "0"], ["--fps", "-1"], ["--shift", "nan"]):
        assert main([*args, "-o", str(tmp_path / "c.mp4"), *bad]) == 2
        assert "must be a positive number" in capsys.readouterr().err


def test_generate_rejects_numbers_that_are_not_finite_and_absurd_step_counts(model_dir, tmp_path, capsys):
    """nan / inf for a guidance setting, and a step count past MAX_STEPS (10**20 used to overflow
    inside torch with a traceback): a clear message and exit 2, from the CLI and from the API."""
    args = ["generate", "a small red circle moving left on a black background", "--model", str(model_dir),
            "-o", str(tmp_path / "c.mp4"), "-q"]
    capsys.readouterr()
    for bad, says in ((["--guidance", "nan"], "--guidance: nan must be a finite number"),
                      (["--guidance-interval", "0", "inf"], "--guidance-interval: inf must be a finite number"),
                      (["--cache-threshold", "inf"], "--cache-threshold: inf must be a finite number"),
                      (["--steps", str(10**20)], f"--steps must be at most {MAX_STEPS}")):
        assert main([*args, *bad]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err
    pipe = Pipeline.from_pretrained(model_dir)
    with pytest.raises(KinoUserError, match="guidance must be a finite number"):
        pipe.generate("a small red circle moving left on a black background", steps=2, guidance=float("nan"))
    with pytest.raises(KinoUserError, match="at most"):
        pipe.generate("a small red circle moving left on a black background", steps=MAX_STEPS + 1)


def test_generate_cli_single_and_image(model_dir, tmp_path, capsys):
    out = tmp_path / "a.mp4"
    assert main(["generate", "a small red circle moving left on a black background", "-o", str(out),
                 "--model", str(model_dir), "--seed", "3", "--steps", "2", "--guidance-interval", "0.5", "1", "-q"]) == 0
    video, fps = read_video(out)
    assert video.shape == (5, 32, 32, 3) and fps == 8
    meta = read_metadata(out)
    assert meta["seed"] == "3" and meta["prompt"].startswith("a small red") and meta["kino_version"]
    assert meta["guidance_interval"] == "(0.5, 1.0)"
    png = tmp_path / "a.png"
    assert main(["generate", "a small red circle standing still on a black background", "-o", str(png),
                 "--frames", "1", "--size", "32x48", "--model", str(model_dir), "-q"]) == 0
    assert read_video(png)[0].shape == (1, 32, 48, 3)


def test_generate_cli_batch_writes_world_format(model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"caption": "a small red circle moving left on a black background", "frames": 9, "seed": 5},
        {"caption": "a large blue square standing still on a white background", "frames": 1},
    ]) + "\n")
    out = tmp_path / "b"
    assert main(["generate", "--batch", str(prompts), "--out", str(out), "--model", str(model_dir), "-q"]) == 0
    rows = [json.loads(x) for x in (out / "captions.jsonl").read_text().splitlines()]
    assert [r["frames"] for r in rows] == [9, 1] and rows[1]["file"].endswith(".png")
    # the same row again gives the same clip (seed from the row)
    out2 = tmp_path / "c"
    assert main(["generate", "--batch", str(prompts), "--out", str(out2), "--model", str(model_dir), "-q"]) == 0
    assert np.array_equal(read_video(out / rows[0]["file"])[0], read_video(out2 / rows[0]["file"])[0])
    assert main(["world", "eval", str(out), "-q"]) == 0  # scored directly (random weights fail, but it runs)


def test_a_killed_batch_resumes_where_it_stopped(model_dir, tmp_path, monkeypatch):
    from kino.tasks import batch as batch_module

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"caption": f"a small {c} circle moving left on a black background",
                                           "frames": f}) + "\n" for c, f in (("red", 5), ("blue", 1), ("green", 5))))
    pipe = Pipeline.from_pretrained(model_dir)
    calls = []
    run = batch_module.RUNNERS["generate"]
    monkeypatch.setitem(batch_module.RUNNERS, "generate", lambda *a, **k: (calls.append(a[1]), run(*a, **k))[1])

    def killed_after(n):
        def progress(items):
            for k, item in enumerate(items):
                if k == n:
                    raise KeyboardInterrupt  # as if the process died here
                yield item
        return progress

    whole = batch_module.generate_batch(pipe, prompts, tmp_path / "whole", defaults={"steps": 2}, seed=1)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        batch_module.generate_batch(pipe, prompts, tmp_path / "out", defaults={"steps": 2}, seed=1,
                                    progress=killed_after(2))
    assert len(calls) == 2 and not (tmp_path / "out" / "captions.jsonl").exists()
    calls.clear()
    again = batch_module.generate_batch(pipe, prompts, tmp_path / "out", defaults={"steps": 2}, seed=1)
    assert calls == ["a small green circle moving left on a black background"]  # only the one left
    assert again == whole
    for row in whole:
        one, two = (read_video(tmp_path / d / row["file"])[0] for d in ("whole", "out"))
        assert np.array_equal(one, two)
    calls.clear()  # other settings, or a clip that went missing: generated again
    (tmp_path / "out" / whole[1]["file"]).unlink()
    batch_module.generate_batch(pipe, prompts, tmp_path / "out", defaults={"steps": 2}, seed=1)
    assert len(calls) == 1
    batch_module.generate_batch(pipe, prompts, tmp_path / "out", defaults={"steps": 3}, seed=1)
    assert len(calls) == 4


def test_a_world_folder_is_a_generate_batch(model_dir, tmp_path):
    world = tmp_path / "world"
    assert main(["world", "sample", "--out", str(world), "--n", "2", "--split", "eval", "--size", "32x32", "-q"]) == 0
    rows = [json.loads(x) for x in (world / "captions.jsonl").read_text().splitlines()]
    out = tmp_path / "gen"
    assert main(["generate", "--batch", str(world / "captions.jsonl"), "--out", str(out), "--steps", "2",
                 "--model", str(model_dir), "-q"]) == 0
    got = [json.loads(x) for x in (out / "captions.jsonl").read_text().splitlines()]
    assert [(r["caption"], r["frames"], r["height"], r["width"]) for r in got] == \
        [(r["caption"], r["frames"], r["height"], r["width"]) for r in rows]


@pytest.mark.parametrize("argv,needle", [
    (["generate"], "PROMPT"),
    (["generate", "x", "--batch", "p.jsonl"], "not both"),
    (["generate", "x", "-o", "a.txt"], ".mp4"),
    (["generate", "x", "-o", "a.png", "--frames", "9"], "one frame"),
    (["generate", "x", "--size", "40x40"], "multiples of 16"),
    (["generate", "x", "--steps", "0"], "at least 1"),
    (["generate", "x", "--sampler", "ddim-eta", "--eta", "1.5"], "--eta"),
    (["generate", "x", "--guidance-interval", "0.9", "0.1"], "0 <= LO <= HI <= 1"),
    (["generate", "--batch", "missing.jsonl", "--out", "d"], "does not exist"),
    (["generate", "--batch", "bad.jsonl", "--out", "d"], "caption"),
    (["generate", "x", "--model", "nowhere"], "kino.json"),
    (["generate", ""], "the prompt is empty"),
    (["generate", "  "], "the prompt is empty"),
    (["generate", "", "--model", "nowhere"], "the prompt is empty"),  # told before any model loads
    (["edit", "in.mp4", "x", "--source-prompt", " ", "--model", "nowhere"], "the prompt is empty"),
])
def test_generate_bad_input_exits_2(model_dir, tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    if "--model" not in argv:
        argv = argv + ["--model", str(model_dir)]
    assert main(argv + ["-q"]) == 2
    assert needle in capsys.readouterr().err


def test_a_shapes_world_model_warns_about_prompts_outside_its_world(tmp_path, capsys):
    shapes = save_tiny_pipeline(tmp_path / "shapes", SHAPES_WORLD_NAME, frames=5, height=32, width=32, steps=2)
    out = tmp_path / "dog.mp4"
    assert main(["generate", "a dog surfing", "-o", str(out), "--model", str(shapes), "-q"]) == 0
    err = capsys.readouterr().err
    assert out.is_file() and "kino: warning:" in err and "only Shapes World captions" in err and "dog surfing" in err
    assert "Traceback" not in err and "pipeline.py" not in err  # one line, like an error
    assert main(["generate", "a small red circle growing on a black background", "-o", str(tmp_path / "ok.mp4"),
                 "--model", str(shapes), "-q"]) == 0
    assert "warning" not in capsys.readouterr().err  # a world caption: no warning
    pipe = Pipeline.from_pretrained(shapes)
    with pytest.warns(UserWarning, match="only Shapes World"):
        pipe.generate("a cat", steps=1)
    other = Pipeline.from_pretrained(tmp_path / "shapes")
    other.name = "not-a-world-model"  # other models take any prompt silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other.generate("a cat", steps=1)
    with pytest.raises(KinoUserError, match="empty"):
        pipe.generate("", steps=1)


def test_compiled_pipeline_generates_the_same(model_dir):
    """`Pipeline.compile` (CLI --compile) wraps every DiT block with torch.compile; traced
    here with the eager backend (no C++ toolchain or minutes of inductor on a CPU), so the
    graph capture itself is what is checked: the clip equals the uncompiled one."""
    import torch._dynamo

    pipe = Pipeline.from_pretrained(model_dir)
    kw = dict(frames=5, steps=2, seed=1)
    prompt = "a small red circle moving left on a black background"
    ref = pipe.generate(prompt, **kw)
    torch._dynamo.reset()
    pipe.compile(backend="eager")
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in pipe.dit.blocks)
    torch.testing.assert_close(pipe.generate(prompt, **kw).latents, ref.latents, rtol=0, atol=1e-5)


def test_cli_compile_flag_compiles_after_placement(model_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(Pipeline, "compile", lambda self, **kw: calls.append(self.memory.cfg))
    from kino.cli import main

    assert main(["generate", "a small red circle moving left on a black background", "--model", str(model_dir),
                 "--frames", "1", "--steps", "1", "--compile", "--cfg", "sequential", "-o", str(tmp_path / "x.png"),
                 "-q"]) == 0
    assert calls == ["sequential"]  # once, with the memory plan already set


def test_a_pipeline_saved_in_shards_loads_and_generates_the_same(model_dir, tmp_path):
    """save_pretrained with a small shard size: the DiT and VAE go into checked shards, the folder
    generates what the one-file folder does, and its DiT digest is the one LoRAs record."""
    from kino.models.folder import weights_sha256

    pipe = Pipeline.from_pretrained(model_dir)
    pipe.save_pretrained(tmp_path / "sharded", max_shard_bytes=64 * 1024)
    dit_files = sorted(p.name for p in (tmp_path / "sharded" / "dit").iterdir())
    assert "model.safetensors" not in dit_files and "model.safetensors.index.json" in dit_files
    assert sum(n.endswith(".safetensors") for n in dit_files) > 2
    again = Pipeline.from_pretrained(tmp_path / "sharded")
    assert again.dit_sha256 == weights_sha256(tmp_path / "sharded" / "dit") != pipe.dit_sha256
    assert pipe.dit_sha256 == weights_sha256(model_dir / "dit")
    kw = dict(frames=5, height=32, width=32, steps=2, seed=3)
    assert torch.equal(again.generate("a red circle", **kw).video, pipe.generate("a red circle", **kw).video)
