"""Shapes World evaluator: exact, attribute-by-attribute checks of a clip against its caption.

Implements ../shared/WORLD.md, "The evaluator". Choices where the contract is silent
(documented in docs/SHAPES_WORLD.md):
- the *median frame* is frame F // 2;
- an object is *present* in a frame when its area reaches the presence threshold; shape,
  size, centroid means and smoothness use present frames only, so stray pixels of the
  right color in a frame where the object is missing cannot fake a centroid;
- smoothness compares consecutive *present* frames (a jump across a gap still counts);
- the triangle's "more area in the bottom half" is judged per present frame, and must hold
  in at least half of them; a pixel row straddling the bbox's middle counts in neither half;
- a wrong color shows up as `presence` (the named color is missing) and `no_extras`
  (an unnamed color is on screen): the contract has no separate color check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import numpy as np

from kino.world.captions import BACKGROUNDS, COLORS, Caption, parse_caption
from kino.world.generator import nominal_side

CHECKS = ("background", "presence", "no_extras", "shape", "size", "motion", "smoothness")
PALETTE_NAMES = tuple(BACKGROUNDS) + tuple(COLORS)
UNKNOWN = -1
UNKNOWN_DISTANCE = 80.0
SHAPE_FILL = {"circle": (0.65, 0.89), "square": (0.89, np.inf), "triangle": (0.30, 0.65)}


_PALETTE = np.array([(BACKGROUNDS | COLORS)[n] for n in PALETTE_NAMES], np.int64)  # (10, 3)


_UNSEEN = -2
_table: np.ndarray | None = None  # label of every 24-bit color, filled in as colors are seen


def _label_colors(packed: np.ndarray) -> np.ndarray:
    rgb = np.stack([packed >> 16, (packed >> 8) & 255, packed & 255], -1)  # (U, 3)
    d2 = ((rgb[:, None, :] - _PALETTE[None]) ** 2).sum(-1)  # (U, 10)
    best = d2.argmin(1)
    return np.where(d2[np.arange(len(best)), best] > UNKNOWN_DISTANCE ** 2, UNKNOWN, best).astype(np.int8)


def label_pixels(video: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) uint8 -> (F, H, W) int8 palette index into PALETTE_NAMES, -1 = unknown."""
    global _table
    if _table is None:
        _table = np.full(1 << 24, _UNSEEN, np.int8)  # 16 MB, once per process
    v = video.astype(np.int32)
    packed = (v[..., 0] << 16) | (v[..., 1] << 8) | v[..., 2]
    labels = _table[packed]
    unseen = labels == _UNSEEN
    if unseen.any():  # label each new color once; clips hold few distinct colors
        colors = np.unique(packed[unseen])
        _table[colors] = _label_colors(colors.astype(np.int64))
        labels = _table[packed]
    return labels


@dataclass
class ClipResult:
    passed: bool
    checks: dict[str, bool]  # only the checks that apply to this clip
    details: dict = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [k for k, ok in self.checks.items() if not ok]


def _as_video(video) -> np.ndarray:
    if hasattr(video, "detach"):  # a torch tensor
        video = video.detach().cpu().numpy()
    v = np.asarray(video)
    if v.ndim == 3:
        v = v[None]
    if v.ndim != 4 or v.shape[-1] != 3 or v.dtype != np.uint8:
        raise ValueError(f"expected a uint8 clip of shape (F, H, W, 3) or an image (H, W, 3), "
                         f"got {v.dtype} {tuple(v.shape)}")
    return v


def _object_stats(mask: np.ndarray):
    """Per-frame area, centroid and bbox of a (F, H, W) mask."""
    F, H, W = mask.shape
    area = mask.sum((1, 2)).astype(np.float64)  # (F,)
    safe = np.maximum(area, 1)
    cx = (mask.sum(1) * (np.arange(W) + 0.5)).sum(1) / safe  # (F,)
    cy = (mask.sum(2) * (np.arange(H) + 0.5)).sum(1) / safe
    rows, cols = mask.any(2), mask.any(1)  # (F, H), (F, W)
    y0, y1 = rows.argmax(1), H - 1 - rows[:, ::-1].argmax(1)
    x0, x1 = cols.argmax(1), W - 1 - cols[:, ::-1].argmax(1)
    return area, cx, cy, (x0, y0, x1, y1)


