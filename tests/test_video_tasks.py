"""Every task end to end with a tiny random pipeline: image-to-video, extend forwards and
backwards, connect, loop, edit, through the Python API and the CLI (single and batch)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import save_tiny_pipeline

from kino.cli import main
from kino.data.video_io import read_metadata, read_video, write_video
from kino.models.memory import MemoryPlan
from kino.pipeline import Pipeline
from kino.tasks import video_tasks as tasks
from kino.errors import KinoUserError
from kino.tasks.conditioning import LOOP_DECODE_CYCLES, fit_video, loop_cycle, to_model_range
from kino.tasks.reconstruct import reconstruct_video

PROMPT = "a small red circle moving left on a black background"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("model"), "tiny-tasks", frames=9, height=32, width=32,
                              steps=3, guidance=3.0)


@pytest.fixture(scope="module")
def pipe(model_dir):
    return Pipeline.from_pretrained(model_dir)


def clip(frames: int, seed: int = 0, size=(32, 32)) -> torch.Tensor:
    """A smooth moving pattern, uint8 (F, H, W, 3)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, 1, size[0] // 4, size[1] // 4, generator=g)
    frames_ = [torch.roll(base, shifts=i, dims=-1) for i in range(frames)]
    up = torch.nn.functional.interpolate(torch.cat(frames_, 1).transpose(0, 1), size=size, mode="bilinear")
    return (up * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # (F, H, W, 3)


def encode(pipe, video_u8) -> torch.Tensor:
    with torch.no_grad():
        return pipe.vae.normalize(pipe.vae.encode(to_model_range(video_u8)[None])[0])


class EncodeSpy:
    """Wraps vae.encode to record what it was given and gave."""

    def __init__(self, vae):
        self.vae, self.calls = vae, []
        self.original = vae.encode

    def __call__(self, video, tile=None):
        out = self.original(video, tile)
        self.calls.append((video.clone(), out[0].clone()))
        return out


@pytest.fixture
def encode_spy(pipe, monkeypatch):
    spy = EncodeSpy(pipe.vae)
    monkeypatch.setattr(pipe.vae, "encode", spy)
    return spy


# ---------------------------------------------------------------------------- the Python API


def test_image_to_video_keeps_the_image_latent(pipe):
    image = clip(1, seed=3)[0]  # (H, W, 3)
    g = tasks.image_to_video(pipe, PROMPT, image, frames=9, seed=1, given="decoded")
    z = encode(pipe, image)  # (1, C, 1, h, w)
    assert g.video.shape == (9, 32, 32, 3) and g.latents.shape[2] == 3
    assert torch.equal(g.latents[:, :, :1], z)
    assert torch.equal(g.video[0], pipe.decode(z, 1)[0])  # frame 0 decodes from the image's latent alone
    assert g.metadata["task"] == "image-to-video" and json.loads(g.metadata["inputs"]) == {"image": ""}
    assert g.conditioning.clean.tolist() == [[True, False, False]]
    assert g.metadata["given_frames"] == "decoded"
    # by default the image itself is frame 0, the rest as decoded
    exact = tasks.image_to_video(pipe, PROMPT, image, frames=9, seed=1)
    assert torch.equal(exact.video[0], image) and torch.equal(exact.video[1:], g.video[1:])
    assert torch.equal(exact.latents, g.latents) and exact.metadata["given_frames"] == "exact"
    # an image of another size is resized and center-cropped (and that is what is pasted)
    wide_image = clip(1, seed=3, size=(32, 64))[0]
    wide = tasks.image_to_video(pipe, PROMPT, wide_image, frames=5, height=32, width=32)
    assert wide.video.shape == (5, 32, 32, 3)
    fitted = fit_video(to_model_range(wide_image), 32, 32)[:, 0].add(1).mul(127.5).round().to(torch.uint8)
    assert torch.equal(wide.video[0], fitted.permute(1, 2, 0))
    assert tasks.image_to_video(pipe, PROMPT, clip(1, size=(48, 64))[0], frames=5).video.shape == (5, 48, 64, 3)


def test_extend_forward_keeps_the_input(pipe):
    x = clip(11, seed=4)
    g = tasks.extend(pipe, PROMPT, x, frames=8, seed=2)
    kept = x[2:]  # the last 4k + 1 = 9 frames
    assert g.video.shape == (17, 32, 32, 3)
    assert torch.equal(g.latents[:, :, :3], encode(pipe, kept))
    assert torch.equal(g.video[:9], kept)  # the input comes back as given
    decoded = tasks.extend(pipe, PROMPT, x, frames=8, seed=2, given="decoded")
    # decoded, the causal decoder gives the input back exactly as the VAE reconstructs it
    assert np.array_equal(decoded.video[:9].numpy(), reconstruct_video(pipe.vae, kept.numpy()))
    assert torch.equal(decoded.video[9:], g.video[9:]) and torch.equal(decoded.video, pipe.decode(g.latents, 17))
    assert not torch.equal(g.video[9:], g.video[8:9].expand(8, -1, -1, -1))
    meta = json.loads(g.metadata["input_frames"])
    assert g.metadata["task"] == "extend forward" and meta == [{"input": "video", "frames": [2, 11, 11], "at": 0}]
    assert torch.equal(tasks.extend(pipe, PROMPT, x, frames=8, seed=2).video, g.video)  # deterministic


def test_extend_backward_uses_exact_latents_of_the_input_in_place(pipe, encode_spy):
    x = clip(9, seed=5)
    g = tasks.extend(pipe, PROMPT, x, frames=5, backward=True, seed=3, refine=0.5)
    kept = to_model_range(x[:8])  # the first 4k = 8 frames, after the 5 new ones
    assert g.video.shape == (13, 32, 32, 3) and g.latents.shape[2] == 4
    clean = g.conditioning.clean[0]
    assert clean.tolist() == [False, False, True, True]
    # pass 2 encoded the pass-1 video with the input pasted at frames 5..12 ...
    composite, mean = encode_spy.calls[-1]
    assert composite.shape[2] == 13 and torch.equal(composite[0, :, 5:], kept)
    # ... and those latents are what the result keeps for the input's frames
    assert torch.equal(g.latents[:, :, 2:], pipe.vae.normalize(mean)[:, :, 2:])
    assert torch.equal(g.conditioning.start_latents, pipe.vae.normalize(mean))
    # the input comes back as given after new frames decoded from the final latents ...
    decoded = pipe.decode(g.latents, 13)
    assert torch.equal(g.video[5:], x[:8]) and torch.equal(g.video[:5], decoded[:5])
    assert g.metadata["task"] == "extend backward" and g.metadata["refine"] == "0.5"
    # ... or, decoded, re-decoded in the context of the new frames
    assert torch.equal(tasks.extend(pipe, PROMPT, x, frames=5, backward=True, seed=3, given="decoded").video, decoded)
    # refine 0: the second pass only re-encodes (the composite's latents decoded)
    g0 = tasks.extend(pipe, PROMPT, x, frames=5, backward=True, seed=3, refine=0.0)
    assert torch.equal(g0.latents, g0.conditioning.start_latents)


def test_connect_keeps_both_inputs(pipe, encode_spy):
    a, b = clip(9, seed=6), clip(10, seed=7)
    g = tasks.connect(pipe, PROMPT, a, b, frames=4, seed=4)
    composite, mean = encode_spy.calls[-1]  # pass 2: the pass-1 video with A and B pasted
    assert g.video.shape == (9 + 4 + 8, 32, 32, 3)
    assert g.conditioning.clean.tolist() == [[True, True, True, False, True, True]]
    assert torch.equal(g.latents[:, :, :3], encode(pipe, a))  # A at the start: exact in both passes
    assert torch.equal(composite[0, :, :9], to_model_range(a))
    assert torch.equal(composite[0, :, 13:], to_model_range(b[:8]))
    assert torch.equal(g.latents[:, :, 4:], pipe.vae.normalize(mean)[:, :, 4:])
    assert torch.equal(g.video[:9], a) and torch.equal(g.video[13:], b[:8])  # both as given
    assert torch.equal(g.video[9:13], pipe.decode(g.latents, 21)[9:13])
    decoded = tasks.connect(pipe, PROMPT, a, b, frames=4, seed=4, given="decoded")
    assert np.array_equal(decoded.video[:9].numpy(), reconstruct_video(pipe.vae, a.numpy()))
    assert json.loads(g.metadata["inputs"]) == {"first": "", "second": ""}
    with pytest.raises(KinoUserError, match="--given must be one of exact, decoded"):
        tasks.connect(pipe, PROMPT, a, b, frames=4, given="pasted")


def test_loop_ties_latent_one_to_the_last_and_decodes_a_cycle(pipe):
    g = tasks.loop(pipe, PROMPT, frames=8, seed=5)
    assert g.video.shape == (8, 32, 32, 3) and g.latents.shape[2] == 4  # latent 0, the loop's 1..2, the tied one
    assert torch.equal(g.latents[:, :, 1], g.latents[:, :, -1])
    assert not torch.equal(g.latents[:, :, 0], g.latents[:, :, 1])
    # decoded as a cycle: the last of LOOP_DECODE_CYCLES repeats of latents 1..k, not straight
    assert torch.equal(g.video, pipe.decode(g.latents, 8, loop=True))
    with torch.no_grad():
        cycle = pipe.vae.decode(pipe.vae.denormalize(loop_cycle(g.latents)))[0]  # (3, 1 + 3 * 8, H, W)
    assert cycle.shape[1] == 1 + LOOP_DECODE_CYCLES * 8
    expected = cycle[:, -8:].add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0)
    assert torch.equal(g.video, expected) and not torch.equal(g.video, pipe.decode(g.latents, 8))
    assert tasks.loop(pipe, PROMPT, seed=5).video.shape[0] == pipe.defaults.frames // 4 * 4  # the default length
    image = clip(1, seed=8)[0]
    gi = tasks.generate(pipe, PROMPT, image=image, loop=True, frames=8, seed=5)
    z = encode(pipe, image)[:, :, 0]
    assert torch.equal(gi.latents[:, :, 0], z) and torch.equal(gi.latents[:, :, -1], gi.latents[:, :, 1])
    assert torch.equal(gi.video[0], torch.as_tensor(image))  # the loop starts at the image (given exactly)
    decoded = tasks.generate(pipe, PROMPT, image=image, loop=True, frames=8, seed=5, given="decoded").video
    assert torch.equal(decoded[1:], gi.video[1:]) and torch.equal(decoded, pipe.decode(gi.latents, 8, True, True))
    assert gi.metadata["task"] == "image-to-video loop" and gi.metadata["loop"] == "true"


