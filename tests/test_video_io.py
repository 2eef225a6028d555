"""Video I/O: round trips, frame sampling, metadata, errors and atomic writes."""

import json
import os
import struct
import wave

import av
import numpy as np
import pytest
import torch
from PIL import Image

from kino.data import video_io
from kino.data.video_io import (
    VideoInfo, is_image_path, iter_frames, probe, read_metadata, read_video, write_image,
    write_video,
)
from kino.errors import VideoReadError

GREY_STEP = 5  # frame i is a flat grey of level i * GREY_STEP: survives any compression


def smooth_clip(frames=9, height=32, width=48, square=True) -> np.ndarray:
    """Moving smooth gradients, with a flat-colour square (hard edges) if asked."""
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    clip = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        phase = i / frames
        clip[i, ..., 0] = 128 + 100 * np.sin(2 * np.pi * (x + phase))
        clip[i, ..., 1] = 40 + 180 * y
        clip[i, ..., 2] = 128 + 90 * np.cos(2 * np.pi * (x + y - phase))
        if square:
            clip[i, 4:12, 4 + i: 12 + i] = (220, 40, 40)
    return clip


def palette_clip(frames=9, height=32, width=48) -> np.ndarray:
    """Shapes World-like: few exact colours, with two identical consecutive frames."""
    clip = np.full((frames, height, width, 3), 16, np.uint8)
    for i in range(frames):
        clip[i, 8:16, 2 + 3 * i: 10 + 3 * i] = (220, 40, 40)
        clip[i, 20:28, 30:38] = (40, 80, 220) if i % 2 else (40, 170, 60)
    if frames > 5:
        clip[5] = clip[4]
    return clip


def counter_clip(frames=48, height=32, width=32) -> np.ndarray:
    return np.repeat(np.arange(frames, dtype=np.uint8) * GREY_STEP, height * width * 3).reshape(
        frames, height, width, 3)


def frame_indices(frames: np.ndarray) -> list[int]:
    return [round(float(f.mean()) / GREY_STEP) for f in frames]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def counter_mp4(tmp_path_factory):
    """2 s at 24 fps, frame i = grey level 5 i."""
    path = tmp_path_factory.mktemp("counter") / "counter.mp4"
    write_video(path, counter_clip(), 24)
    return path


@pytest.fixture(scope="module")
def gop_mp4(tmp_path_factory):
    """counter_mp4 with a keyframe every 12 frames, so that seeking really jumps."""
    path = tmp_path_factory.mktemp("gop") / "gop.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24, options={"g": "12", "crf": "18"})
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for frame in counter_clip():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path


# ------------------------------------------------------------------------- round trips


def test_lossless_mp4_round_trip(tmp_path):
    clip = smooth_clip()
    path = write_video(tmp_path / "clip.mp4", clip, 8, lossless=True)
    frames, fps = read_video(path)
    assert frames.shape == clip.shape and frames.dtype == np.uint8
    assert fps == 8.0
    assert np.abs(frames.astype(int) - clip).max() <= 2
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv444p"


def test_lossless_mp4_accepts_odd_sizes(tmp_path):
    clip = smooth_clip(3, 31, 33)
    frames, _ = read_video(write_video(tmp_path / "odd.mp4", clip, 8, lossless=True))
    assert frames.shape == clip.shape
    assert np.abs(frames.astype(int) - clip).max() <= 2


def test_default_mp4_is_yuv420p_with_good_psnr(tmp_path):
    clip = smooth_clip(16, 64, 96, square=False)
    path = write_video(tmp_path / "clip.mp4", clip, 24)
    frames, fps = read_video(path)
    assert frames.shape == clip.shape and fps == 24.0
    assert psnr(frames, clip) > 35
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"


@pytest.mark.parametrize("ext", [".mkv", ".mov"])
def test_other_h264_containers_round_trip(tmp_path, ext):
    clip = smooth_clip()
    frames, fps = read_video(write_video(tmp_path / f"clip{ext}", clip, 8, lossless=True))
    assert frames.shape == clip.shape and fps == pytest.approx(8.0)
    assert np.abs(frames.astype(int) - clip).max() <= 2


