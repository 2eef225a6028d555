"""Shapes World on disk: a folder of losslessly stored clips plus `captions.jsonl`.

One row per clip: {"file", "caption", "frames", "height", "width", "fps"}. `kino world
sample` writes such folders, `kino world eval` scores them, and every batch mode of kino
that produces clips for scoring writes the same format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

from kino import __version__
from kino.data.video_io import read_video, write_video
from kino.errors import KinoUserError
from kino.world.captions import FPS, parse_caption
from kino.world.evaluator import ClipResult, clip_kind, evaluate_clip, summarize
from kino.world.generator import sample_clips

CAPTIONS = "captions.jsonl"
REPORT = "report.json"
ROW_KEYS = ("file", "caption", "frames", "height", "width", "fps")


def clip_filename(index: int, frames: int) -> str:
    # lossless storage (WORLD.md): PNG for images, H.264 yuv444p crf 0 for video
    return f"{index:06d}.png" if frames == 1 else f"{index:06d}.mp4"


def write_clip(out_dir: Path, name: str, video, caption: str, fps: float = FPS,
               metadata: dict | None = None) -> dict:
    """Store one clip losslessly and return its captions.jsonl row."""
    meta = {"caption": caption, "kino_version": __version__, **(metadata or {})}
    write_video(out_dir / name, video, fps, lossless=True,
                metadata={k: str(v) for k, v in meta.items()})
    F, H, W = video.shape[:3]
    return {"file": name, "caption": caption, "frames": int(F), "height": int(H), "width": int(W),
            "fps": fps}


def write_rows(out_dir: Path, rows: Iterable[dict]) -> Path:
    path = Path(out_dir) / CAPTIONS
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


def write_samples(out_dir, n: int, split: str = "train", seed: int = 0,
                  progress: Callable[[Iterable], Iterable] = iter, **options) -> list[dict]:
    """Generate n clips of (split, seed) into out_dir with captions.jsonl."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, scene, video in progress(sample_clips(n, split, seed, **options)):
        meta = {"split": split, "seed": seed, "index": i}
        rows.append(write_clip(out, clip_filename(i, scene.frames), video, scene.text, metadata=meta))
    write_rows(out, rows)
    return rows


def read_jsonl(path: Path) -> list[tuple[int, object]]:
    """(line number, value) for each non-blank line; a KinoUserError naming the line for bad JSON."""
    values = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                values.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise KinoUserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return values


def read_rows(folder) -> list[dict]:
    """Rows of folder/captions.jsonl, validated; a clear KinoUserError for anything malformed."""
    path = Path(folder) / CAPTIONS
    if not Path(folder).is_dir():
        raise KinoUserError(f"{folder} is not a folder: expected a folder with {CAPTIONS}")
    if not path.is_file():
        raise KinoUserError(f"{path} not found: a Shapes World folder holds clips and a {CAPTIONS} "
                            "with one JSON row per clip, as `kino world sample` writes")
    rows = []
    for n, row in read_jsonl(path):
        if not isinstance(row, dict) or not {"file", "caption"} <= row.keys():
            raise KinoUserError(f"{path}:{n}: each row needs at least 'file' and 'caption', "
                                f"and may have {', '.join(ROW_KEYS[2:])}")
        rows.append(row)
    if not rows:
        raise KinoUserError(f"{path} has no rows")
    return rows


def evaluate_rows(folder, rows: list[dict],
                  progress: Callable[[Iterable], Iterable] = iter) -> list[tuple[dict, ClipResult]]:
    results = []
    for row in progress(rows):
        caption = parse_caption(row["caption"])
        video, _ = read_video(Path(folder) / row["file"])
        result = evaluate_clip(video, caption)
        results.append(({**row, "kind": clip_kind(len(video), len(caption.objects))}, result))
    return results


def evaluate_folder(folder, progress: Callable[[Iterable], Iterable] = iter) -> dict:
    """Score every clip listed in folder/captions.jsonl and write folder/report.json."""
    rows = read_rows(folder)
    report = summarize(evaluate_rows(folder, rows, progress))
    tmp = Path(folder) / (REPORT + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, Path(folder) / REPORT)
    return report