def test_edit_strength_ends(pipe):
    x = clip(7, seed=9)
    g0 = tasks.edit(pipe, PROMPT, x, strength=0.0, seed=6)
    assert torch.equal(g0.latents, encode(pipe, x))
    assert np.array_equal(g0.video.numpy(), reconstruct_video(pipe.vae, x.numpy()))  # the input as the VAE gives it
    g1 = tasks.edit(pipe, PROMPT, x, strength=1.0, seed=6)
    t2v = pipe.generate(PROMPT, frames=7, seed=6)
    assert torch.equal(g1.latents, t2v.latents) and torch.equal(g1.video, t2v.video)
    half = tasks.edit(pipe, PROMPT, x, strength=0.5, seed=6)
    assert not torch.equal(half.latents, g0.latents) and not torch.equal(half.latents, g1.latents)
    assert half.metadata["task"] == "edit" and half.metadata["strength"] == "0.5"
    assert tasks.edit(pipe, PROMPT, x, strength=0.5, frames=5).video.shape == (5, 32, 32, 3)


OTHER = "a large blue square moving up on a white background"


def test_flow_edit_moves_the_input_only_where_the_prompts_differ(pipe, model_dir):
    x = clip(7, seed=9)
    source = encode(pipe, x)
    same = tasks.edit(pipe, PROMPT, x, strength=0.8, seed=6, source_prompt=PROMPT)
    torch.testing.assert_close(same.latents, source, rtol=0, atol=1e-6)  # nothing to change: the input
    g0 = tasks.edit(pipe, OTHER, x, strength=0.0, seed=6, source_prompt=PROMPT)
    assert torch.equal(g0.latents, source)
    a = tasks.edit(pipe, OTHER, x, strength=0.8, seed=6, source_prompt=PROMPT)
    b = tasks.edit(pipe, OTHER, x, strength=0.8, seed=6, source_prompt=PROMPT)
    sd = tasks.edit(pipe, OTHER, x, strength=0.8, seed=6)
    assert torch.equal(a.latents, b.latents) and not torch.allclose(a.latents, source, atol=1e-3)
    assert not torch.allclose(a.latents, sd.latents, atol=1e-3)  # FlowEdit, not SDEdit
    assert a.metadata["source_prompt"] == PROMPT and "source_prompt" not in sd.metadata
    seq = Pipeline.from_pretrained(model_dir)
    seq.set_memory(MemoryPlan(cfg="sequential"))  # four calls one after the other: the same edit
    torch.testing.assert_close(tasks.edit(seq, OTHER, x, strength=0.8, seed=6, source_prompt=PROMPT).latents,
                               a.latents, rtol=0, atol=1e-5)
    # skip-layer guidance weakens both prompts' fields alike: equal prompts still change nothing
    slg = dict(strength=0.8, seed=6, source_prompt=PROMPT, skip_guidance=1.0, skip_blocks=(0,))
    torch.testing.assert_close(tasks.edit(pipe, PROMPT, x, **slg).latents, source, rtol=0, atol=1e-6)
    assert not torch.allclose(tasks.edit(pipe, OTHER, x, **slg).latents, a.latents, atol=1e-4)
    with pytest.raises(KinoUserError, match="goes with an edit"):
        pipe.generate(OTHER, frames=7, source_prompt=PROMPT)
    with pytest.raises(KinoUserError, match="goes with an edit"):
        tasks.generate(pipe, OTHER, frames=4, loop=True, source_prompt=PROMPT)


