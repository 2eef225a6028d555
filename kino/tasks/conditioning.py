"""Conditioning: every generation task is the same sampling loop with some latent frames given.

A task gives some latent frames clean (flow time 0) and lets the sampler generate the rest:

    text-to-video     nothing given
    image-to-video    latent 0 = the image's latent
    extend forward    the first latents = the input's latents
    extend backward   the last latents = the input's latents (two passes, see below)
    connect           the first latents = A's, the last latents = B's (two passes)
    loop              latents 1 and T-1 tied to one generated value
    edit              start from the input's latents noised to the strength (SDEdit)

Two objects carry this. A `Layout` says, in pixel frames, where the given frames sit in
the output; `build_conditioning` turns it into a `Conditioning` (clean latents, the mask
of clean latent frames, the loop tie and the SDEdit start), which `kino.pipeline.
sample_latents` obeys (the math is in `Conditioning`'s docstring). The task functions
(`kino/tasks/video_tasks.py`) only choose a layout.

Inputs to the output (`fit_video`, `plan_*`):
- Size: each input is resized, aspect preserved, so that it covers the output's H x W
  (bilinear, antialiased; an input already H x W is used untouched), then center-cropped
  to H x W. Without an explicit size a task takes its first input's size rounded down to a
  multiple of the model's stride (16 for kino's models), at least one stride.
- Frames: the causal VAE turns pixel frame 0 into latent 0 and frames 4j-3..4j into
  latent j, so the given frames must fill whole latent frames:
  * frames at the start of the output (image-to-video, extend forward, connect's A) fill
    latents 0..k: 4k + 1 frames (1, 5, 9, ...). A longer input is trimmed to the largest
    such count by dropping its earliest frames, so the frame the new ones continue from is
    kept.
  * frames at the end (extend backward, connect's B) fill the last k latents: 4k frames
    (4, 8, ...). A longer input is trimmed by dropping its latest frames, so its first
    frame, the one the new frames lead into, is kept. Fewer than 4 frames is an error.
  * new frames: a multiple of 4 after given frames at the start (extend forward,
    connect), 4m + 1 before given frames at the end (extend backward), so that the whole
    output has 4k + 1 frames. Other counts are errors naming the nearest allowed ones.
  * loop: N = 4k output frames (k >= 1); edit: any count (the VAE pads the clip).

Loops: a loop of N = 4k frames is sampled as k + 2 latent frames: latent 0 (pixel frame 0),
latents 1..k (frames 1..4k: the loop) and one more, tied to latent 1 (the sampler averages
their velocities, so they stay equal; see `Conditioning`). The model thus generates latents
1..k as a cycle: what follows latent k is latent 1 again. Latent 1, not 0, is the tied one
because with a causal VAE latent 0 is an image-style latent of one frame, which never
recurs inside a clip. The decoder is causal too, and its output drifts with the frames
before it (the first frames of a clip decode differently from later ones), so decoding the
k + 2 latents as they are would show that drift as a cut at the wrap. A loop is therefore
decoded as a cycle (`loop_cycle`, then `loop_frames`): latent 0, then latents 1..k repeated LOOP_DECODE_CYCLES
times, keeping the last cycle's 4k frames; the decoder's context at the start of that cycle
is the end of the one before, so the decoded frames repeat too. The output is frames 1..4k
of the cycle: the wrap from its last frame to its first is the step from latent k into
latent 1 that the tie made the model generate. With an image (latent 0 given), the clip
starts at the image instead: the cycle's frame 4k (which stands where frame 0 stood),
then its frames 1..4k-1.

Given frames that are not at the start (extend backward, connect's B): with a causal VAE
the latents of frames late in a clip depend on every frame before them, so encoding the
input alone (its frame 0 would become an image-style latent 0) does not give the latents
it has at the end of a longer clip. Encoding it after stand-in frames only approximates
them. So such tasks take two passes (`Layout.needs_refine`):
  1. the guide clip: the given frames in place, each gap filled with copies of the first
     frame of the given frames after it (a freeze frame as stand-in past); sample with
     its latents as the clean frames;
  2. paste the given frames (pixels) into the pass-1 video and encode that composite:
     the given frames' latents are now exactly those of a clip that holds them after the
     generated frames (what training sees). Sample again with these clean frames,
     starting from the composite's latents noised to `refine` (SDEdit), so the new frames
     are regenerated to match the exact latents.
Frames at the start need one pass: the first 4k + 1 frames' latents are the latents of
those frames alone (causality), so they are exact from the start.

Decoding the final latents re-decodes the given frames too. Given frames at the start come
back as the VAE reconstructs them (the decoder is causal too); frames at the end are
decoded in the context of the new frames before them, so they blend in but differ from a
stand-alone reconstruction of the input by the VAE's context effects, more so when the
second pass changed the new frames. By default the tasks therefore paste the given frames
over the decoded video (`given="exact"`, kino/tasks/video_tasks.py); `given="decoded"`
returns the decoding as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from kino.errors import KinoUserError

LOOP_TIE = 1  # a loop's last latent frame is tied to this one (module docstring)
LOOP_DECODE_CYCLES = 3  # a loop is decoded as latent 0 and this many cycles (benchmarks/loop_bound.py)

# ---------------------------------------------------------------------------- the sampler's view


@dataclass
class Conditioning:
    """What the sampler must respect. Shapes: latents (B, C, T, h, w), clean (B, T) bool.

    With clean latents c, mask m (1 on clean latent frames), flow time t, noise eps and the
    DiT's velocity v_theta(x, tau) at per-frame times tau (B, T), each sampler step sees

        x_in  = m c + (1 - m) x                   clean frames are exactly c whatever x holds
        tau   = 1000 (1 - m) t                    clean frames are at t = 0 ...
        v     = (1 - m) guided(v_theta(x_in, tau))  ... and do not move
        loop:   v_1 = v_{T-1} = (v_1 + v_{T-1}) / 2

    and starts from x = m c + (1 - m) eps at t = 1 (loop: x_{T-1} = x_1 too). Both tied
    frames then get the same update from the same value at every step, so they stay equal
    bit for bit: averaging the velocities lets both positions' predictions shape the one
    shared frame (a copy would ignore one of them). With `start_latents` z (SDEdit) the
    schedule is cut to its last round(strength * steps) steps, starting at their first
    time t0, from x = m c + (1 - m) ((1 - t0) z + t0 eps): strength 1 is exactly
    text-to-video from eps (t0 = 1), strength 0 returns z. The result is m c + (1 - m) x_0.

    Clean values are substituted at every model call and in the result rather than kept in
    the sampler's state, because multistep updates (DPM-Solver's coefficients sum to one
    only up to rounding) would let a frame with zero velocity drift by an ulp: that way the
    model and the result see them bit-exact.
    """

    latents: Tensor  # (B, C, T, h, w) normalised latents; only clean frames are read
    clean: Tensor  # (B, T) bool, True where the latent frame is given
    loop: bool = False  # tie latent frame LOOP_TIE (1) and latent frame T-1
    start_latents: Tensor | None = None  # SDEdit: (B, C, T, h, w) the latents sampling starts from
    strength: float = 1.0  # SDEdit: the share of the sampling schedule that is run

    def __post_init__(self) -> None:
        if self.latents.ndim != 5:
            raise KinoUserError(f"conditioning latents must be (B, C, T, h, w); got {tuple(self.latents.shape)}")
        B, _, T = self.latents.shape[:3]
        if self.clean.shape != (B, T) or self.clean.dtype != torch.bool:
            raise KinoUserError(f"the clean mask must be a ({B}, {T}) bool tensor, one flag per latent frame; "
                                f"got {self.clean.dtype} {tuple(self.clean.shape)}")
        if self.start_latents is not None and self.start_latents.shape != self.latents.shape:
            raise KinoUserError(f"start latents {tuple(self.start_latents.shape)} must have the conditioning's "
                                f"shape {tuple(self.latents.shape)}")
        if not 0.0 <= self.strength <= 1.0:
            raise KinoUserError(f"strength must be in [0, 1], got {self.strength}")
        if self.loop:
            if T < 3:
                raise KinoUserError(f"a loop needs at least 3 latent frames, got {T}")
            # one given end makes both given: the tied frame takes its value
            a = LOOP_TIE
            ends = self.clean[:, a] | self.clean[:, -1]  # (B,)
            value = torch.where(self.clean[:, a, None, None, None], self.latents[:, :, a], self.latents[:, :, -1])
            self.latents = self.latents.clone()
            self.latents[:, :, a] = self.latents[:, :, -1] = value  # (B, C, h, w)
            self.clean = self.clean.clone()
            self.clean[:, a] = self.clean[:, -1] = ends

    @classmethod
    def none(cls, shape: tuple[int, ...], device=None) -> Conditioning:
        """Nothing given: text-to-video."""
        B, _, T = shape[:3]
        return cls(torch.zeros(shape, device=device), torch.zeros(B, T, dtype=torch.bool, device=device))

    @property
    def starts_part_way(self) -> bool:
        """An edit (SDEdit/FlowEdit) that runs only the last `strength` of the schedule."""
        return self.start_latents is not None and self.strength < 1.0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.latents.shape)

    def to(self, device) -> Conditioning:
        start = None if self.start_latents is None else self.start_latents.to(device)
        return Conditioning(self.latents.to(device), self.clean.to(device), self.loop, start, self.strength)

    def _mask(self) -> Tensor:
        return self.clean[:, None, :, None, None]  # (B, 1, T, 1, 1)

    def keep_clean(self, x: Tensor) -> Tensor:
        """m c + (1 - m) x."""
        return torch.where(self._mask(), self.latents.to(x.dtype), x)

    def frame_times(self, t: float, dtype=torch.float32) -> Tensor:
        """(B, T) times: t (on any scale) on generated frames, 0 on clean ones."""
        return torch.full(self.clean.shape, t, dtype=dtype, device=self.clean.device).masked_fill(self.clean, 0.0)

    def constrain(self, v: Tensor) -> Tensor:
        """Velocity of clean frames 0; the loop's tied frames share the mean of theirs."""
        if self.loop:
            v = v.clone()
            v[:, :, LOOP_TIE] = v[:, :, -1] = 0.5 * (v[:, :, LOOP_TIE] + v[:, :, -1])
        return torch.where(self._mask(), torch.zeros((), dtype=v.dtype, device=v.device), v)

    def schedule(self, timesteps: Tensor) -> Tensor:
        """The full schedule, or its last round(strength * steps) steps for SDEdit."""
        if self.start_latents is None:
            return timesteps
        steps = len(timesteps) - 1
        return timesteps[steps - round(self.strength * steps):]

    def start(self, noise: Tensor, t0: float) -> Tensor:
        """The sampler's starting point at time t0 (see the class docstring)."""
        x = noise if self.start_latents is None else (1 - t0) * self.start_latents.to(noise.dtype) + t0 * noise
        x = self.keep_clean(x)
        if self.loop:
            x = x.clone()
            x[:, :, -1] = x[:, :, LOOP_TIE]
        return x  # (B, C, T, h, w)


