"""Real video datasets: a folder of videos with a captions file, or tar shards in WebDataset
layout, decoded as a stream into fixed-shape clips.

Two layouts:

- **folder**: a captions file, CSV (with a header row) or JSONL, one row per clip with
  `path` (relative to the captions file, or absolute), `caption`, and optional `start`,
  `end` in seconds (the part of the video to use).
- **tar shards** (WebDataset): each sample is the run of consecutive members sharing a key
  (`dir/key.ext`: the key is the name up to the first dot of the basename): one video or
  image (`.mp4`, `.webm`, `.mkv`, `.mov`, `.avi`, `.gif`, `.png`, `.jpg`, ...), a caption
  in `.txt` or `.caption` (UTF-8) and/or a `.json` with `caption` and optional `start`,
  `end`. Shards are read front to back with the stdlib `tarfile` in streaming mode, so a
  shard can be a pipe or an object-store download; each video is spooled to a temporary
  file for PyAV.

A dataset is cut into **parts**, the unit of preprocessing (kino/data/preprocess.py): each
tar shard is a part; a folder dataset's rows make parts of `part_size` rows.

Each clip goes into a **bucket** (frames, height, width): the size whose aspect ratio is
nearest the video's (in log ratio; ties to the larger area), then the most frames of that
size the video (from `start` to `end`) holds at the target `fps`. Frames are sampled to
`fps` while decoding (kino/data/video_io.py: nearest source frame to each target time;
decoding stops after the bucket's frames), resized with the aspect ratio kept to cover the
bucket's size, and center-cropped (kino/tasks/conditioning.py `fit_video`), so a batch
drawn from one bucket never mixes shapes and nothing is padded.

A sample that cannot give a clip (missing, empty, corrupt, truncated, not a video, no
caption, shorter than the shortest bucket) becomes a `Skipped` record with the reason:
never an exception, never a hang (video_io refuses anything that is not a regular file).
A tar shard that breaks mid-way keeps the samples read before the break and is itself
listed as skipped.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import math
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from torch import Tensor

from kino.data.latent_cache import Bucket, parse_bucket
from kino.errors import KinoUserError

CAPTION_EXTS = (".txt", ".caption")
_FRAME_EPS = 1e-6  # frames of float error tolerated when counting the frames a span holds


@dataclass
class VideoDatasetConfig:
    """A real video dataset: `captions` (folder layout) or `shards` (WebDataset tars), not both.
    Relative paths are relative to the working directory."""

    captions: str | None = None  # CSV or JSONL: path, caption, optional start, end (seconds)
    shards: list[str] = field(default_factory=list)  # tar files; glob patterns allowed
    fps: float = 8.0  # frames are sampled to this rate
    buckets: list[str] = field(default_factory=lambda: ["1x64x64", "17x64x64", "17x64x96", "17x96x64"])
    part_size: int = 64  # rows of a folder dataset per part (a tar shard is one part)

    def __post_init__(self):
        if (self.captions is None) == (not self.shards):
            raise KinoUserError("dataset: give either captions (a CSV/JSONL file) or shards (tar files), "
                                "exactly one")
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise KinoUserError(f"dataset.fps must be a positive number, got {self.fps}")
        if self.part_size < 1:
            raise KinoUserError(f"dataset.part_size must be >= 1, got {self.part_size}")
        if not self.buckets:
            raise KinoUserError("dataset.buckets must list at least one FRAMESxHEIGHTxWIDTH bucket")
        buckets = self.bucket_list()
        if len(set(buckets)) != len(buckets):
            raise KinoUserError(f"dataset.buckets lists a bucket twice: {self.buckets}")

    def bucket_list(self) -> list[Bucket]:
        return [parse_bucket(b) for b in self.buckets]


@dataclass(frozen=True)
class Sample:
    """One row / tar sample before decoding. `key` names it in logs and in the cache: the
    path as the captions file writes it, or `SHARD.tar:KEY`."""

    key: str
    caption: str
    start: float = 0.0
    end: float | None = None


@dataclass(frozen=True)
class Clip:
    key: str
    caption: str
    bucket: Bucket
    video: Tensor  # (3, F, H, W) float in [-1, 1], F, H, W = bucket


@dataclass(frozen=True)
class Skipped:
    key: str
    reason: str

    def to_dict(self) -> dict:
        return {"key": self.key, "reason": self.reason}


@dataclass(frozen=True)
class Part:
    """A unit of preprocessing: a tar shard, or a run of rows of a captions file. `digest`
    changes when what the part holds changes (rows edited, shard replaced)."""

    index: int
    name: str
    digest: str
    tar: Path | None = None
    rows: tuple[tuple[Path | None, Sample | Skipped], ...] = ()


# ---------------------------------------------------------------------------- parts


def dataset_parts(config: VideoDatasetConfig) -> list[Part]:
    """The parts of a dataset, in order. Raises KinoUserError for a captions file or shard list
    that cannot be used at all (missing, unreadable, no rows, malformed header)."""
    if config.captions is not None:
        rows = read_captions(Path(config.captions))
        return [
            Part(i, f"part-{i:05d}", _digest(repr([(str(p), s) for p, s in chunk])), rows=tuple(chunk))
            for i, chunk in enumerate(rows[j:j + config.part_size] for j in range(0, len(rows), config.part_size))
        ]
    paths: list[Path] = []
    for pattern in config.shards:
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not found:
            raise KinoUserError(f"dataset.shards: no file matches {pattern!r}")
        paths += [Path(p) for p in found]
    for p in paths:
        if not p.is_file():
            raise KinoUserError(f"dataset.shards: {p} is not a file")
    if len(set(paths)) != len(paths):
        raise KinoUserError("dataset.shards names a tar file twice")
    return [Part(i, f"part-{i:05d}", _digest(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}"), tar=p)
            for i, p in enumerate(paths)]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_captions(path: Path) -> list[tuple[Path | None, Sample | Skipped]]:
    """(video path, sample) per row of a CSV or JSONL captions file; a row with an unusable
    field (no path, empty caption, bad start/end) is a Skipped sample (path None). JSONL rows
    may name the video `file` instead of `path`, so a `kino world sample` folder is a dataset."""
    from kino.world.dataset import read_jsonl

    if not path.is_file():
        raise KinoUserError(f"dataset.captions: {path} is not a file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = read_jsonl(path)
        for n, row in records:
            if not isinstance(row, dict):
                raise KinoUserError(f"{path}:{n}: each line must be a JSON object with path and caption")
    elif suffix == ".csv":
        try:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is None or not {"path", "caption"} <= set(reader.fieldnames):
                    raise KinoUserError(f"{path}: the first row must name the columns, with at least path and "
                                        f"caption (and optionally start, end); got {reader.fieldnames}")
                records = [(reader.line_num, row) for row in reader]
        except (UnicodeDecodeError, csv.Error) as e:
            raise KinoUserError(f"{path} is not a readable UTF-8 CSV file: {e}") from None
    else:
        raise KinoUserError(f"dataset.captions: {path} must be a .csv or .jsonl file")
    if not records:
        raise KinoUserError(f"{path} has no rows")
    out = []
    for n, row in records:
        if "path" not in row and "file" in row:  # a Shapes World folder (`kino world sample`) names clips `file`
            row = {**row, "path": row["file"]}
        if not isinstance(row.get("path"), str) or not row["path"].strip():
            out.append((None, Skipped(f"{path.name}:{n}", "no path")))
            continue
        key = row["path"].strip()
        sample = _sample(key, row.get("caption"), row.get("start"), row.get("end"))
        video = path.parent / key if isinstance(sample, Sample) else None
        out.append((video, sample))
    return out


def _sample(key: str, caption, start, end) -> Sample | Skipped:
    if not isinstance(caption, str) or not caption.strip():
        return Skipped(key, "no caption")
    try:
        start_s = 0.0 if start in (None, "") else float(start)
        end_s = None if end in (None, "") else float(end)
    except (TypeError, ValueError):
        return Skipped(key, f"start/end must be numbers of seconds, got {start!r}, {end!r}")
    if not (math.isfinite(start_s) and start_s >= 0) or (end_s is not None and not end_s > start_s):
        return Skipped(key, f"needs 0 <= start < end, got start={start!r}, end={end!r}")
    return Sample(key, caption.strip(), start_s, end_s)


# ---------------------------------------------------------------------------- clips


def iter_clips(part: Part, fps: float, buckets: list[Bucket]) -> Iterator[Clip | Skipped]:
    """Decode a part, sample by sample, into clips and skip records, in the part's order."""
    if part.tar is None:
        for video, sample in part.rows:
            yield sample if isinstance(sample, Skipped) else load_clip(video, sample, fps, buckets)
    else:
        yield from _iter_tar(part.tar, fps, buckets)


