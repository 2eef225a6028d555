"""Video and image files in and out: uint8 RGB numpy arrays, (F, H, W, 3), plus fps.

Reading goes through PyAV for video containers (mp4, webm, mov, mkv, avi, gif, ...) and
through Pillow for still images (png, jpg, jpeg, webp, bmp). Images are 1-frame videos
with ``fps=None``; only their first frame is read, and the sampling arguments do not
apply to them. Rotation and non-square-pixel metadata are not applied.

Every failure to read a file (missing, empty, corrupt, truncated, not media, no
decodable frame) raises `VideoReadError` naming the file and the reason; no PyAV or
Pillow exception escapes the readers. An mp4/mov/mkv/webm whose frames end well before
the duration its header declares is reported as truncated once decoding reaches its end.

Frame sampling (`iter_frames`, `read_video`):
- times are seconds from the video stream's start, so ``start=0`` is the first frame;
  ``start`` seeks to the keyframe before it and then drops every frame earlier than
  ``start``: the first frame returned is the first one at or after ``start``.
- ``fps=r`` returns, for each target time ``start + k / r`` that lies before the end of
  the video, the decoded frame nearest to it (a tie goes to the earlier frame). Asking
  for more fps than the source has never interpolates: frames are duplicated.
- ``stride=n`` returns every n-th decoded frame from ``start``. ``fps`` and ``stride``
  are exclusive.
- ``max_frames`` stops decoding as soon as that many frames have been produced.
- ``size=(h, w)`` returns video frames scaled to that size inside the YUV -> RGB conversion
  (one swscale pass, area filter when shrinking, bilinear otherwise), so a large video read
  for a small model never exists as full-size RGB. Images ignore it.

Writing picks the format from the extension and replaces the final file atomically:
- ``.mp4``/``.mov``/``.mkv``: H.264 (libx264). Default ``yuv420p`` (browser-friendly;
  needs even H and W), ``quality`` = x264 crf (default 18, lower is better, 0-51).
  ``lossless=True``: ``yuv444p`` with crf 0, the evaluation storage of WORLD.md (the
  RGB <-> YUV conversion still costs up to 2 levels per channel). Colours are converted
  with the BT.601 matrix (what tools assume for untagged video) in limited range, and
  the stream is tagged so that colour-managed players agree. mp4/mov put the index
  first (``faststart``) so browsers can play while downloading. Files are bit-for-bit
  reproducible (x264's mbtree is off, mkv is written bitexact).
- ``.gif``: exact for at most 256 distinct colours over the clip (one global palette);
  more colours are quantized to 256 (or rejected with ``lossless=True``). Loops forever.
  GIF delays are whole centiseconds: frame i is shown at ``round(i * 100 / fps)`` cs, so
  consecutive delays may differ by 10 ms (8 fps -> 13, 12, 13, 12 ... cs) while the
  average rate stays right; reading it back reports fps = frames / duration, which is
  within about 1% of the written fps. GIF cannot play faster than 50 fps (2 cs).
- ``.png``/``.jpg``/``.jpeg``: a single frame.

Metadata (`read_metadata`): a ``dict[str, str]`` recording how an output was made.
mp4/mov/mkv and gif store it as JSON in the container's ``comment`` tag (the mp4 muxer
keeps only a few well-known tags such as title, artist, comment and description, and
drops arbitrary keys like ``prompt``); png stores one text chunk per key; jpg stores the
JSON in its comment segment.
"""

import contextlib
import io
import json
import math
import numbers
import os
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter
from PIL import Image, ImageOps, PngImagePlugin

from kino.errors import VideoReadError

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
VIDEO_EXTS = frozenset({".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif"})
H264_EXTS = frozenset({".mp4", ".mov", ".mkv"})
WRITABLE_IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg"})

DEFAULT_CRF = 18
DEFAULT_JPEG_QUALITY = 95
GIF_MAX_FPS = 50.0  # browsers play delays under 2 cs as 10 cs

