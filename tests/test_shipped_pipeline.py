"""The text-to-video model shipped inside the package: it loads offline with its sha256
checks, `kino generate PROMPT` works with nothing else, and it does every task on a few
fresh Shapes World cases with the checks of the task benchmark (the full measurement, on
hundreds of cases, is in BENCHMARKS.md; these are small samples with floors under it)."""

from collections import defaultdict

import numpy as np
import pytest
import torch

from kino.cli import main
from kino.data.video_io import read_video
from conftest import tampered_default_copy
from kino.models.folder import WeightsIntegrityError
from kino.pipeline import Pipeline
from kino.tasks import video_tasks
from kino.tasks.checks import JUMP_BOUND, edited_caption, kept_psnr, loop_steps, seam_jumps, trajectory_offset
from kino.world.captions import SIZES
from kino.world.evaluator import evaluate_clip
from kino.world.generator import render, scene_at

SEED = 8080  # eval scenes of this seed are used nowhere else (not in training, tuning or the benchmarks)
# Floors, set under what the thirteen-stage model (four decoder rounds) measured on these very
# cases; the fifteen-stage model shipped since (1x1x1 patches) passes every one of them (2026-12-02,
# the whole file, two threads; again at its 16-step default, thirteenth session). The thirteen-stage figures (2026-12-02, two threads: t2v
# background 10/10, presence 8/10, no_extras 9/10, shape 1/10, all checks 1/10; decoded kept frames 30.5-36.7 dB; seam jumps <= 0.035 of
# the frame; edit trajectory offsets 0.013-0.033; loops' wrap step 0.95, 1.19 and 1.24x their
# mean step; the eleven-stage model before: presence 9/10, no_extras 10/10, shape 2/10, kept
# 30.8-36.7 dB, jumps <= 0.026, offsets 0.012-0.029, loops 0.68, 1.32, 1.41), so that a
# regression fails and float noise across CPUs does not (presence one under the 8 measured: on
# 360 prompts the model keeps 81% of clips present, so 8 of 10 is its typical draw, not a
# margin). The model misses most of the targets (BENCHMARKS.md); these floors guard
# what it does do.
T2V_MIN_CHECKS = {"background": 9, "presence": 7, "no_extras": 8}  # of 10
LOOP_WRAP_MAX = 1.5  # median wrap step / mean step of three loops
KEEP_FLOOR = 27.0  # dB, every given frame block (the VAE bounds it: ~30 dB mean)


@pytest.fixture(scope="module")
def pipe():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield Pipeline.from_pretrained()
    torch.set_num_threads(old)


def test_shipped_model_is_a_whole_pipeline(pipe):
    assert pipe.name == "kino-shapes"
    assert pipe.defaults.frames == 17 and (pipe.defaults.height, pipe.defaults.width) == (64, 64)
    assert pipe.dit.config.text_dim == pipe.text_encoder.dim


def test_shipped_dit_was_trained_on_the_shipped_vaes_latents(pipe):
    """Its training record names the latent identity of the VAE it ships with (a decoder
    fine-tune or widening keeps it; a changed encoder would not)."""
    import json

    from kino.data.latent_cache import vae_identity
    from kino.models.folder import default_model_dir

    record = json.loads((default_model_dir() / "dit" / "training.json").read_text())
    assert vae_identity(pipe.vae)["latent_sha256"] == record["vae_latent_sha256"]


def test_tampered_shipped_dit_is_refused(tmp_path):
    copy = tampered_default_copy(tmp_path, "dit")
    with pytest.raises(WeightsIntegrityError, match="sha256"):
        Pipeline.from_pretrained(copy)


