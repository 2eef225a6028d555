"""Text to video: encode the prompt, sample latents with the DiT, decode with the VAE.

    pipe = Pipeline.from_pretrained()          # the model shipped with kino, or a folder
    clip = pipe.generate("a large red circle moving left on a black background", seed=0)
    clip.video  # uint8 (F, H, W, 3); clip.metadata says how it was made

The sampling loop is one function (`sample_latents`) over a velocity closure; guidance,
the timestep convention and conditioning (given latent frames, loops, SDEdit starts: every
task of `kino/tasks/video_tasks.py`) live there, not in the model.

Wan2.1 image-to-video models (a DiT with an image branch, and a CLIP image encoder) are
conditioned another way (`ImageCondition`): their DiT reads 20 more input channels (a mask
of the given frames and the VAE latents of the image followed by black frames) and the
image's CLIP features; every frame is sampled, none is kept clean.
"""

from __future__ import annotations

import json
import math
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from kino import __version__
from kino.diffusion.flow import sampling_timesteps, shift_for_tokens
from kino.diffusion.samplers import SAMPLERS, STOCHASTIC, flow_edit
from kino.errors import CaptionError, KinoUserError
from kino.models.dit.cache import FirstBlockCache
from kino.models.dit.model import DiT
from kino.models.dit.pretrained import load_folder_dit
from kino.models.folder import (MAX_SHARD_BYTES, combined_sha256, default_model_dir, load_component, load_module,
                                read_manifest, reject_unknown_fields, save_component, write_manifest)
from kino.models.gguf import GGUFLinear
from kino.models.hub import resolve_model, weights_replaced, weights_skipped
from kino.models.lora import fuse_lora, read_lora, unfuse_lora
from kino.models.memory import BlockStreamer, MemoryPlan, placed
from kino.models.text.encoder import TextEncoder, load_text_encoder, save_text_encoder
from kino.models.vae.model import TileConfig, VAEConfig, VideoVAE
from kino.tasks.conditioning import Conditioning, fit_video, loop_cycle, loop_frames
from kino.world.captions import parse_caption

SHAPES_WORLD_NAME = "kino-shapes"  # the name of Shapes World pipelines (the shipped default, `kino train dit`)
EXAMPLE_PROMPT = "a large red circle moving left on a black background"

# the DiT's time input is 1000 x flow time (Wan's scale)
T_SCALE = 1000.0
MAX_STEPS = 10_000  # sampling steps a request may ask for (a typo's 10**20 would overflow torch)


@dataclass
class GenerationDefaults:
    """A model's recommended settings, stored under "pipeline" in its kino.json."""

    frames: int = 17
    height: int = 64
    width: int = 64
    fps: float = 8.0
    steps: int = 20
    guidance: float = 4.0
    # solver times t (1 = noise) where guidance applies; elsewhere the conditional velocity
    # alone, one DiT pass instead of two (Kynkäänniemi et al. 2024). None: every step.
    guidance_interval: tuple[float, float] | None = None
    sampler: str = "dpm++2m"
    eta: float = 1.0  # a stochastic sampler's share of fresh noise (ddim_eta: 0 = Euler, 1 = ancestral)
    shift: float | None = None  # None: grows with the token count (shift_for_tokens)
    negative: str = ""
    t_max: float = 1.0  # the schedule runs from t_max to t_min, then 0 (Wan2.1: 0.999 to 0; sampling_timesteps)
    t_min: float = 0.0
    # Wan2.1 (and diffusers' WanPipeline) hand the DiT int64 timesteps, floor(1000 t), while the
    # solver steps between the exact times: True reproduces that.
    integer_dit_time: bool = False
    # skip-layer guidance (sample_latents): scale (0: off), the DiT blocks the weakened pass
    # leaves out, and the solver times where it applies (None: those of guidance_interval)
    skip_guidance: float = 0.0
    skip_blocks: tuple[int, ...] = ()
    skip_interval: tuple[float, float] | None = None
    # first-block cache (kino/models/dit/cache.py): 0 runs every block on every call
    cache_threshold: float = 0.0
    # Two-expert models (Wan2.2 A14B): the DiT (high-noise expert) runs where the DiT time is at
    # least boundary x 1000, the second DiT (low-noise expert) below, with guidance_2 (None:
    # guidance). Unused by one-DiT models.
    boundary: float | None = None
    guidance_2: float | None = None
    # CFG-Zero* (Fan et al. 2025, sample_latents): the unconditional velocity scaled by its
    # projection coefficient before guidance, and zero velocity on the first `zero_steps` steps
    cfg_star: bool = False
    zero_steps: int = 0

    def __post_init__(self):
        if self.guidance_interval is not None:
            self.guidance_interval = check_guidance_interval(self.guidance_interval)
        if self.skip_interval is not None:
            self.skip_interval = check_guidance_interval(self.skip_interval, "skip-layer guidance interval")
        self.skip_blocks = tuple(self.skip_blocks)
        for name, value in (("guidance", self.guidance), ("guidance_2", self.guidance_2),
                            ("skip-layer guidance", self.skip_guidance), ("the cache threshold", self.cache_threshold)):
            if value is not None and not math.isfinite(value):
                raise KinoUserError(f"{name} must be a finite number, got {value}")
        if self.skip_guidance < 0:
            raise KinoUserError(f"skip-layer guidance must be >= 0, got {self.skip_guidance}")
        if not self.cache_threshold >= 0:
            raise KinoUserError(f"the cache threshold must be >= 0 (0 = off), got {self.cache_threshold}")
        if self.zero_steps < 0:
            raise KinoUserError(f"zero_steps must be >= 0, got {self.zero_steps}")
        if not 0.0 <= self.eta <= 1.0:
            raise KinoUserError(f"eta (a stochastic sampler's share of fresh noise) must be in [0, 1], got {self.eta}")
        if self.boundary is not None and not 0.0 < self.boundary < 1.0:
            raise KinoUserError(f"the experts' boundary must be in (0, 1), got {self.boundary}")

    @classmethod
    def from_dict(cls, d: dict) -> GenerationDefaults:
        reject_unknown_fields(cls, d, "pipeline settings", KinoUserError)
        return cls(**d)