_H264_FORMATS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}
# FFmpeg happily "decodes" text files (.txt, .nfo, ...) as ANSI art; they are not video.
_TEXT_ART_CODECS = frozenset({"ansi", "bintext", "xbin", "idf"})
# Containers whose header states the duration, so a file that decodes to much less is
# truncated. Others estimate duration (from bitrate, say) and cannot be checked.
_HEADER_DURATION_FORMATS = ("mov", "mp4", "matroska", "webm")
_TIME_EPS = 1e-4  # seconds; absorbs float error when comparing frame times
_READ_ERRORS = (av.FFmpegError, OSError, EOFError, ValueError)
# swscale's default YUV -> RGB path upsamples chroma crudely: 39 dB on smooth 4:2:0
# content, against 50 dB with full chroma interpolation and accurate rounding (which
# costs about 7 ms more per 720p frame).
_READ_INTERPOLATION = Interpolation.BILINEAR | Interpolation.FULL_CHR_H_INT | Interpolation.ACCURATE_RND
_WRITE_INTERPOLATION = Interpolation.BICUBIC | Interpolation.ACCURATE_RND
# Shrinking while converting: the area (box) filter averages every source pixel, an
# antialiased resize like torch's bilinear with antialias=True.
_SHRINK_INTERPOLATION = Interpolation.AREA | Interpolation.FULL_CHR_H_INT | Interpolation.ACCURATE_RND

# Tags for the written H.264 stream: BT.601 matrix, limited range, sRGB-like (BT.709)
# primaries and transfer. AVCOL_SPC_SMPTE170M, AVCOL_RANGE_MPEG, AVCOL_PRI/TRC_BT709.
_AVCOL_SPC_SMPTE170M = 6
_AVCOL_RANGE_MPEG = 1
_AVCOL_BT709 = 1


@dataclass(frozen=True)
class VideoInfo:
    """What a file holds, read from its header. ``frames`` is estimated from duration x
    fps when the container does not state it; images have 1 frame, ``fps=None`` and
    ``duration=0.0``."""

    frames: int
    fps: float | None
    height: int
    width: int
    duration: float


def is_image_path(path) -> bool:
    """True when the extension is a still-image format read with Pillow."""
    return Path(path).suffix.lower() in IMAGE_EXTS


# ---------------------------------------------------------------------------- reading


def read_video(
    path, *, fps: float | None = None, stride: int | None = None,
    max_frames: int | None = None, start: float = 0.0, size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, float | None]:
    """Decode a video or image into uint8 (F, H, W, 3) RGB and its fps.

    Sampling follows the module docstring. The fps returned is the requested ``fps``,
    else the source fps divided by ``stride``; images give their one frame and None.
    """
    _check_sampling(fps, stride, max_frames, start, size)
    path = _existing_file(path)
    if is_image_path(path):
        return _read_image(path)[None], None
    with _open_video(path) as (container, stream):
        source_fps = _source_fps(container, stream)
        frames = list(_sampled_frames(path, container, stream, fps, stride, max_frames, start, size))
    if fps is not None:
        out_fps = float(fps)
    else:
        out_fps = None if source_fps is None else source_fps / (stride or 1)
    return np.stack(frames), out_fps  # (F, H, W, 3)


def iter_frames(
    path, *, fps: float | None = None, stride: int | None = None,
    max_frames: int | None = None, start: float = 0.0, size: tuple[int, int] | None = None,
) -> Iterator[np.ndarray]:
    """Yield uint8 (H, W, 3) RGB frames one at a time, decoding only as far as needed.

    Arguments are checked and the file's existence tested at call time; a video is
    opened on the first ``next()`` (an image is read at once) and closed when the
    generator ends or is closed. Errors met while decoding raise VideoReadError from
    ``next()``, possibly after some frames (a truncated file, say).
    """
    _check_sampling(fps, stride, max_frames, start, size)
    path = _existing_file(path)
    if is_image_path(path):
        return iter([_read_image(path)])
    return _iter_video(path, fps, stride, max_frames, start, size)


def probe(path) -> VideoInfo:
    """Frame count, fps, size and duration from the file's header, without decoding it."""
    path = _existing_file(path)
    if is_image_path(path):
        with _reading_image(path) as image:
            return VideoInfo(frames=1, fps=None, height=image.height, width=image.width, duration=0.0)
    with _open_video(path) as (container, stream), _reading(path, "cannot probe"):
        fps = _source_fps(container, stream)
        duration = _declared_duration(container, stream)
        frames = stream.frames or 0
        if frames <= 0 and duration is not None and fps:
            frames = max(1, round(duration * fps))
        if frames <= 0 or duration is None:
            frames, duration = _count_packets(container, stream, fps)
        return VideoInfo(
            frames=frames, fps=fps, height=stream.codec_context.height,
            width=stream.codec_context.width, duration=duration,
        )