# ---------------------------------------------------------------------------- inputs to the output


@dataclass
class Given:
    """Pixel frames the output must hold: (3, F, H, W) in [-1, 1], at the output's size,
    starting at output frame `at`. `name` (image, video, first, second) and `source`
    (a path, or '' for arrays) and `used` ((start, stop, total) input frames) are for metadata."""

    pixels: Tensor
    at: int
    name: str
    source: str = ""
    used: tuple[int, int, int] = (0, 0, 0)

    @property
    def frames(self) -> int:
        return self.pixels.shape[1]


@dataclass
class Layout:
    """Where given frames sit in an output of `frames` pixel frames at height x width.

    `loop` ties latent frame 1 to one extra latent frame after the output (module
    docstring); `source` (edit) is the whole input (3, F, H, W), the start of the
    sampling, re-run for `strength` of the schedule.
    """

    frames: int
    height: int
    width: int
    time_stride: int
    given: list[Given] = field(default_factory=list)
    loop: bool = False
    source: Given | None = None
    strength: float = 1.0

    def __post_init__(self) -> None:
        s = self.time_stride
        for g in self.given:
            end = g.at + g.frames - 1
            starts_chunk = g.at == 0 or (g.at - 1) % s == 0
            if not (starts_chunk and end % s == 0 and end < self.frames and g.pixels.shape[2:] == self.size):
                raise KinoUserError(f"given frames {g.name} at {g.at}..{end} do not fill whole latent frames of a "
                                    f"{self.frames}-frame {self.height}x{self.width} output")

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def latent_frames(self) -> int:
        n = 1 + math.ceil((self.frames - 1) / self.time_stride)
        return n + 1 if self.loop else n

    @property
    def needs_refine(self) -> bool:
        """Given frames after the start: their latents depend on the frames before them."""
        return any(g.at > 0 for g in self.given)

    def chunks(self, g: Given) -> range:
        """The latent frames `g` fills."""
        def chunk(f: int) -> int:
            return 0 if f == 0 else (f - 1) // self.time_stride + 1

        return range(chunk(g.at), chunk(g.at + g.frames - 1) + 1)

    def clean_mask(self) -> Tensor:
        clean = torch.zeros(1, self.latent_frames, dtype=torch.bool)
        for g in self.given:
            clean[0, list(self.chunks(g))] = True
        return clean  # (1, T)

    def guide(self) -> Tensor:
        """The pass-1 clip (1, 3, F, H, W): given frames in place, each gap filled with the
        first frame of the given frames after it (the last given frame when none follows)."""
        F_ = 1 + self.time_stride * (self.latent_frames - 1)  # loop: the tied latent frame too
        clip = torch.zeros(1, 3, F_, self.height, self.width)
        given = sorted(self.given, key=lambda g: g.at)
        for f in range(F_):
            nxt = next((g for g in given if g.at + g.frames > f), None)
            if nxt is None:
                clip[0, :, f] = given[-1].pixels[:, -1] if given else 0.0
            else:
                clip[0, :, f] = nxt.pixels[:, max(f - nxt.at, 0)]
        return clip

    def paste(self, clip: Tensor) -> Tensor:
        clip = clip.clone()
        for g in self.given:
            clip[0, :, g.at : g.at + g.frames] = g.pixels.to(clip)
        return clip  # (1, 3, F, H, W)