@pytest.mark.parametrize("name", ["a.mp4", "a.mkv", "a.mov", "a.gif", "a.png"])
def test_writing_is_deterministic(tmp_path, name):
    clip = smooth_clip(1 if name.endswith(".png") else 9)
    first = write_video(tmp_path / "1" / name, clip, 8, metadata={"seed": "1"}).read_bytes()
    assert write_video(tmp_path / "2" / name, clip, 8, metadata={"seed": "1"}).read_bytes() == first


@pytest.mark.parametrize("fmt, codec, name", [
    ("avi", "mjpeg", "a.avi"), ("webm", "libvpx-vp9", "a.webm"), ("matroska", "ffv1", "a.mkv"),
])
def test_reads_other_formats(tmp_path, fmt, codec, name):
    if codec not in av.codecs_available:
        pytest.skip(f"this FFmpeg has no {codec} encoder")
    path = tmp_path / name
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=12)
        stream.width, stream.height = 32, 32
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for frame in counter_clip(24):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    frames, fps = read_video(path)
    assert fps == 12.0 and frame_indices(frames) == list(range(24))
    assert frame_indices(read_video(path, start=1.0, fps=4)[0]) == [12, 15, 18, 21]
    assert probe(path) == VideoInfo(frames=24, fps=12.0, height=32, width=32, duration=2.0)


def test_torch_input(tmp_path):
    clip = palette_clip()
    frames, _ = read_video(write_video(tmp_path / "clip.gif", torch.from_numpy(clip), 8))
    np.testing.assert_array_equal(frames, clip)


@pytest.mark.parametrize("fps", [8, 24, 10])
def test_gif_round_trip_is_exact(tmp_path, fps):
    clip = palette_clip(17)
    path = write_video(tmp_path / "clip.gif", clip, fps)
    frames, read_fps = read_video(path)
    np.testing.assert_array_equal(frames, clip)  # identical frames 4 and 5 both kept
    assert read_fps == pytest.approx(fps, rel=0.02)  # whole-centisecond delays
    with Image.open(path) as image:
        assert image.info["loop"] == 0  # loops forever


def test_gif_with_256_colours_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    colours = np.unique(rng.integers(0, 256, (400, 3), dtype=np.uint8), axis=0)[:256]
    clip = colours[rng.integers(0, 256, (4, 32, 32))]
    clip[0, :8] = colours.reshape(8, 32, 3)  # every colour appears
    frames, _ = read_video(write_video(tmp_path / "clip.gif", clip, 8))
    np.testing.assert_array_equal(frames, clip)


def test_gif_with_many_colours_is_quantized_unless_lossless(tmp_path):
    clip = smooth_clip()
    frames, _ = read_video(write_video(tmp_path / "clip.gif", clip, 8))
    assert frames.shape == clip.shape
    assert psnr(frames, clip) > 25
    with pytest.raises(ValueError, match="256 colours"):
        write_video(tmp_path / "exact.gif", clip, 8, lossless=True)
    assert not (tmp_path / "exact.gif").exists()


def test_png_is_exact_and_jpg_close(tmp_path):
    image = smooth_clip(1)[0]
    frames, fps = read_video(write_image(tmp_path / "a.png", image))
    np.testing.assert_array_equal(frames[0], image)
    assert fps is None
    frames, _ = read_video(write_video(tmp_path / "a.jpg", image[None], 8))
    assert frames.shape == (1, *image.shape)
    assert psnr(frames[0], image) > 30
    assert is_image_path(tmp_path / "A.JPG") and not is_image_path("a.mp4")


# ----------------------------------------------------------------------- frame sampling


def test_read_all_frames_in_order(counter_mp4):
    frames, fps = read_video(counter_mp4)
    assert fps == 24.0
    assert frame_indices(frames) == list(range(48))


def test_fps_picks_nearest_frames(counter_mp4):
    frames, fps = read_video(counter_mp4, fps=8)
    assert fps == 8.0
    assert frame_indices(frames) == list(range(0, 48, 3))
    frames, _ = read_video(counter_mp4, fps=16)  # ties go to the earlier frame
    assert frame_indices(frames) == [int(k * 1.5) for k in range(32)]


def test_fps_above_source_duplicates_frames(counter_mp4):
    frames, fps = read_video(counter_mp4, fps=48, max_frames=8)
    assert fps == 48.0
    assert frame_indices(frames) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len(read_video(counter_mp4, fps=48)[0]) == 96  # up to the end of the last frame