def test_generate_with_only_a_prompt(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prompt = "a large red circle moving left on a black background"
    assert main(["generate", prompt, "--quiet"]) == 0
    video, fps = read_video(tmp_path / "out.mp4")
    assert video.shape == (17, 64, 64, 3) and fps == 8
    result = evaluate_clip(video, prompt)  # measured: background ok, the circle in 17 of 17 frames (15 with eleven stages)
    assert result.checks["background"] and result.details["objects"][0]["present_frames"] >= 12, result.details
    assert main(["generate", prompt, "--frames", "1", "-o", "still.png", "--quiet"]) == 0
    assert read_video(tmp_path / "still.png")[0].shape == (1, 64, 64, 3)


def test_text_to_video_on_fresh_eval_prompts(pipe):
    passed, report = {k: 0 for k in T2V_MIN_CHECKS}, []
    for i in range(10):
        frames, size = (1, 9, 17, 25, 33)[i % 5], SIZES[i % 3]
        scene = scene_at("eval", SEED, i, frames=frames, size=size)
        clip = pipe.generate(scene.text, frames=frames, height=size[0], width=size[1], seed=i)
        assert clip.video.shape == (frames, *size, 3)
        result = evaluate_clip(clip.video.numpy(), scene.caption)
        for k in passed:
            passed[k] += result.checks[k]
        report.append((scene.text, frames, result.failed))
    assert all(passed[k] >= n for k, n in T2V_MIN_CHECKS.items()), (passed, report)


def _source(task_index: int, i: int, frames: int):
    scene = scene_at("eval", SEED + 1 + task_index, i, frames=frames, size=SIZES[i % 3])
    return scene, render(scene)


def test_conditioned_tasks_keep_inputs_and_join_without_jumps(pipe):
    kept, jumps = defaultdict(list), defaultdict(list)  # per task: kept PSNR, largest seam jump
    for i in range(2):
        scene, video = _source(0, i, 17)  # image-to-video
        out = video_tasks.generate(pipe, scene.text, image=video[0], frames=17, seed=i, given="decoded").video.numpy()
        assert out.shape == video.shape
        kept["i2v"].append(kept_psnr(out, video[:1], 0))

        scene, video = _source(1, i, 33)  # extend forward: frames 0-16 given, 16 new
        out = video_tasks.extend(pipe, scene.text, video[:17], frames=16, seed=i, given="decoded").video.numpy()
        assert out.shape == video.shape
        kept["fwd"].append(kept_psnr(out, video[:17], 0))
        jumps["fwd"].append(seam_jumps(out, scene.caption, [17]))

        scene, video = _source(2, i, 33)  # extend backward: frames 17-32 given, 17 new before
        out = video_tasks.extend(pipe, scene.text, video[17:], frames=17, backward=True, seed=i,
                                 given="decoded").video.numpy()
        assert out.shape == video.shape
        kept["bwd"].append(kept_psnr(out, video[17:], 17))
        jumps["bwd"].append(seam_jumps(out, scene.caption, [17]))

        scene, video = _source(3, i, 33)  # connect frames 0-8 to frames 25-32 with 16 new
        out = video_tasks.connect(pipe, scene.text, video[:9], video[25:], frames=16, seed=i,
                                  given="decoded").video.numpy()
        assert out.shape == video.shape
        kept["connect"].append(min(kept_psnr(out, video[:9], 0), kept_psnr(out, video[25:], 25)))
        jumps["connect"].append(seam_jumps(out, scene.caption, [9, 25]))
    # Measured on the decoding (given="decoded"), which shows the model and the VAE:
    # frames given before the new ones are kept exactly up to the VAE's round trip, and the new
    # frames join them: every case. Given frames after generated ones (backward, connect) go
    # through a second pass (4 of 4 kept and joined here; the 100-case benchmark of the model
    # before found 55-57% kept at 28 dB, no jump in 78-81%), so here 3 of the 4 cases must hold.
    assert min(kept["i2v"] + kept["fwd"]) >= KEEP_FLOOR and max(jumps["fwd"]) <= JUMP_BOUND, (kept, jumps)
    two_pass_kept = [k >= KEEP_FLOOR for k in kept["bwd"] + kept["connect"]]
    two_pass_joined = [j <= JUMP_BOUND for j in jumps["bwd"] + jumps["connect"]]
    assert sum(two_pass_kept) >= 3 and sum(two_pass_joined) >= 3, (kept, jumps)
    # What users get by default: the same video with the given frames as given.
    exact = video_tasks.connect(pipe, scene.text, video[:9], video[25:], frames=16, seed=1).video.numpy()
    assert np.array_equal(exact[:9], video[:9]) and np.array_equal(exact[25:], video[25:])
    assert np.array_equal(exact[9:25], out[9:25])


def test_loop_and_edit_run_on_the_shipped_model(pipe):
    # Loops (16 frames, decoded as a cycle): the wrap step is about as large as the steps
    # between frames (the 90% target asks for no larger than their mean; the shipped model
    # meets it about half the time, BENCHMARKS.md). Asserted: the clip, its background and
    # object, and a wrap no larger than the clip's largest step (a loop decoded straight,
    # without the cycle, wrapped at 2-4x the mean step: a cut).
    ratios = []
    for i in range(3):
        scene, _ = _source(4, i, 17)
        out = video_tasks.generate(pipe, scene.text, loop=True, seed=i).video.numpy()
        result = evaluate_clip(out, scene.caption)
        assert out.shape[0] == 16 and result.checks["background"] and result.checks["presence"], result.details
        wrap, mean = loop_steps(out)
        steps = np.abs(np.diff(out.astype(np.float64), axis=0)).mean((1, 2, 3))
        assert wrap <= steps.max(), (wrap, steps)
        ratios.append(wrap / mean)
    assert np.median(ratios) <= LOOP_WRAP_MAX, ratios
    offsets = []
    for i in range(3):
        scene, video = _source(5, i, 17)
        new, k, _ = edited_caption(scene.caption, i)
        out = video_tasks.edit(pipe, str(new), video, strength=0.7, seed=i).video.numpy()
        offsets.append(trajectory_offset(video, scene.caption.objects[k].color, out, new.objects[k].color))
        assert evaluate_clip(out, new).checks["background"]
    assert np.median(offsets) <= 0.1, offsets
