"""Shapes World vocabulary and caption grammar (../shared/WORLD.md is the contract).

A caption fully determines what must be on screen, so a `Scene` (the structured form)
and its caption convert both ways: `format_caption(parse_caption(c)) == c`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kino.errors import CaptionError, KinoUserError

FPS = 8
FRAME_COUNTS = (1, 9, 17, 25, 33)
SIZES = ((64, 64), (64, 96), (96, 64))  # (H, W): square, landscape, portrait
TEST_SIZES = ((32, 32),)  # allowed by the contract for tests only

BACKGROUNDS = {
    "black": (16, 16, 16),
    "gray": (128, 128, 128),
    "white": (235, 235, 235),
}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
    "cyan": (40, 190, 200),
}
SHAPES = ("circle", "square", "triangle")
OBJECT_SIZES = {"small": 0.18, "large": 0.32}  # nominal side as a fraction of min(H, W)
MOTIONS = (
    "moving left",
    "moving right",
    "moving up",
    "moving down",
    "standing still",
    "growing",
    "shrinking",
)


@dataclass(frozen=True)
class WorldObject:
    size: str  # "small" | "large"
    color: str
    shape: str
    motion: str

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {self.motion}"


@dataclass(frozen=True)
class Caption:
    """The structured form of a caption: one or two objects on a background."""

    objects: tuple[WorldObject, ...]
    background: str

    def __str__(self) -> str:
        return format_caption(self)


GRAMMAR = (
    "a caption is 'a {size} {color} {shape} {motion} on a {background} background' or "
    "'a {size} {color} {shape} {motion} and a {size} {color} {shape} {motion} on a {background} background', "
    f"lower case, no final period; size: {'|'.join(OBJECT_SIZES)}; color: {'|'.join(COLORS)}; "
    f"shape: {'|'.join(SHAPES)}; motion: {'|'.join(MOTIONS)}; background: {'|'.join(BACKGROUNDS)}; "
    "two objects must have different colors"
)


def _alt(words) -> str:
    return "|".join(re.escape(w) for w in words)


_OBJECT_RE = (
    rf"a ({_alt(OBJECT_SIZES)}) ({_alt(COLORS)}) ({_alt(SHAPES)}) ({_alt(MOTIONS)})"
)
_CAPTION_RE = re.compile(
    rf"{_OBJECT_RE}(?: and {_OBJECT_RE})? on a ({_alt(BACKGROUNDS)}) background"
)


def format_caption(caption: Caption) -> str:
    validate(caption)
    objects = " and ".join(o.phrase() for o in caption.objects)
    return f"{objects} on a {caption.background} background"


def parse_caption(text: str) -> Caption:
    """Parse a caption; raise CaptionError quoting the grammar when it does not follow it."""
    m = _CAPTION_RE.fullmatch(text)
    if m is None:
        raise CaptionError(f"invalid caption {text!r}: {GRAMMAR}")
    g = m.groups()
    objects = [WorldObject(*g[0:4])]
    if g[4] is not None:
        objects.append(WorldObject(*g[4:8]))
    caption = Caption(tuple(objects), g[8])
    validate(caption)
    return caption


def validate(caption: Caption, frames: int | None = None) -> None:
    """Check the rules the regular grammar cannot express."""
    if not 1 <= len(caption.objects) <= 2:
        raise CaptionError(f"a caption names one or two objects, got {len(caption.objects)}: {GRAMMAR}")
    if caption.background not in BACKGROUNDS:
        raise CaptionError(f"unknown background {caption.background!r}: {GRAMMAR}")
    for o in caption.objects:
        if (o.size not in OBJECT_SIZES or o.color not in COLORS or o.shape not in SHAPES
                or o.motion not in MOTIONS):
            raise CaptionError(f"invalid object {o.phrase()!r}: {GRAMMAR}")
    if len(caption.objects) == 2 and caption.objects[0].color == caption.objects[1].color:
        raise CaptionError(
            f"the two objects share the color {caption.objects[0].color!r}: {GRAMMAR}")
    if frames == 1 and any(o.motion != "standing still" for o in caption.objects):
        raise CaptionError("an image (1 frame) only allows the motion 'standing still'")


def is_held_out(obj: WorldObject) -> bool:
    """Compositions the `train` split never produces (WORLD.md, Splits)."""
    return ((obj.color, obj.shape) in {("yellow", "triangle"), ("cyan", "circle"), ("purple", "square")}
            or (obj.color == "orange" and obj.motion == "moving up"))


def check_frames(frames: int) -> None:
    if frames < 1 or (frames - 1) % 4 != 0:
        raise KinoUserError(f"invalid frame count {frames}: Shapes World clips have 4k+1 frames "
                           f"(1 for an image), e.g. {', '.join(map(str, FRAME_COUNTS))}")


def check_size(height: int, width: int) -> None:
    if (height, width) not in SIZES + TEST_SIZES:
        allowed = ", ".join(f"{h}x{w}" for h, w in SIZES + TEST_SIZES)
        raise KinoUserError(f"invalid Shapes World size {height}x{width}: allowed {allowed} (32x32 for tests)")