def choose_bucket(height: int, width: int, frames: int, buckets: list[Bucket]) -> Bucket | None:
    """The bucket of a video of `frames` frames (at the target fps) and `height` x `width`:
    nearest aspect ratio first, then as many frames as it holds; None when even the
    shortest bucket needs more frames."""
    fits = [b for b in buckets if b[0] <= frames]
    if not fits:
        return None
    aspect = math.log(width / height)
    h, w = min({(b[1], b[2]) for b in fits}, key=lambda s: (abs(math.log(s[1] / s[0]) - aspect), -s[0] * s[1]))
    return max(b for b in fits if (b[1], b[2]) == (h, w))


def load_clip(path: Path, sample: Sample, fps: float, buckets: list[Bucket]) -> Clip | Skipped:
    """One sample's clip, or why there is none. Never raises for a bad file."""
    try:
        return _load_clip(path, sample, fps, buckets)
    except KinoUserError as e:  # VideoReadError: missing, empty, corrupt, truncated, not media
        return Skipped(sample.key, getattr(e, "reason", None) or str(e))
    except Exception as e:  # noqa: BLE001 - a decoder failing in a new way must not end a run over one file
        return Skipped(sample.key, f"unreadable ({type(e).__name__}: {e})")


def _load_clip(path: Path, sample: Sample, fps: float, buckets: list[Bucket]) -> Clip | Skipped:
    from kino.data.video_io import is_image_path, iter_frames, probe  # PyAV only where videos are read
    from kino.tasks.conditioning import cover_size, fit_video, to_model_range

    info = probe(path)
    if is_image_path(path):
        available = 1
    else:
        end = info.duration if sample.end is None else min(sample.end, info.duration)
        available = max(0, math.ceil((end - sample.start) * fps - _FRAME_EPS))
    shortest = min(b[0] for b in buckets)
    bucket = choose_bucket(info.height, info.width, available, buckets)
    if bucket is None:
        return Skipped(sample.key, f"too short: {available} frames at {fps:g} fps from {sample.start:g}s, the "
                                   f"shortest bucket needs {shortest}")
    f, h, w = bucket
    # A video larger than the bucket is scaled down while it is converted to RGB (one swscale
    # pass): then fit_video only crops. A smaller one is decoded as it is and resized by torch.
    size = cover_size(info.height, info.width, h, w)
    shrink = size[0] <= info.height and size[1] <= info.width
    frames = list(iter_frames(path) if is_image_path(path)
                  else iter_frames(path, fps=fps, max_frames=f, start=sample.start, size=size if shrink else None))
    if len(frames) < f:  # the header promised more than the stream holds
        return Skipped(sample.key, f"too short: decoded {len(frames)} frames at {fps:g} fps, bucket "
                                   f"{f}x{h}x{w} needs {f}")
    return Clip(sample.key, sample.caption, bucket, fit_video(to_model_range(np.stack(frames[:f])), h, w))


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset: 'dir/key.a.b' -> ('dir/key', '.a.b')."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (dot + ext).lower()


