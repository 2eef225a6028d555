"""Shapes World: caption grammar, generator, evaluator (WORLD.md is the contract)."""

import dataclasses
import itertools

import numpy as np
import pytest

from kino.errors import CaptionError, KinoUserError
from kino.world.captions import (BACKGROUNDS, COLORS, FRAME_COUNTS, MOTIONS, SHAPES, SIZES, Caption,
                                 WorldObject, format_caption, is_held_out, parse_caption)
from kino.world.evaluator import CHECKS, component_sizes, evaluate_clip, label_pixels, summarize
from kino.world.generator import Scene, nominal_side, render, sample_clips, scene_at, scene_from_caption


# ---- captions -------------------------------------------------------------------------

def test_caption_round_trip_every_vocabulary_word():
    for size, color, shape, motion, bg in itertools.product(("small", "large"), COLORS, SHAPES, MOTIONS,
                                                             BACKGROUNDS):
        text = f"a {size} {color} {shape} {motion} on a {bg} background"
        assert format_caption(parse_caption(text)) == text


def test_two_object_caption_round_trip():
    text = "a small red circle moving left and a large blue square growing on a black background"
    cap = parse_caption(text)
    assert cap.objects[1] == WorldObject("large", "blue", "square", "growing")
    assert cap.background == "black"
    assert str(cap) == text


@pytest.mark.parametrize("bad", [
    "a small red circle moving left on a black background.",  # final period
    "A small red circle moving left on a black background",  # upper case
    "a tiny red circle moving left on a black background",  # unknown size
    "a small pink circle moving left on a black background",  # unknown color
    "a small red hexagon moving left on a black background",
    "a small red circle spinning on a black background",
    "a small red circle moving left on a blue background",
    "a small red circle moving left and a large red square growing on a black background",  # same color
    "a small red circle moving left",
    "",
])
def test_invalid_caption_is_rejected_with_the_grammar(bad):
    with pytest.raises(CaptionError) as e:
        parse_caption(bad)
    assert "a {size} {color} {shape} {motion} on a {background} background" in str(e.value)
    assert isinstance(e.value, KinoUserError)


# ---- generator ------------------------------------------------------------------------

def test_generator_is_deterministic_and_index_addressable():
    a = [(s.text, v) for _, s, v in sample_clips(5, "train", seed=3)]
    b = [(s.text, v) for _, s, v in sample_clips(5, "train", seed=3)]
    assert all(x[0] == y[0] and np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    # clip 3 alone equals clip 3 of the stream
    assert scene_at("train", 3, 3).text == a[3][0]
    # the seed and the split each change the stream
    assert [s.text for _, s, _ in sample_clips(5, "train", seed=4)] != [t for t, _ in a]
    assert [s.text for _, s, _ in sample_clips(5, "eval", seed=3)] != [t for t, _ in a]


def test_train_split_never_produces_held_out_compositions():
    n_eval_held_out = 0
    for i in range(4000):
        for obj in scene_at("train", 11, i).caption.objects:
            assert not is_held_out(obj), obj
    for i in range(1000):
        n_eval_held_out += any(is_held_out(o) for o in scene_at("eval", 11, i).caption.objects)
    assert n_eval_held_out > 50  # eval draws from all compositions, held-out ones included


def test_generator_covers_every_attribute():
    seen = {k: set() for k in ("size", "color", "shape", "motion", "bg", "frames", "hw", "n")}
    for i in range(1500):
        s = scene_at("eval", 0, i)
        seen["bg"].add(s.caption.background)
        seen["frames"].add(s.frames)
        seen["hw"].add((s.height, s.width))
        seen["n"].add(len(s.caption.objects))
        for o in s.caption.objects:
            for k in ("size", "color", "shape", "motion"):
                seen[k].add(getattr(o, k))
    assert seen["color"] == set(COLORS) and seen["shape"] == set(SHAPES) and seen["motion"] == set(MOTIONS)
    assert seen["bg"] == set(BACKGROUNDS) and seen["frames"] == set(FRAME_COUNTS)
    assert seen["hw"] == set(SIZES) and seen["n"] == {1, 2} and seen["size"] == {"small", "large"}


def test_rendered_clips_follow_the_contract():
    for _, scene, video in sample_clips(200, "eval", seed=5):
        F, H, W = scene.frames, scene.height, scene.width
        assert video.shape == (F, H, W, 3) and video.dtype == np.uint8
        allowed = {BACKGROUNDS[scene.caption.background]} | {COLORS[o.color] for o in scene.caption.objects}
        packed = np.unique((video.astype(np.int64) * [65536, 256, 1]).sum(-1))
        assert set(packed) <= {r * 65536 + g * 256 + b for r, g, b in allowed}  # no anti-aliasing
        if F == 1:
            assert all(o.motion == "standing still" for o in scene.caption.objects)
        if len(scene.caption.objects) == 2:
            masks = [(video == np.array(COLORS[o.color], np.uint8)).all(-1) for o in scene.caption.objects]
            for f in range(F):  # pixel bounding boxes stay >= 2 px apart in every frame
                (ya, xa), (yb, xb) = (np.nonzero(m[f]) for m in masks)
                gap_x = max(xb.min() - xa.max(), xa.min() - xb.max()) - 1
                gap_y = max(yb.min() - ya.max(), ya.min() - yb.max()) - 1
                assert max(gap_x, gap_y) >= 2


def test_loop_renders_repeat_with_their_period():
    from kino.world.generator import loop_progress, trajectory

    u = loop_progress(21, 16)
    assert u[0] == 0.0 and u[8] == 1.0 and np.allclose(u[16:], u[:5]) and (np.diff(u[:9]) > 0).all()
    for i in range(30):
        scene = scene_at("train", 3, i, frames=21, size=(64, 96))
        loop = render(scene, loop_progress(21, 16))
        assert np.array_equal(loop[16:], loop[:5])  # frame 16 is frame 0 again: a seamless loop
        assert np.array_equal(loop[0], render(scene)[0])
        for obj, center in zip(scene.caption.objects, scene.centers):  # never past the linear path's ends
            ends = trajectory(obj, center, 2, 64, 96)
            path = trajectory(obj, center, 21, 64, 96, loop_progress(21, 16))
            for a, lo_hi in zip(path, ends):
                assert lo_hi.min() - 1e-9 <= a.min() and a.max() <= lo_hi.max() + 1e-9
    with pytest.raises(ValueError, match="progress"):
        render(scene_at("train", 3, 0, frames=9), np.full(9, 1.5))
    with pytest.raises(ValueError, match="period"):
        loop_progress(9, 1)
    # the default wave slows down at both turns; the triangle moves at constant speed
    assert np.allclose(np.diff(loop_progress(9, 8, "triangle")[:5]), 0.25)
    steps = np.diff(u[:9])
    assert steps[0] < steps[3] and steps[-1] < steps[4] and u[4] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="wave"):
        loop_progress(9, 8, "square")