def read_metadata(path) -> dict[str, str]:
    """The metadata dict written by `write_video`/`write_image`.

    For files kino did not write: png text chunks, or the container's raw tags; ``{}``
    when there are none.
    """
    path = _existing_file(path)
    if is_image_path(path):
        with _reading_image(path) as image:
            if image.format == "PNG":
                return {str(k): str(v) for k, v in image.text.items()}
            return _decode_json_comment(image.info.get("comment")) or {}
    with _open_video(path) as (container, _):
        tags = {str(k): str(v) for k, v in container.metadata.items()}
    comment = next((v for k, v in tags.items() if k.lower() == "comment"), None)
    decoded = _decode_json_comment(comment)
    return decoded if decoded is not None else tags


def _decode_json_comment(comment) -> dict[str, str] | None:
    if isinstance(comment, bytes):
        comment = comment.decode("utf-8", errors="replace")
    if not comment:
        return None
    try:
        value = json.loads(comment)
    except ValueError:
        return None
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        return value
    return None


def _existing_file(path) -> Path:
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise VideoReadError(path, "no such file") from None
    except OSError as e:
        raise VideoReadError(path, e.strerror or str(e)) from None
    if path.is_dir():
        raise VideoReadError(path, "is a directory, not a file")
    if not path.is_file():
        raise VideoReadError(path, "not a regular file")  # a FIFO would block forever
    if st.st_size == 0:
        raise VideoReadError(path, "file is empty (0 bytes)")
    return path


def _check_sampling(fps, stride, max_frames, start, size=None) -> None:
    if fps is not None and stride is not None:
        raise ValueError("give either fps (resample by time) or stride (every n-th frame), not both")
    if fps is not None and not _is_positive_number(fps):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if stride is not None and not (isinstance(stride, numbers.Integral) and stride >= 1):
        raise ValueError(f"stride must be an integer >= 1, got {stride!r}")
    if max_frames is not None and not (isinstance(max_frames, numbers.Integral) and max_frames >= 1):
        raise ValueError(f"max_frames must be an integer >= 1, got {max_frames!r}")
    if not (isinstance(start, numbers.Real) and math.isfinite(start) and start >= 0):
        raise ValueError(f"start must be a number of seconds >= 0, got {start!r}")
    if size is not None and not (isinstance(size, (tuple, list)) and len(size) == 2
                                 and all(isinstance(n, numbers.Integral) and n >= 2 for n in size)):
        raise ValueError(f"size must be (height, width), two integers >= 2, got {size!r}")


def _is_positive_number(x) -> bool:
    return isinstance(x, numbers.Real) and math.isfinite(x) and x > 0


@contextlib.contextmanager
def _reading(path, stage: str):
    """Turn any PyAV / OS error into a VideoReadError that names the file."""
    try:
        yield
    except _READ_ERRORS as e:
        detail = getattr(e, "strerror", None) or str(e) or type(e).__name__
        hint = "" if isinstance(e, OSError) else " (corrupt, truncated or not a video?)"
        raise VideoReadError(path, f"{stage}: {detail}{hint}") from e


@contextlib.contextmanager
def _reading_image(path):
    """Open an image with Pillow, fully decoded. Any failure, in Pillow or in the caller's
    block using the image, is a VideoReadError."""
    try:
        with Image.open(path) as image:
            image.load()
            yield image
    except VideoReadError:
        raise
    # Pillow's plugins raise many types on bad input (OSError, SyntaxError, struct.error,
    # DecompressionBombError, ...): every one of them means the file is unreadable.
    except Exception as e:  # noqa: BLE001
        raise VideoReadError(path, f"cannot read image: {e or type(e).__name__}") from e


def _read_image(path) -> np.ndarray:
    with _reading_image(path) as image:
        image = ImageOps.exif_transpose(image)  # photos store their rotation in EXIF
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()  # (H, W, 3)


@contextlib.contextmanager
def _open_video(path):
    """Open a container and its first video stream; always closes the container."""
    with _reading(path, "cannot open"):
        container = av.open(str(path), mode="r", metadata_errors="replace")
    try:
        with _reading(path, "cannot open"):
            streams = container.streams.video
            if not streams:
                kinds = sorted({s.type for s in container.streams}) or ["nothing"]
                raise VideoReadError(path, f"no video stream (contains: {', '.join(kinds)})")
            stream = streams[0]
            if stream.codec_context.name in _TEXT_ART_CODECS:
                raise VideoReadError(path, "not a video: a text file")
            stream.codec_context.thread_type = "AUTO"
        yield container, stream
    finally:
        container.close()


