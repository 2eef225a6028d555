"""Real video datasets and `kino preprocess`: folder (CSV/JSONL) and tar (WebDataset)
layouts with bad files among good ones, frame sampling, trimming, resize + crop, buckets,
the resumable and rank-sharded cache, and training on it.

Everything is tiny: 32x32..40x64 clips of a few frames written here with PyAV, the tiny
VAE (random weights), a hash-based fake text encoder and the tiny DiT.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FakeTextEncoder
import torch
from safetensors.torch import load_file

from kino.cli import main
from kino.data.datasets import Sample, VideoDatasetConfig, choose_bucket, dataset_parts, iter_clips, load_clip
from kino.data.latent_cache import CACHE_JSON, LatentCache
from kino.data.preprocess import OnTheFlyLatents, build_video_cache, open_video_cache
from kino.data.video_io import write_image, write_video
from kino.errors import KinoUserError
from kino.models.folder import save_component, write_manifest
from kino.models.vae import VAE_SIZES, VideoVAE
from kino.training.config import TrainConfig
from kino.training.dit import CacheConfig, DiTDataConfig, DiTRunConfig, DiTTask, run_train_dit
from kino.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
BUCKETS = ["1x32x32", "5x32x32", "5x32x48"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_vae() -> VideoVAE:
    torch.manual_seed(0)
    return VideoVAE(VAE_SIZES["tiny"]).eval()


class FailingVAE:
    """The tiny VAE, raising on encode call number `fail_at` (a run killed mid-way)."""

    def __init__(self, vae, fail_at: int | None = None):
        self.vae, self.config, self.fail_at, self.calls = vae, vae.config, fail_at, 0

    def encode(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")
        return self.vae.encode(x)

    def __getattr__(self, name):
        return getattr(self.vae, name)


def ramp(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A moving gradient with a per-clip tint: uint8 (F, H, W, 3)."""
    y, x = np.mgrid[0:height, 0:width]
    tint = np.array([40, 90, 160]) + 30 * seed
    out = [(((x + 3 * f)[..., None] * 7 + y[..., None] * 3 + tint) % 256) for f in range(frames)]
    return np.stack(out).astype(np.uint8)


def numbered(frames: int, size=(32, 32)) -> np.ndarray:
    """Frame i is uniformly gray at 12 * i + 10: the frame number is readable after decoding."""
    return np.stack([np.full((*size, 3), 12 * i + 10, np.uint8) for i in range(frames)])


def frame_numbers(clip) -> list[int]:
    gray = (clip.video.mean(dim=(0, 2, 3)) + 1) * 127.5  # (F,)
    return [round((float(g) - 10) / 12) for g in gray]


# ---------------------------------------------------------------------------- datasets on disk


BAD_FOLDER = {"empty.mp4", "corrupt.mp4", "truncated.mp4", "notes.mp4", "missing.mp4", "late_start.mp4",
              "captions.csv:7"}


