"""Measurable success criteria for the conditioned tasks on Shapes World clips.

The world evaluator (`kino.world.evaluator`) says whether a clip matches its caption. The
tasks promise more: that given frames are kept, that the new frames join them without a
jump, that a loop wraps around without a cut, that an edit keeps the input's trajectory.
These functions measure those promises on decoded uint8 clips (F, H, W, 3); the task
benchmark (`benchmarks/eval_tasks.py`) and the shipped-model tests use the same ones.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kino.tasks.reconstruct import psnr_uint8
from kino.world.captions import COLORS, SHAPES, Caption, parse_caption
from kino.world.evaluator import PALETTE_NAMES, label_pixels

JUMP_BOUND = 0.15  # the evaluator's smoothness bound, as a share of max(H, W)
KEEP_PSNR = 28.0  # dB: given frames count as kept at or above this


def kept_psnr(output: np.ndarray, given: np.ndarray, start: int) -> float:
    """PSNR of the output's frames start .. start + len(given) against the given frames."""
    part = output[start:start + len(given)]
    if part.shape != given.shape:
        raise ValueError(f"output frames {start}..{start + len(given)} have shape {part.shape}, "
                         f"the given frames {given.shape}")
    return psnr_uint8(part, given)


def centroids(video: np.ndarray, color: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame centroid (x, y) in pixels of the pixels labelled `color`, and whether the
    colour is present in the frame (>= 4 pixels): three (F,) arrays."""
    mask = label_pixels(video) == PALETTE_NAMES.index(color)  # (F, H, W)
    area = mask.sum((1, 2)).astype(np.float64)
    safe = np.maximum(area, 1)
    _, H, W = mask.shape
    cx = (mask.sum(1) * (np.arange(W) + 0.5)).sum(1) / safe
    cy = (mask.sum(2) * (np.arange(H) + 0.5)).sum(1) / safe
    return cx, cy, area >= 4


def seam_jumps(video: np.ndarray, caption: str | Caption, seams: list[int]) -> float:
    """The largest centroid step of any captioned object across the seams (a seam s joins
    frames s - 1 and s), as a share of max(H, W); inf when an object is missing at a seam."""
    cap = parse_caption(caption) if isinstance(caption, str) else caption
    worst = 0.0
    for obj in cap.objects:
        cx, cy, present = centroids(video, obj.color)
        for s in seams:
            if not (present[s - 1] and present[s]):
                return float("inf")
            worst = max(worst, float(np.hypot(cx[s] - cx[s - 1], cy[s] - cy[s - 1])))
    return worst / max(video.shape[1:3])


def loop_steps(video: np.ndarray) -> tuple[float, float]:
    """(wrap step, mean step): the mean absolute pixel difference from the last frame back
    to the first, and the mean of that difference over consecutive frames."""
    v = video.astype(np.float64)
    steps = np.abs(np.diff(v, axis=0)).mean((1, 2, 3))
    return float(np.abs(v[0] - v[-1]).mean()), float(steps.mean())


def edited_caption(caption: str | Caption, index: int) -> tuple[Caption, int, str]:
    """A caption with one object changed: its colour (even index) or shape (odd index) to
    another one, the colour always unused by the other object. Returns (caption, the
    changed object's position, 'color' or 'shape')."""
    cap = parse_caption(caption) if isinstance(caption, str) else caption
    k = index // 2 % len(cap.objects)
    obj = cap.objects[k]
    if index % 2 == 0:
        taken = {o.color for o in cap.objects}
        free = [c for c in COLORS if c not in taken]
        new = dataclasses.replace(obj, color=free[index // 2 % len(free)])
        what = "color"
    else:
        others = [s for s in SHAPES if s != obj.shape]
        new = dataclasses.replace(obj, shape=others[index // 2 % len(others)])
        what = "shape"
    objects = tuple(new if i == k else o for i, o in enumerate(cap.objects))
    return Caption(objects, cap.background), k, what


def trajectory_offset(source: np.ndarray, old_color: str, output: np.ndarray, new_color: str) -> float:
    """How far the edited object strays from the input's: the largest per-frame centroid
    offset along x (share of W) or y (share of H) over frames where both are present; inf
    when they share no frame."""
    ax, ay, a_ok = centroids(source, old_color)
    bx, by, b_ok = centroids(output, new_color)
    both = a_ok & b_ok
    if not both.any():
        return float("inf")
    _, H, W, _ = source.shape
    return float(max(np.abs(ax - bx)[both].max() / W, np.abs(ay - by)[both].max() / H))
