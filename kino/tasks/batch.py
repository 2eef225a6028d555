"""Batch generation: a JSONL of prompts in, lossless clips + captions.jsonl out, in the
`kino world sample` format so that `kino world eval DIR` scores the results directly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

from kino.errors import KinoUserError
from kino.pipeline import Pipeline
from kino.world.dataset import clip_filename, write_clip, write_rows

ROW_OPTIONS = {"frames": int, "height": int, "width": int, "seed": int}


def read_prompt_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise KinoUserError(f"--batch {path} does not exist")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise KinoUserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("caption"), str):
            raise KinoUserError(f"{path}:{n}: each row needs a string 'caption' and may have "
                                f"{', '.join(ROW_OPTIONS)} (integers)")
        for key, typ in ROW_OPTIONS.items():
            if key in row and not isinstance(row[key], typ):
                raise KinoUserError(f"{path}:{n}: '{key}' must be an integer, got {row[key]!r}")
        rows.append(row)
    if not rows:
        raise KinoUserError(f"--batch {path} has no rows")
    return rows


def generate_batch(pipe: Pipeline, prompts: str | Path, out: str | Path, *, defaults: dict, seed: int = 0,
                   progress: Callable[[Iterable], Iterable] = iter) -> list[dict]:
    """Generate every row; a row without 'seed' uses seed + its index, so reruns are identical."""
    rows = read_prompt_rows(prompts)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KinoUserError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    for row in rows:  # check every request before spending time on any
        pipe.check_request(row.get("frames") or defaults["frames"] or pipe.defaults.frames,
                           row.get("height") or defaults["height"] or pipe.defaults.height,
                           row.get("width") or defaults["width"] or pipe.defaults.width)
    written = []
    for i, row in enumerate(progress(rows)):
        options = {**defaults, **{k: row[k] for k in ("frames", "height", "width") if k in row}}
        clip = pipe.generate(row["caption"], seed=row.get("seed", seed + i), **options)
        name = clip_filename(i, len(clip.video))
        written.append(write_clip(out, name, clip.video.numpy(), row["caption"], clip.fps, clip.metadata))
    write_rows(out, written)
    return written