def _iter_video(path, fps, stride, max_frames, start, size) -> Iterator[np.ndarray]:
    with _open_video(path) as (container, stream):
        yield from _sampled_frames(path, container, stream, fps, stride, max_frames, start, size)


def _sampled_frames(path, container, stream, fps, stride, max_frames, start, size=None) -> Iterator[np.ndarray]:
    """The sampling rule of the module docstring, over an open stream."""
    with _reading(path, "cannot decode"):
        source_fps = _source_fps(container, stream)
        timed = _timed_frames(path, container, stream, start, source_fps)
        if fps is not None:
            picked = _nearest_to_grid(timed, start, 1.0 / fps)
        else:
            picked = (frame for n, (_, frame, _) in enumerate(timed) if n % (stride or 1) == 0)
        produced = 0
        # One reformatter for the stream keeps its swscale context between frames (a frame's
        # own to_ndarray() builds a new one every time, which costs more than the conversion).
        reformatter = VideoReformatter()
        for frame in picked:
            height, width = size if size is not None else (frame.height, frame.width)
            shrink = (height, width) != (frame.height, frame.width) and height <= frame.height \
                and width <= frame.width
            # Full-range YUV is flagged on the frame, not in its pixel format: pass it on.
            rgb = reformatter.reformat(frame, width=width, height=height, format="rgb24",
                                       src_color_range=frame.color_range,
                                       interpolation=_SHRINK_INTERPOLATION if shrink else _READ_INTERPOLATION)
            yield rgb.to_ndarray()  # (H, W, 3)
            produced += 1
            if produced == max_frames:
                return  # before asking the decoder for another frame
    if produced == 0:
        if start > 0:
            raise VideoReadError(path, f"no frame at or after start={start:g}s")
        raise VideoReadError(path, "no decodable video frames")


def _timed_frames(path, container, stream, start, source_fps):
    """Yield (t, frame, duration) for decoded frames with t >= start, t in seconds from the
    stream start. Checks, once the stream ends, that the file was not truncated."""
    tb = stream.time_base
    origin = float(stream.start_time * tb) if stream.start_time is not None and tb else None
    seeked = start > 0 and origin is not None and _seek(container, stream, origin + start)
    nominal = 1.0 / source_fps if source_fps else 0.0
    last_abs, last_t, last_duration = None, None, 0.0
    for frame in container.decode(stream):
        if frame.pts is not None and tb:
            t_abs = float(frame.pts * tb)
        else:  # no timestamp: assume the nominal rate
            t_abs = last_abs + nominal if last_abs is not None else (origin or 0.0)
        if origin is None:
            origin = t_abs  # times count from the first frame
        t = t_abs - origin
        if seeked and last_t is None and t > start + _TIME_EPS:
            # The demuxer landed after the target: decode from the beginning instead.
            seeked = False
            if not _seek(container, stream, origin):
                raise VideoReadError(path, f"cannot seek back to the start after overshooting {start:g}s")
            continue
        if frame.duration and tb:
            duration = float(frame.duration * tb)
        else:
            duration = nominal or (t - last_t if last_t is not None else 0.0)
        last_abs, last_t, last_duration = t_abs, t, duration
        if start > 0 and t < start - _TIME_EPS:
            continue
        yield t, frame, duration
    _check_not_truncated(path, container, stream, last_t, last_duration)


def _seek(container, stream, t_abs: float) -> bool:
    """Seek to the keyframe at or before absolute time t_abs; False if the format can't."""
    try:
        pts = math.floor(Fraction(t_abs) / stream.time_base + Fraction(1, 1000))  # float noise
        container.seek(pts, stream=stream, backward=True, any_frame=False)
    except av.FFmpegError:
        return False
    return True


def _nearest_to_grid(timed, start: float, step: float):
    """For targets start + k * step, yield the frame nearest each (ties: the earlier)."""
    k = 0
    prev = None  # (t, frame, duration) of the last frame before the next target
    for current in timed:
        t = current[0]
        while t >= start + k * step - _TIME_EPS:
            target = start + k * step
            take_prev = prev is not None and target - prev[0] <= t - target + _TIME_EPS
            yield (prev if take_prev else current)[1]
            k += 1
        prev = current
    if prev is not None:  # targets after the last frame's start but before its end
        end = prev[0] + prev[2]
        while start + k * step < end - _TIME_EPS:
            yield prev[1]
            k += 1