# ---------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    write_video(d / "a.mp4", clip(9, seed=1).numpy(), 8, lossless=True)
    write_video(d / "b.mp4", clip(8, seed=2).numpy(), 8, lossless=True)
    write_video(d / "first.png", clip(1, seed=3).numpy(), 8)
    return d


def test_cli_tasks_write_files(model_dir, inputs, tmp_path, capsys):
    common = ["--model", str(model_dir), "--steps", "2", "-q"]
    runs = {
        "i2v.mp4": (["generate", PROMPT, "--image", str(inputs / "first.png"), "--frames", "5"], 5, "image-to-video"),
        "loop.gif": (["generate", PROMPT, "--loop", "--frames", "4"], 4, "text-to-video loop"),
        "fwd.mp4": (["extend", str(inputs / "a.mp4"), PROMPT, "--frames", "4"], 13, "extend forward"),
        "bwd.mp4": (["extend", str(inputs / "a.mp4"), PROMPT, "--frames", "5", "--backward"], 13, "extend backward"),
        "con.mp4": (["connect", str(inputs / "a.mp4"), str(inputs / "b.mp4"), PROMPT, "--frames", "4"], 21,
                    "connect"),
        "edit.mp4": (["edit", str(inputs / "a.mp4"), PROMPT, "--strength", "0.4"], 9, "edit"),
        "flowedit.mp4": (["edit", str(inputs / "a.mp4"), PROMPT, "--strength", "0.4", "--source-prompt", OTHER], 9,
                         "edit"),
    }
    for name, (argv, frames, task) in runs.items():
        out = tmp_path / name
        assert main(argv + ["-o", str(out)] + common) == 0, name
        video, _ = read_video(out)
        meta = read_metadata(out)
        assert video.shape == (frames, 32, 32, 3) and meta["task"] == task, name
        assert meta["prompt"] == PROMPT and meta["steps"] == "2" and meta["kino_version"]
    meta = read_metadata(tmp_path / "con.mp4")
    assert json.loads(meta["inputs"]) == {"first": str(inputs / "a.mp4"), "second": str(inputs / "b.mp4")}
    assert read_metadata(tmp_path / "edit.mp4")["strength"] == "0.4"
    assert read_metadata(tmp_path / "flowedit.mp4")["source_prompt"] == OTHER