def make_folder(root: Path, fmt: str) -> Path:
    """Good clips (two aspects, a 16 fps source, an image) among empty, corrupt, truncated,
    wrong-format, missing, too-short (start past the end) and uncaptioned rows."""
    root.mkdir(parents=True, exist_ok=True)
    write_video(root / "square.mp4", ramp(9, 32, 32), fps=8, lossless=True)
    write_video(root / "wide.mp4", ramp(6, 40, 64, seed=1), fps=8, lossless=True)
    write_video(root / "fast.mp4", ramp(20, 32, 32, seed=2), fps=16, lossless=True)
    write_image(root / "still.png", ramp(1, 32, 32, seed=3)[0])
    (root / "empty.mp4").write_bytes(b"")
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    write_video(root / "whole.mp4", ramp(5, 32, 32, seed=4), fps=8, lossless=True)
    data = (root / "whole.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) * 2 // 3])
    (root / "whole.mp4").unlink()
    (root / "notes.mp4").write_text("these are notes, not a video\n" * 20)
    write_video(root / "late_start.mp4", ramp(6, 32, 32), fps=8, lossless=True)
    rows = [
        {"path": "square.mp4", "caption": "a square clip"},
        {"path": "empty.mp4", "caption": "nothing"},
        {"path": "wide.mp4", "caption": "a wide clip"},
        {"path": "corrupt.mp4", "caption": "noise"},
        {"path": "fast.mp4", "caption": "a fast clip", "start": 0.1, "end": 1.2},
        {"path": "", "caption": "a row without a path"},  # line 7 of the CSV (header is line 1)
        {"path": "truncated.mp4", "caption": "cut short"},
        {"path": "still.png", "caption": "a still image"},
        {"path": "notes.mp4", "caption": "text"},
        {"path": "missing.mp4", "caption": "gone"},
        {"path": "late_start.mp4", "caption": "starts after the end", "start": 5},
    ]
    if fmt == "csv":
        lines = ["path,caption,start,end"] + [
            f"{r['path']},{r['caption']},{r.get('start', '')},{r.get('end', '')}" for r in rows]
        (root / "captions.csv").write_text("\n".join(lines) + "\n")
        return root / "captions.csv"
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "captions.jsonl"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shards(root: Path) -> list[Path]:
    """shard-0: good, corrupt, caption-less and video-less samples; shard-1 breaks mid-way."""
    root.mkdir(parents=True, exist_ok=True)
    clips = root / "clips"
    clips.mkdir(exist_ok=True)
    write_video(clips / "a.mp4", ramp(9, 32, 32), fps=8, lossless=True)
    write_video(clips / "b.mp4", ramp(6, 40, 64, seed=1), fps=8, lossless=True)
    write_video(clips / "c.mp4", ramp(5, 32, 48, seed=2), fps=8, lossless=True)
    with tarfile.open(root / "shard-0.tar", "w") as tar:
        _add(tar, "s/a.mp4", (clips / "a.mp4").read_bytes())
        _add(tar, "s/a.txt", b"a square clip")
        _add(tar, "s/b.mp4", (clips / "b.mp4").read_bytes())
        _add(tar, "s/b.json", json.dumps({"caption": "a wide clip", "start": 0.0}).encode())
        _add(tar, "s/bad.mp4", b"\x00\x01garbage" * 100)
        _add(tar, "s/bad.txt", b"corrupt")
        _add(tar, "s/nocap.mp4", (clips / "a.mp4").read_bytes())
        _add(tar, "s/novideo.txt", b"a caption alone")
    with tarfile.open(root / "full-1.tar", "w") as tar:
        _add(tar, "c.mp4", (clips / "c.mp4").read_bytes())
        _add(tar, "c.caption", b"another wide clip")
        _add(tar, "d.mp4", (clips / "a.mp4").read_bytes())
        _add(tar, "d.txt", b"lost in the break")
    with tarfile.open(root / "full-1.tar") as tar:
        cut = tar.getmember("d.mp4").offset_data + 100  # c whole, d's video cut short
    (root / "shard-1.tar").write_bytes((root / "full-1.tar").read_bytes()[:cut])
    (root / "full-1.tar").unlink()
    return [root / "shard-0.tar", root / "shard-1.tar"]


BAD_TAR = {"shard-0.tar:s/bad", "shard-0.tar:s/nocap", "shard-0.tar:s/novideo", "shard-1.tar:d"}


@pytest.fixture(scope="module")
def folder_csv(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("videos"), "csv")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vae")
    vae = tiny_vae()
    save_component(out / "vae", vae.config.to_dict(), vae.state_dict())
    write_manifest(out, "tiny-vae", {"vae": ("vae", "VideoVAE")})
    return out


def dataset(captions=None, shards=(), **kw) -> VideoDatasetConfig:
    return VideoDatasetConfig(captions=None if captions is None else str(captions),
                              shards=[str(s) for s in shards], buckets=list(BUCKETS), **{"part_size": 4, **kw})


# ---------------------------------------------------------------------------- decoding


def test_choose_bucket_nearest_aspect_then_most_frames():
    b = [(1, 32, 32), (5, 32, 32), (9, 32, 32), (5, 32, 48)]
    assert choose_bucket(32, 32, 100, b) == (9, 32, 32)
    assert choose_bucket(32, 32, 7, b) == (5, 32, 32)
    assert choose_bucket(40, 64, 6, b) == (5, 32, 48)  # 1.6 is nearer 1.5 than 1
    assert choose_bucket(40, 64, 3, b) == (1, 32, 32)  # only the image bucket fits 3 frames
    assert choose_bucket(32, 32, 0, b) is None
    assert choose_bucket(64, 32, 9, b) == (9, 32, 32)  # tall: square is the nearest aspect


def test_fps_sampling_start_and_end(tmp_path):
    path = tmp_path / "n.mp4"
    write_video(path, numbered(20), fps=16, lossless=True)  # 1.25 s
    buckets = [(1, 32, 32), (5, 32, 32)]
    clip = load_clip(path, Sample("n", "x"), 8.0, buckets)  # 8 fps: every other source frame
    assert clip.bucket == (5, 32, 32) and frame_numbers(clip) == [0, 2, 4, 6, 8]
    clip = load_clip(path, Sample("n", "x", start=0.25), 8.0, buckets)  # t = 0.25 + k / 8
    assert frame_numbers(clip) == [4, 6, 8, 10, 12]
    clip = load_clip(path, Sample("n", "x", start=0.25, end=0.6), 8.0, buckets)  # 3 frames: image bucket
    assert clip.bucket == (1, 32, 32) and frame_numbers(clip) == [4]
    clip = load_clip(path, Sample("n", "x"), 16.0, buckets)
    assert frame_numbers(clip) == [0, 1, 2, 3, 4]
    short = load_clip(path, Sample("n", "x", start=1.2), 8.0, [(5, 32, 32)])
    assert "too short" in short.reason


def test_aspect_preserving_resize_and_center_crop(tmp_path):
    frames = np.zeros((5, 32, 96, 3), np.uint8)
    frames[:, :, :48] = (250, 0, 0)  # left half red, right half blue: a 3:1 clip
    frames[:, :, 48:] = (0, 0, 250)
    write_video(tmp_path / "w.mp4", frames, fps=8, lossless=True)
    clip = load_clip(tmp_path / "w.mp4", Sample("w", "x"), 8.0, [(5, 32, 32), (5, 32, 48)])
    assert clip.bucket == (5, 32, 48) and clip.video.shape == (3, 5, 32, 48)
    # cover 32x48 at scale 1 (32x96), center crop: columns 24..72 of the source
    red = clip.video[0, 0].mean(dim=0)  # (W,) red channel per column
    assert (red[:22] > 0.9).all() and (red[26:] < -0.9).all()
    tall = np.zeros((5, 64, 32, 3), np.uint8)
    tall[:, 16:48] = 200
    write_video(tmp_path / "t.mp4", tall, fps=8, lossless=True)
    clip = load_clip(tmp_path / "t.mp4", Sample("t", "x"), 8.0, [(5, 32, 32)])
    # cover 32x32: scale 1 (64x32), crop rows 16..48 = the bright band only: no squashing
    assert clip.video.shape == (3, 5, 32, 32) and clip.video.min() > 0.5


def test_a_large_video_is_scaled_while_decoding(tmp_path):
    """A video larger than its bucket is shrunk inside the RGB conversion (area filter), then
    cropped: close to decoding it whole and resizing with torch (fit_video), and the same crop."""
    from kino.data.video_io import read_video
    from kino.tasks.conditioning import fit_video, to_model_range

    rng = np.random.default_rng(3)
    big = np.zeros((9, 192, 384, 3), np.uint8)
    big[..., 2] = np.linspace(0, 255, 384, dtype=np.uint8)[None, None]  # a horizontal ramp
    for i in range(9):  # hard-edged squares, moving
        y, x = rng.integers(0, 150), rng.integers(0, 330)
        big[i, y:y + 40, x:x + 48] = (230, 200, 20)
    path = write_video(tmp_path / "big.mp4", big, fps=8, lossless=True)
    clip = load_clip(path, Sample("big", "x"), 8.0, [(9, 32, 48)])
    assert clip.video.shape == (3, 9, 32, 48)
    reference = fit_video(to_model_range(read_video(path)[0]), 32, 48)  # the full-size route
    err = (clip.video - reference).abs()
    assert err.mean() < 0.01 and err.max() < 0.5  # [-1, 1] units: 0.5 levels mean here; edges differ most
    assert float(clip.video[2, 0, :, -1].mean()) > float(clip.video[2, 0, :, 0].mean()) + 0.5  # crop: the middle


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_folder_dataset_skips_exactly_the_bad_files(tmp_path, fmt):
    captions = make_folder(tmp_path / "v", fmt)
    cfg = dataset(captions)
    items = [item for part in dataset_parts(cfg) for item in iter_clips(part, cfg.fps, cfg.bucket_list())]
    bad = {i.key for i in items if not hasattr(i, "bucket")}
    bad_expected = BAD_FOLDER if fmt == "csv" else BAD_FOLDER - {"captions.csv:7"} | {"captions.jsonl:6"}
    assert bad == bad_expected
    good = {i.key: i for i in items if hasattr(i, "bucket")}
    assert {k: c.bucket for k, c in good.items()} == {
        "square.mp4": (5, 32, 32), "wide.mp4": (5, 32, 48), "fast.mp4": (5, 32, 32), "still.png": (1, 32, 32)}
    for clip in good.values():  # the shape is the bucket's: batches stack without padding
        assert clip.video.shape == (3, *clip.bucket) and clip.video.abs().max() <= 1.0
    reasons = {i.key: i.reason for i in items if not hasattr(i, "bucket")}
    assert "empty" in reasons["empty.mp4"] and "no such file" in reasons["missing.mp4"]
    assert "too short" in reasons["late_start.mp4"] and "truncated" in reasons["truncated.mp4"]


def test_a_world_sample_folder_is_a_dataset(tmp_path):
    """`kino world sample` names clips `file` in captions.jsonl: such a folder trains as it is,
    each clip (and image) in the bucket of its own shape, frames unchanged."""
    from kino.world.dataset import write_samples

    rows = write_samples(tmp_path / "w", 3, frames=5, size=(32, 32)) + write_samples(tmp_path / "img", 1, frames=1,
                                                                                     size=(32, 32))
    lines = [json.dumps(r) for r in rows[:3]] + [json.dumps({**rows[3], "file": "../img/" + rows[3]["file"]})]
    (tmp_path / "w" / "captions.jsonl").write_text("\n".join(lines) + "\n")
    cfg = dataset(tmp_path / "w" / "captions.jsonl")
    items = [item for part in dataset_parts(cfg) for item in iter_clips(part, 8.0, cfg.bucket_list())]
    assert [getattr(i, "bucket", None) for i in items] == [(5, 32, 32)] * 3 + [(1, 32, 32)]
    assert [i.caption for i in items] == [r["caption"] for r in rows]


def test_tar_shards_skip_exactly_the_bad_samples(tmp_path):
    cfg = dataset(shards=make_shards(tmp_path / "t"))
    items = [item for part in dataset_parts(cfg) for item in iter_clips(part, cfg.fps, cfg.bucket_list())]
    assert {i.key for i in items if not hasattr(i, "bucket")} == BAD_TAR
    assert {i.key: (i.bucket, i.caption) for i in items if hasattr(i, "bucket")} == {
        "shard-0.tar:s/a": ((5, 32, 32), "a square clip"), "shard-0.tar:s/b": ((5, 32, 48), "a wide clip"),
        "shard-1.tar:c": ((5, 32, 48), "another wide clip")}
    assert "tar file unreadable" in next(i.reason for i in items if i.key == "shard-1.tar:d")


# ---------------------------------------------------------------------------- the cache


def cache_tensors(root: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(root.glob("*/*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.parent.name}/{f.stem}/{k}"] = v
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory, folder_csv) -> Path:
    out = tmp_path_factory.mktemp("cache") / "c"
    report = build_video_cache(out, tiny_vae(), FakeTextEncoder(), dataset(folder_csv))
    assert report.complete and report.clips == 4 and {s.key for s in report.skipped} == BAD_FOLDER
    return out


def test_cache_layout_reports_the_bad_files(built):
    meta = json.loads((built / CACHE_JSON).read_text())
    assert meta["complete"] and meta["source"]["kind"] == "videos" and meta["parts"] == ["part-00000", "part-00001",
                                                                                         "part-00002"]
    assert {s["key"] for s in meta["skipped"]} == BAD_FOLDER and meta["skipped_count"] == len(BAD_FOLDER)
    assert [b["name"] for b in meta["buckets"]] == BUCKETS and meta["clips"] == 4
    cache = LatentCache(built)
    assert cache.keys((5, 32, 32)) == ["square.mp4", "fast.mp4"] and cache.captions((1, 32, 32)) == ["a still image"]
    batch = cache.get((5, 32, 48), [0, 0])
    assert batch["latents"].shape == (2, 16, 2, 4, 6) and batch["text"].shape == (2, 8, 24)


def test_tar_dataset_preprocesses(tmp_path):
    cfg = dataset(shards=make_shards(tmp_path / "t"))
    report = build_video_cache(tmp_path / "c", tiny_vae(), FakeTextEncoder(), cfg)
    assert report.complete and report.clips == 3 and {s.key for s in report.skipped} == BAD_TAR
    assert LatentCache(tmp_path / "c").keys((5, 32, 48)) == ["shard-0.tar:s/b", "shard-1.tar:c"]


def test_cache_resumes_after_a_kill(tmp_path, folder_csv, built):
    cfg = dataset(folder_csv)
    dying = FailingVAE(tiny_vae(), fail_at=3)  # part 0 done (2 calls), killed inside part 1
    with pytest.raises(KeyboardInterrupt):
        build_video_cache(tmp_path / "c", dying, FakeTextEncoder(), cfg)
    assert (tmp_path / "c" / "parts" / "part-00000.json").is_file()
    assert not (tmp_path / "c" / "parts" / "part-00001.json").exists()
    assert not json.loads((tmp_path / "c" / CACHE_JSON).read_text())["complete"]
    with pytest.raises(KinoUserError, match="incomplete"):
        LatentCache(tmp_path / "c")
    again = FailingVAE(tiny_vae())
    report = build_video_cache(tmp_path / "c", again, FakeTextEncoder(), cfg)
    assert report.complete and report.parts_done == 2 and again.calls == 2  # part 0 was not encoded again
    one, two = cache_tensors(built), cache_tensors(tmp_path / "c")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert json.loads((tmp_path / "c" / CACHE_JSON).read_text())["buckets"] == \
        json.loads((built / CACHE_JSON).read_text())["buckets"]
    idle = FailingVAE(tiny_vae())  # a third run has nothing to do
    assert build_video_cache(tmp_path / "c", idle, FakeTextEncoder(), cfg).complete and idle.calls == 0
    with pytest.raises(KinoUserError, match="other settings"):  # another dataset config: refused
        build_video_cache(tmp_path / "c", tiny_vae(), FakeTextEncoder(), dataset(folder_csv, fps=4.0))


RANK_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from test_datasets import FakeTextEncoder, dataset, tiny_vae
from kino.data.preprocess import build_video_cache, rank_and_world
import torch
torch.set_num_threads(1)
rank, world = rank_and_world()
r = build_video_cache({out!r}, tiny_vae(), FakeTextEncoder(), dataset({captions!r}), rank=rank, world_size=world)
print(json.dumps({{"rank": rank, "parts_done": r.parts_done, "complete": r.complete}}))
"""


def test_two_ranks_take_their_parts(tmp_path, folder_csv, built):
    script = RANK_SCRIPT.format(tests=str(REPO / "tests"), out=str(tmp_path / "c"), captions=str(folder_csv))
    env = {**os.environ, "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    reports = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert [r["parts_done"] for r in reports] == [2, 1]  # parts 0, 2 and part 1
    assert any(r["complete"] for r in reports)  # whoever finished last completed the cache
    one, two = cache_tensors(built), cache_tensors(tmp_path / "c")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert json.loads((tmp_path / "c" / CACHE_JSON).read_text())["buckets"] == \
        json.loads((built / CACHE_JSON).read_text())["buckets"]


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from test_datasets import FakeTextEncoder, FailingVAE, dataset, tiny_vae
from kino.data.preprocess import build_video_cache
import torch
torch.set_num_threads(1)

class Slow(FailingVAE):  # part 0 at full speed, then slow enough to be killed inside part 1
    def encode(self, x):
        if self.calls >= 3:
            time.sleep(60)
        return super().encode(x)

build_video_cache({out!r}, Slow(tiny_vae()), FakeTextEncoder(), dataset({captions!r}))
"""


def test_cache_resumes_after_kill_9(tmp_path, folder_csv, built):
    out = tmp_path / "c"
    script = KILL_SCRIPT.format(tests=str(REPO / "tests"), out=str(out), captions=str(folder_csv))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (out / "parts" / "part-00000.json").exists():  # part 0 done, part 1 being encoded
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "parts" / "part-00001.json").exists()
    # as if killed while writing part 1: one shard in place, another as a temp file
    (out / "1x32x32").mkdir(exist_ok=True)
    (out / "1x32x32" / "part-00001.safetensors").write_bytes(b"half")
    (out / "5x32x32" / "part-00001.safetensors.tmp-99999").write_bytes(b"half")
    again = FailingVAE(tiny_vae())
    report = build_video_cache(out, again, FakeTextEncoder(), dataset(folder_csv))
    assert report.complete and report.parts_done == 2 and again.calls == 2  # part 1 only (part 2 has no good clip)
    one, two = cache_tensors(built), cache_tensors(out)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert not list(out.glob("*/part-0000[12].*.tmp-*"))


# ---------------------------------------------------------------------------- training


def run_config(tmp: Path, cache: Path, data: VideoDatasetConfig, **train) -> DiTRunConfig:
    return DiTRunConfig(
        model="tiny", dataset=data, cache=CacheConfig(dir=str(cache)), data=DiTDataConfig(batch_size=3),
        train=TrainConfig(**{"out_dir": str(tmp / "run"), "max_steps": 3, "lr": 3e-3, "log_every": 1,
                             "checkpoint_every": 0, "progress": False, **train}),
    )


def test_training_on_the_cache_equals_training_on_the_fly(tmp_path, folder_csv, built):
    """The same batches (bucket, clips, noise, t, text, latents) from the cache and from the
    encoders run in the step, and so the same losses and weights after 3 training steps:
    bitwise on this CPU. (The cache encodes up to 8 clips per VAE call, on the fly one: a
    backend whose convolutions round differently by batch size could move a latent by one
    bf16 step; then compare latents with rtol 2^-7 and losses with ~1e-3 instead.)"""
    data = dataset(folder_csv)
    cfg = run_config(tmp_path, built, data)
    cached = DiTTask(cfg, open_video_cache(built, data, tiny_vae()))
    live_source = OnTheFlyLatents(data, tiny_vae(), FakeTextEncoder())
    assert {s.key for s in live_source.skipped} == BAD_FOLDER
    live = DiTTask(cfg, live_source)
    assert cached.buckets == live.buckets == [(1, 32, 32), (5, 32, 32), (5, 32, 48)]
    for step in range(4):
        a, b = cached.batch(step), live.batch(step)
        for k in ("latents", "noise", "t", "text", "mask", "clean"):
            assert torch.equal(a[k], b[k]), k

    def losses(task, out):
        c = run_config(tmp_path / out, built, data)
        trainer = Trainer(task, c.train)
        trainer.fit()
        rows = [json.loads(line) for line in (tmp_path / out / "run" / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r], trainer.export_state_dict()

    (la, wa), (lb, wb) = losses(cached, "a"), losses(live, "b")
    assert len(la) == 3
    assert la == lb and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_train_dit_reads_a_preprocessed_cache(tmp_path, folder_csv, built, vae_dir):
    cfg = run_config(tmp_path, built, dataset(folder_csv), max_steps=2)
    cfg.vae = str(vae_dir)
    out = run_train_dit(cfg, text_encoder=FakeTextEncoder())
    assert (out / "dit" / "model.safetensors").is_file()
    assert json.loads((out / "dit" / "training.json").read_text())["latent_cache"] == str(built)
    other = run_config(tmp_path, built, dataset(folder_csv, fps=4.0))
    other.vae = str(vae_dir)
    with pytest.raises(KinoUserError, match="not made from this config"):
        run_train_dit(other, text_encoder=FakeTextEncoder())
    missing = run_config(tmp_path, tmp_path / "nothing", dataset(folder_csv))
    missing.vae = str(vae_dir)
    with pytest.raises(KinoUserError, match="kino preprocess"):
        run_train_dit(missing, text_encoder=FakeTextEncoder())


# ---------------------------------------------------------------------------- the command


@pytest.mark.parametrize("body, message", [
    ('model = "tiny"\n', "no [dataset]"),
    ('[dataset]\ncaptions = "nowhere/captions.csv"\n', "is not a file"),
    ('[dataset]\nshards = ["nowhere/*.tar"]\n', "no file matches"),
    ('[dataset]\ncaptions = "x.csv"\nshards = ["y.tar"]\n', "exactly one"),
    ('[dataset]\ncaptions = "x.csv"\nbuckets = ["5x32"]\n', "invalid bucket"),
    ('[dataset]\ncaptions = "x.csv"\nfps = 0\n', "fps"),
])
def test_cli_preprocess_bad_input(tmp_path, capsys, body, message):
    config = tmp_path / "run.toml"
    config.write_text(body)
    assert main(["preprocess", "--config", str(config), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kino: error:") and message in err and "Traceback" not in err


def test_cli_preprocess_bad_captions_file(tmp_path, capsys):
    (tmp_path / "c.csv").write_text("file,text\na.mp4,hello\n")
    config = tmp_path / "run.toml"
    config.write_text(f'[dataset]\ncaptions = "{tmp_path / "c.csv"}"\n')
    assert main(["preprocess", "--config", str(config), "-q"]) == 2
    err = capsys.readouterr().err
    assert "path and caption" in err and "Traceback" not in err


def test_cli_preprocess_then_train(tmp_path, capsys, monkeypatch, folder_csv, vae_dir):
    import kino.models.text.encoder as encoder

    class Fake(FakeTextEncoder):
        def __init__(self, max_length: int, clauses: bool = False):
            pass

    monkeypatch.setattr(encoder, "MiniLMEncoder", Fake)  # the CLI's text encoder, without MiniLM's weights
    config = tmp_path / "run.toml"
    config.write_text(f'''model = "tiny"
vae = "{vae_dir}"
[dataset]
captions = "{folder_csv}"
buckets = {json.dumps(BUCKETS)}
part_size = 4
[cache]
dir = "{tmp_path / 'cache'}"
[data]
batch_size = 2
[train]
out_dir = "{tmp_path / 'run'}"
max_steps = 2
sample_every = 0
checkpoint_every = 0
''')
    assert main(["preprocess", "--config", str(config), "-q"]) == 0
    out, err = capsys.readouterr()
    assert "(complete): 4 clips, 7 skipped" in out
    assert {line.split(":")[0].removeprefix("skipped ") for line in err.splitlines() if line.startswith("skipped ")} \
        >= {k.split(":")[0] for k in BAD_FOLDER}
    assert main(["train", "dit", "--config", str(config), "-q"]) == 0
    assert (tmp_path / "run" / "model" / "dit" / "model.safetensors").is_file()


def test_shipped_video_config_loads():
    from kino.training.config import load_config

    cfg = load_config(REPO / "configs" / "dit_videos.toml", DiTRunConfig)
    assert cfg.dataset is not None and cfg.dataset.bucket_list()
