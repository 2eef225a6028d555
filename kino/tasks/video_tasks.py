"""Every generation task as a thin function: choose a layout (kino/tasks/conditioning.py),
sample with `Pipeline.generate` (one loop), record what was done.

    from kino.tasks import video_tasks as tasks
    clip = tasks.image_to_video(pipe, "a small red circle moving left ...", "first.png")
    clip = tasks.extend(pipe, prompt, "in.mp4", frames=8)                 # 8 new frames after it
    clip = tasks.extend(pipe, prompt, "in.mp4", frames=9, backward=True)  # 9 new frames before it
    clip = tasks.connect(pipe, prompt, "a.mp4", "b.mp4", frames=8)        # A, 8 new frames, B
    clip = tasks.loop(pipe, prompt, frames=16)                           # frame 16 would be frame 0
    clip = tasks.edit(pipe, prompt, "in.mp4", strength=0.6)              # SDEdit

Inputs are paths (videos are read at the model's fps, so motion keeps the speed the model
learnt; images are one frame) or uint8 frames (F, H, W, 3) / (H, W, 3). The frame and
size rules are in kino/tasks/conditioning.py. `sampling` options (steps, guidance,
negative, sampler, shift, callback) mean what they mean for `Pipeline.generate`. The
returned `Generation` holds the output video, its latents, the conditioning of the last
pass and metadata naming the task, its inputs and the input frames used.

Given frames in the output (`given`, for image-to-video, extend and connect):
- "exact" (default): the frames the user gave come back as given (at the output size),
  pasted over the decoded video. An extended or connected video holds its inputs unchanged;
  only the new frames are the model's.
- "decoded": every frame is decoded from the final latents, the given ones too. They blend
  into the new frames through the causal decoder, but come back as the VAE reconstructs them
  and, after generated frames (extend backward, connect's B), in the context of the new
  frames, which can alter them (see kino/tasks/conditioning.py).
In both cases `latents` are the final latents (which decode to the "decoded" video).

Wan image-to-video models (`pipe.takes_image`: Wan2.1 I2V, FLF2V, Wan2.2 I2V-A14B) take `image`
(and FLF2V `last_image`) their own way (`Pipeline.image_condition`): every frame is
sampled, the image conditions the DiT. Without a size, the output keeps the image's aspect
ratio at the area of the model's default size, each side rounded down to the stride (Wan's
rule: at 832x480's area a 4:3 image gives 720x544), and "exact" pastes the given frames back
as above.

Wan2.1 VACE models (`pipe.takes_vace`) keep given frames their own way (`vace_task`): image to
video, extend and connect place the given clips in a source video whose mask says to keep
them (and to generate every other frame), one sampling pass, any frame counts; `generate`
also takes a source video with a mask of the pixels to regenerate (inpainting, outpainting,
a control video) and reference images. A loop keeps its first frame (given, or generated from
the prompt first) as the frame after its last (`vace_loop`); edits run as for kino's models
(SDEdit / FlowEdit, with VACE's text-to-video context).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kino.data.video_io import read_video
from kino.errors import KinoUserError
from kino.pipeline import Generation, Pipeline
from kino.tasks.conditioning import (Given, Layout, build_conditioning, default_size, fit_video, plan_connect,
                                     plan_edit, plan_extend, plan_generate, to_model_range)

Media = str | Path | np.ndarray | Tensor
REFINE = 0.5  # share of the schedule the second pass re-runs (extend backward, connect)
GIVEN_MODES = ("exact", "decoded")  # how given frames come back (see the module docstring)


def load_input(pipe: Pipeline, media: Media, name: str) -> tuple[Tensor, str]:
    """(3, F, h, w) in [-1, 1] and its source path ('' for arrays)."""
    if isinstance(media, (str, Path)):
        path = Path(media)
        if not path.is_file():
            raise KinoUserError(f"{name} {path} does not exist")
        video, _ = read_video(path, fps=pipe.defaults.fps)
        return to_model_range(video), str(path)
    return to_model_range(media), ""


def output_size(pipe: Pipeline, first: Tensor | None, height: int | None, width: int | None) -> tuple[int, int]:
    """The requested size; unset sides take the first input's (rounded down to the model's
    stride; for a Wan VACE model at most the default size's area, the input's aspect ratio
    kept, as Wan does), or the model's default without inputs."""
    stride = pipe.vae.config.space_stride * pipe.dit.config.patch_size[1]
    h, w = default_size(first, stride) if first is not None else (pipe.defaults.height, pipe.defaults.width)
    area = pipe.defaults.height * pipe.defaults.width
    if first is not None and pipe.takes_vace and h * w > area:
        h, w = wan_size(first, area, stride)
    h, w = height or h, width or w
    pipe.check_request(1, h, w)
    return h, w