def test_stride_max_frames_and_start(counter_mp4):
    frames, fps = read_video(counter_mp4, stride=2)
    assert fps == 12.0 and frame_indices(frames) == list(range(0, 48, 2))
    assert frame_indices(read_video(counter_mp4, max_frames=5)[0]) == [0, 1, 2, 3, 4]
    assert frame_indices(read_video(counter_mp4, start=1.0)[0]) == list(range(24, 48))
    assert frame_indices(read_video(counter_mp4, start=0.99)[0])[0] == 24  # first at or after
    frames, _ = read_video(counter_mp4, fps=8, start=1.0, max_frames=3)
    assert frame_indices(frames) == [24, 27, 30]
    frames, _ = read_video(counter_mp4, stride=3, start=0.5, max_frames=4)
    assert frame_indices(frames) == [12, 15, 18, 21]


def test_start_after_a_keyframe_seek(gop_mp4):
    # start=1.25 s seeks to the keyframe at frame 24 and drops frames 24-29.
    assert frame_indices(list(iter_frames(gop_mp4, start=1.25, max_frames=3))) == [30, 31, 32]
    assert frame_indices(read_video(gop_mp4, start=1.25, fps=4)[0]) == [30, 36, 42]


def test_seek_that_overshoots_falls_back_to_the_start(monkeypatch, gop_mp4):
    real_seek, targets = video_io._seek, []

    def overshooting_seek(container, stream, t_abs):
        targets.append(t_abs)
        return real_seek(container, stream, t_abs + (1.0 if len(targets) == 1 else 0.0))

    monkeypatch.setattr(video_io, "_seek", overshooting_seek)
    assert frame_indices(read_video(gop_mp4, start=0.5, max_frames=3)[0]) == [12, 13, 14]
    assert targets == [0.5, 0.0]


def test_start_past_the_end_raises(counter_mp4):
    with pytest.raises(VideoReadError, match="no frame at or after"):
        read_video(counter_mp4, start=5.0)


def test_sampling_arguments_are_checked(counter_mp4):
    with pytest.raises(ValueError, match="not both"):
        read_video(counter_mp4, fps=8, stride=2)
    with pytest.raises(ValueError, match="not both"):
        iter_frames(counter_mp4, fps=8, stride=2)  # at call time, not at first next()
    for bad in [dict(fps=0), dict(stride=0), dict(max_frames=0), dict(start=-1.0), dict(size=(32,)),
                dict(size=(0, 8)), dict(size=32)]:
        (name,) = bad
        with pytest.raises(ValueError, match=f"^{name} must be"):  # the check's own message, naming the argument
            read_video(counter_mp4, **bad)


def _torch_resize(frames: np.ndarray, size) -> np.ndarray:
    x = torch.as_tensor(frames).permute(0, 3, 1, 2).float()
    y = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return y.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("size", [(16, 24), (8, 12), (64, 96), (32, 48)])
def test_size_scales_while_converting(tmp_path, size):
    """`size` resizes inside the YUV -> RGB conversion: shrinking averages like torch's
    antialiased bilinear resize of the full frames, enlarging interpolates; the frame count and
    sampling are those of a plain read."""
    clip = smooth_clip(9, 32, 48)
    path = write_video(tmp_path / "c.mp4", clip, 8, lossless=True)
    full = read_video(path)[0]
    scaled, fps = read_video(path, size=size)
    assert scaled.shape == (9, *size, 3) and fps == 8.0
    if size == (32, 48):
        np.testing.assert_array_equal(scaled, full)  # nothing to scale: the plain conversion
    else:
        assert psnr(scaled, _torch_resize(full, size)) > 28
    lazy = list(iter_frames(path, size=size, max_frames=3, fps=4))
    assert len(lazy) == 3 and lazy[0].shape == (*size, 3)
    np.testing.assert_array_equal(np.stack(lazy), scaled[::2][:3])  # one reformatter for all frames


def test_reading_twice_gives_the_same_frames(counter_mp4):
    """The reformatter reused across frames converts each frame as a fresh one does."""
    a, _ = read_video(counter_mp4, size=(16, 16))
    b = np.stack([frame for frame in iter_frames(counter_mp4, size=(16, 16))])
    np.testing.assert_array_equal(a, b)
    assert frame_indices(a) == list(range(48))