def _iter_tar(path: Path, fps: float, buckets: list[Bucket]) -> Iterator[Clip | Skipped]:
    from kino.data.video_io import IMAGE_EXTS, VIDEO_EXTS

    with tempfile.TemporaryDirectory(prefix="kino-tar-") as tmp:
        group: dict[str, bytes | Path] = {}  # extension -> small file's bytes, or a spooled video
        key = None
        try:
            with tarfile.open(path, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    k, ext = _split_name(member.name)
                    if k != key and group:
                        yield _tar_sample(path, key, group, fps, buckets)
                        _drop(group)
                    key = k
                    data = tar.extractfile(member)
                    if ext in VIDEO_EXTS or ext in IMAGE_EXTS:  # straight to disk: videos can be large
                        target = Path(tmp) / f"{len(group)}{ext}"
                        with open(target, "wb") as out:
                            shutil.copyfileobj(data, out, 1 << 20)
                        group[ext] = target
                    else:
                        group[ext] = data.read()
            if group:
                yield _tar_sample(path, key, group, fps, buckets)
                _drop(group)
        except (tarfile.TarError, OSError, EOFError) as e:
            # samples before the break were yielded; the one being read is lost with the rest
            yield Skipped(f"{path.name}" + (f":{key}" if key else ""),
                          f"tar file unreadable from here on ({type(e).__name__}: {e or 'truncated'})")


def _drop(group: dict[str, bytes | Path]) -> None:
    for value in group.values():
        if isinstance(value, Path):
            value.unlink(missing_ok=True)
    group.clear()


def _tar_sample(shard: Path, key: str, group: dict[str, bytes | Path], fps: float,
                buckets: list[Bucket]) -> Clip | Skipped:
    from kino.data.video_io import IMAGE_EXTS, VIDEO_EXTS

    name = f"{shard.name}:{key}"
    videos = [e for e in group if e in VIDEO_EXTS or e in IMAGE_EXTS]
    if len(videos) != 1:
        return Skipped(name, f"needs exactly one video or image file, has {sorted(group) or 'none'}")
    meta: dict = {}
    if ".json" in group:
        try:
            meta = json.loads(group[".json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return Skipped(name, "its .json is not valid UTF-8 JSON")
        if not isinstance(meta, dict):
            return Skipped(name, "its .json must be an object")
    caption = meta.get("caption")
    for ext in CAPTION_EXTS:
        if caption is None and ext in group:
            try:
                caption = group[ext].decode("utf-8")
            except UnicodeDecodeError:
                return Skipped(name, f"its {ext} caption is not UTF-8")
    sample = _sample(name, caption, meta.get("start"), meta.get("end"))
    if isinstance(sample, Skipped):
        return sample
    return load_clip(group[videos[0]], sample, fps, buckets)
