"""Batch generation: a JSONL of prompts (and inputs) in, lossless clips + captions.jsonl out,
in the `kino world sample` format so that `kino world eval` scores the results directly.

Every generation command has a batch mode. A row holds a 'caption', the inputs its task
needs as paths (relative to the JSONL's folder, or absolute), and optional options that
override the command line's:

    generate  {"caption", "image"?, "loop"?, "frames"?, "given"?, ...}
    extend    {"caption", "video", "frames"?, "backward"?, "refine"?, "given"?, ...}
    connect   {"caption", "first", "second", "frames"?, "refine"?, "given"?, ...}
    edit      {"caption", "video", "strength"?, "source_prompt"?, "frames"?, ...}

with "height", "width" and "seed" allowed everywhere. A row without 'seed' uses the
command's seed + its index, so reruns are identical. A `captions.jsonl` written by `kino
world sample` is a valid `generate` batch: its rows' "file" and "fps" are ignored (outputs get
their own names and the model's fps), so the captions are generated at their frame counts
and sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable

from kino.errors import KinoUserError
from kino.pipeline import Generation, Pipeline
from kino.tasks import video_tasks
from kino.world.dataset import clip_filename, read_jsonl, write_clip, write_rows

OPTION_TYPES = {"frames": int, "height": int, "width": int, "seed": int, "loop": bool, "backward": bool,
                "refine": float, "strength": float, "given": str, "source_prompt": str}
OPTION_CHOICES = {"given": video_tasks.GIVEN_MODES}
# task -> (the input paths a row must name, those it may name, its options besides height/width/seed)
TASKS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "generate": ((), ("image", "last_image", "vace_video", "vace_mask", "reference"), ("frames", "loop", "given")),
    "extend": (("video",), ("reference",), ("frames", "backward", "refine", "given")),
    "connect": (("first", "second"), ("reference",), ("frames", "refine", "given")),
    "edit": (("video",), (), ("frames", "strength", "source_prompt")),
}
IGNORED = {"generate": ("file", "fps")}  # keys of a world captions.jsonl row, so it can be a batch
RUNNERS: dict[str, Callable[..., Generation]] = {"generate": video_tasks.generate, "extend": video_tasks.extend,
                                                  "connect": video_tasks.connect, "edit": video_tasks.edit}


def _type_ok(value, typ) -> bool:
    if typ is bool:
        return isinstance(value, bool)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, typ) and not isinstance(value, bool)


def read_prompt_rows(path: str | Path, task: str = "generate") -> list[dict]:
    """The rows of a batch file, checked, with input paths resolved and checked to exist."""
    path = Path(path)
    if not path.is_file():
        raise KinoUserError(f"--batch {path} does not exist")
    required, optional, options = TASKS[task]
    options = (*options, "height", "width", "seed")
    usage = (f"each row needs a string 'caption'{''.join(f', {k!r}' for k in required)} and may have "
             f"{', '.join(map(repr, (*optional, *options)))}")
    rows = []
    for n, row in read_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("caption"), str):
            raise KinoUserError(f"{path}:{n}: {usage}")
        for key in IGNORED.get(task, ()):
            row.pop(key, None)
        unknown = sorted(set(row) - {"caption", *required, *optional, *options})
        if unknown:
            raise KinoUserError(f"{path}:{n}: unknown key(s) {', '.join(unknown)} for `kino {task}`: {usage}")
        for key in (*required, *optional):
            if key not in row:
                if key in required:
                    raise KinoUserError(f"{path}:{n}: '{key}' is missing: {usage}")
                continue
            if not isinstance(row[key], str):
                raise KinoUserError(f"{path}:{n}: '{key}' must be a path (a string), got {row[key]!r}")
            file = path.parent / row[key]  # an absolute row path stays absolute
            if not file.is_file():
                raise KinoUserError(f"{path}:{n}: {key} {file} does not exist")
            row[key] = str(file)
        for key in options:
            typ = OPTION_TYPES[key]
            if key in row and not _type_ok(row[key], typ):
                raise KinoUserError(f"{path}:{n}: '{key}' must be {'a number' if typ is float else f'a {typ.__name__}'}"
                                    f", got {row[key]!r}")
            if key in row and key in OPTION_CHOICES and row[key] not in OPTION_CHOICES[key]:
                raise KinoUserError(f"{path}:{n}: '{key}' must be one of {', '.join(OPTION_CHOICES[key])}, got "
                                    f"{row[key]!r}")
        rows.append(row)
    if not rows:
        raise KinoUserError(f"--batch {path} has no rows")
    return rows


JOURNAL = ".kino-batch"  # OUT/.kino-batch/part-K.jsonl: one line per clip written, for resuming


def _stamp(path: str) -> list:
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]


def _request_key(pipe: Pipeline, task: str, row: dict, kwargs: dict, seed: int, inputs: tuple[str, ...]) -> str:
    """What decides a row's clip: the task, its caption, options and seed, its input files (path,
    size, modification time) and the model (name, DiT weights, fused LoRAs)."""
    request = {"task": task, "caption": row["caption"], "options": kwargs, "seed": seed,
               "inputs": {k: _stamp(row[k]) for k in inputs if k in row},
               "model": [pipe.name, pipe.dit_sha256, pipe.loras]}
    return hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()


def _read_journal(out: Path) -> dict[int, tuple[str, dict]]:
    """index -> (request key, captions.jsonl row) of every clip an earlier run finished."""
    done = {}
    for path in sorted((out / JOURNAL).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                done[int(entry["index"])] = (entry["key"], entry["row"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill
    return done


def generate_batch(pipe: Pipeline, prompts: str | Path, out: str | Path, *, defaults: dict, seed: int = 0,
                   progress: Callable[[Iterable], Iterable] = iter, task: str = "generate",
                   shard: tuple[int, int] = (0, 1),
                   merge: Callable[[list[tuple[int, dict]]], list[tuple[int, dict]] | None] | None = None,
                   joint=None) -> list[dict]:
    """Run `task` on every row into the folder `out` (clips + captions.jsonl). `defaults`
    are the keyword arguments of the task function the rows may override.

    `shard` (k, n): run only rows k, k + n, k + 2n, ... (one of n processes); each keeps its
    row's index, file name and seed, so the clips are those one process would write. `merge`
    then collects every process's (index, row) pairs (e.g. a gather to rank 0) and returns
    them all on the process that writes captions.jsonl, None on the others.

    `joint` (kino.training.distributed.Processes), for a pipeline whose weights are shared
    over processes (set_memory(shard=)): every process runs every row with the others; its
    main process alone reads the journal (its choice of the rows left to run is broadcast),
    writes the clips and returns the rows, the others return [].

    Resumable: each finished clip is recorded in OUT/.kino-batch/ as soon as it is written,
    and a rerun keeps every clip whose request (task, caption, options, seed, input files,
    model) is unchanged and whose file is still there, generating only the others: a batch
    killed part way loses at most the clip it was on."""
    rows = read_prompt_rows(prompts, task)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KinoUserError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    required, optional, options = TASKS[task]
    for row in rows:  # check every size given before spending time on any (others come from inputs)
        height, width = row.get("height") or defaults.get("height"), row.get("width") or defaults.get("width")
        if height or width:
            pipe.check_request(1, height or pipe.defaults.height, width or pipe.defaults.width)
    part, parts = shard
    if not 0 <= part < parts:
        raise ValueError(f"shard {part} of {parts}")
    mine = [(i, row) for i, row in enumerate(rows) if i % parts == part]
    writes = joint is None or joint.is_main
    done = _read_journal(out) if writes else {}
    given = (*required, *optional, *options, "height", "width")
    requests = []
    for i, row in mine:
        kwargs = {**defaults, **{k: row[k] for k in given if k in row}}
        if "reference" in kwargs:  # a Wan2.1 VACE model's reference image: the row's, in place of --reference
            kwargs["references"] = [kwargs.pop("reference")]
        row_seed = row.get("seed", seed + i)
        key = _request_key(pipe, task, row, kwargs, row_seed, (*required, *optional))
        kept = i in done and done[i][0] == key and (out / done[i][1]["file"]).is_file()
        requests.append((i, row, kwargs, row_seed, key, kept))
    if joint is not None:  # the same rows left to run on every process
        kept = joint.broadcast([r[5] for r in requests])
        requests = [(*r[:5], k) for r, k in zip(requests, kept)]
    written = []
    (out / JOURNAL).mkdir(exist_ok=True)
    with open(out / JOURNAL / f"part-{part}.jsonl", "a", encoding="utf-8") if writes else nullcontext() as journal:
        for i, row, kwargs, row_seed, key, kept in progress(requests):
            if kept:
                written.append((i, done[i][1]))
                continue
            clip = RUNNERS[task](pipe, row["caption"], seed=row_seed, **kwargs)
            if not writes:
                continue
            name = clip_filename(i, len(clip.video))
            result = write_clip(out, name, clip.video.numpy(), row["caption"], clip.fps, clip.metadata)
            journal.write(json.dumps({"index": i, "key": key, "row": result}) + "\n")
            journal.flush()
            os.fsync(journal.fileno())
            written.append((i, result))
    if not writes:
        return []
    if merge is not None:
        written = merge(written)
        if written is None:
            return []
    written = [row for _, row in sorted(written, key=lambda p: p[0])]
    write_rows(out, written)
    return written
