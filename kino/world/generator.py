"""Shapes World generator: scenes sampled by split and seed, rendered exactly per WORLD.md.

Geometry conventions (the evaluator relies on the same ones):
- pixel (x, y) covers [x, x+1) x [y, y+1); it belongs to a shape when its *center*
  (x + 0.5, y + 0.5) does, with half-open edges so a side of s pixels covers s pixels;
- an object's trajectory is linear in frame index: u = f / (F - 1) goes 0 -> 1;
- start centers are real numbers drawn so that the object's box stays inside the frame,
  and two objects' boxes stay >= 2 px apart (3 px in continuous coordinates, so that
  rasterisation can never bring them closer) in every frame.

Clip i of (split, seed) is a pure function of (split, seed, i): any subset of a split can
be regenerated independently, which is what makes training data positions exact to resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from kino.world.captions import (BACKGROUNDS, COLORS, FRAME_COUNTS, MOTIONS, OBJECT_SIZES, SHAPES,
                                 SIZES, Caption, WorldObject, check_frames, check_size,
                                 is_held_out, validate)

SPLITS = ("train", "eval")
_SEPARATION = 3.0  # continuous gap between boxes; the contract asks >= 2 px of pixels
_MARGIN = 0.5  # keep boxes this far inside the frame
_MAX_TRIES = 200


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one clip."""

    caption: Caption
    frames: int
    height: int
    width: int
    centers: tuple[tuple[float, float], ...]  # start center (x, y) per object

    @property
    def text(self) -> str:
        return str(self.caption)


def nominal_side(size: str, height: int, width: int) -> int:
    return int(round(OBJECT_SIZES[size] * min(height, width)))


LOOP_WAVES = ("cosine", "triangle")  # loop_progress's shapes of going there and back


def loop_progress(frames: int, period: int, wave: str = "cosine") -> np.ndarray:
    """A clip that loops: per-frame progress along the motion (0 = start, 1 = the motion's end)
    going there and back once every `period` frames, frame `period` equal to frame 0, so the
    clip cut after `period` frames plays as a seamless loop. `wave` "cosine" (the default)
    slows down at both turns, (1 - cos(2 pi f / period)) / 2; "triangle" moves at constant
    speed. Every progress value is one the ordinary clip passes through, so positions stay
    valid (inside the frame, objects apart)."""
    if period < 2:
        raise ValueError(f"a loop period must be >= 2 frames, got {period}")
    if wave not in LOOP_WAVES:
        raise ValueError(f"unknown loop wave {wave!r}: allowed {', '.join(LOOP_WAVES)}")
    phase = (np.arange(frames) % period) / period  # [0, 1)
    if wave == "triangle":
        return 1.0 - np.abs(1.0 - 2.0 * phase)
    return (1.0 - np.cos(2.0 * np.pi * phase)) / 2.0