def component_sizes(mask: np.ndarray) -> np.ndarray:
    """Pixel counts of the 4-connected components of a (H, W) boolean mask, largest first.

    Every pixel starts with its own index as label and takes the smallest label among itself
    and its masked neighbours until nothing changes; a component ends with one label.
    """
    H, W = mask.shape
    big = H * W
    lab = np.where(mask, np.arange(big).reshape(H, W), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        new = np.minimum.reduce([lab, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        new = np.where(mask, new, big)
        if np.array_equal(new, lab):
            break
        lab = new
    return np.sort(np.unique(lab[mask], return_counts=True)[1])[::-1]


def _bottom_heavy(mask: np.ndarray, y0: int, y1: int) -> bool:
    rows = mask.sum(1)[y0:y1 + 1]  # (h,)
    centers = np.arange(y0, y1 + 1) + 0.5
    mid = (y0 + y1 + 1) / 2
    return rows[centers > mid].sum() > rows[centers < mid].sum()


def _motion_ok(motion: str, dx: float, dy: float, growth: float) -> bool:
    if motion == "moving left":
        return dx < -0.15 and abs(dy) < 0.08
    if motion == "moving right":
        return dx > 0.15 and abs(dy) < 0.08
    if motion == "moving up":
        return dy < -0.15 and abs(dx) < 0.08
    if motion == "moving down":
        return dy > 0.15 and abs(dx) < 0.08
    if motion == "standing still":
        return abs(dx) < 0.05 and abs(dy) < 0.05
    if motion == "growing":
        return growth > 1.8 and abs(dx) < 0.08 and abs(dy) < 0.08
    if motion == "shrinking":
        return growth < 0.55 and abs(dx) < 0.08 and abs(dy) < 0.08
    raise ValueError(f"unknown motion {motion!r}")


def _check_object(labels: np.ndarray, obj, H: int, W: int) -> tuple[dict[str, bool], dict]:
    F = labels.shape[0]
    mask = labels == PALETTE_NAMES.index(obj.color)
    area, cx, cy, (x0, y0, x1, y1) = _object_stats(mask)
    s = nominal_side(obj.size, H, W)
    present = area >= 0.25 * (0.6 * s) ** 2 * 0.5
    checks = {"presence": bool(present.mean() >= 0.9)}
    # Diagnostic, not a check: in the median frame, how many separate blobs of the object's
    # color are each big enough to count as the object (a generator that draws it twice).
    blobs = component_sizes(mask[F // 2])
    info = {"present_frames": int(present.sum()), "blobs": int((blobs >= 0.25 * (0.6 * s) ** 2 * 0.5).sum())}
    idx = np.flatnonzero(present)
    if len(idx) == 0:
        checks["shape"] = False
        if obj.motion not in ("growing", "shrinking"):
            checks["size"] = False
        if F > 1:
            checks.update(motion=False, smoothness=False)
        return checks, info

    bw = (x1 - x0 + 1)[idx].astype(np.float64)
    bh = (y1 - y0 + 1)[idx].astype(np.float64)
    fill = float(np.median(area[idx] / (bw * bh)))
    lo, hi = SHAPE_FILL[obj.shape]
    shape_ok = lo <= fill < hi
    if obj.shape == "triangle":
        heavy = [_bottom_heavy(mask[f], y0[f], y1[f]) for f in idx]
        shape_ok = shape_ok and np.mean(heavy) >= 0.5
    checks["shape"] = bool(shape_ok)
    info["fill"] = round(fill, 4)

    if obj.motion not in ("growing", "shrinking"):
        rel = float(np.median(np.sqrt(bw * bh)) / min(H, W))
        checks["size"] = rel < 0.25 if obj.size == "small" else rel >= 0.25
        info["relative_size"] = round(rel, 4)

    if F > 1:
        q = max(1, F // 4)
        first = idx[idx < q]
        last = idx[idx >= F - q]
        if len(first) == 0 or len(last) == 0:
            checks["motion"] = False
        else:
            dx = (cx[last].mean() - cx[first].mean()) / W
            dy = (cy[last].mean() - cy[first].mean()) / H
            growth = area[F - q:].mean() / max(area[:q].mean(), 1e-9)
            checks["motion"] = _motion_ok(obj.motion, dx, dy, growth)
            info.update(dx=round(float(dx), 4), dy=round(float(dy), 4), growth=round(float(growth), 4),
                        # diagnostic: where it starts (first quarter's centroid, from the frame's centre)
                        start_x=round(float(cx[first].mean() / W - 0.5), 4),
                        start_y=round(float(cy[first].mean() / H - 0.5), 4))
        jumps = np.hypot(np.diff(cx[idx]), np.diff(cy[idx]))
        max_jump = float(jumps.max()) if len(jumps) else 0.0
        checks["smoothness"] = max_jump <= 0.15 * max(H, W)
        info["max_jump"] = round(max_jump, 3)
    return checks, info


def evaluate_clip(video, caption: str | Caption) -> ClipResult:
    """Evaluate a decoded clip (F, H, W, 3) uint8 against its caption."""
    cap = parse_caption(caption) if isinstance(caption, str) else caption
    v = _as_video(video)
    F, H, W, _ = v.shape
    labels = label_pixels(v)
    mid = labels[F // 2]
    bg_fraction = float((mid == PALETTE_NAMES.index(cap.background)).mean())
    named = {PALETTE_NAMES.index(o.color) for o in cap.objects}
    extra = [PALETTE_NAMES.index(c) for c in COLORS if PALETTE_NAMES.index(c) not in named]
    extra_fraction = float(np.isin(mid, extra).mean())
    checks = {"background": bg_fraction >= 0.5, "no_extras": extra_fraction < 0.01}
    details = {"background_fraction": round(bg_fraction, 4), "extra_fraction": round(extra_fraction, 4),
               "objects": []}
    for obj in cap.objects:
        obj_checks, info = _check_object(labels, obj, H, W)
        details["objects"].append({"object": obj.phrase(), **info,
                                   "failed": [k for k, ok in obj_checks.items() if not ok]})
        for k, ok in obj_checks.items():
            checks[k] = checks.get(k, True) and bool(ok)
    if F == 1:
        checks.pop("smoothness", None)
    checks = {k: bool(checks[k]) for k in CHECKS if k in checks}
    return ClipResult(all(checks.values()), checks, details)


def clip_kind(frames: int, objects: int) -> str:
    return "image" if frames == 1 else ("single" if objects == 1 else "pair")


def _rate(passed: int, total: int) -> dict:
    return {"clips": total, "passed": passed, "pass_rate": round(passed / total, 4) if total else None}


def summarize(results: list[tuple[dict, ClipResult]], max_failures: int = 50) -> dict:
    """Aggregate (row, result) pairs into the JSON report: overall, per check, per kind."""
    report = _rate(sum(r.passed for _, r in results), len(results))
    report["checks"] = {}
    for name in CHECKS:
        vals = [r.checks[name] for _, r in results if name in r.checks]
        report["checks"][name] = _rate(sum(vals), len(vals))
    kinds: dict[str, list[bool]] = {}
    for row, r in results:
        kinds.setdefault(row["kind"], []).append(r.passed)
    report["kinds"] = {k: _rate(sum(v), len(v)) for k, v in sorted(kinds.items())}
    failures = [{"file": row.get("file"), "caption": row["caption"], "failed": r.failed,
                 "details": r.details} for row, r in results if not r.passed]
    report["failures"] = failures[:max_failures]
    report["failures_omitted"] = max(0, len(failures) - max_failures)
    return report