def test_iter_frames_is_lazy(tmp_path):
    # The back half of this file is cut off: reading it all fails, but taking the first
    # frames succeeds only if decoding stops as soon as they are produced.
    path = tmp_path / "long.mp4"
    rng = np.random.default_rng(0)
    write_video(path, rng.integers(0, 256, (240, 32, 32, 3), dtype=np.uint8), 24)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    frames = iter_frames(path)
    assert next(frames).shape == (32, 32, 3)
    assert next(frames).shape == (32, 32, 3)
    frames.close()
    assert len(list(iter_frames(path, max_frames=2))) == 2
    with pytest.raises(VideoReadError):
        read_video(path)


def test_iter_frames_of_an_image(tmp_path):
    image = smooth_clip(1)[0]
    frames = list(iter_frames(write_image(tmp_path / "a.png", image)))
    assert len(frames) == 1
    np.testing.assert_array_equal(frames[0], image)


# --------------------------------------------------------------------------------- probe


def test_probe(tmp_path, counter_mp4):
    assert probe(counter_mp4) == VideoInfo(frames=48, fps=24.0, height=32, width=32, duration=2.0)
    info = probe(write_video(tmp_path / "a.mkv", smooth_clip(), 8))
    assert (info.frames, info.fps, info.height, info.width) == (9, 8.0, 32, 48)
    assert info.duration == pytest.approx(9 / 8)
    info = probe(write_video(tmp_path / "a.gif", palette_clip(), 8))
    assert (info.frames, info.height, info.width) == (9, 32, 48)
    assert info.fps == pytest.approx(8, rel=0.02) and info.duration == pytest.approx(9 / 8, abs=0.02)
    info = probe(write_image(tmp_path / "a.png", smooth_clip(1)[0]))
    assert info == VideoInfo(frames=1, fps=None, height=32, width=48, duration=0.0)


# ------------------------------------------------------------------------------ metadata

META = {"prompt": "a small red circle moving left on a black background — ünïcode",
        "seed": "42", "steps": "30", "model": "kino-shapes", "kino_version": "0.1.0",
        "long": "x" * 1000}


@pytest.mark.parametrize("name", ["a.mp4", "a.mkv", "a.mov", "a.gif", "a.png", "a.jpg"])
def test_metadata_round_trip(tmp_path, name):
    clip = palette_clip(1 if name.endswith(("png", "jpg")) else 9)
    path = write_video(tmp_path / name, clip, 8, metadata=META)
    assert read_metadata(path) == META
    read_video(path)  # still a readable file


def test_metadata_in_mp4_is_a_json_comment(tmp_path):
    path = write_video(tmp_path / "a.mp4", palette_clip(), 8, metadata={"prompt": "p"})
    with av.open(str(path)) as container:
        assert json.loads(container.metadata["comment"]) == {"prompt": "p"}


def test_metadata_of_files_kino_did_not_write(tmp_path):
    path = write_video(tmp_path / "a.mp4", palette_clip(), 8)
    assert "comment" not in read_metadata(path)  # the container's raw tags
    assert read_metadata(write_image(tmp_path / "a.png", palette_clip(1)[0])) == {}


def test_metadata_is_checked(tmp_path):
    with pytest.raises(ValueError, match="str"):
        write_video(tmp_path / "a.mp4", palette_clip(), 8, metadata={"seed": 42})
    assert not (tmp_path / "a.mp4").exists()


# -------------------------------------------------------------------------------- errors


def _make_corrupt(path):
    path.write_bytes(np.random.default_rng(0).bytes(5000))


def _make_truncated_mp4(path):
    write_video(path, np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8), 24)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _make_truncated_mkv(path):
    write_video(path, counter_clip(), 24)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _make_empty(path):
    path.write_bytes(b"")


def _make_text(path):
    path.write_text("just some text, not a video\n" * 20)


def _make_audio_only(path):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(bytes(16000))


def _make_zero_frames(path):
    # A valid GIF header and palette, then the trailer: a video stream with no image.
    path.write_bytes(b"GIF89a" + struct.pack("<HHBBB", 4, 4, 0x80, 0, 0) + bytes(6) + b";")


def _make_corrupt_png(path):
    write_image(path, palette_clip(1)[0])
    data = path.read_bytes()
    path.write_bytes(data[:60])