@pytest.mark.parametrize("argv,needle", [
    (["extend", "a.mp4", "x", "--frames", "5"], "nearest allowed: --frames 4 or 8"),
    (["extend", "a.mp4", "x", "--frames", "4", "--backward"], "nearest allowed: --frames 1 or 5"),
    (["extend", "a.mp4", "x"], "--frames N is required"),
    (["extend", "missing.mp4", "x", "--frames", "4"], "does not exist"),
    (["extend", "a.mp4"], "needs PROMPT"),
    (["extend"], "INPUT PROMPT"),
    (["extend", "a.mp4", "x", "--frames", "4", "-o", "out.png"], ".png holds one frame"),
    (["extend", "a.mp4", "x", "--frames", "4", "--size", "40x40"], "multiples of 16"),
    (["connect", "a.mp4", "x", "--frames", "4"], "needs PROMPT"),
    (["connect", "a.mp4", "first.png", "x", "--frames", "4"], "at least 4"),
    (["edit", "a.mp4", "x"], "--strength S is required"),
    (["edit", "a.mp4", "x", "--strength", "2"], "must be in [0, 1]"),
    (["edit", "a.mp4", "x", "--strength", "0.5", "--frames", "20"], "only 9"),
    (["generate", "x", "--loop", "--frames", "6"], "--frames 4k with k >= 1"),
    (["generate", "x", "--image", "missing.png"], "does not exist"),
    (["generate", "--batch", "rows.jsonl", "--image", "first.png", "-o", "d"], "in the row"),
    (["extend", "--batch", "rows.jsonl"], "--out DIR"),
    (["extend", "--batch", "bad_rows.jsonl", "-o", "d"], "'video' is missing"),
    (["edit", "--batch", "bad_types.jsonl", "-o", "d"], "'strength' must be a number"),
    (["edit", "--batch", "bad_source.jsonl", "-o", "d"], "'source_prompt' must be a str"),
    (["edit", "a.mp4", "x", "--strength", "0.5", "--source-prompt", ""], "empty"),
    (["extend", "--batch", "bad_given.jsonl", "-o", "d"], "'given' must be one of exact, decoded"),
    (["extend", "a.mp4", "x", "--frames", "4", "--given", "pasted"], "invalid choice"),
    (["connect", "--batch", "bad_paths.jsonl", "-o", "d"], "does not exist"),
])
def test_cli_bad_input_exits_2(model_dir, inputs, tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.chdir(inputs)
    (inputs / "rows.jsonl").write_text(json.dumps({"caption": "x", "video": "a.mp4"}) + "\n")
    (inputs / "bad_rows.jsonl").write_text(json.dumps({"caption": "x", "frames": 4}) + "\n")
    (inputs / "bad_types.jsonl").write_text(json.dumps({"caption": "x", "video": "a.mp4", "strength": "high"}) + "\n")
    (inputs / "bad_source.jsonl").write_text(json.dumps({"caption": "x", "video": "a.mp4", "source_prompt": 3}) + "\n")
    (inputs / "bad_given.jsonl").write_text(json.dumps({"caption": "x", "video": "a.mp4", "given": "all"}) + "\n")
    (inputs / "bad_paths.jsonl").write_text(json.dumps({"caption": "x", "first": "a.mp4", "second": "nope.mp4"}) + "\n")
    assert main(argv + ["--model", str(model_dir), "--steps", "1", "-q"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_cli_batch_mode_for_every_task(model_dir, inputs, tmp_path, capsys):
    rows = {
        "generate": [{"caption": PROMPT, "image": "first.png", "frames": 5},
                     {"caption": PROMPT, "loop": True, "frames": 4, "seed": 3}],
        "extend": [{"caption": PROMPT, "video": "a.mp4", "frames": 4},
                   {"caption": PROMPT, "video": str(inputs / "a.mp4"), "frames": 1, "backward": True,
                    "given": "decoded"}],
        "connect": [{"caption": PROMPT, "first": "a.mp4", "second": "b.mp4", "frames": 4}],
        "edit": [{"caption": PROMPT, "video": "a.mp4", "strength": 0.3}, {"caption": PROMPT, "video": "a.mp4"},
                 {"caption": PROMPT, "video": "a.mp4", "source_prompt": OTHER}],
    }
    frames = {"generate": [5, 4], "extend": [13, 9], "connect": [21], "edit": [9, 9, 9]}
    for task, task_rows in rows.items():
        batch = inputs / f"{task}.jsonl"
        batch.write_text("".join(json.dumps(r) + "\n" for r in task_rows))
        out = tmp_path / task
        extra = ["--strength", "1"] if task == "edit" else []
        assert main([task, "--batch", str(batch), "-o", str(out), "--model", str(model_dir), "--steps", "1", "-q"]
                    + extra) == 0, task
        written = [json.loads(x) for x in (out / "captions.jsonl").read_text().splitlines()]
        assert [r["frames"] for r in written] == frames[task] and all(r["caption"] == PROMPT for r in written)
        for r in written:
            assert read_video(out / r["file"])[0].shape[0] == r["frames"]
    edits = [read_metadata(tmp_path / "edit" / r["file"])["strength"]
             for r in map(json.loads, (tmp_path / "edit" / "captions.jsonl").read_text().splitlines())]
    assert edits == ["0.3", "1.0", "1.0"]  # the row's strength, else the command line's
    sources = [read_metadata(tmp_path / "edit" / r["file"]).get("source_prompt")
               for r in map(json.loads, (tmp_path / "edit" / "captions.jsonl").read_text().splitlines())]
    assert sources == [None, None, OTHER]
    given = [read_metadata(tmp_path / "extend" / r["file"])["given_frames"]
             for r in map(json.loads, (tmp_path / "extend" / "captions.jsonl").read_text().splitlines())]
    assert given == ["exact", "decoded"]
    assert main(["world", "eval", str(tmp_path / "extend"), "-q"]) == 0  # kino world eval scores the folder