def run_layout(pipe: Pipeline, prompt: str, layout: Layout, task: str, *, seed: int = 0, refine: float = REFINE,
               given: str = "exact", **sampling) -> Generation:
    """Sample a layout: one pass, or two when given frames follow generated ones (see
    kino/tasks/conditioning.py): the second starts from the first's video with the given
    frames pasted in, re-encoded, and re-runs `refine` of the schedule. `given`: how the
    given frames come back (GIVEN_MODES; module docstring)."""
    if not 0.0 <= refine <= 1.0:
        raise KinoUserError(f"--refine must be in [0, 1], got {refine}")
    if given not in GIVEN_MODES:
        raise KinoUserError(f"--given must be one of {', '.join(GIVEN_MODES)}; got {given!r}")
    pipe.check_request(layout.frames, layout.height, layout.width)
    size = dict(frames=layout.frames, height=layout.height, width=layout.width, seed=seed)
    with pipe.using("vae"):
        cond = build_conditioning(pipe.vae, layout)
    clip = pipe.generate(prompt, **size, conditioning=cond, **sampling)
    if layout.needs_refine:
        base = to_model_range(clip.video)[None]  # (1, 3, F, H, W) the pass-1 video
        with pipe.using("vae"):
            cond = build_conditioning(pipe.vae, layout, base=base, refine=refine)
        clip = pipe.generate(prompt, **size, conditioning=cond, **sampling)
    if given == "exact" and layout.given:
        clip.video = paste_given(clip.video, layout.given)
    clip.metadata.update(task_metadata(task, layout, refine))
    if layout.given:
        clip.metadata["given_frames"] = given
    return clip


def paste_given(video: Tensor, given: list[Given]) -> Tensor:
    """uint8 (F, H, W, 3) with each given clip's frames written in at its place (an input
    already at the output size comes back bit for bit)."""
    video = video.clone()
    for g in given:
        end = min(g.at + g.frames, video.shape[0])  # a loop's tied frame lies past the output
        pixels = g.pixels[:, : end - g.at].add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
        video[g.at : end] = pixels.permute(1, 2, 3, 0).to(video.device)  # (F, H, W, 3)
    return video


def task_metadata(task: str, layout: Layout, refine: float) -> dict[str, str]:
    given = layout.given + ([layout.source] if layout.source is not None else [])
    meta = {"task": task,
            "inputs": json.dumps({g.name: g.source for g in given}),
            # which input frames (start, stop of total) sit where in the output
            "input_frames": json.dumps([{"input": g.name, "frames": list(g.used), "at": g.at} for g in given])}
    if layout.loop:
        meta["loop"] = "true"
    if layout.source is not None:
        meta["strength"] = str(layout.strength)
    if layout.needs_refine:
        meta["refine"] = str(refine)
    return meta


# ---------------------------------------------------------------------------- the tasks