BAD_FILES = {
    "corrupt.mp4": _make_corrupt,
    "truncated.mp4": _make_truncated_mp4,
    "truncated.mkv": _make_truncated_mkv,
    "empty.mp4": _make_empty,
    "missing.mp4": None,
    "text.mp4": _make_text,
    "notes.txt": _make_text,
    "audio.wav": _make_audio_only,
    "noframes.gif": _make_zero_frames,
    "corrupt.png": _make_corrupt_png,
    "corrupt.gif": _make_corrupt,
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_unreadable_files_raise_video_read_error(tmp_path, name):
    path = tmp_path / name
    if BAD_FILES[name] is not None:
        BAD_FILES[name](path)
    for read in (read_video, lambda p: list(iter_frames(p)), probe, read_metadata):
        if read in (probe, read_metadata) and name in ("truncated.mp4", "truncated.mkv", "noframes.gif"):
            continue  # their headers are intact, and these do not decode
        with pytest.raises(VideoReadError) as info:
            read(path)
        assert str(path) in str(info.value)
        assert info.value.path == str(path)


def test_reasons(tmp_path):
    with pytest.raises(VideoReadError, match="no such file"):
        read_video(tmp_path / "nope.mp4")
    with pytest.raises(VideoReadError, match="empty"):
        _make_empty(tmp_path / "empty.mp4")
        read_video(tmp_path / "empty.mp4")
    with pytest.raises(VideoReadError, match="directory"):
        read_video(tmp_path)
    _make_zero_frames(tmp_path / "noframes.gif")
    with pytest.raises(VideoReadError, match="no decodable video frames"):
        read_video(tmp_path / "noframes.gif")
    _make_truncated_mkv(tmp_path / "cut.mkv")
    with pytest.raises(VideoReadError, match="truncated"):
        read_video(tmp_path / "cut.mkv")
    _make_text(tmp_path / "notes.txt")
    with pytest.raises(VideoReadError, match="text file"):
        read_video(tmp_path / "notes.txt")
    _make_audio_only(tmp_path / "audio.wav")
    with pytest.raises(VideoReadError, match="no video stream"):
        read_video(tmp_path / "audio.wav")


# ----------------------------------------------------------------------- writing errors


def test_write_rejects_bad_frames_and_settings(tmp_path):
    clip = palette_clip()
    with pytest.raises(ValueError, match=r"\.mp4.*\.gif"):
        write_video(tmp_path / "a.png", clip, 8)
    with pytest.raises(ValueError, match="even.*lossless"):
        write_video(tmp_path / "a.mp4", smooth_clip(3, 31, 32), 8)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "a.mp4", clip.astype(np.float32), 8)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "a.mp4", torch.zeros(2, 32, 32, 3), 8)
    with pytest.raises(ValueError, match="channels"):
        write_video(tmp_path / "a.mp4", clip.transpose(0, 3, 1, 2).copy(), 8)
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "a.mp4", clip, 0)
    with pytest.raises(ValueError, match="crf"):
        write_video(tmp_path / "a.mp4", clip, 8, quality=99)
    with pytest.raises(ValueError, match="50 fps"):
        write_video(tmp_path / "a.gif", clip, 60)
    with pytest.raises(ValueError, match="cannot write"):
        write_video(tmp_path / "a.webm", clip, 8)
    assert os.listdir(tmp_path) == []


def test_write_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "new" / "folder" / "clip.mp4"
    write_video(out, palette_clip(), 8)
    assert os.listdir(out.parent) == ["clip.mp4"]  # parents created, no temp left
    good = out.read_bytes()

    class Crash(RuntimeError):
        pass

    calls = []
    real = av.VideoFrame

    class FailingFrame:
        @staticmethod
        def from_ndarray(*args, **kwargs):
            calls.append(1)
            if len(calls) > 3:
                raise Crash("disk on fire")
            return real.from_ndarray(*args, **kwargs)

    monkeypatch.setattr(video_io.av, "VideoFrame", FailingFrame)
    with pytest.raises(Crash):
        write_video(out, smooth_clip(), 8)  # fails mid-stream, over an existing file
    with pytest.raises(Crash):
        write_video(out.with_name("other.mp4"), smooth_clip(), 8)
    assert os.listdir(out.parent) == ["clip.mp4"]
    assert out.read_bytes() == good