def check_guidance_interval(interval, what: str = "guidance interval") -> tuple[float, float]:
    """(lo, hi) with 0 <= lo <= hi <= 1, or a clear error."""
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise KinoUserError(f"a {what} is two solver times LO HI, got {interval!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise KinoUserError(f"a {what} needs 0 <= LO <= HI <= 1 (solver times, 1 = noise), got {lo} {hi}")
    return lo, hi


@dataclass
class Generation:
    video: Tensor  # uint8 (F, H, W, 3)
    fps: float
    metadata: dict[str, str] = field(default_factory=dict)
    latents: Tensor | None = None  # (1, C, T, h, w) the normalised latents the video was decoded from
    conditioning: Conditioning | None = None  # what the last sampling pass was given


@dataclass
class ImageCondition:
    """Wan2.1 I2V / FLF2V conditioning of one clip, the same for both guidance branches.

    `channels` (1, 4 + C, T, h, w): Wan's mask of the given pixel frames folded into latent
    frames (frame 0 counted four times, then 4 pixel frames per latent frame: 4 channels),
    then the normalised VAE latents of the given frames with black (zero) frames between
    them; the DiT reads them after the noisy latents. `features` (1, N, img_dim): the CLIP
    features of the given images (FLF2V: the first frame's tokens, then the last's); None for
    Wan2.2 I2V-A14B, whose DiT reads the channels alone.
    """

    channels: Tensor
    features: Tensor | None

    def to(self, device) -> ImageCondition:
        return ImageCondition(self.channels.to(device), None if self.features is None else self.features.to(device))


@dataclass
class VaceCondition:
    """Wan2.1 VACE conditioning of one clip (`Pipeline.vace_condition`), the same for both
    guidance branches.

    `context` (1, 96, R + T, h, w): the normalised VAE latents of the source video's kept
    pixels (mask 0) and, apart, of its pixels to regenerate (mask 1), then the pixel mask
    folded into 64 channels (each 8x8 pixel square's values, taken nearest in time onto the
    T latent frames); in front, R reference images' latents (with zero "regenerate" latents
    and a zero mask). The sampled latents hold R + T frames too; the first R are dropped
    before decoding. `scale`: the weight of the VACE hints (Wan's context_scale).
    """

    context: Tensor
    references: int = 0
    scale: float = 1.0

    def to(self, device) -> VaceCondition:
        return replace(self, context=self.context.to(device))


def frame_mask(frames: int, given: list[int], stride: int) -> Tensor:
    """Wan's (stride, T) mask of `given` pixel frames among `frames` = stride (T - 1) + 1:
    frame 0 repeated `stride` times, then the frames in latent order, stride per latent frame."""
    m = torch.zeros(frames)
    m[given] = 1.0
    m = torch.cat([m[:1].repeat(stride), m[1:]])  # (stride * T,)
    return m.view(-1, stride).transpose(0, 1)  # (stride, T)


def fold_vace_mask(mask: Tensor, stride: int, latent_frames: int) -> Tensor:
    """VACE's mask channels: (F, H, W) pixel mask -> (stride^2, T, H / stride, W / stride), each
    stride x stride square's values as channels, taken nearest in time ("nearest-exact") onto
    the T latent frames (Wan's vace_encode_masks)."""
    f, height, width = mask.shape
    h, w = height // stride, width // stride
    folded = mask.reshape(f, h, stride, w, stride).permute(2, 4, 0, 1, 3).reshape(stride * stride, f, h, w)
    return torch.nn.functional.interpolate(folded[None], size=(latent_frames, h, w), mode="nearest-exact")[0]


def place_on_canvas(image: Tensor, height: int, width: int) -> Tensor:
    """(3, H, W) -> (3, height, width): scaled to fit inside (aspect kept, bilinear, sizes
    rounded down) and centred on white: how VACE places a reference image."""
    h, w = image.shape[-2:]
    scale = min(height / h, width / w)
    nh, nw = max(1, int(h * scale)), max(1, int(w * scale))
    resized = torch.nn.functional.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    canvas = torch.ones(3, height, width)
    top, left = (height - nh) // 2, (width - nw) // 2
    canvas[:, top:top + nh, left:left + nw] = resized
    return canvas


@contextmanager
def _installed(dits: list[DiT], caches: list[FirstBlockCache] | None):
    """A step cache on each DiT for one sampling run (None: every block runs, as always)."""
    for dit, cache in zip(dits, caches or [None] * len(dits)):
        dit.step_cache = cache
    try:
        yield
    finally:
        for dit in dits:
            dit.step_cache = None


def sample_latents(dit: DiT, text: Tensor, mask: Tensor, neg_text: Tensor, neg_mask: Tensor,
                   noise: Tensor, *, steps: int, guidance: float, sampler: str = "dpm++2m",
                   shift: float | None = None, callback: Callable[[int], None] | None = None,
                   conditioning: Conditioning | None = None, t_max: float = 1.0, t_min: float = 0.0,
                   integer_dit_time: bool = False, cfg_batch: bool = True,
                   image: ImageCondition | None = None, source: tuple[Tensor, Tensor] | None = None,
                   generator: torch.Generator | None = None,
                   guidance_interval: tuple[float, float] | None = None,
                   skip_guidance: float = 0.0, skip_blocks: tuple[int, ...] = (),
                   skip_interval: tuple[float, float] | None = None, dit_2: DiT | None = None,
                   boundary: float | None = None, guidance_2: float | None = None,
                   on_switch: Callable[[DiT], None] | None = None, cfg_star: bool = False,
                   zero_steps: int = 0, vace: VaceCondition | None = None, eta: float = 1.0) -> Tensor:
    """Integrate the DiT's velocity from noise (t = 1) to latents (t = 0) with classifier-free
    guidance; conditional and unconditional branches run as one batch (`cfg_batch=False`:
    one after the other, half the activations). The DiT computes in its own dtype (that of
    its patch embedding); the solver's state stays float32.

    `conditioning` gives latent frames clean (kept exactly, at t = 0, with zero velocity),
    ties a loop's first and last frames, or starts from noised latents (SDEdit); the math is
    in `Conditioning`'s docstring. Without it nothing is given (text-to-video).

    `image` (Wan2.1 I2V / FLF2V DiTs): extra input channels and CLIP features, given to both
    guidance branches alike (`ImageCondition`). `vace` (Wan2.1 VACE DiTs): the context and
    the weight of its hints, likewise (`VaceCondition`).

    Skip-layer guidance (`skip_guidance` s > 0, Hyung et al. 2024's STG, SD3.5's SLG): at
    solver times in `skip_interval` (default: those of `guidance_interval`) the conditional
    velocity is also computed with the blocks `skip_blocks` left out, and the step moves away
    from that weakened prediction: v = v_u + g (v_c - v_u) + s (v_c - v_skip). One more DiT
    pass per such step.

    `dit_2` (Wan2.2 A14B's low-noise expert): a second DiT that takes over from `dit` (the
    high-noise expert) on the steps whose DiT time is below `boundary` x 1000, guided by
    `guidance_2` (None: `guidance`); `on_switch(expert)` is called before an expert's first
    step and whenever the other one takes over (e.g. to swap them in and out of the device).

    CFG-Zero* (Fan et al. 2025; `cfg_star`, `zero_steps`): the unconditional velocity is first
    scaled by s = <v_c, v_u> / |v_u|^2 per clip, its best fit to the conditional one, so
    v = s v_u + g (v_c - s v_u); and the first `zero_steps` steps take zero velocity (a flow
    model's earliest velocity estimates are its least reliable). Guidance 1 is still the
    conditional velocity.

    A stochastic sampler (`STOCHASTIC`: ddim-eta) draws its fresh noise at each step from
    `generator` (CPU), tied and clean where the conditioning ties and gives frames, with
    stochasticity `eta`.

    `source` (text, mask) of the prompt that describes the start latents of an edit
    conditioning: the edit then runs FlowEdit (`flow_edit`: the difference of the target's
    and the source's guided velocities, integrated from the start latents) over the same cut
    of the schedule instead of SDEdit's sampling from the noised input; `noise` is its first
    step's noise and `generator` (CPU) draws the others. `sampler` does not apply (Euler).
    """
    if sampler not in SAMPLERS:
        raise KinoUserError(f"unknown sampler {sampler!r}: allowed {', '.join(SAMPLERS)}")
    B, _, T, H, W = noise.shape
    cond = conditioning if conditioning is not None else Conditioning.none(noise.shape, noise.device)
    if cond.shape != tuple(noise.shape):
        raise KinoUserError(f"the conditioning's latents {cond.shape} do not match the noise {tuple(noise.shape)}")
    p = dit.config.patch_size
    tokens = (T // p[0]) * (H // p[1]) * (W // p[2])
    ts = cond.schedule(sampling_timesteps(steps, shift if shift is not None else shift_for_tokens(tokens), t_max,
                                          t_min))
    lo, hi = guidance_interval if guidance_interval is not None else (0.0, 1.0)
    skip_lo, skip_hi = skip_interval if skip_interval is not None else (lo, hi)
    if skip_guidance < 0.0:
        raise KinoUserError(f"skip-layer guidance must be >= 0, got {skip_guidance}")
    if skip_guidance > 0.0 and not skip_blocks:
        raise KinoUserError("skip-layer guidance needs the blocks to skip (skip_blocks)")

    if dit_2 is not None and boundary is None:
        raise KinoUserError("a second DiT (expert) needs the boundary where it takes over")
    active: list[DiT] = []

    def expert(t: float) -> tuple[DiT, float]:
        """The DiT and the guidance scale of the step at solver time t."""
        if dit_2 is None:
            return dit, guidance
        high = dit_time(t) >= boundary * T_SCALE
        model = dit if high else dit_2
        if on_switch is not None and (not active or active[0] is not model):
            on_switch(model)
        active[:] = [model]
        return model, guidance if high or guidance_2 is None else guidance_2

    def guided(t: float) -> bool:
        """Whether the step at solver time t runs both guidance branches."""
        return expert(t)[1] != 1.0 and lo <= t <= hi

    def skip_guided(t: float) -> bool:
        """Whether the step at solver time t also runs the DiT without `skip_blocks`."""
        return skip_guidance > 0.0 and skip_lo <= t <= skip_hi

    def combine(v_cond: Tensor, v_uncond: Tensor | None, v_skip: Tensor | None, g: float) -> Tensor:
        if v_uncond is not None and cfg_star:  # CFG-Zero*'s optimized scale, per clip
            dims = tuple(range(1, v_cond.ndim))
            scale = (v_cond * v_uncond).sum(dims, keepdim=True) / v_uncond.square().sum(dims, keepdim=True).clamp_min(
                1e-12)
            v_uncond = scale * v_uncond
        v = v_cond if v_uncond is None else v_uncond + g * (v_cond - v_uncond)
        return v if v_skip is None else v + skip_guidance * (v_cond - v_skip)

    embed = getattr(dit, "patch_embedding", None)  # any velocity model with a DiT's call signature will do
    dtype = embed.weight.dtype if embed is not None else noise.dtype
    text, neg_text = text.to(dtype), neg_text.to(dtype)
    extra, channels, fixed = {}, None, {}
    if image is not None:
        channels = image.channels.to(dtype).expand(B, -1, -1, -1, -1)
        if image.features is not None:
            extra = {"image": image.features.to(dtype).expand(B, -1, -1)}
    if vace is not None:
        extra["vace"] = vace.context.to(dtype).expand(B, -1, -1, -1, -1)
        fixed["vace_scale"] = vace.scale

    def batched(n: int) -> dict:
        """The DiT's extra inputs for a batch of n copies of the clips."""
        return {**{k: torch.cat([v] * n) for k, v in extra.items()}, **fixed}

    both = batched(2)
    extra = batched(1)

    def dit_time(t: float) -> float:
        return math.floor(t * T_SCALE) if integer_dit_time else t * T_SCALE

    def frame_times(t: float, dtype) -> Tensor:
        """(B, T) DiT times of solver time t (0 on clean frames)."""
        return cond.frame_times(dit_time(t), dtype)

    zeroed = set(ts.tolist()[:zero_steps])  # CFG-Zero*'s zero-init: the first steps' times

    def velocity(x: Tensor, t: float) -> Tensor:
        if t in zeroed:
            return torch.zeros_like(x)
        use_cfg = guided(t)
        dit, g = expert(t)
        x = cond.keep_clean(x)
        t_frames = frame_times(t, x.dtype)  # (B, T)
        x_dit = x.to(dtype) if channels is None else torch.cat([x.to(dtype), channels], dim=1)
        v_uncond = v_skip = None
        if not use_cfg:
            v_cond = dit(x_dit, t_frames, text, mask, **extra).float()
        elif cfg_batch:
            v_cond, v_uncond = dit(torch.cat([x_dit, x_dit]), torch.cat([t_frames, t_frames]),
                                   torch.cat([text, neg_text]), torch.cat([mask, neg_mask]), **both).float().chunk(2)
        else:
            v_cond = dit(x_dit, t_frames, text, mask, **extra).float()
            v_uncond = dit(x_dit, t_frames, neg_text, neg_mask, **extra).float()
        if skip_guided(t):
            v_skip = dit(x_dit, t_frames, text, mask, skip_blocks=skip_blocks, **extra).float()
        return cond.constrain(combine(v_cond, v_uncond, v_skip, g))

    if source is not None:
        if cond.start_latents is None or cond.clean.any() or cond.loop or image is not None:
            raise KinoUserError("a source prompt (FlowEdit) goes with an edit: an input to start from, no "
                                "given frames, no loop, no Wan image condition")
        src_text, src_mask = source[0].to(dtype), source[1]

        def velocities(z_src: Tensor, z_tar: Tensor, t: float) -> tuple[Tensor, Tensor]:
            use_cfg = guided(t)
            dit, g = expert(t)
            t_frames = frame_times(t, dtype)  # (B, T)
            # the source under its prompt, the edit under the target (and both unconditioned)
            calls = [(z_src, src_text, src_mask), (z_tar, text, mask)]
            if use_cfg:
                calls += [(z_src, neg_text, neg_mask), (z_tar, neg_text, neg_mask)]
            if cfg_batch:  # one batch
                xs, txt, msk = (torch.cat(parts) for parts in zip(*calls))
                vs = dit(xs.to(dtype), t_frames.repeat(len(calls), 1), txt, msk,
                         **batched(len(calls))).float().chunk(len(calls))
            else:  # one call after the other: a quarter of the activations
                vs = [dit(x.to(dtype), t_frames, txt, msk, **extra).float() for x, txt, msk in calls]
            skips = [None, None]
            if skip_guided(t):
                xs, txt, msk = (torch.cat(parts) for parts in zip(*calls[:2]))
                skips = dit(xs.to(dtype), t_frames.repeat(2, 1), txt, msk, skip_blocks=skip_blocks,
                            **both).float().chunk(2)
            uncond = vs[2:] if use_cfg else [None, None]
            return tuple(combine(vs[k], uncond[k], skips[k], g) for k in range(2))

        def step_noise(i: int) -> Tensor:
            return noise if i == 0 else torch.randn(noise.shape, generator=generator).to(noise)

        x_src = cond.start_latents.to(noise)
        if len(ts) < 2:  # strength 0: nothing to edit
            return x_src
        return flow_edit(velocities, x_src, ts.tolist(), step_noise, callback=callback)

    x = cond.start(noise, float(ts[0]))
    if len(ts) > 1:  # an SDEdit at strength 0 has no step to take
        kwargs = {}
        if sampler in STOCHASTIC:  # fresh noise per step, tied and clean where the start is
            kwargs = {"eta": eta, "noise": lambda i: cond.start(
                torch.randn(noise.shape, generator=generator).to(noise), 1.0)}
        x = SAMPLERS[sampler](velocity, x, ts.tolist(), callback=callback, **kwargs)
    return cond.keep_clean(x)


def transformer_units(model: torch.nn.Module) -> list:
    """The shard groups of a transformers model: its repeated layers (`_no_split_modules`, as
    accelerate's FSDP wrapping picks them: UMT5Block, BertLayer, ...), and the input embedding
    table unless one of them holds it (UMT5-XXL's is a fifth of the encoder), together with
    every other module that shares its weight (T5's `shared` and `encoder.embed_tokens`: a tied
    weight must be in one group)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in names]
    if not units:
        raise KinoUserError(f"{type(model).__name__} names no repeated layers to shard")
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is not None and not any(embedding is m for unit in units for m in unit.modules()):
        weight = embedding.weight
        tied = [m for m in model.modules() if any(p is weight for p in m.parameters(recurse=False))]
        units.insert(0, tied if len(tied) > 1 else embedding)
    return units


def require_prompt(prompt) -> None:
    """An empty (or blank) prompt is a user error, told before any model loads."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise KinoUserError(f"the prompt is empty: say what the clip shows, e.g. {EXAMPLE_PROMPT!r}")


class Pipeline:
    def __init__(self, vae: VideoVAE, dit: DiT, text_encoder: TextEncoder,
                 defaults: GenerationDefaults | None = None, name: str = "kino", image_encoder=None,
                 dit_2: DiT | None = None):
        if dit.config.text_dim != text_encoder.dim:
            raise KinoUserError(f"the DiT expects {dit.config.text_dim}-d text features but the text encoder "
                                f"gives {text_encoder.dim}-d")
        img_dim = dit.config.img_dim
        if (img_dim is None) != (image_encoder is None) or (image_encoder is not None and image_encoder.dim != img_dim):
            raise KinoUserError(
                f"the DiT takes {'no image features' if img_dim is None else f'{img_dim}-d image features'} but the "
                f"pipeline has {'no image encoder' if image_encoder is None else f'a {image_encoder.dim}-d image encoder'}")
        if img_dim is not None and dit.config.in_channels != 2 * vae.config.z_dim + vae.config.time_stride:
            raise KinoUserError(f"a Wan image-to-video DiT reads {2 * vae.config.z_dim + vae.config.time_stride} "
                                f"channels (noise, mask, image latents); this one reads {dit.config.in_channels}")
        vace_in = 2 * vae.config.z_dim + vae.config.space_stride ** 2
        if dit.config.vace_layers and dit.config.vace_in_channels != vace_in:
            raise KinoUserError(f"a VACE DiT on this VAE reads a {vace_in}-channel context (kept and regenerated "
                                f"latents, the folded mask); this one reads {dit.config.vace_in_channels}")
        if dit_2 is not None and (dit_2.config != dit.config or (defaults or GenerationDefaults()).boundary is None):
            raise KinoUserError("a second DiT (the low-noise expert of a Wan2.2 A14B model) must have the first "
                                "one's config, and the settings must give the boundary where it takes over")
        self.vae, self.dit, self.text_encoder = vae, dit, text_encoder
        self.dit_2 = dit_2  # Wan2.2 A14B: the low-noise expert (`dit` is the high-noise one)
        self.image_encoder = image_encoder  # Wan2.1 I2V / FLF2V: CLIP (kino/models/clip.py)
        self.defaults = defaults or GenerationDefaults()
        self.name = name
        self.loras: list[dict] = []  # fused LoRAs, in order: {"file", "sha256", "scale"}
        # each DiT's weights as they were before its first LoRA
        self._dit_bases: list[dict[str, Tensor]] = [{}, {}]
        self.dit_sha256: str | None = None  # of the DiT's weights file, when loaded from a model folder
        self.memory = MemoryPlan(dtype="float32")  # what set_memory last applied
        self._device = next(dit.parameters()).device  # where the models run
        self._offloaded: set[str] = set()  # components kept in CPU memory between uses
        self._streamers: list[BlockStreamer] = []  # one per DiT, when the memory plan streams blocks
        self.sharded = False  # weights shared over a torchrun job's processes (set_memory(shard=))

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device = "cpu",
                        text_device: str | torch.device | None = None, text_dtype: str | None = None,
                        memory: MemoryPlan | None = None,
                        dit_dtype: torch.dtype | None = torch.float32,
                        dit_file: str | Path | None = None, dit_2_file: str | Path | None = None,
                        text_encoder_file: str | Path | None = None) -> Pipeline:
        """Load a model folder (kino.json with vae, dit and text_encoder); None = the shipped default.
        A Wan2.1 folder in its original or diffusers layout loads too (kino/convert/wan.py).
        `text_device` puts the text encoder elsewhere (e.g. "cpu" beside a GPU DiT);
        `text_dtype` overrides a UMT5 encoder's recorded compute dtype; `dit_dtype` is the
        dtype the DiT's weights are converted to as they are read (None: the file's dtype; the
        weights then stay memory-mapped from the file, the page cache shared by every process
        that reads it, until they are moved, cast or sharded). With `memory` the weights
        load into CPU memory, the DiT straight in the plan's compute dtype, and
        `set_memory(memory, device)` places them.

        `dit_file` (and `dit_2_file`, a two-expert model's second DiT): the DiT's weights from
        this file instead of the folder's, which then needs only the DiT's config: a GGUF file
        (its blocks' linear layers stay quantized and are dequantized one layer at a time as they
        run: kino/models/gguf.py) or a safetensors file, in Wan's, diffusers' or kino's names.
        `text_encoder_file`: the UMT5 text encoder's weights from this file (GGUF, its layers
        kept quantized likewise, or safetensors: `UMT5Encoder.from_file`); the folder then gives
        its tokenizer."""
        if memory is not None:
            dtype = memory.compute_dtype(torch.device(device))
            pipe = cls.from_pretrained(path, "cpu", None, text_dtype, dit_dtype=dtype, dit_file=dit_file,
                                       dit_2_file=dit_2_file, text_encoder_file=text_encoder_file)
            pipe.set_memory(memory, device, text_device)
            return pipe
        skip = weights_replaced(dit=dit_file, dit_2=dit_2_file, text_encoder=text_encoder_file)
        root = resolve_model(path, skip) if path is not None else default_model_dir()
        manifest = read_manifest(root)
        if manifest is None:
            from kino.convert.wan import detect_layout, load_wan_pipeline

            if root.is_dir() and detect_layout(root) in ("original", "diffusers"):
                return load_wan_pipeline(root, device, text_device, text_dtype or "bfloat16", dit_dtype,
                                         (dit_file, dit_2_file), text_encoder_file)
            raise KinoUserError(f"{root} is not a kino model folder (kino.json is missing) nor a Wan2.1 folder")
        missing = [c for c in ("vae", "dit", "text_encoder") if c not in manifest.get("components", {})]
        if missing:
            raise KinoUserError(f"{root / 'kino.json'} lacks the component(s) {', '.join(missing)}; "
                                "a generation model needs vae, dit and text_encoder")
        vae = load_module(root, "vae", VAEConfig, VideoVAE, device)
        if dit_2_file is not None and "dit_2" not in manifest["components"]:
            raise KinoUserError(f"{root} has one DiT: a second DiT file is for two-expert models (Wan2.2 A14B)")
        dits = [load_folder_dit(root, c, f, device, dit_dtype) if c in manifest["components"] else None
                for c, f in (("dit", dit_file), ("dit_2", dit_2_file))]
        dit, dit_2 = dits  # dit_2: a two-expert model's low-noise DiT (Wan2.2 A14B)
        text = load_component(root, "text_encoder", weights=False,
                              skip=weights_skipped("text_encoder") if text_encoder_file is not None else ())
        text_encoder = load_text_encoder(text.config, text_device if text_device is not None else device, text.folder,
                                         text_dtype, file=text_encoder_file)
        image_encoder = None
        if "image_encoder" in manifest["components"]:
            from kino.models.clip import CLIPImageEncoder

            image = load_component(root, "image_encoder", weights=False)
            image_encoder = CLIPImageEncoder.from_reference(image.config, image.folder,
                                                            device=text_device if text_device is not None else device)
        defaults = GenerationDefaults.from_dict(manifest.get("pipeline", {}))
        pipe = cls(vae, dit, text_encoder, defaults, name=manifest.get("name", root.name), image_encoder=image_encoder,
                   dit_2=dit_2)
        if dit_file is None:
            pipe.dit_sha256 = combined_sha256(manifest["components"]["dit"].get("files", {}))
        return pipe

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
        """Write a model folder: vae/, dit/, text_encoder/ (MiniLM: a reference, its weights ship
        in a package; UMT5: weights and tokenizer too) and kino.json with every file's sha256
        and the generation defaults. A VAE or DiT over `max_shard_bytes` is written in shards
        (kino/models/folder.py)."""
        if self.sharded:
            raise KinoUserError("this pipeline's weights are sharded over processes; save it from a plain load")
        if self.quantized or self.text_quantized:
            raise KinoUserError(f"this pipeline's {'DiT' if self.quantized else 'text encoder'} holds GGUF-quantized "
                                "layers (read from a .gguf file), which a kino model folder does not store: save "
                                "from weights in a float dtype")
        root = Path(path)
        save_component(root / "vae", self.vae.config.to_dict(), self.vae.state_dict(), max_shard_bytes)
        save_component(root / "dit", self.dit.config.to_dict(), self.dit.state_dict(), max_shard_bytes)
        save_text_encoder(self.text_encoder, root / "text_encoder")
        components = {"vae": ("vae", "VideoVAE"), "dit": ("dit", "DiT"),
                      "text_encoder": ("text_encoder", type(self.text_encoder).__name__)}
        if self.dit_2 is not None:
            save_component(root / "dit_2", self.dit_2.config.to_dict(), self.dit_2.state_dict(), max_shard_bytes)
            components["dit_2"] = ("dit_2", "DiT")
        if self.image_encoder is not None:  # a reference config.json beside the weights in clip/
            self.image_encoder.save(root / "image_encoder")
            (root / "image_encoder" / "config.json").write_text(json.dumps(self.image_encoder.reference(), indent=2)
                                                                + "\n")
            components["image_encoder"] = ("image_encoder", type(self.image_encoder).__name__)
        return write_manifest(root, self.name, components, extra={"pipeline": asdict(self.defaults)})

    def set_memory(self, plan: MemoryPlan, device: str | torch.device | None = None,
                   text_device: str | torch.device | None = None, *, shard=None) -> None:
        """Place the models for generation on `device` (default: where they run now) as `plan`
        says (kino/models/memory.py): the DiT's compute dtype, its blocks' storage dtype and
        how many stay in CPU memory, whole-model offload, VAE tiling, sequential guidance.

        Apply once, after any `load_lora` (fusing needs the weights in place). With
        `offload="model"` and a block storage dtype, every block's stored weights live in
        CPU memory. The VAE and text encoder keep their dtypes. The text encoder goes to
        `text_device` when given (and stays there), else it follows the other models.

        `shard`, a 1-D DeviceMesh over the processes of a torchrun job (on `device`'s kind):
        instead of a whole copy each, the processes share the DiT's weights, and the text
        encoder's when it runs on `device`, by FSDP2 (each keeps 1/N of every weight and
        gathers one block's for its forward, as Wan's --dit_fsdp / --t5_fsdp). Every process
        must then run the same generations together (sequence-parallel: each clip's tokens
        split over the same processes). It does not combine with block streaming or offload,
        which keep weights off the device another way.
        """
        if self._streamers or self.sharded:
            raise KinoUserError("this pipeline's memory plan is already set; load it again to change it")
        device = torch.device(device) if device is not None else self._device
        dtype = plan.compute_dtype(device)
        if shard is not None:  # each block cast as it is sharded: weights read in the file's dtype stay mapped
            self._shard(plan, shard, device, text_device, dtype)
        else:
            for dit in self.dits:
                dit.to(dtype=dtype)
            self._place(plan, device, text_device, dtype)
        if plan.vae_tile is not None:
            self.vae.enable_tiling(TileConfig(plan.vae_tile, plan.vae_tile, plan.vae_tile // 4))
        self._device, self.memory = device, plan

    def _place(self, plan: MemoryPlan, device: torch.device, text_device, dtype: torch.dtype) -> None:
        """set_memory without sharding: block streaming, whole-model offload, the encoders."""
        offload = plan.offload == "model"
        home = torch.device("cpu") if offload else device
        for dit in self.dits:
            if plan.streams_blocks:  # before the move: only what stays on the device goes there
                blocks = dit.all_blocks()  # a VACE DiT's VACE blocks first: they run first
                n = len(blocks)
                self._streamers.append(BlockStreamer(blocks, device, dtype, plan.weights,
                                                     n if offload else plan.swap_blocks))
            dit.to(home)  # the blocks' parameters are empty placeholders by now
        self.vae.to(home)
        self._offloaded = {"vae", *("dit", "dit_2")[:len(self.dits)]} if offload else set()
        for name, model in (("text_encoder", getattr(self.text_encoder, "model", None)),
                            ("image_encoder", getattr(self.image_encoder, "model", None))):
            if model is not None:  # the encoders follow --text-device when given
                model.to(text_device if text_device is not None else home)
                if offload and text_device is None:
                    self._offloaded.add(name)

    def _shard(self, plan: MemoryPlan, mesh, device: torch.device, text_device, dtype: torch.dtype) -> None:
        from kino.training.distributed import shard_modules

        if plan.streams_blocks or plan.offload == "model":
            raise KinoUserError("sharding the weights over the processes (--fsdp) does not combine with "
                                "--swap-blocks, --weights-dtype or --offload: use one or the other")
        if self.quantized:
            raise KinoUserError("sharding the weights over the processes (--fsdp) takes float weights, not a "
                                "GGUF-quantized DiT; each process can hold the quantized DiT whole instead")
        if mesh.device_type != device.type:
            raise KinoUserError(f"the processes' mesh is on {mesh.device_type}, the pipeline's device is {device}")
        for dit in self.dits:
            shard_modules(dit, dit.all_blocks(), mesh, cast=dtype)  # the shards move to this process's device
        self.sharded = True
        self.vae.to(device)
        for model in (getattr(self.text_encoder, "model", None), getattr(self.image_encoder, "model", None)):
            if model is None:
                continue
            if model is getattr(self.text_encoder, "model", None) and not self.text_quantized and (
                    text_device is None or torch.device(text_device) == device):
                shard_modules(model, transformer_units(model), mesh)
            else:  # an encoder on another device (--text-device cpu) or GGUF-quantized (held whole), and the
                # (small) CLIP image encoder
                model.to(text_device if text_device is not None else device)

    def compile(self, backend: str = "inductor", mode: str | None = None) -> None:
        """torch.compile each DiT block in place (every expert's), as `parallelize` does for
        training: one graph per block shape, reused across blocks; parameter names, LoRA
        fusing order and memory plans are untouched (apply after them). Faster on a GPU after
        a first, slow call per new clip shape; off by default (on a CPU it costs minutes of
        compiling for ~1.2x)."""
        for dit in self.dits:
            for block in dit.all_blocks():
                block.compile(backend=backend, mode=mode)

    @property
    def takes_image(self) -> bool:
        """A Wan image-to-video model: its DiT reads a mask and image latents beside the noise
        (Wan2.1 I2V / FLF2V with CLIP features too, Wan2.2 I2V-A14B without)."""
        return self.dit.config.in_channels == 2 * self.vae.config.z_dim + self.vae.config.time_stride

    @property
    def takes_vace(self) -> bool:
        """A Wan2.1 VACE model: its DiT reads a context made of a source video, a mask of what
        to generate and reference images (`vace_condition`)."""
        return bool(self.dit.config.vace_layers)

    @property
    def quantized(self) -> bool:
        """Whether a DiT holds GGUF-quantized layers (kino/models/gguf.py)."""
        return any(isinstance(m, GGUFLinear) for dit in self.dits for m in dit.modules())

    @property
    def text_quantized(self) -> bool:
        """Whether the text encoder holds GGUF-quantized layers (`text_encoder_file` a .gguf)."""
        return bool(getattr(self.text_encoder, "quantized", False))

    @property
    def dits(self) -> list[DiT]:
        """The DiT, and a two-expert model's second one."""
        return [self.dit] if self.dit_2 is None else [self.dit, self.dit_2]

    @contextmanager
    def _experts(self):
        """For the sampling loop: nothing for one DiT; for two experts, the `on_switch` that
        (when the memory plan offloads whole models) moves the expert that takes over onto the
        device and the other back to CPU memory, so one 14B expert at a time sits there."""
        if self.dit_2 is None:
            with self.using("dit"):
                yield None
            return
        offload = "dit" in self._offloaded

        def switch(expert: DiT) -> None:
            if offload:
                for dit in self.dits:
                    if dit is not expert:
                        dit.to("cpu")
                expert.to(self._device)

        try:
            yield switch
        finally:
            if offload:
                for dit in self.dits:
                    dit.to("cpu")

    def using(self, component: str):
        """Context in which `component` ("dit", "vae", "text_encoder", "image_encoder") sits on the
        pipeline's device: a no-op unless the memory plan offloads whole models."""
        module = {"dit": self.dit, "dit_2": self.dit_2, "vae": self.vae,
                  "text_encoder": getattr(self.text_encoder, "model", None),
                  "image_encoder": getattr(self.image_encoder, "model", None)}
        return placed(module[component], self._device, component in self._offloaded)

    def _check_fusable(self) -> None:
        if self.sharded:
            raise KinoUserError("fuse LoRAs before sharding the weights over the processes: "
                                "load the pipeline, load_lora, then set_memory(shard=...)")
        if self._streamers:
            raise KinoUserError("fuse LoRAs before setting a memory plan (the DiT's blocks are streamed): "
                                "load the pipeline, load_lora, then set_memory")

    def load_lora(self, path: str | Path, scale: float = 1.0, expert: int = 1) -> None:
        """Fuse a LoRA file into the DiT's weights: W += scale * alpha / rank * up @ down.
        `expert` 2: into a two-expert model's second (low-noise) DiT instead; Wan2.2 LoRAs come
        as a pair, one file for each expert.

        Several LoRAs add up; sampling then costs the same as without. `unload_loras()`
        restores the DiT bit for bit. Besides kino's own files, Wan2.1 LoRAs from other
        trainers load (wan / ComfyUI, musubi-tuner and diffusers layouts, with their alphas
        and bias or norm differences: kino/convert/lora_formats.py). A file in none of these
        layouts, or whose layers do not fit this DiT, raises KinoUserError and changes nothing.
        A LoRA trained on other base
        weights (its recorded base sha256 differs) still fuses when the shapes fit, with a
        warning: adapting a close relative of the base is legitimate but may not work.
        `save_pretrained` afterwards writes the fused (merged) DiT.
        """
        self._check_fusable()
        if expert not in (1, 2) or (expert == 2 and self.dit_2 is None):
            raise KinoUserError(f"{self.name} has {len(self.dits)} DiT(s): no expert {expert} to fuse a LoRA into")
        lora = read_lora(path)
        fuse_lora(self.dits[expert - 1], lora, scale, self._dit_bases[expert - 1])
        if expert == 1 and lora.base_sha256 and self.dit_sha256 and lora.base_sha256 != self.dit_sha256:
            warnings.warn(f"LoRA {lora.path.name} was trained on a DiT with weights sha256 {lora.base_sha256[:12]}... "
                          f"({lora.base}), not this model's ({self.dit_sha256[:12]}...)", stacklevel=2)
        entry = {"file": lora.path.name, "sha256": lora.sha256, "scale": float(scale)}
        self.loras.append(entry if expert == 1 else {**entry, "expert": 2})

    def unload_loras(self) -> None:
        """Undo every `load_lora`: the DiTs' original weights, bit for bit."""
        self._check_fusable()
        for dit, base in zip(self.dits, self._dit_bases):
            unfuse_lora(dit, base)
        self.loras.clear()

    @property
    def device(self) -> torch.device:
        """Where the models run (with model offload they wait in CPU memory between uses)."""
        return self._device

    def check_request(self, frames: int, height: int, width: int) -> None:
        stride = self.vae.config.space_stride * self.dit.config.patch_size[1]
        if frames < 1:
            raise KinoUserError(f"--frames must be at least 1, got {frames}")
        if height % stride or width % stride or height <= 0 or width <= 0:
            raise KinoUserError(f"size {height}x{width} is not allowed: height and width must be positive "
                                f"multiples of {stride}")

    @torch.no_grad()
    def check_prompt(self, prompt: str) -> None:
        """An empty prompt is an error. A Shapes World model (kino's default, named
        `SHAPES_WORLD_NAME`) given a prompt outside the world's caption grammar still generates,
        with a warning saying so."""
        require_prompt(prompt)
        if self.name == SHAPES_WORLD_NAME:
            try:
                parse_caption(prompt)
            except CaptionError:
                warnings.warn(f"the {self.name} model knows only Shapes World captions, such as "
                              f"{EXAMPLE_PROMPT!r} ('a SIZE COLOR SHAPE MOTION [and a ...] on a BACKGROUND background'); "
                              f"{prompt!r} is not one, "
                              "so the clip is generated but will not show it", stacklevel=3)

    def generate(self, prompt: str, *, frames: int | None = None, height: int | None = None,
                 width: int | None = None, steps: int | None = None, guidance: float | None = None,
                 seed: int = 0, negative: str | None = None, sampler: str | None = None,
                 shift: float | None = None, callback: Callable[[int], None] | None = None,
                 conditioning: Conditioning | None = None, image: Tensor | None = None,
                 last_image: Tensor | None = None, source_prompt: str | None = None,
                 guidance_interval: tuple[float, float] | None = None, skip_guidance: float | None = None,
                 skip_blocks: tuple[int, ...] | None = None,
                 skip_interval: tuple[float, float] | None = None, fps: float | None = None,
                 cache_threshold: float | None = None, guidance_2: float | None = None,
                 cfg_star: bool | None = None, zero_steps: int | None = None,
                 vace: VaceCondition | None = None, vace_scale: float | None = None,
                 eta: float | None = None) -> Generation:
        """One clip. Unset options take the model's defaults; the same arguments on the same
        machine give the same clip bit for bit on CPU.

        `conditioning` (see kino/tasks/conditioning.py) must have the latent shape of the
        request; it may hold more latent frames than `frames` needs (a loop's tied frame):
        the decoded clip is trimmed to `frames`. The noise is drawn for the whole latent
        shape from `seed` whatever the conditioning, so an SDEdit at strength 1 is exactly
        text-to-video with the same seed.

        `image` (and `last_image` for FLF2V), (3, H, W) pixels in [-1, 1] of any size: the
        first (and last) frame, for a Wan2.1 image-to-video pipeline (`image_encoder`), which
        needs them; resized to cover the output and center-cropped for the VAE, given to CLIP
        as they are (`image_condition`).

        `source_prompt`, with an edit conditioning: what the input shows; the edit then runs
        FlowEdit from it to `prompt` (see `sample_latents`) instead of SDEdit.

        `guidance_interval` (lo, hi): guide only the steps at solver times lo <= t <= hi (1 is
        noise); the others take the conditional velocity alone, one DiT pass instead of two.
        The model's default interval applies to runs from noise only: a run that starts part way
        (an edit, a refine pass: strength < 1) guides every step unless given an interval here.

        `skip_guidance`, `skip_blocks`, `skip_interval`: skip-layer guidance (see
        `sample_latents`); the model's defaults unless given. `cfg_star`, `zero_steps`: CFG-Zero*
        (`sample_latents`; zero steps only on runs from noise). `fps`: the clip's frame rate
        (for the file; the model's by default). `cache_threshold` > 0: first-block caching
        (kino/models/dit/cache.py), an approximation that skips most of the DiT on steps
        where its first block changes by less than that (relative); the metadata's
        "cache_reused" says on how many of the DiT calls. `guidance_2`: a two-expert model's
        guidance scale on its low-noise expert's steps (`guidance` is the high-noise one's).

        `vace` (a Wan2.1 VACE pipeline, `takes_vace`): the clip's VACE context
        (`vace_condition`); without it the context of nothing given, as Wan does for text to
        video. Its reference frames come in front of the sampled latents and are dropped before
        decoding. `vace_scale`: the weight of the VACE hints (Wan's context_scale; the
        condition's own, 1, by default).
        """
        self.check_prompt(prompt)
        if source_prompt is not None:
            self.check_prompt(source_prompt)
        d = replace(self.defaults, **{k: v for k, v in dict(
            frames=frames, height=height, width=width, steps=steps, guidance=guidance, negative=negative,
            sampler=sampler, shift=shift, guidance_interval=guidance_interval, skip_guidance=skip_guidance,
            skip_blocks=skip_blocks, skip_interval=skip_interval, fps=fps,
            cache_threshold=cache_threshold, guidance_2=guidance_2, cfg_star=cfg_star,
            zero_steps=zero_steps, eta=eta).items() if v is not None})
        partial = d.t_max < 1.0 or (conditioning is not None and conditioning.starts_part_way)
        if partial and guidance_interval is None:
            # the model's interval is for runs from noise; a run that starts part way (edit,
            # refine) has no high-noise steps, and its guidance is what carries the prompt
            d = replace(d, guidance_interval=None)
        if partial and skip_interval is None:
            d = replace(d, skip_interval=None)
        self.check_request(d.frames, d.height, d.width)
        if d.steps < 1:
            raise KinoUserError(f"--steps must be at least 1, got {d.steps}")
        if d.steps > MAX_STEPS:
            raise KinoUserError(f"--steps must be at most {MAX_STEPS}, got {d.steps} (flow-matching samplers "
                                "converge in tens of steps)")
        s = self.vae.config.space_stride
        shape = (1, self.vae.config.z_dim, self.vae.config.latent_frames(d.frames), d.height // s, d.width // s)
        if conditioning is not None:
            if conditioning.shape[:2] != shape[:2] or conditioning.shape[3:] != shape[3:] or \
                    conditioning.shape[2] < shape[2]:
                raise KinoUserError(f"the conditioning's latents {conditioning.shape} do not fit a "
                                    f"{d.frames}x{d.height}x{d.width} clip (latents {shape})")
            shape = conditioning.shape
            conditioning = conditioning.to(self.device)
        image_cond = None
        if self.takes_image:
            if image is None:
                raise KinoUserError(f"{self.name} is a Wan image-to-video model: give the first frame (--image)")
            if conditioning is not None:
                raise KinoUserError("a Wan2.1 image-to-video model takes its image through the DiT, not kino's "
                                    "conditioning (loops, extend, connect, edit)")
            image_cond = self.image_condition(image, d.frames, d.height, d.width, last_image)
        elif image is not None or last_image is not None:
            raise KinoUserError(f"{self.name} is no Wan image-to-video model: Pipeline.generate takes no image "
                                "(kino's own image-to-video is kino.tasks.generate(pipe, prompt, image=...))")
        if (vace is not None or vace_scale is not None) and not self.takes_vace:
            raise KinoUserError(f"{self.name} is no Wan VACE model: it takes no VACE context (nor --vace-scale)")
        if self.takes_vace:
            vace = vace if vace is not None else self.vace_condition(d.frames, d.height, d.width)
            if vace_scale is not None:
                if not math.isfinite(vace_scale):
                    raise KinoUserError(f"--vace-scale must be a finite number, got {vace_scale}")
                vace = replace(vace, scale=float(vace_scale))
            T = self.vae.config.latent_frames(d.frames)
            if tuple(vace.context.shape[2:]) != (vace.references + T, *shape[3:]):
                raise KinoUserError(f"the VACE context {tuple(vace.context.shape)} does not fit a "
                                    f"{d.frames}x{d.height}x{d.width} clip with {vace.references} reference(s)")
            if vace.references and conditioning is not None:
                raise KinoUserError("reference images do not combine with kino's conditioning (edit, given frames)")
            shape = (1, shape[1], vace.references + shape[2], *shape[3:])
            vace = vace.to(self.device)
        # noise from a CPU generator: the same seed gives the same clip on any device
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(shape, generator=generator).to(self.device)
        with self.using("text_encoder"):
            text, mask = self.text_encoder.encode([prompt, d.negative] + ([source_prompt] if source_prompt else []))
        text, mask = text.to(self.device), mask.to(self.device)
        # one cache per DiT: an expert never reuses the other's residuals
        caches = [FirstBlockCache(d.cache_threshold) for _ in self.dits] if d.cache_threshold > 0 else None
        with self._experts() as switch, _installed(self.dits, caches):
            latents = sample_latents(self.dit, text[:1], mask[:1], text[1:2], mask[1:2], noise, steps=d.steps,
                                     guidance=d.guidance, sampler=d.sampler, shift=d.shift, callback=callback,
                                     conditioning=conditioning, t_max=d.t_max, t_min=d.t_min,
                                     integer_dit_time=d.integer_dit_time, cfg_batch=self.memory.cfg == "batch",
                                     image=image_cond, generator=generator,
                                     source=(text[2:], mask[2:]) if source_prompt else None,
                                     guidance_interval=d.guidance_interval, skip_guidance=d.skip_guidance,
                                     skip_blocks=d.skip_blocks, skip_interval=d.skip_interval, dit_2=self.dit_2,
                                     boundary=d.boundary, guidance_2=d.guidance_2, on_switch=switch,
                                     cfg_star=d.cfg_star, zero_steps=d.zero_steps if not partial else 0, eta=d.eta,
                                     vace=vace)
        if vace is not None and vace.references:  # the reference images' frames are not the clip's
            latents = latents[:, :, vace.references:]
        meta = {"prompt": prompt, **{k: v for k, v in asdict(d).items() if k != "fps"}, "seed": seed,
                "model": self.name, "kino_version": __version__, "generator": "kino (AI-generated)"}
        if source_prompt:
            meta["source_prompt"] = source_prompt
        if vace is not None:
            meta.update(vace_scale=vace.scale, vace_references=vace.references)
        if caches is not None:
            meta["cache_reused"] = f"{sum(c.reused for c in caches)}/{sum(c.calls for c in caches)}"
        if self.loras:
            meta["lora"] = json.dumps(self.loras)
        loop = conditioning is not None and conditioning.loop
        video = self.decode(latents, d.frames, loop=loop, image_first=loop and bool(conditioning.clean[0, 0]))
        return Generation(video, d.fps,
                          {k: "" if v is None else str(v) for k, v in meta.items()},
                          latents=latents, conditioning=conditioning)

    @torch.no_grad()
    def image_condition(self, image: Tensor, frames: int, height: int, width: int,
                        last_image: Tensor | None = None) -> ImageCondition:
        """Wan2.1's I2V (and, with `last_image`, FLF2V) conditioning of a frames x height x width
        clip from (3, H, W) images in [-1, 1]: CLIP features of the images as given, and the
        VAE latents (the posterior mean, normalised) of the clip holding the images, resized to
        cover height x width and center-cropped, as its first (and last) frame, black between."""
        if not self.takes_image:
            raise KinoUserError(f"{self.name} is not a Wan image-to-video model")
        images = [image] + ([] if last_image is None else [last_image])
        for name, x in zip(("image", "last image"), images):
            if x.ndim != 3 or x.shape[0] != 3:
                raise KinoUserError(f"the {name} must be (3, H, W) pixels in [-1, 1]; got shape {tuple(x.shape)}")
        pos_len = self.dit.config.img_pos_len
        if (last_image is not None) != (pos_len is not None):
            raise KinoUserError("a Wan2.1 FLF2V model takes a first and a last frame (--image, --last-image)"
                                if pos_len is not None else "only a Wan2.1 FLF2V model takes a last frame")
        stride = self.vae.config.time_stride
        if frames % stride != 1 or (last_image is not None and frames < stride + 1):
            raise KinoUserError(f"a Wan2.1 image-to-video clip has {stride}k + 1 frames"
                                f"{' (k >= 1 with a last frame)' if last_image is not None else ''}; got {frames}")
        features = None  # Wan2.2 I2V-A14B: no CLIP
        if self.image_encoder is not None:
            with self.using("image_encoder"):
                features = torch.cat([self.image_encoder.encode(x[None].float()) for x in images], dim=1)  # (1, N, D)
        pixels = [fit_video(x[:, None].float(), height, width) for x in images]  # each (3, 1, H, W)
        video = torch.zeros(1, 3, frames, height, width)
        video[0, :, :1] = pixels[0]
        if last_image is not None:
            video[0, :, -1:] = pixels[1]
        with self.using("vae"):
            mean, _ = self.vae.encode(video.to(self.device))
            latents = self.vae.normalize(mean)  # (1, C, T, h, w)
        given = [0] if last_image is None else [0, frames - 1]
        mask = frame_mask(frames, given, stride)[None, :, :, None, None]  # (1, stride, T, 1, 1)
        mask = mask.expand(-1, -1, -1, *latents.shape[3:]).to(latents)
        return ImageCondition(torch.cat([mask, latents], dim=1),
                              None if features is None else features.to(self.device))

    @torch.no_grad()
    def vace_condition(self, frames: int, height: int, width: int, video: Tensor | None = None,
                       mask: Tensor | None = None,
                       references: list[Tensor] | tuple[Tensor, ...] = ()) -> VaceCondition:
        """Wan2.1 VACE's context for a frames x height x width clip (Wan's vace.py, which
        diffusers' WanVACEPipeline follows):

        `video` (3, frames, height, width) in [-1, 1]: the source (None: zeros, i.e. gray);
        `mask` (frames, height, width) in [0, 1], 1 where to generate (None: generate
        everything). The kept pixels (mask < 0.5) and the pixels to regenerate are encoded
        apart (VAE mean, normalised) into 32 channels; the mask is folded into 64 (`space_stride`
        squared) channels per latent pixel and taken nearest in time onto the latent frames
        (`fold_vace_mask`). `references`, (3, H, W) images in [-1, 1]: each scaled to fit inside the
        frame (aspect kept, bilinear) and centred on white, encoded as one frame, in front of
        the clip's latents in the order given (Wan's; diffusers reverses several), with zero
        regenerate-latents and mask. Frame counts not of the form 4k + 1 are padded with
        frames to generate (and the output trimmed by the caller)."""
        if not self.takes_vace:
            raise KinoUserError(f"{self.name} is not a Wan VACE model")
        self.check_request(frames, height, width)
        s = self.vae.config.space_stride
        full = self.vae.config.pixel_frames(self.vae.config.latent_frames(frames))  # 4k + 1
        if video is None:
            video = torch.zeros(3, frames, height, width)
        if mask is None:
            mask = torch.ones(frames, height, width)
        if tuple(video.shape) != (3, frames, height, width) or tuple(mask.shape) != (frames, height, width):
            raise KinoUserError(f"a VACE source must be (3, {frames}, {height}, {width}) pixels and its mask "
                                f"({frames}, {height}, {width}); got {tuple(video.shape)} and {tuple(mask.shape)}")
        for i, image in enumerate(references):  # checked before any encoding
            if image.ndim != 3 or image.shape[0] != 3:
                raise KinoUserError(f"reference image {i + 1} must be (3, H, W) pixels in [-1, 1]; "
                                    f"got shape {tuple(image.shape)}")
        video, mask = video.float().cpu(), mask.float().cpu().clamp(0, 1)
        if full > frames:  # frames to generate up to 4k + 1
            video = torch.cat([video, video.new_zeros(3, full - frames, height, width)], dim=1)
            mask = torch.cat([mask, mask.new_ones(full - frames, height, width)])
        binary = (mask > 0.5).float()  # the pixels' split; the folded mask keeps its values (as Wan)
        parts = []
        with self.using("vae"):
            for pixels in (video * (1 - binary), video * binary):
                mean, _ = self.vae.encode(pixels[None].to(self.device))
                parts.append(self.vae.normalize(mean))  # (1, Z, T, h, w)
            latents = torch.cat(parts, dim=1)  # (1, 2Z, T, h, w)
            refs = []
            for image in references:
                mean, _ = self.vae.encode(place_on_canvas(image.float().cpu(), height, width)[None, :, None]
                                          .to(self.device))
                z = self.vae.normalize(mean)  # (1, Z, 1, h, w)
                refs.append(torch.cat([z, torch.zeros_like(z)], dim=1))
        folded = fold_vace_mask(mask, s, latents.shape[2])[None]  # (1, s^2, T, h, w)
        h, w = folded.shape[3:]
        folded = torch.cat([folded.new_zeros(1, s * s, len(refs), h, w), folded], dim=2).to(latents)
        context = torch.cat([torch.cat([*refs, latents], dim=2), folded], dim=1)  # (1, 2Z + s^2, R + T, h, w)
        return VaceCondition(context, len(refs))

    @torch.no_grad()
    def decode(self, latents: Tensor, frames: int, loop: bool = False, image_first: bool = False) -> Tensor:
        """Normalised latents (1, C, T, h, w) -> `frames` frames as uint8 (F, H, W, 3): the
        first ones, or with `loop` the loop's, its latents decoded as a cycle (`loop_cycle`,
        `loop_frames` in kino/tasks/conditioning.py; `image_first`: it starts at a given image)."""
        z = loop_cycle(latents) if loop else latents
        with self.using("vae"):
            pixels = self.vae.decode(self.vae.denormalize(z.to(self.device)))[0]  # (3, F', H, W)
        pixels = loop_frames(pixels, frames, image_first) if loop else pixels[:, :frames]  # (3, F, H, W)
        return pixels.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).cpu()