def _check_not_truncated(path, container, stream, last_t, last_duration) -> None:
    if last_t is None or not container.format.name.startswith(_HEADER_DURATION_FORMATS):
        return
    declared = _declared_duration(container, stream)
    if declared is None:
        return
    decoded_end = last_t + last_duration
    if declared - decoded_end > max(3 * last_duration, 0.02 * declared, 0.05):
        raise VideoReadError(
            path, f"truncated: frames end at {decoded_end:.2f}s but the file declares {declared:.2f}s")


def _source_fps(container, stream) -> float | None:
    tb = stream.time_base
    if container.format.name == "gif" and stream.frames and stream.duration and tb:
        # The demuxer's rate is the most common delay; frames / duration is the true mean.
        return stream.frames / float(stream.duration * tb)
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    return None


def _declared_duration(container, stream) -> float | None:
    """Seconds of the video stream according to the header, if it says."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = next((v for k, v in stream.metadata.items() if k.upper() == "DURATION"), None)
    if tag:  # matroska: "HH:MM:SS.nnnnnnnnn" per stream
        try:
            h, m, s = tag.split(":")
            return int(h) * 3600 + int(m) * 60 + float(s)
        except ValueError:
            pass
    if container.duration and len(container.streams) == 1:
        return container.duration / av.time_base
    return None


def _count_packets(container, stream, fps) -> tuple[int, float]:
    """Frame count and duration by demuxing (no decoding), for headers that don't say."""
    count, first, end = 0, None, None
    tb = stream.time_base
    for packet in container.demux(stream):
        if packet.size == 0:
            continue
        count += 1
        if packet.pts is not None and tb:
            t = float(packet.pts * tb)
            first = t if first is None else min(first, t)
            dur = float(packet.duration * tb) if packet.duration else (1.0 / fps if fps else 0.0)
            end = t + dur if end is None else max(end, t + dur)
    duration = (end - first) if first is not None else (count / fps if fps else 0.0)
    return count, duration


# ---------------------------------------------------------------------------- writing