def test_nominal_side_rounds_to_the_nearest_pixel():
    assert nominal_side("small", 64, 96) == 12  # 0.18 * 64 = 11.52
    assert nominal_side("large", 96, 64) == 20  # 0.32 * 64 = 20.48


# ---- evaluator ------------------------------------------------------------------------

def _scene(text, frames=17, size=(64, 64), centers=None, seed=0):
    cap = parse_caption(text)
    if centers is None:
        return scene_from_caption(cap, frames, *size, seed=seed)
    return Scene(cap, frames, size[0], size[1], tuple(centers))


def _failed(video, caption):
    r = evaluate_clip(video, caption)
    return set(r.failed)


def test_generated_clips_pass_the_evaluator_in_memory():
    results = [({"caption": s.text, "kind": "x"}, evaluate_clip(v, s.text))
               for _, s, v in sample_clips(400, "eval", seed=9)]
    report = summarize(results)
    assert report["pass_rate"] == 1.0, report["failures"][:3]


def test_label_pixels_marks_far_colors_unknown():
    frame = np.array([[[16, 16, 16], [220, 40, 40], [128, 255, 0], [200, 60, 50]]], np.uint8)
    labels = label_pixels(frame[None])[0, 0]
    assert labels[0] == 0 and labels[1] == 3 and labels[2] == -1 and labels[3] == 3


def test_wrong_color_fails_presence_and_no_extras():
    s = _scene("a large red circle standing still on a black background")
    v = render(s)
    mask = (v == np.array(COLORS["red"], np.uint8)).all(-1)
    v[mask] = COLORS["green"]
    # the named color is missing, so nothing about the object can be verified either
    assert _failed(v, s.text) == {"presence", "no_extras", "shape", "size", "motion", "smoothness"}
    two = _scene("a large red circle standing still and a small blue square moving up on a black background",
                 seed=3)
    v = render(two)
    v[(v == np.array(COLORS["blue"], np.uint8)).all(-1)] = COLORS["cyan"]
    assert "presence" in _failed(v, two.text) and "no_extras" in _failed(v, two.text)
    assert _failed(render(s), s.text) == set()


def test_wrong_direction_fails_motion():
    s = _scene("a small blue square moving left on a white background")
    v = render(s)
    assert _failed(v, s.text) == set()
    assert _failed(v[::-1], s.text) == {"motion"}
    assert _failed(v, "a small blue square moving right on a white background") == {"motion"}
    assert _failed(v, "a small blue square moving up on a white background") == {"motion"}
    assert _failed(v, "a small blue square standing still on a white background") == {"motion"}


@pytest.mark.parametrize("shape,other", [("circle", "square"), ("square", "triangle"), ("triangle", "circle"),
                                         ("circle", "triangle")])