@torch.no_grad()
def build_conditioning(vae, layout: Layout, base: Tensor | None = None, refine: float = 1.0) -> Conditioning:
    """The Conditioning of a layout.

    Without `base` (pass 1): the clean latents come from the layout's guide clip. With
    `base` (pass 2: the pass-1 video, (1, 3, F, H, W) in [-1, 1]): the given frames are
    pasted into it, and its latents are both the clean latents and the SDEdit start,
    re-run for `refine` of the schedule.
    """
    device = next(vae.parameters()).device
    T, s = layout.latent_frames, vae.config.space_stride
    shape = (1, vae.config.z_dim, T, layout.height // s, layout.width // s)
    clean = layout.clean_mask().to(device)
    if layout.source is not None:  # edit
        z = vae.normalize(vae.encode(layout.source.pixels[None].to(device))[0])  # (1, C, T, h, w)
        return Conditioning(torch.zeros_like(z), clean, layout.loop, start_latents=z, strength=layout.strength)
    if not layout.given:
        return Conditioning(torch.zeros(shape, device=device), clean, layout.loop)
    clip = layout.paste(layout.guide() if base is None else base)
    if base is None:  # causal: frames after the last given one cannot change its latents
        clip = clip[:, :, : max(g.at + g.frames for g in layout.given)]
    z = vae.normalize(vae.encode(clip.to(device))[0])  # (1, C, T' <= T, h, w)
    latents = torch.zeros(shape, device=device, dtype=z.dtype)
    latents[:, :, : z.shape[2]] = z
    if base is None:
        return Conditioning(latents, clean, layout.loop)
    return Conditioning(latents, clean, layout.loop, start_latents=latents, strength=refine)


def loop_cycle(latents: Tensor, cycles: int = LOOP_DECODE_CYCLES) -> Tensor:
    """A loop's latents (B, C, k + 2, h, w) -> what the decoder gets: latent 0, then latents
    1..k `cycles` times (B, C, 1 + cycles k, h, w). The tied last latent is latent 1 again."""
    T = latents.shape[2]
    if T < 3:
        raise KinoUserError(f"a loop needs at least 3 latent frames, got {T}")
    return torch.cat([latents[:, :, :1]] + [latents[:, :, 1 : T - 1]] * cycles, dim=2)


def loop_frames(pixels: Tensor, frames: int, image_first: bool = False) -> Tensor:
    """A decoded `loop_cycle` (C, F', H, W) -> the loop's `frames` (4k) frames (C, frames, H, W):
    the last cycle's frames 1..4k, or with `image_first` its frame 4k (frame 0's place,
    the given image) and then frames 1..4k-1."""
    last = pixels[:, -frames:]
    return torch.roll(last, 1, dims=1) if image_first else last


def to_model_range(video) -> Tensor:
    """uint8 (F, H, W, 3) or (H, W, 3), numpy or torch -> float (3, F, H, W) in [-1, 1]."""
    v = torch.as_tensor(video)
    if v.ndim == 3:
        v = v[None]
    if v.ndim != 4 or v.shape[-1] != 3 or v.dtype != torch.uint8 or v.shape[0] == 0:
        raise KinoUserError(f"an input must be uint8 RGB frames (F, H, W, 3) or an image (H, W, 3); got "
                            f"{v.dtype} {tuple(v.shape)}")
    return v.permute(3, 0, 1, 2).float() / 127.5 - 1.0  # (3, F, H, W)


def cover_size(h: int, w: int, height: int, width: int) -> tuple[int, int]:
    """The size an h x w frame is resized to (aspect kept) so that it covers height x width."""
    scale = max(height / h, width / w)
    return max(height, round(h * scale)), max(width, round(w * scale))


def fit_video(video: Tensor, height: int, width: int) -> Tensor:
    """(3, F, h, w) -> (3, F, height, width): aspect-preserving resize to cover (`cover_size`;
    none when the input already has that size), then center crop."""
    h, w = video.shape[-2:]
    if (h, w) != (height, width):
        size = cover_size(h, w, height, width)
        if size != (h, w):
            video = F.interpolate(video.transpose(0, 1), size=size, mode="bilinear", align_corners=False,
                                  antialias=True).transpose(0, 1)  # (3, F, H', W')
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
        video = video[..., top : top + height, left : left + width]
    return video.clamp(-1.0, 1.0).contiguous()


def default_size(video: Tensor, stride: int) -> tuple[int, int]:
    """An input's (3, F, h, w) size rounded down to multiples of `stride` (at least one stride)."""
    h, w = video.shape[-2:]
    return max(stride, h // stride * stride), max(stride, w // stride * stride)


def _nearest(n: int, ok, what: str) -> str:
    lo = next((m for m in range(n, 0, -1) if ok(m)), None)
    hi = next(m for m in range(n, n + 10) if ok(m))
    return f"{what} {hi}" if lo is None else f"{what} {lo} or {hi}"


def check_new_frames(n: int | None, rule: str, stride: int) -> None:
    """rule 'after': a multiple of stride (>= stride); 'before': 1 + stride * m."""
    if n is None:
        raise KinoUserError("--frames N is required: the number of new frames to generate")
    ok = (lambda m: m >= stride and m % stride == 0) if rule == "after" else (lambda m: m >= 1 and m % stride == 1)
    if not ok(n):
        kind = (f"a multiple of {stride}" if rule == "after"
                else f"{stride}m + 1 (1, {stride + 1}, {2 * stride + 1}, ...)")
        raise KinoUserError(f"--frames {n} is not allowed here: the new frames must be {kind} so that they fill "
                            f"whole latent frames (nearest allowed: {_nearest(n, ok, '--frames')})")


def lead(video: Tensor, stride: int, name: str, source: str) -> Given:
    """The input at the start of the output: its last 4k + 1 frames."""
    n = video.shape[1]
    keep = 1 + (n - 1) // stride * stride
    return Given(video[:, n - keep :], 0, name, source, (n - keep, n, n))


def trail(video: Tensor, at: int, stride: int, name: str, source: str) -> Given:
    """The input at the end of the output, starting at output frame `at`: its first 4k frames."""
    n = video.shape[1]
    keep = n // stride * stride
    if keep == 0:
        raise KinoUserError(f"{name} {source or ''} has {n} frame(s); frames at the end of the output must fill whole "
                            f"latent frames: at least {stride}")
    return Given(video[:, :keep], at, name, source, (0, keep, n))


# ---------------------------------------------------------------------------- one layout per task


def plan_generate(frames: int, height: int, width: int, stride: int, image: Given | None = None,
                  loop: bool = False) -> Layout:
    """Text-to-video, image-to-video (image at frame 0) and loop.

    A loop has N = 4k frames, sampled as k + 2 latent frames, the last tied to latent 1
    and decoded as a cycle (module docstring).
    """
    if image is not None and frames < 2:
        raise KinoUserError("image-to-video needs --frames of at least 2: with 1 frame there is nothing to generate")
    if loop and (frames < stride or frames % stride):
        ok = lambda m: m >= stride and m % stride == 0  # noqa: E731
        raise KinoUserError(f"--loop needs --frames {stride}k with k >= 1 (the loop is a whole number of latent "
                            f"frames); got {frames} (nearest allowed: {_nearest(frames, ok, '--frames')})")
    return Layout(frames, height, width, stride, [image] if image is not None else [], loop=loop)


def plan_extend(video: Tensor, new_frames: int, stride: int, backward: bool = False, source: str = "") -> Layout:
    """Forward: the input's last 4k + 1 frames, then `new_frames` (a multiple of 4).
    Backward: `new_frames` (4m + 1), then the input's first 4k frames."""
    _, _, h, w = video.shape
    if backward:
        check_new_frames(new_frames, "before", stride)
        given = trail(video, new_frames, stride, "video", source)
        return Layout(new_frames + given.frames, h, w, stride, [given])
    check_new_frames(new_frames, "after", stride)
    given = lead(video, stride, "video", source)
    return Layout(given.frames + new_frames, h, w, stride, [given])


def plan_connect(first: Tensor, second: Tensor, new_frames: int, stride: int, sources: tuple[str, str] = ("", "")
                 ) -> Layout:
    """A's last 4a + 1 frames, `new_frames` (a multiple of 4), B's first 4b frames."""
    check_new_frames(new_frames, "after", stride)
    a = lead(first, stride, "first", sources[0])
    b = trail(second, a.frames + new_frames, stride, "second", sources[1])
    _, _, h, w = first.shape
    return Layout(a.frames + new_frames + b.frames, h, w, stride, [a, b])


def plan_edit(video: Tensor, strength: float | None, stride: int, frames: int | None = None,
              source: str = "") -> Layout:
    """The input's first `frames` frames (all by default), re-run for `strength` of the schedule."""
    n = video.shape[1]
    if strength is None:
        raise KinoUserError("--strength S is required: 0 returns the input, 1 ignores it")
    if not 0.0 <= strength <= 1.0:
        raise KinoUserError(f"--strength must be in [0, 1] (0 returns the input, 1 ignores it); got {strength}")
    frames = n if frames is None else frames
    if frames < 1:
        raise KinoUserError(f"--frames must be at least 1, got {frames}")
    if frames > n:
        raise KinoUserError(f"--frames {frames}: the input to edit has only {n} frame(s)")
    _, _, h, w = video.shape
    return Layout(frames, h, w, stride, source=Given(video[:, :frames], 0, "video", source, (0, frames, n)),
                  strength=strength)