def write_video(
    path, frames, fps: float, *, quality: int | None = None, lossless: bool = False,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write uint8 frames, (F, H, W, 3) or (H, W, 3), numpy or torch, in the format of
    the path's extension: .mp4/.mov/.mkv, .gif, or .png/.jpg/.jpeg for one frame.

    ``quality`` is the x264 crf for video (default 18) and the JPEG quality for .jpg; GIF
    and PNG ignore it. ``lossless=True`` means yuv444p crf 0 for video, and an error
    rather than a lossy result for GIF (> 256 colours) or JPEG. Settings and frames are
    checked before anything touches the disk. Returns the path written.
    """
    path = Path(path)
    ext = path.suffix.lower()
    frames = _as_frames(frames)  # (F, H, W, 3)
    if metadata is not None:
        metadata = _check_metadata(metadata)
    if ext in WRITABLE_IMAGE_EXTS:
        if len(frames) != 1:
            raise ValueError(
                f"{ext} holds a single image but got {len(frames)} frames: "
                "write a video (.mp4) or an animation (.gif) instead")
        return write_image(path, frames[0], metadata, quality=quality, lossless=lossless)
    if not _is_positive_number(fps):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    fps = float(fps)
    if ext in H264_EXTS:
        data_writer = _h264_writer(frames, fps, ext, quality, lossless, metadata)
    elif ext == ".gif":
        data_writer = _gif_writer(frames, fps, lossless, metadata)
    else:
        supported = sorted(H264_EXTS | WRITABLE_IMAGE_EXTS | {".gif"})
        raise ValueError(f"cannot write {ext or 'a file without extension'}: use one of {', '.join(supported)}")
    with _atomic_output(path) as tmp:
        data_writer(tmp)
    return path


def write_image(path, frame, metadata: dict[str, str] | None = None, *,
                quality: int | None = None, lossless: bool = False) -> Path:
    """Write one uint8 (H, W, 3) frame (or a 1-frame video) to .png/.jpg/.jpeg.

    ``quality`` is the JPEG quality (1-95, default 95) and is ignored for PNG, which is
    always lossless; ``lossless=True`` with a JPEG path is an error.
    """
    path = Path(path)
    ext = path.suffix.lower()
    frames = _as_frames(frame)
    if len(frames) != 1:
        raise ValueError(f"write_image takes one frame, got {len(frames)}: use write_video with .mp4 or .gif")
    if ext not in WRITABLE_IMAGE_EXTS:
        raise ValueError(f"cannot write an image as {ext or 'a file without extension'}: use .png, .jpg or .jpeg")
    if metadata is not None:
        metadata = _check_metadata(metadata)
    image = Image.fromarray(frames[0])
    if ext == ".png":
        options = {"format": "PNG"}
        if metadata:
            info = PngImagePlugin.PngInfo()
            for key, value in metadata.items():
                if not (1 <= len(key) <= 79) or not key.isprintable() or _not_latin1(key):
                    raise ValueError(f"PNG text keys must be 1-79 printable latin-1 characters, got {key!r}")
                info.add_text(key, value)  # tEXt, or iTXt when the value is not latin-1
            options["pnginfo"] = info
    else:
        if lossless:
            raise ValueError("JPEG cannot be lossless: write .png instead")
        q = DEFAULT_JPEG_QUALITY if quality is None else quality
        if not (isinstance(q, int) and 1 <= q <= 95):
            raise ValueError(f"JPEG quality must be an integer in 1-95, got {quality!r}")
        options = {"format": "JPEG", "quality": q, "subsampling": 0}  # 4:4:4 keeps small shapes' colours
        if metadata:
            options["comment"] = json.dumps(metadata, ensure_ascii=False).encode("utf-8")
    with _atomic_output(path) as tmp:
        image.save(tmp, **options)
    return path


def _not_latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return True
    return False


def _as_frames(frames) -> np.ndarray:
    """Validate and convert to a C-contiguous uint8 numpy (F, H, W, 3)."""
    torch = sys.modules.get("torch")  # a tensor can only exist if torch is imported
    if torch is not None and isinstance(frames, torch.Tensor):
        if frames.dtype != torch.uint8:
            raise ValueError(
                f"frames must be uint8, got torch {frames.dtype}: "
                "convert with (x.clamp(0, 1) * 255).round().to(torch.uint8)")
        frames = frames.detach().cpu().numpy()
    elif isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("frames is empty")
        frames = np.stack([np.asarray(f) for f in frames])
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"frames must be a numpy array or torch tensor, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (0-255), got {frames.dtype}")
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        hint = " (channels first? permute to channels last)" if frames.ndim == 4 and frames.shape[1] == 3 else ""
        raise ValueError(f"frames must have shape (F, H, W, 3) or (H, W, 3), got {tuple(frames.shape)}{hint}")
    if min(frames.shape[:3]) == 0:
        raise ValueError(f"frames must be non-empty, got shape {tuple(frames.shape)}")
    return np.ascontiguousarray(frames)


def _check_metadata(metadata) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata must be a dict of non-empty str keys to str values (json.dumps other values)")
    return dict(metadata)


def _h264_writer(frames, fps, ext, quality, lossless, metadata):
    """Check the settings now; return a function that writes the file to a given path."""
    _, height, width, _ = frames.shape
    if lossless:
        if quality not in (None, 0):
            raise ValueError(f"lossless=True uses crf 0; do not also give quality={quality}")
        pix_fmt, crf = "yuv444p", 0
    else:
        crf = DEFAULT_CRF if quality is None else quality
        if not (isinstance(crf, int) and 0 <= crf <= 51):
            raise ValueError(f"quality is the x264 crf, an integer in 0-51 (lower is better), got {quality!r}")
        if height % 2 or width % 2:
            raise ValueError(
                f"{ext} with yuv420p needs even height and width, got {height}x{width}: "
                "crop or pad to even sizes, or pass lossless=True (yuv444p accepts any size)")
        pix_fmt = "yuv420p"
    rate = Fraction(fps).limit_denominator(1001)  # 29.97 -> 2997/100, 8.0 -> 8
    if ext == ".mkv":
        container_options = {"fflags": "+bitexact"}  # else a random segment UID and a date
    else:
        container_options = {"movflags": "+faststart"}

    def write(tmp: Path) -> None:
        with av.open(str(tmp), mode="w", format=_H264_FORMATS[ext], container_options=container_options) as container:
            if metadata:
                container.metadata["comment"] = json.dumps(metadata, ensure_ascii=False)
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
            # x264's macroblock-tree rate control occasionally gives different bits for the
            # same input (seen here with SIMD on, even single-threaded); without it files
            # are reproducible, at the cost of larger files for the same crf.
            stream.options = {"crf": str(crf), "x264-params": "mbtree=0"}
            cc = stream.codec_context
            cc.colorspace, cc.color_range = _AVCOL_SPC_SMPTE170M, _AVCOL_RANGE_MPEG
            cc.color_primaries, cc.color_trc = _AVCOL_BT709, _AVCOL_BT709
            for i, rgb in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
                    format=pix_fmt, dst_colorspace="ITU601", dst_color_range="MPEG",
                    interpolation=_WRITE_INTERPOLATION)
                frame.pts, frame.time_base = i, 1 / rate
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))

    return write


def _gif_writer(frames, fps, lossless, metadata):
    """Check the settings now; return a function that writes the file to a given path."""
    if fps > GIF_MAX_FPS:
        raise ValueError(f"GIF plays at most {GIF_MAX_FPS:g} fps (2 cs per frame), got {fps:g}: use .mp4")
    indices, palette = _gif_palette(frames, lossless)  # (F, H, W) uint8, (256, 3) uint8
    _, height, width = indices.shape
    show_cs = [math.floor(i * 100 / fps + 0.5) for i in range(len(frames) + 1)]  # display times
    argb = np.concatenate([np.full((256, 1), 255, np.uint8), palette], axis=1)  # (256, 4)

    def write(tmp: Path) -> None:
        buffer = io.BytesIO()
        options = {"loop": "0", "final_delay": str(max(show_cs[-1] - show_cs[-2], 1))}
        with av.open(buffer, mode="w", format="gif", container_options=options) as container:
            stream = container.add_stream("gif", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, "pal8"
            stream.codec_context.time_base = Fraction(1, 100)
            for i, index in enumerate(indices):
                frame = av.VideoFrame.from_ndarray((index, argb), format="pal8")
                frame.pts, frame.time_base = show_cs[i], Fraction(1, 100)
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        data = buffer.getvalue()
        if metadata:
            data = _with_gif_comment(data, json.dumps(metadata).encode("ascii"))  # GIF text is ASCII
        tmp.write_bytes(data)

    return write


def _gif_palette(frames: np.ndarray, lossless: bool) -> tuple[np.ndarray, np.ndarray]:
    """One palette for the whole clip: exact when it has <= 256 colours, else quantized."""
    packed = (frames[..., 0].astype(np.uint32) << 16) | (frames[..., 1].astype(np.uint32) << 8) | frames[..., 2]
    colours, inverse = np.unique(packed, return_inverse=True)
    palette = np.zeros((256, 3), np.uint8)
    if len(colours) <= 256:
        palette[: len(colours)] = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], axis=1)
        return inverse.reshape(packed.shape).astype(np.uint8), palette
    if lossless:
        raise ValueError(f"GIF holds at most 256 colours, the frames have {len(colours)}: use .mp4 or lossless=False")
    # Palette from a montage of up to 8 frames spread over the clip; no dithering, so
    # static areas do not flicker.
    sample = frames[np.linspace(0, len(frames) - 1, min(len(frames), 8)).round().astype(int)]
    montage = Image.fromarray(sample.reshape(-1, *frames.shape[2:]))
    quantized = montage.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    indices = np.stack([
        np.asarray(Image.fromarray(f).quantize(palette=quantized, dither=Image.Dither.NONE)) for f in frames
    ])
    palette_list = quantized.getpalette()[: 256 * 3]
    palette[: len(palette_list) // 3] = np.asarray(palette_list, np.uint8).reshape(-1, 3)
    return indices.astype(np.uint8), palette


def _with_gif_comment(data: bytes, text: bytes) -> bytes:
    """Insert a GIF89a comment extension right after the header and global colour table."""
    if not data.startswith(b"GIF89a"):
        raise RuntimeError("the GIF muxer did not write a GIF89a header")
    packed = data[10]
    offset = 13 + (3 * 2 ** ((packed & 7) + 1) if packed & 0x80 else 0)
    blocks = b"".join(bytes([len(text[i:i + 255])]) + text[i:i + 255] for i in range(0, len(text), 255))
    return data[:offset] + b"\x21\xfe" + blocks + b"\x00" + data[offset:]


@contextlib.contextmanager
def _atomic_output(path: Path):
    """Yield a temporary path beside `path`; on success fsync it and move it over `path`,
    on failure delete it. The final name never holds a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