def generate(pipe: Pipeline, prompt: str, *, image: Media | None = None, loop: bool = False,
             frames: int | None = None, height: int | None = None, width: int | None = None, seed: int = 0,
             last_image: Media | None = None, references: list[Media] | tuple[Media, ...] = (),
             vace_video: Media | None = None, vace_mask: Media | None = None, **sampling) -> Generation:
    """Text-to-video, image-to-video (`image`, or a video's first frame, becomes frame 0)
    and loops (`loop`, 4k frames, by default the most the default length holds; with an
    image, the loop starts and wraps around at it). A Wan2.1 I2V / FLF2V pipeline takes
    `image` (and `last_image`) through its DiT instead (module doc). A Wan2.1 VACE pipeline
    takes `image` as a kept first frame, and also a source video with a mask of what to
    generate (`vace_video`, `vace_mask`) and reference images (`references`) (`vace_task`)."""
    _check_vace_inputs(pipe, references, vace_video, vace_mask)
    if pipe.takes_vace:
        if last_image is not None:
            raise KinoUserError("--last-image is not available with a Wan VACE model (`kino connect` joins two clips "
                                "through VACE's masks)")
        if image is not None and vace_video is not None:
            raise KinoUserError("give --image or --vace-video, not both (a first frame is a one-frame source)")
        if loop:
            if vace_video is not None:
                raise KinoUserError("--loop takes no --vace-video")
            return vace_loop(pipe, prompt, image, frames=frames, height=height, width=width, seed=seed,
                             references=references, **sampling)
        source, mask, name = None, None, ""
        if vace_video is not None:
            source, name = load_input(pipe, vace_video, "--vace-video")
        first = None
        if image is not None:
            first, name = load_input(pipe, image, "--image")
        h, w = output_size(pipe, source if source is not None else first, height, width)
        if source is not None:
            frames = frames or source.shape[1]
            if source.shape[1] < frames:
                raise KinoUserError(f"--vace-video has {source.shape[1]} frames; --frames {frames} needs as many")
            source = fit_video(source[:, :frames], h, w)
            mask = vace_mask_pixels(pipe, vace_mask, frames, h, w) if vace_mask is not None else None
        frames = frames or pipe.defaults.frames
        given = [] if first is None else [Given(fit_video(first[:, :1], h, w), 0, "image", name,
                                                 (0, 1, first.shape[1]))]
        task = "image-to-video" if image is not None else "video-to-video" if source is not None else "text-to-video"
        return vace_task(pipe, prompt, f"{task} (Wan2.1 VACE)", given, frames, h, w, seed=seed,
                         references=references, video=source, mask=mask, source=name if source is not None else None,
                         **sampling)
    if pipe.takes_image:
        if loop:
            raise KinoUserError("--loop is not available with a Wan image-to-video model")
        return wan_image_to_video(pipe, prompt, image, last_image, frames=frames, height=height, width=width,
                                  seed=seed, **sampling)
    if last_image is not None:
        raise KinoUserError("--last-image is for Wan2.1 FLF2V models; with kino's models, `kino connect` joins "
                            "two clips")
    first, source = load_input(pipe, image, "--image") if image is not None else (None, "")
    h, w = output_size(pipe, first, height, width)
    stride = pipe.vae.config.time_stride
    if frames is None:  # a loop: the most whole latent frames the default holds (17 -> 16)
        frames = max(stride, pipe.defaults.frames // stride * stride) if loop else pipe.defaults.frames
    given = None if first is None else Given(fit_video(first[:, :1], h, w), 0, "image", source, (0, 1, first.shape[1]))
    layout = plan_generate(frames, h, w, stride, image=given, loop=loop)
    task = "image-to-video" if image is not None else "text-to-video"
    task = f"{task} loop" if loop else task
    return run_layout(pipe, prompt, layout, task, seed=seed, **sampling)


def wan_size(image: Tensor, area: int, stride: int) -> tuple[int, int]:
    """Wan's I2V output size: the (3, F, h, w) image's aspect ratio at about `area` pixels,
    each side rounded down to a multiple of `stride` (at least one stride)."""
    aspect = image.shape[-2] / image.shape[-1]
    return (max(stride, int(math.sqrt(area * aspect) // stride) * stride),
            max(stride, int(math.sqrt(area / aspect) // stride) * stride))


def wan_image_to_video(pipe: Pipeline, prompt: str, image: Media | None, last_image: Media | None = None, *,
                       frames: int | None = None, height: int | None = None, width: int | None = None,
                       seed: int = 0, given: str = "exact", **sampling) -> Generation:
    """Wan2.1 I2V (FLF2V with `last_image`): the image (a video's first frame; a last image's
    video gives its last frame) conditions every frame through the DiT."""
    if image is None:
        raise KinoUserError(f"{pipe.name} is a Wan2.1 image-to-video model: give the first frame (--image)")
    if given not in GIVEN_MODES:
        raise KinoUserError(f"--given must be one of {', '.join(GIVEN_MODES)}; got {given!r}")
    first, source = load_input(pipe, image, "--image")
    inputs = [("image", first[:, :1], source, (0, 1, first.shape[1]))]
    if last_image is not None:
        last, last_source = load_input(pipe, last_image, "--last-image")
        n = last.shape[1]
        inputs.append(("last_image", last[:, -1:], last_source, (n - 1, n, n)))
    stride = pipe.vae.config.space_stride * pipe.dit.config.patch_size[1]
    h, w = wan_size(first, pipe.defaults.height * pipe.defaults.width, stride)
    h, w = height or h, width or w
    frames = frames or pipe.defaults.frames
    pipe.check_request(frames, h, w)
    clip = pipe.generate(prompt, frames=frames, height=h, width=w, seed=seed, image=inputs[0][1][:, 0],
                         last_image=inputs[1][1][:, 0] if last_image is not None else None, **sampling)
    placed = [Given(fit_video(pixels, h, w), 0 if name == "image" else frames - 1, name, src, used)
              for name, pixels, src, used in inputs]
    if given == "exact":
        clip.video = paste_given(clip.video, placed)
    clip.metadata.update({
        "task": "image-to-video (Wan2.1 " + ("FLF2V" if last_image is not None else "I2V") + ")",
        "inputs": json.dumps({g.name: g.source for g in placed}),
        "input_frames": json.dumps([{"input": g.name, "frames": list(g.used), "at": g.at} for g in placed]),
        "given_frames": given})
    return clip


def vace_loop(pipe: Pipeline, prompt: str, image: Media | None, *, frames: int | None = None,
              height: int | None = None, width: int | None = None, seed: int = 0, given: str = "exact",
              **sampling) -> Generation:
    """A loop of `frames` (4k; default the most whole latent frames the default length holds)
    on a Wan2.1 VACE model: frames + 1 are generated with the image kept as the first and the
    last, and the last is dropped, so frame `frames` would be frame 0 again. Without an image
    the first frame is generated from the prompt first (a one-frame clip, same seed)."""
    stride = pipe.vae.config.time_stride
    frames = frames or max(stride, pipe.defaults.frames // stride * stride)
    if frames % stride:
        raise KinoUserError(f"--loop needs --frames a multiple of {stride} (whole latent frames), got {frames}")
    first, name = load_input(pipe, image, "--image") if image is not None else (None, "")
    h, w = output_size(pipe, first, height, width)
    if first is None:  # the loop's frame: the prompt's text-to-image
        still = vace_task(pipe, prompt, "text-to-image", [], 1, h, w, seed=seed, **sampling)
        first, name = to_model_range(still.video), "generated first frame"
    pixels = fit_video(first[:, :1], h, w)
    ends = [Given(pixels, 0, "image", name, (0, 1, first.shape[1])),
            Given(pixels, frames, "image (again, after the loop's last frame)", name, (0, 1, first.shape[1]))]
    clip = vace_task(pipe, prompt, "image-to-video loop (Wan2.1 VACE)", ends, frames + 1, h, w, seed=seed,
                     given=given, **sampling)
    clip.video = clip.video[:frames]
    clip.metadata["loop"] = "true"
    return clip


def _check_vace_inputs(pipe: Pipeline, references, vace_video, vace_mask) -> None:
    if not pipe.takes_vace and (references or vace_video is not None or vace_mask is not None):
        raise KinoUserError(f"{pipe.name} is no Wan VACE model: --reference, --vace-video and --vace-mask are for "
                            "Wan2.1 VACE models")
    if vace_mask is not None and vace_video is None:
        raise KinoUserError("--vace-mask says which pixels of --vace-video to regenerate: give --vace-video too")


def vace_mask_pixels(pipe: Pipeline, mask: Media, frames: int, height: int, width: int) -> Tensor:
    """A VACE mask (a video, or an image for every frame; white = generate, black = keep) ->
    (frames, height, width) in [0, 1], fitted like the source."""
    pixels, _ = load_input(pipe, mask, "--vace-mask")
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, frames, -1, -1)
    if pixels.shape[1] < frames:
        raise KinoUserError(f"--vace-mask has {pixels.shape[1]} frames; the source needs {frames} (or one image "
                            "for all of them)")
    return fit_video(pixels[:, :frames], height, width).mean(dim=0).add(1).div(2)  # (F, H, W)


def vace_task(pipe: Pipeline, prompt: str, task: str, kept: list[Given], frames: int, height: int, width: int, *,
              seed: int = 0, given: str = "exact", references: list[Media] | tuple[Media, ...] = (),
              video: Tensor | None = None, mask: Tensor | None = None, source: str | None = None,
              **sampling) -> Generation:
    """One clip of a Wan2.1 VACE pipeline: the `kept` clips are kept (mask 0) in a source
    video (`video`, zeros elsewhere; `mask` 1 where to generate, default everywhere but the
    given frames), the `references` images conditioned beside it (`Pipeline.vace_condition`),
    one pass; `given`: how the kept frames come back, as for kino's tasks (module doc)."""
    if given not in GIVEN_MODES:
        raise KinoUserError(f"--given must be one of {', '.join(GIVEN_MODES)}; got {given!r}")
    pipe.check_request(frames, height, width)
    video = video.clone() if video is not None else torch.zeros(3, frames, height, width)
    mask = mask.clone() if mask is not None else torch.ones(frames, height, width)
    for g in kept:
        video[:, g.at:g.at + g.frames] = g.pixels
        mask[g.at:g.at + g.frames] = 0.0
    refs = [load_input(pipe, r, f"reference image {i + 1}") for i, r in enumerate(references)]
    vace = pipe.vace_condition(frames, height, width, video, mask, [x[:, 0] for x, _ in refs])
    clip = pipe.generate(prompt, frames=frames, height=height, width=width, seed=seed, vace=vace, **sampling)
    if given == "exact" and kept:
        clip.video = paste_given(clip.video, kept)
    inputs = {g.name: g.source for g in kept}
    if source is not None:
        inputs["vace_video"] = source
    inputs.update({f"reference_{i + 1}": src for i, (_, src) in enumerate(refs)})
    clip.metadata.update({
        "task": task, "inputs": json.dumps(inputs),
        "input_frames": json.dumps([{"input": g.name, "frames": list(g.used), "at": g.at} for g in kept])})
    if kept:
        clip.metadata["given_frames"] = given
    return clip


def image_to_video(pipe: Pipeline, prompt: str, image: Media, **options) -> Generation:
    return generate(pipe, prompt, image=image, **options)


def loop(pipe: Pipeline, prompt: str, **options) -> Generation:
    return generate(pipe, prompt, loop=True, **options)


def extend(pipe: Pipeline, prompt: str, video: Media, *, frames: int, backward: bool = False,
           height: int | None = None, width: int | None = None, seed: int = 0, refine: float = REFINE,
           **sampling) -> Generation:
    """The input followed (or, `backward`, preceded) by `frames` new frames."""
    references = sampling.pop("references", ())
    _check_vace_inputs(pipe, references, None, None)
    x, source = load_input(pipe, video, "input")
    h, w = output_size(pipe, x, height, width)
    if pipe.takes_vace:  # one pass: the input kept by VACE's mask
        _check_new(frames)
        n = x.shape[1]
        given = [Given(fit_video(x, h, w), frames if backward else 0, "input", source, (0, n, n))]
        task = "extend backward" if backward else "extend forward"
        return vace_task(pipe, prompt, f"{task} (Wan2.1 VACE)", given, n + frames, h, w, seed=seed,
                         references=references, **sampling)
    layout = plan_extend(fit_video(x, h, w), frames, pipe.vae.config.time_stride, backward, source)
    task = "extend backward" if backward else "extend forward"
    return run_layout(pipe, prompt, layout, task, seed=seed, refine=refine, **sampling)


def connect(pipe: Pipeline, prompt: str, first: Media, second: Media, *, frames: int, height: int | None = None,
            width: int | None = None, seed: int = 0, refine: float = REFINE, **sampling) -> Generation:
    """A, then `frames` new frames leading from A's end into B's start, then B."""
    references = sampling.pop("references", ())
    _check_vace_inputs(pipe, references, None, None)
    a, source_a = load_input(pipe, first, "first input")
    b, source_b = load_input(pipe, second, "second input")
    h, w = output_size(pipe, a, height, width)
    if pipe.takes_vace:  # one pass: both inputs kept by VACE's mask
        _check_new(frames)
        na, nb = a.shape[1], b.shape[1]
        given = [Given(fit_video(a, h, w), 0, "first", source_a, (0, na, na)),
                 Given(fit_video(b, h, w), na + frames, "second", source_b, (0, nb, nb))]
        return vace_task(pipe, prompt, "connect (Wan2.1 VACE)", given, na + frames + nb, h, w, seed=seed,
                         references=references, **sampling)
    layout = plan_connect(fit_video(a, h, w), fit_video(b, h, w), frames, pipe.vae.config.time_stride,
                          (source_a, source_b))
    return run_layout(pipe, prompt, layout, "connect", seed=seed, refine=refine, **sampling)


def _check_new(frames: int | None) -> None:
    if frames is None:
        raise KinoUserError("--frames N is required: the number of new frames to generate")
    if frames < 1:
        raise KinoUserError(f"--frames (the new frames) must be at least 1, got {frames}")


def edit(pipe: Pipeline, prompt: str, video: Media, *, strength: float, frames: int | None = None,
         height: int | None = None, width: int | None = None, seed: int = 0, source_prompt: str | None = None,
         **sampling) -> Generation:
    """SDEdit: the input noised to `strength` and re-generated (0 returns the input as the
    VAE reconstructs it, 1 is text-to-video with the same seed). `frames`: use the input's
    first `frames` frames (default all). With `source_prompt` (what the input shows) it is
    FlowEdit instead, over the same share of the schedule: the input moved by the difference
    between the two prompts' velocities, never noised away (0 still returns the input)."""
    x, source = load_input(pipe, video, "input")
    h, w = output_size(pipe, x, height, width)
    layout = plan_edit(fit_video(x, h, w), strength, pipe.vae.config.time_stride, frames, source)
    return run_layout(pipe, prompt, layout, "edit", seed=seed, source_prompt=source_prompt, **sampling)