def test_wrong_shape_fails_shape(shape, other):
    s = _scene(f"a large green {shape} moving down on a gray background")
    wrong = dataclasses.replace(s, caption=parse_caption(s.text.replace(shape, other)))
    assert _failed(render(wrong), s.text) == {"shape"}
    assert _failed(render(s), s.text) == set()


def test_upside_down_triangle_fails_shape():
    s = _scene("a large purple triangle standing still on a black background")
    v = render(s)
    assert _failed(v[:, ::-1], s.text) == {"shape"}


def test_wrong_size_fails_size():
    s = _scene("a small orange square moving right on a black background", size=(64, 96))
    big = dataclasses.replace(s, caption=parse_caption(s.text.replace("small", "large")))
    assert _failed(render(big), s.text) == {"size"}
    assert _failed(render(s), big.text) == {"size"}


def test_growing_and_shrinking():
    s = _scene("a large cyan circle growing on a black background", frames=25)
    v = render(s)
    assert _failed(v, s.text) == set()
    assert _failed(v[::-1], s.text) == {"motion"}
    assert _failed(v[::-1], s.text.replace("growing", "shrinking")) == set()
    assert _failed(v, s.text.replace("growing", "shrinking")) == {"motion"}
    # the contract's 'standing still' bounds only the centroid, so growth in place passes it


def test_missing_object_fails_presence():
    s = _scene("a small red circle moving left and a large blue square growing on a black background",
               frames=9, seed=1)
    only_first = dataclasses.replace(s, caption=Caption(s.caption.objects[:1], "black"), centers=s.centers[:1])
    assert _failed(render(only_first), s.text) == {"presence", "shape", "motion", "smoothness"}
    assert _failed(render(s), s.text) == set()


def test_extra_object_fails_no_extras():
    s = _scene("a small red circle moving left and a large blue square growing on a black background",
               frames=9, seed=2)
    assert _failed(render(s), "a small red circle moving left on a black background") == {"no_extras"}


def test_jump_between_frames_fails_smoothness():
    s = _scene("a small yellow square standing still on a gray background", centers=[(12.0, 32.0)])
    v = render(s)
    v[8] = np.roll(v[8], 30, axis=1)  # one frame teleports 30 px = 0.47 W
    assert _failed(v, s.text) == {"smoothness"}


def test_component_sizes_counts_4_connected_blobs():
    m = np.zeros((10, 12), bool)
    m[1:4, 1:4] = True  # 9 px
    m[6:9, 5:11] = True  # 18 px
    m[0, 11] = m[1, 10] = True  # diagonal neighbours: two 1-px components
    assert component_sizes(m).tolist() == [18, 9, 1, 1]
    m[4:7, 3] = m[6, 4] = True  # a 4-px bridge joins the first two
    assert component_sizes(m).tolist() == [31, 1, 1]
    assert component_sizes(np.zeros((3, 3), bool)).tolist() == []


def test_object_drawn_twice_is_reported_as_two_blobs():
    s = _scene("a large green square standing still on a black background", centers=[(20.0, 32.0)])
    v = render(s)
    assert [o["blobs"] for o in evaluate_clip(v, s.text).details["objects"]] == [1]
    twice = np.maximum(v, np.roll(v, 26, axis=2))  # a second copy 26 px to the right
    r = evaluate_clip(twice, s.text)
    assert [o["blobs"] for o in r.details["objects"]] == [2]
    assert "shape" in r.failed  # the bbox spans both copies: fill halves


def test_background_check():
    s = _scene("a large red square standing still on a black background", frames=1)
    v = render(s)
    assert _failed(v, s.text) == set()
    assert _failed(v, s.text.replace("black", "white")) == {"background"}


def test_image_has_no_motion_or_smoothness_check():
    s = _scene("a large red square standing still on a black background", frames=1)
    r = evaluate_clip(render(s)[0], s.text)  # (H, W, 3) is an image
    assert r.passed and "motion" not in r.checks and "smoothness" not in r.checks


def test_report_counts_per_check_and_kind():
    rows = []
    for i, s, v in sample_clips(30, "eval", seed=4):
        if i == 0:
            v = v[:, :, ::-1] if s.frames > 1 else v
        kind = "image" if s.frames == 1 else ("single" if len(s.caption.objects) == 1 else "pair")
        rows.append(({"caption": s.text, "kind": kind, "file": f"{i}"}, evaluate_clip(v, s.text)))
    rep = summarize(rows)
    assert rep["clips"] == 30 and set(rep["checks"]) == set(CHECKS)
    assert sum(k["clips"] for k in rep["kinds"].values()) == 30
    assert rep["passed"] == sum(r.passed for _, r in rows)


def test_evaluator_rejects_bad_arrays():
    with pytest.raises(ValueError, match="uint8"):
        evaluate_clip(np.zeros((2, 8, 8, 3), np.float32), "a small red circle growing on a black background")