def trajectory(obj: WorldObject, center: tuple[float, float], frames: int, height: int,
               width: int, progress: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame center x, center y and side of one object: three (F,) float arrays. `progress`
    (F,) in [0, 1] replaces the contract's linear u = f / (F - 1) (e.g. `loop_progress`)."""
    if progress is None:
        u = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    else:
        u = np.asarray(progress, dtype=np.float64)
        if u.shape != (frames,) or u.min(initial=0.0) < 0.0 or u.max(initial=0.0) > 1.0:
            raise ValueError(f"progress must be ({frames},) values in [0, 1]; got shape {u.shape}")
    s = nominal_side(obj.size, height, width)
    cx = np.full(frames, center[0])
    cy = np.full(frames, center[1])
    side = np.full(frames, float(s))
    if obj.motion == "moving left":
        cx = cx - 0.4 * width * u
    elif obj.motion == "moving right":
        cx = cx + 0.4 * width * u
    elif obj.motion == "moving up":
        cy = cy - 0.4 * height * u
    elif obj.motion == "moving down":
        cy = cy + 0.4 * height * u
    elif obj.motion == "growing":
        side = s * (0.6 + 0.8 * u)
    elif obj.motion == "shrinking":
        side = s * (1.4 - 0.8 * u)
    return cx, cy, side


def boxes(obj: WorldObject, center, frames: int, height: int, width: int) -> np.ndarray:
    """Continuous bounding boxes (F, 4) as x0, y0, x1, y1."""
    cx, cy, side = trajectory(obj, center, frames, height, width)
    h = side / 2
    return np.stack([cx - h, cy - h, cx + h, cy + h], axis=1)


def shape_masks(shape: str, cx: np.ndarray, cy: np.ndarray, side: np.ndarray, height: int,
                width: int) -> np.ndarray:
    """Rasterise one shape over all frames at once: (F, H, W) bool."""
    x = np.arange(width, dtype=np.float64)[None, None, :] + 0.5 - cx[:, None, None]  # (F, 1, W)
    y = np.arange(height, dtype=np.float64)[None, :, None] + 0.5 - cy[:, None, None]  # (F, H, 1)
    h = side[:, None, None] / 2
    if shape == "circle":
        return x * x + y * y < h * h
    inside_rows = (y >= -h) & (y < h)  # (F, H, 1)
    if shape == "square":
        return inside_rows & (x >= -h) & (x < h)
    if shape == "triangle":
        # apex at the top center; the half-width grows by 1/2 per pixel down (base == height)
        return inside_rows & (np.abs(x) < (y + h) / 2)
    raise ValueError(f"unknown shape {shape!r}: allowed {', '.join(SHAPES)}")


def render(scene: Scene, progress: np.ndarray | None = None) -> np.ndarray:
    """Render a scene to uint8 (F, H, W, 3); `progress` as for `trajectory` (default: the
    contract's linear motion)."""
    F, H, W = scene.frames, scene.height, scene.width
    video = np.empty((F, H, W, 3), np.uint8)
    video[:] = np.array(BACKGROUNDS[scene.caption.background], np.uint8)
    for obj, center in zip(scene.caption.objects, scene.centers):
        cx, cy, side = trajectory(obj, center, F, H, W, progress)
        video[shape_masks(obj.shape, cx, cy, side, H, W)] = np.array(COLORS[obj.color], np.uint8)
    return video


def _center_range(obj: WorldObject, frames: int, height: int, width: int):
    """The start centers that keep the object inside the frame over its whole trajectory."""
    b = boxes(obj, (0.0, 0.0), frames, height, width)  # relative to the start center
    lo_x, hi_x = _MARGIN - b[:, 0].min(), width - _MARGIN - b[:, 2].max()
    lo_y, hi_y = _MARGIN - b[:, 1].min(), height - _MARGIN - b[:, 3].max()
    if lo_x > hi_x or lo_y > hi_y:
        return None
    return lo_x, hi_x, lo_y, hi_y


def _separated(a: np.ndarray, b: np.ndarray) -> bool:
    gap_x = np.maximum(b[:, 0] - a[:, 2], a[:, 0] - b[:, 2])
    gap_y = np.maximum(b[:, 1] - a[:, 3], a[:, 1] - b[:, 3])
    return bool(np.all(np.maximum(gap_x, gap_y) >= _SEPARATION))


def _sample_object(rng: np.random.Generator, split: str, frames: int, taken_colors) -> WorldObject:
    while True:
        obj = WorldObject(
            size=str(rng.choice(list(OBJECT_SIZES))),
            color=str(rng.choice([c for c in COLORS if c not in taken_colors])),
            shape=str(rng.choice(SHAPES)),
            motion="standing still" if frames == 1 else str(rng.choice(MOTIONS)),
        )
        if split == "eval" or not is_held_out(obj):
            return obj


def _place(rng, objects, frames, height, width):
    """Rejection-sample start centers; None when this combination does not fit."""
    ranges = [_center_range(o, frames, height, width) for o in objects]
    if any(r is None for r in ranges):
        return None
    for _ in range(_MAX_TRIES):
        centers = tuple((float(rng.uniform(r[0], r[1])), float(rng.uniform(r[2], r[3]))) for r in ranges)
        if len(objects) == 1:
            return centers
        a, b = (boxes(o, c, frames, height, width) for o, c in zip(objects, centers))
        if _separated(a, b):
            return centers
    return None


def sample_scene(rng: np.random.Generator, split: str = "train", *, frames: int | None = None,
                 size: tuple[int, int] | None = None, objects: int | None = None) -> Scene:
    """Draw one scene. Unset options are drawn uniformly from the contract's choices."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: allowed {', '.join(SPLITS)}")
    F = int(rng.choice(FRAME_COUNTS)) if frames is None else frames
    H, W = SIZES[int(rng.integers(len(SIZES)))] if size is None else size
    n = int(rng.integers(1, 3)) if objects is None else objects
    check_frames(F)
    check_size(H, W)
    if n not in (1, 2):
        raise ValueError(f"a scene has 1 or 2 objects, got {n}")
    background = str(rng.choice(list(BACKGROUNDS)))
    while True:
        objs = []
        for _ in range(n):
            objs.append(_sample_object(rng, split, F, {o.color for o in objs}))
        centers = _place(rng, objs, F, H, W)
        if centers is not None:
            caption = Caption(tuple(objs), background)
            validate(caption, F)
            return Scene(caption, F, H, W, centers)


def scene_rng(split: str, seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index]))


def scene_at(split: str, seed: int, index: int, **options) -> Scene:
    """Scene `index` of the stream (split, seed): independent of every other index."""
    return sample_scene(scene_rng(split, seed, index), split, **options)


def sample_clips(n: int, split: str = "train", seed: int = 0, start: int = 0,
                 **options) -> Iterator[tuple[int, Scene, np.ndarray]]:
    """Yield (index, scene, video) for indices start .. start+n-1."""
    for i in range(start, start + n):
        scene = scene_at(split, seed, i, **options)
        yield i, scene, render(scene)


def scene_from_caption(caption: Caption, frames: int, height: int, width: int,
                       seed: int = 0) -> Scene:
    """A scene that realises a given caption (positions drawn from `seed`)."""
    check_frames(frames)
    check_size(height, width)
    validate(caption, frames)
    rng = np.random.default_rng(seed)
    centers = _place(rng, caption.objects, frames, height, width)
    if centers is None:
        raise ValueError(f"{caption} does not fit in {height}x{width} over {frames} frames")
    return Scene(caption, frames, height, width, centers)
