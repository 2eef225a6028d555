"""Training the diffusion transformer on Shapes World: the DiT task for the generic trainer,
the run that builds the latent cache, trains and exports, and its config.

Flow matching (kino/diffusion/flow.py): x_t = (1 - t) x_0 + t eps, the model predicts the
velocity eps - x_0 from (x_t, 1000 t, text). Data come from a latent cache (kino/data/
latent_cache.py): the VAE and the text encoder never run during training. Each step draws
one bucket (a frame count and size), so a batch has one shape and needs no padding.

One model serves every task (kino/tasks/conditioning.py) because each clip is trained with
a conditioning pattern drawn from `ConditioningMix`: some latent frames given clean
(t = 0, left out of the loss) or, for loops, the first latent frame tied to the last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from kino.data.datasets import VideoDatasetConfig
from kino.data.latent_cache import (LOOP_RENDER, Bucket, LatentCache, bucket_name, build_world_cache,
                                    default_buckets, parse_bucket, same_latents)
from kino.diffusion.flow import (interpolate, logit_normal, sampling_timesteps, shift_for_tokens, shift_timesteps,
                                 velocity_target)
from kino.diffusion.samplers import euler, guided
from kino.errors import KinoUserError
from kino.models.dit import DIT_SIZES, DiT, DiTConfig
from kino.models.dit.grow import can_grow, config_diff, grow
from kino.models.folder import (default_model_dir, load_component, read_manifest, save_component, sha256_file,
                                weights_sha256, write_manifest)
from kino.models.hub import resolve_model
from kino.models.lora import LoRAConfig, apply_lora, save_lora, write_record
from kino.tasks.conditioning import LOOP_TIE, to_model_range
from kino.training.config import TrainConfig
from kino.training.binding import BindingConfig, binding_loss, pick_swaps
from kino.training.decoder_loss import DecoderLossConfig, clean_estimate, decoded_target, decoder_loss, pick_rows
from kino.training.grounding import CrossAttentionRecorder, GroundingConfig, grounding_loss, object_cover, phrase_masks
from kino.world.generator import SPLITS, render, scene_at

TIME_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)  # noise levels the loss is also logged for
SAMPLE_STEPS = 20  # Euler steps of the preview videos logged to TensorBoard
SAMPLE_GUIDANCE = 4.0
# per-clip tensors a cache may hold beside the latents: Wan I2V / FLF2V images, Wan2.1 VACE contexts
CONDITION_KEYS = ("image_latents", "image_features", "vace_latents", "vace_kept")
SAMPLE_BUCKET = (17, 64, 64)  # the preview's shape when the run trains it (else its longest bucket)


# ---------------------------------------------------------------------------- config


@dataclass
class CacheConfig:
    """The latent cache: built on first use in `dir` (resumably), reused afterwards."""

    dir: str = "runs/cache/world"
    clips_per_bucket: int = 512
    split: str = "train"
    seed: int = 0
    buckets: list[str] = field(default_factory=lambda: [bucket_name(b) for b in default_buckets()])
    text_max_length: int = 32  # text tokens per caption (captions are 10-25 MiniLM tokens)
    # MiniLM encodes each clause of a caption on its own (one per object, and the background;
    # `MiniLMEncoder(clauses=True)`); the exported pipeline's text encoder does the same.
    text_clauses: bool = False
    # Clips that really loop for the loop pattern (`build_world_cache(motion="loop")`): every
    # bucket of at least three latent frames, same split and seed. None: the loop pattern ties
    # the ends of ordinary clips.
    loop_dir: str | None = None
    loop_clips_per_bucket: int = 256

    def __post_init__(self):
        if self.loop_clips_per_bucket < 1:
            raise KinoUserError(f"cache.loop_clips_per_bucket must be >= 1, got {self.loop_clips_per_bucket}")
        if self.split not in SPLITS:
            raise KinoUserError(f"cache.split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.clips_per_bucket < 1:
            raise KinoUserError(f"cache.clips_per_bucket must be >= 1, got {self.clips_per_bucket}")
        if not self.buckets:
            raise KinoUserError("cache.buckets must list at least one FRAMESxHEIGHTxWIDTH bucket")
        for b in self.buckets:
            parse_bucket(b)

    def bucket_list(self) -> list[Bucket]:
        return [parse_bucket(b) for b in self.buckets]


@dataclass
class DiTDataConfig:
    # Rows per step; with batch_tokens, the smallest step, and every step's rows a multiple of
    # it (so it must split over the data-parallel ranks and grad_accum micro-batches).
    batch_size: int = 8
    # A token budget per step: each bucket's rows are the largest multiple of batch_size whose
    # transformer tokens fit in it (at least batch_size), so short clips and images come in
    # bigger batches and every step costs about the same. None: batch_size rows for every bucket.
    batch_tokens: int | None = None
    # P(bucket) ~ tokens^-bucket_weight_power. 0: every bucket as often (most compute on the
    # longest clips); 1: every bucket the same compute (images drawn ~9x as often as 33-frame
    # clips). 0.5: compute per bucket ~ sqrt(tokens), see configs/dit_small.toml.
    bucket_weight_power: float = 0.5
    # A regular expression: only cached clips whose caption it matches (re.search) are drawn,
    # e.g. "moving (left|right)" to train one skill harder; buckets with no such clip are left
    # out. None: every clip. Loops still come from the whole loop cache.
    caption_filter: str | None = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise KinoUserError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise KinoUserError(f"data.batch_tokens must be >= 1 (or unset), got {self.batch_tokens}")
        if not math.isfinite(self.bucket_weight_power):
            raise KinoUserError("data.bucket_weight_power must be a number")
        if self.caption_filter is not None:
            try:
                re.compile(self.caption_filter)
            except re.error as e:
                raise KinoUserError(f"data.caption_filter {self.caption_filter!r} is not a regular expression: "
                                    f"{e}") from None


@dataclass
class FlowConfig:
    logit_mean: float = 0.0  # t = sigmoid(N(logit_mean, logit_std)) (SD3's logit-normal)
    logit_std: float = 1.0
    caption_dropout: float = 0.1  # share of clips trained on the empty prompt (for guidance)
    # Warp each bucket's t with shift_for_tokens (as the sampler may): longer clips spend
    # more time at high noise. Off by default: Shapes World sequences are short (16-216 tokens).
    shift_by_tokens: bool = False
    # Train on flow times in [t_min, t_max] only (t drawn as above, then mapped linearly into
    # the range): one expert of a two-expert model (Wan2.2 A14B) sees only its own noise levels.
    # With `expert` set and these at 0 and 1, the expert's range comes from init_from's boundary.
    t_min: float = 0.0
    t_max: float = 1.0

    def __post_init__(self):
        if not self.logit_std > 0:
            raise KinoUserError(f"flow.logit_std must be > 0, got {self.logit_std}")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise KinoUserError(f"flow.t_min and flow.t_max need 0 <= t_min < t_max <= 1, got {self.t_min}, "
                                f"{self.t_max}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise KinoUserError(f"flow.caption_dropout must be in [0, 1), got {self.caption_dropout}")


PATTERNS = ("none", "first", "first_k", "last_k", "first_last", "loop")


@dataclass
class ConditioningMix:
    """P(pattern) for each training clip; the six must sum to 1. Clean latent frames get
    t = 0 and no loss; the rest are noised and trained as usual.

    - none: text-to-video, nothing given
    - first: latent frame 0 clean (image-to-video)
    - first_k: the first k clean, k uniform in 1..T-1 (extend forward, connect's A alone)
    - last_k: the last k clean, k uniform in 1..T-1 (extend backward)
    - first_last: the first a and last b clean, a uniform in 1..T-2, then b in 1..T-1-a (connect)
    - loop: the last latent frame replaced by latent frame 1 (same clean latent, same noise,
      same t), which is what sampling a loop shows the model (kino/tasks/conditioning.py: the
      last latent frame tied to frame 1, period 4 (T - 2) pixel frames); latent frame 0 is
      clean for half of them (a loop through a given image)

    A pattern that does not fit a clip falls back to none: images (T = 1) are always
    text-to-image; first_last and loop need T >= 3 (one frame to generate between).
    """

    none: float = 0.6
    first: float = 0.15
    first_k: float = 0.05
    last_k: float = 0.1
    first_last: float = 0.05
    loop: float = 0.05

    def __post_init__(self):
        probs = self.probabilities()
        if any(not (math.isfinite(p) and p >= 0) for p in probs):
            raise KinoUserError(f"conditioning probabilities must be >= 0; got {dict(zip(PATTERNS, probs))}")
        if abs(sum(probs) - 1.0) > 1e-6:
            raise KinoUserError(f"conditioning probabilities ({', '.join(PATTERNS)}) must sum to 1; "
                                f"they sum to {sum(probs):g}")

    def probabilities(self) -> list[float]:
        return [getattr(self, name) for name in PATTERNS]


@dataclass
class ValidationConfig:
    """`[validation]`: held-out clips the trainer scores every `train.validate_every` steps
    with fixed noise at fixed flow times (text-to-video, nothing given), so that the curve
    shows learning without the training loss's noise from random times and batches."""

    # A latent cache of held-out clips (same VAE and text encoder as the training cache; for a
    # video dataset: `kino preprocess` of held-out videos). None: Shapes World's `eval` split,
    # encoded on first use beside the training cache, in cache.dir + "-val".
    dir: str | None = None
    clips_per_bucket: int = 16  # the first clips of each training bucket the cache has
    batch_size: int = 8  # rows per forward; a multiple of the data-parallel size
    times: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    seed: int = 0

    def __post_init__(self):
        if self.clips_per_bucket < 1 or self.batch_size < 1:
            raise KinoUserError("validation.clips_per_bucket and validation.batch_size must be >= 1")
        if not self.times or not all(0.0 < t <= 1.0 for t in self.times):
            raise KinoUserError(f"validation.times must be flow times in (0, 1], got {self.times}")


@dataclass
class DiTRunConfig:
    """`kino train dit --config FILE`: a TOML/JSON file with these sections."""

    # A named size in DIT_SIZES (its text_dim is set from the text encoder). Unset: the size of
    # init_from's DiT as it is (fine-tuning, LoRA), or "small" for a fresh model.
    model: str | None = None
    # VAE model folder; none: init_from's VAE when that folder has one, else the shipped default
    vae: str | None = None
    # Start from this model folder's DiT ("default": the shipped model; sha256-checked):
    # full fine-tuning, or with a [lora] section the frozen base the LoRA adapts. none: random init.
    init_from: str | None = None
    # The base DiT's weights from this file instead of init_from's (which still gives the DiT's
    # config, the VAE and the text encoder): a GGUF file (kino/models/gguf.py; its blocks stay
    # quantized, so only a [lora] trains on it, as QLoRA does) or a safetensors file.
    init_dit_file: str | None = None
    # init_from's UMT5 text encoder's weights from this file instead (for `kino preprocess` and
    # any caption encoding here): a GGUF file (kept quantized: UMT5-XXL encodes in fp32 within
    # 5.4 GiB as Q8_0, against 22.7 GB of fp32 weights) or a safetensors file; `--text-encoder
    # FILE` at generation. init_from's folder then gives only the tokenizer.
    init_text_encoder_file: str | None = None
    lora: LoRAConfig | None = None  # a [lora] section trains only a LoRA of the init_from DiT
    # A two-expert init_from (Wan2.2 A14B): which DiT trains, 1 (high-noise, `dit`) or 2
    # (low-noise, `dit_2`), on the flow times of its side of the model's boundary (flow.t_min/max
    # override). Required there; on a one-DiT init_from only with `boundary`.
    expert: int | None = None
    # Grow a one-DiT init_from into two experts split at this flow time (Wan2.2's layout): the
    # run trains `expert` from init_from's DiT on its side of the boundary, and the export holds
    # it beside init_from's DiT, untouched, on the other side.
    boundary: float | None = None
    # A real video dataset (kino/data/datasets.py), encoded into cache.dir by `kino preprocess`
    # (its buckets replace cache.buckets). None: Shapes World, encoded on first use.
    dataset: VideoDatasetConfig | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    data: DiTDataConfig = field(default_factory=DiTDataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    conditioning: ConditioningMix = field(default_factory=ConditioningMix)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    # An experiment: a loss that ties each object's words to its pixels (kino/training/grounding.py)
    grounding: GroundingConfig = field(default_factory=GroundingConfig)
    # The DiT's clean-latent estimate at low noise judged in pixels through the frozen VAE
    # decoder (kino/training/decoder_loss.py; the shipped DiT's stage 16 trained with it)
    decoder_loss: DecoderLossConfig = field(default_factory=DecoderLossConfig)
    # An experiment: the caption with the objects' attributes exchanged must explain a
    # two-object clip worse than the true one (kino/training/binding.py)
    binding: BindingConfig = field(default_factory=BindingConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/dit"))

    def __post_init__(self):
        if self.model is not None and self.model not in DIT_SIZES:
            raise KinoUserError(f"unknown DiT size {self.model!r}: allowed {', '.join(DIT_SIZES)}")
        if self.expert not in (None, 1, 2):
            raise KinoUserError(f"expert must be 1 (high-noise) or 2 (low-noise), got {self.expert}")
        if self.boundary is not None and (self.expert is None or not 0.0 < self.boundary < 1.0):
            raise KinoUserError(f"boundary (where a one-DiT init_from splits into two experts) must be in (0, 1) and "
                                f"needs `expert` (1: train the high-noise side, 2: the low-noise side); got boundary "
                                f"{self.boundary}, expert {self.expert}")
        if self.boundary is not None and self.lora is not None:
            raise KinoUserError("boundary grows a two-expert model by training one expert in full; a [lora] trains "
                                "an adapter of one DiT: remove one of them")
        if self.dataset is not None and self.cache.loop_dir is not None:
            raise KinoUserError("cache.loop_dir renders Shapes World loops: it cannot go with a [dataset] (a video "
                                "dataset has no loops to render); remove one of them")
        if self.dataset is not None and self.train.validate_every and self.validation.dir is None:
            raise KinoUserError("train.validate_every with a [dataset] needs validation.dir: a latent cache of "
                                "held-out videos (`kino preprocess` of another dataset)")
        if self.init_dit_file is not None and self.init_from is None:
            raise KinoUserError("init_dit_file needs init_from = \"MODEL_DIR\": the folder whose DiT config, VAE "
                                "and text encoder go with those weights")
        if self.init_dit_file is not None and str(self.init_dit_file).endswith(".gguf") and self.lora is None:
            raise KinoUserError(f"init_dit_file {self.init_dit_file} is GGUF-quantized: its weights cannot train; "
                                "add a [lora] section to train a LoRA on it")
        if self.init_text_encoder_file is not None and self.init_from is None:
            raise KinoUserError("init_text_encoder_file needs init_from = \"MODEL_DIR\": the Wan model whose UMT5 "
                                "text encoder (and tokenizer) it stands in for")
        if self.grounding.weight and (self.dataset is not None or self.train.parallel.sequence_parallel > 1):
            raise KinoUserError("grounding needs Shapes World's scenes (no [dataset]) and whole clips on each "
                                "process (train.parallel.sequence_parallel = 1)")
        if self.binding.weight and (self.dataset is not None or self.train.parallel.sequence_parallel > 1):
            raise KinoUserError("binding needs Shapes World's captions (no [dataset]) and whole clips on each "
                                "process (train.parallel.sequence_parallel = 1)")
        if self.decoder_loss.weight and self.train.parallel.sequence_parallel > 1:
            raise KinoUserError("decoder_loss decodes whole clips: it needs train.parallel.sequence_parallel = 1")
        if self.decoder_loss.weight and self.decoder_loss.target == "frames" and self.dataset is not None:
            raise KinoUserError("decoder_loss.target = \"frames\" renders Shapes World scenes: with a [dataset] "
                                "use target = \"decoded\"")
        if self.lora is not None and self.init_from is None:
            raise KinoUserError("a [lora] section needs init_from = \"MODEL_DIR\" (or \"default\"): the model "
                                "whose DiT the LoRA adapts")


def model_folder(init_from: str) -> Path:
    """The folder an `init_from` value names ("default": the model shipped with kino)."""
    return default_model_dir() if init_from == "default" else resolve_model(init_from)


def init_dit(init_from: str) -> tuple[Path, DiTConfig]:
    """The folder `init_from` names and its DiT's config (configs only: cheap)."""
    folder = model_folder(init_from)
    manifest = read_manifest(folder) if folder.is_dir() else None
    if not folder.is_dir() or (manifest is not None and "dit" not in manifest.get("components", {})):
        raise KinoUserError(f"init_from = {init_from!r}: {folder} is not a model folder with a DiT "
                            "(a `kino train dit` output, or a folder whose kino.json lists a dit component)")
    return folder, DiTConfig.from_dict(load_component(folder, "dit", weights=False).config)


def target_dit_config(config: DiTRunConfig, text_dim: int) -> DiTConfig:
    """The DiT a run trains: the size `model` names with the text encoder's width, or, with
    `model` unset, init_from's DiT as it is (a fresh run without init_from: "small")."""
    if config.model is not None or config.init_from is None:
        return dataclasses.replace(DIT_SIZES[config.model or "small"], text_dim=text_dim)
    _, found = init_dit(config.init_from)
    if found.text_dim != text_dim:
        raise KinoUserError(f"init_from {config.init_from}'s DiT takes {found.text_dim}-d text features; the "
                            f"text encoder gives {text_dim}-d ones")
    return found


def size_label(config: DiTRunConfig) -> str:
    """How messages name the DiT size of a run."""
    return repr(config.model) if config.model is not None else ("init_from's" if config.init_from else "'small'")


def check_init_from(init_from: str, dit_config: DiTConfig, size: str) -> Path:
    """The folder `init_from` names, once checked to hold a DiT of `dit_config` (the size
    `model` names, with the text encoder's width) or one that grows into it (an
    absolute-position layer, more blocks, finer patches: kino/models/dit/grow.py). Cheap (configs
    only), so a run checks it before spending time on the latent cache."""
    folder, found = init_dit(init_from)
    if not can_grow(found, dit_config):
        diff = {k: has for k, (has, _) in config_diff(found, dit_config).items()}
        raise KinoUserError(f"init_from {init_from} holds a DiT that differs from model = {size} with "
                            f"{dit_config.text_dim}-d text features: it has {diff}; set model to its size")
    return folder


# ---------------------------------------------------------------------------- timesteps


def frame_times(generator: torch.Generator, batch: int, frames: int, flow: FlowConfig, shift: float = 1.0,
                clean: Tensor | None = None, t_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Per-frame flow times (B, T): one logit-normal t in (0, 1) per clip on every latent
    frame (mapped linearly into `t_range`), and t = 0 on the `clean` (B, T) frames of a
    conditioning pattern.

    The one place a batch's noise levels are made.
    """
    t = logit_normal((batch,), flow.logit_mean, flow.logit_std, generator=generator)  # (B,)
    if shift != 1.0:
        t = shift_timesteps(t, shift)
    if t_range != (0.0, 1.0):
        t = t_range[0] + (t_range[1] - t_range[0]) * t
    t = t[:, None].expand(batch, frames).contiguous()  # (B, T)
    return t if clean is None else t.masked_fill(clean, 0.0)


def draw_patterns(generator: torch.Generator, mix: ConditioningMix, batch: int, frames: int
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Pattern index into PATTERNS (B,), clean latent frames (B, T) bool and loop ties (B,)
    bool for a batch of clips with `frames` latent frames (see ConditioningMix)."""
    patterns = torch.multinomial(torch.tensor(mix.probabilities(), dtype=torch.float64), batch, replacement=True,
                                 generator=generator)  # (B,)
    clean = torch.zeros(batch, frames, dtype=torch.bool)
    tie = torch.zeros(batch, dtype=torch.bool)

    def uniform(lo: int, hi: int) -> int:  # lo..hi inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=generator))

    for i in range(batch):
        name = PATTERNS[int(patterns[i])]
        fits = frames >= (3 if name in ("first_last", "loop") else 2)
        if not fits:
            patterns[i] = PATTERNS.index("none")
        elif name == "first":
            clean[i, 0] = True
        elif name == "first_k":
            clean[i, : uniform(1, frames - 1)] = True
        elif name == "last_k":
            clean[i, frames - uniform(1, frames - 1) :] = True
        elif name == "first_last":
            a = uniform(1, frames - 2)
            clean[i, :a] = True
            clean[i, frames - uniform(1, frames - 1 - a) :] = True
        elif name == "loop":
            tie[i] = True
            clean[i, 0] = uniform(0, 1) == 1
    return patterns, clean, tie


def time_bin_probability(lo: float, hi: float, flow: FlowConfig, shift: float = 1.0,
                         t_range: tuple[float, float] = (0.0, 1.0)) -> float:
    """P(lo <= t < hi) for one clip's t as `frame_times` draws it (into `t_range`)."""
    a, b = t_range

    def cdf(t: float) -> float:
        t = (t - a) / (b - a)  # back to the draw before the range's linear map
        if t <= 0.0:
            return 0.0
        if t >= 1.0:
            return 1.0
        u = t / (shift - (shift - 1.0) * t)  # undo the shift
        z = (math.log(u / (1.0 - u)) - flow.logit_mean) / flow.logit_std
        return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))

    return cdf(hi) - cdf(lo)


def bucket_batch_size(tokens: int, data: DiTDataConfig) -> int:
    """Rows of a step drawn from a bucket of `tokens` transformer tokens per clip (see
    DiTDataConfig.batch_tokens)."""
    if data.batch_tokens is None:
        return data.batch_size
    return data.batch_size * max(1, data.batch_tokens // (data.batch_size * tokens))


def bucket_tokens(latent: tuple[int, ...], patch: tuple[int, int, int]) -> int:
    """Transformer tokens of a clip with latents (C, T, h, w)."""
    return math.prod(n // p for n, p in zip(latent[1:], patch))


# ---------------------------------------------------------------------------- the task


class DiTTask:
    """Flow matching on cached latents, each clip with a conditioning pattern (text-to-video,
    given frames, loops: `ConditioningMix`). `vae` (optional) decodes the preview videos of
    `samples`; without it no samples are logged."""

    def __init__(self, config: DiTRunConfig, cache: LatentCache, vae: nn.Module | None = None,
                 loop_cache: LatentCache | None = None, val_cache: LatentCache | None = None, tokenizer=None,
                 text_encoder=None):
        self.config = config
        self.tokenizer = tokenizer  # the text encoder's: the grounding loss finds each phrase's tokens
        self.text_encoder = text_encoder  # the cache's: the binding loss encodes swapped captions
        if config.binding.weight and (text_encoder is None or text_encoder.max_length != cache.text_length):
            raise KinoUserError("binding needs the text encoder that encoded the cache's captions (it encodes "
                                "their swapped forms)")
        if config.grounding.weight and (tokenizer is None or not cache.scene_indices(cache.buckets[0])):
            raise KinoUserError("grounding needs a Shapes World latent cache (its scene indices) and the text "
                                "encoder's tokenizer")
        dec = config.decoder_loss
        if dec.weight and vae is None:
            raise KinoUserError("decoder_loss needs the VAE whose latents the cache holds")
        if dec.weight and dec.target == "frames" and not cache.scene_indices(cache.buckets[0]):
            raise KinoUserError("decoder_loss.target = \"frames\" needs a Shapes World latent cache (its scene "
                                "indices); use target = \"decoded\" with another cache")
        self.cache = cache
        self.val_cache = val_cache
        if val_cache is not None and (not same_latents(val_cache.meta["vae"], cache.meta["vae"]) or
                                      val_cache.meta["text_encoder"] != cache.meta["text_encoder"]):
            raise KinoUserError(f"the validation cache {val_cache.root} was encoded by another VAE or text encoder "
                                f"than {cache.root}")
        self.vae = vae
        self.loop_cache = loop_cache
        self.dit_config = target_dit_config(config, cache.text_dim)
        self.component = dit_component(config)  # "dit", or a two-expert model's "dit_2"
        self.t_range = training_times(config)
        # a Wan image-to-video model: the cache holds each clip's image conditioning (preprocess)
        record = getattr(cache, "meta", {}).get("image_condition")  # None: on-the-fly latents have none
        self.vace = (record or {}).get("kind") == "wan-vace"  # a Wan2.1 VACE model's contexts
        self.image_condition = record is not None and not self.vace
        self.last_frame = (record or {}).get("kind") == "wan-first-last-frame"  # FLF2V
        # kino's clean-frame patterns are its own way to condition; Wan's I2V and VACE models have Wan's
        self.mix = ConditioningMix(1.0, 0.0, 0.0, 0.0, 0.0, 0.0) if record is not None else config.conditioning
        z = cache.latent_channels
        if bool(self.dit_config.vace_layers) != self.vace:
            raise KinoUserError(f"the cache holds {'' if self.vace else 'no '}VACE contexts; the DiT "
                                f"{size_label(config)} is {'a' if self.dit_config.vace_layers else 'no'} VACE DiT: it "
                                "needs a cache made by `kino preprocess` with this init_from")
        if self.dit_config.in_channels not in (z, 2 * z + 4) or \
                (self.dit_config.in_channels != z) != self.image_condition:
            need = ("a cache made by `kino preprocess` with this init_from (its image conditioning)"
                    if self.dit_config.in_channels != z else f"{self.dit_config.in_channels}-channel latents")
            raise KinoUserError(f"the cache holds {z}-channel latents{' with' if self.image_condition else ' without'}"
                                f" image conditioning; the DiT {size_label(config)} takes "
                                f"{self.dit_config.in_channels} channels: it needs {need}")
        wanted = config.cache.bucket_list() if config.dataset is None else list(cache.buckets)
        missing = [bucket_name(b) for b in wanted if b not in cache.buckets]
        if missing:
            raise KinoUserError(f"the latent cache {cache.root} has no bucket {', '.join(missing)}")
        # per bucket, the cache rows that may be drawn (None: all of them)
        self.rows: dict[Bucket, np.ndarray | None] = {b: None for b in wanted}
        if config.data.caption_filter is not None:
            pattern = re.compile(config.data.caption_filter)
            self.rows = {b: np.array([i for i, c in enumerate(cache.captions(b)) if pattern.search(c)], dtype=np.int64)
                         for b in wanted}
            wanted = [b for b in wanted if len(self.rows[b])]
            if not wanted:
                raise KinoUserError(f"no cached caption matches data.caption_filter {config.data.caption_filter!r}")
        self.buckets = wanted
        if loop_cache is not None:
            if loop_cache.meta.get("motion") != "loop" or loop_cache.meta.get("loop") != LOOP_RENDER:
                raise KinoUserError(f"{loop_cache.root} is not a loop cache of this kino (its clips must repeat "
                                    f"latent frame 1 in their last: {LOOP_RENDER}); build it again in another folder")
            if not same_latents(loop_cache.meta["vae"], cache.meta["vae"]) or \
                    loop_cache.meta["text_encoder"] != cache.meta["text_encoder"]:
                raise KinoUserError(f"the loop cache {loop_cache.root} was encoded by another VAE or text encoder "
                                    f"than {cache.root}")
            need = [b for b in wanted if cache.latent_shape(b)[1] >= 3]
            missing = [bucket_name(b) for b in need if b not in loop_cache.buckets]
            if missing:
                raise KinoUserError(f"the loop cache {loop_cache.root} has no bucket {', '.join(missing)}")
        patch = self.dit_config.patch_size
        self.tokens = [bucket_tokens(cache.latent_shape(b), patch) for b in self.buckets]
        w = np.array([n ** -config.data.bucket_weight_power for n in self.tokens], dtype=np.float64)
        self.bucket_probs = w / w.sum()
        self.batch_sizes = [bucket_batch_size(n, config.data) for n in self.tokens]

    def shift(self, latent: tuple[int, ...]) -> float:
        if not self.config.flow.shift_by_tokens:
            return 1.0
        return shift_for_tokens(bucket_tokens(latent, self.dit_config.patch_size))

    def build_model(self) -> nn.Module:
        """A fresh DiT, or init_from's (all of it trainable, or frozen under a LoRA)."""
        from kino.models.dit.pretrained import load_folder_dit

        cfg = self.config
        if cfg.init_from is None:
            return DiT(self.dit_config)
        model = load_folder_dit(check_init_from(cfg.init_from, self.dit_config, size_label(cfg)), self.component,
                                cfg.init_dit_file).train()
        if cfg.init_dit_file is not None and model.config != self.dit_config:
            raise KinoUserError(f"init_dit_file {cfg.init_dit_file} trains as it is: leave model unset")
        if model.config != self.dit_config:  # check_init_from allowed it: a grown model (grow.py)
            if cfg.lora is not None:
                found = model.config
                raise KinoUserError(f"a LoRA trains on the DiT of init_from as it is; leave model unset or set it to its size "
                                    f"(init_from's DiT has {found.num_layers} blocks"
                                    f"{'' if found.abs_pos_embed else ' and no absolute-position embedding'}"
                                    f", {'x'.join(map(str, found.patch_size))} patches; model = {size_label(cfg)} differs)")
            model = grow(model, self.dit_config).train()
        if cfg.lora is None:
            return model.requires_grad_(True)
        apply_lora(model, cfg.lora)  # freezes the base; only the LoRA layers train
        return model

    def batch(self, step: int) -> dict[str, Tensor]:
        """Clean latents, noise, per-frame times and text of step `step`: a pure function of
        (train.seed, step), drawn from one bucket."""
        cfg = self.config
        rng = np.random.default_rng([cfg.train.seed, step])
        k = int(rng.choice(len(self.buckets), p=self.bucket_probs))
        bucket, size = self.buckets[k], self.batch_sizes[k]
        rows = self.rows[bucket]
        n = self.cache.num_clips(bucket) if rows is None else len(rows)
        indices = rng.choice(n, size=size, replace=n < size)
        if rows is not None:
            indices = rows[indices]
        gen = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
        # its own stream, drawn after the others, so the text-to-video draws are unchanged
        cond_gen = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
        data = self.cache.get(bucket, indices)
        x0 = data["latents"]  # (B, C, T, h, w)
        patterns, clean, tie = draw_patterns(cond_gen, self.mix, size, x0.shape[2])
        if self.loop_cache is not None and tie.any():  # loops: clips that loop, in place of the drawn ones
            rows = rng.choice(self.loop_cache.num_clips(bucket), size=int(tie.sum()))
            loops = self.loop_cache.get(bucket, rows)
            for key in ("latents", "text", "mask"):  # `get` returns fresh tensors: safe to write
                data[key][tie] = loops[key]
            x0 = data["latents"]
        t = frame_times(gen, size, x0.shape[2], cfg.flow, self.shift(tuple(x0.shape[1:])), clean,
                        self.t_range)  # (B, T)
        noise = torch.randn(x0.shape, generator=gen)  # (B, C, T, h, w)
        drop = torch.rand(size, generator=gen) < cfg.flow.caption_dropout  # (B,)
        text = torch.where(drop[:, None, None], self.cache.empty_text, data["text"])  # (B, L, D)
        mask = torch.where(drop[:, None], self.cache.empty_mask, data["mask"])  # (B, L)
        if tie.any():  # loops: the last frame is frame 1 (clean latent, noise and t alike)
            x0, noise = x0.clone(), noise.clone()
            x0[tie, :, -1] = x0[tie, :, LOOP_TIE]
            noise[tie, :, -1] = noise[tie, :, LOOP_TIE]
        extras = {k: data[k] for k in CONDITION_KEYS if k in data}  # a Wan I2V or VACE model's
        if cfg.grounding.weight:
            extras.update(self._grounding_targets(bucket, indices, x0.shape[2:], drop | tie))
        if cfg.binding.weight:  # its own stream, drawn last: the other draws are unchanged
            bind_rng = np.random.default_rng([cfg.train.seed, step, 1])
            captions = self.cache.captions(bucket)
            rows, swapped = pick_swaps([captions[i] for i in indices], t, ~(drop | tie | clean.any(dim=1)),
                                       cfg.binding, bind_rng)
            extras["bind_rows"] = rows
            if len(rows):
                extras["bind_text"], extras["bind_mask"] = self.text_encoder.encode(swapped)
        if cfg.decoder_loss.weight:
            dec = cfg.decoder_loss
            rows = pick_rows(t, ~clean.any(dim=1) & ~tie, dec.max_t, dec.rows)
            extras["decoder_rows"] = rows
            if dec.target == "frames":
                scenes = self._scenes(bucket, indices[rows.numpy()])
                frames = [to_model_range(render(s)) for s in scenes]  # each (3, F, H, W) in [-1, 1]
                extras["decoder_frames"] = torch.stack(frames) if frames else torch.zeros(0, 3, *bucket)
        return {"latents": x0, "noise": noise, "t": t, "text": text, "mask": mask, "clean": clean,
                "pattern": patterns, **extras}

    def _grounding_targets(self, bucket: Bucket, indices, latent: tuple[int, ...], skip: Tensor) -> dict[str, Tensor]:
        """Per clip, its objects' phrase tokens (B, 2, L) and the share of each DiT token's pixels
        inside each object (B, 2, tokens); zeros for clips without two objects, and for `skip`
        (captions dropped, loops drawn in their place)."""
        f = bucket[0]
        scenes = self._scenes(bucket, indices)
        grid = tuple(n // p for n, p in zip(latent, self.dit_config.patch_size))
        stride = (f - 1) // (latent[0] - 1) if latent[0] > 1 else 1
        cover = torch.stack([object_cover(s, grid, stride).flatten(1) for s in scenes])  # (B, 2, tokens)
        phrases = phrase_masks(self.tokenizer, [s.text for s in scenes], self.cache.text_length)
        cover[skip | ~phrases.any(-1).all(-1)] = 0.0  # one object, or a phrase cut off: nothing to bind
        return {"ground_cover": cover, "ground_phrases": phrases}

    def _scenes(self, bucket: Bucket, indices) -> list:
        """The Shapes World scenes of cached clips, from the scene indices the cache records."""
        meta = self.cache.meta
        f, h, w = bucket
        return [scene_at(meta["split"], meta["seed"], self.cache.scene_indices(bucket)[i], frames=f, size=(h, w))
                for i in indices]

    def dit_input(self, x: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The DiT's input for noisy latents `x` (B, C, T, h, w) and its extra arguments: for a
        Wan image-to-video model, Wan's mask of the given first (FLF2V: and last) frame and the
        clip's image latents after the noise (Pipeline.image_condition's layout), and its CLIP
        features; for a Wan2.1 VACE model, the clip's VACE context (its stored latents and the
        mask of its kept frames folded as `Pipeline.vace_condition` folds a mask)."""
        if "vace_latents" in batch:  # a Wan2.1 VACE model: the clip's context, its mask folded
            from kino.pipeline import fold_vace_mask

            t, h, w = x.shape[2:]
            kept = batch["vace_kept"].to(x)  # (B, F) 1 on the kept pixel frames
            s = self.dit_config.vace_in_channels - batch["vace_latents"].shape[1]  # stride^2 mask channels
            stride = math.isqrt(s)
            f = kept.shape[1]
            step = -(-(f - 1) // (t - 1)) if t > 1 else 1  # the VAE's time stride
            kept = torch.nn.functional.pad(kept, (0, 1 + step * (t - 1) - f))  # frames padded to 4k + 1: generated
            masks = torch.stack([fold_vace_mask((1 - k)[:, None, None].expand(-1, stride, stride), stride, t)
                                 for k in kept])  # (B, s, T, 1, 1): the same over space
            context = torch.cat([batch["vace_latents"].to(x), masks.expand(-1, -1, -1, h, w)], dim=1)
            return x, {"vace": context}
        if "image_latents" not in batch:
            return x, {}
        from kino.pipeline import frame_mask

        b, _, t, h, w = x.shape
        stride = self.dit_config.in_channels - 2 * x.shape[1]  # Wan's mask: one channel per frame of a latent frame
        frames = 1 + stride * (t - 1)
        given = [0, frames - 1] if self.last_frame else [0]
        mask = frame_mask(frames, given, stride)[None, :, :, None, None].expand(b, -1, -1, h, w).to(x)
        extra = {"image": batch["image_features"].to(x)} if "image_features" in batch else {}
        return torch.cat([x, mask, batch["image_latents"].to(x)], dim=1), extra

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean squared velocity error over the generated (not clean) latent frames. Clean
        frames are at t = 0 and masked out (where, not a product: their output cannot leak
        in, not even as NaN), so they take no part in the loss or its gradient."""
        x0, noise, t, free = batch["latents"], batch["noise"], batch["t"], ~batch["clean"]
        xt = interpolate(x0, noise, t)
        x, extra = self.dit_input(xt, batch)
        grounding = self.config.grounding
        recorder = CrossAttentionRecorder(model, grounding.blocks) if grounding.weight else contextlib.nullcontext()
        with recorder:
            v = model(x, 1000.0 * t, batch["text"], batch["mask"], **extra)  # (B, C, T, h, w)
        per_frame = (v.float() - velocity_target(x0, noise).float()).pow(2).mean(dim=(1, 3, 4))  # (B, T)
        per_frame = torch.where(free, per_frame, torch.zeros((), device=per_frame.device))
        loss = per_frame.sum() / free.sum().clamp(min=1)
        logs = self._binned(per_frame.detach(), t, free, self.shift(tuple(x0.shape[1:])))
        if grounding.weight:
            ground = grounding_loss(recorder.probs, batch["ground_phrases"], batch["ground_cover"])
            logs["grounding"] = ground.detach()
            loss = loss + grounding.weight * ground
        bind = self.config.binding
        if bind.weight:  # logged as sums and count: per row, binding_sum / binding_rows
            rows = batch["bind_rows"]
            term = x0.new_zeros(())
            gap = x0.new_zeros(())
            if len(rows):
                sub = {k: val[rows] for k, val in extra.items()}
                vs = model(x[rows], 1000.0 * t[rows], batch["bind_text"].to(batch["text"]),
                           batch["bind_mask"].to(batch["mask"].device), **sub)
                target = velocity_target(x0[rows], noise[rows]).float()
                swapped = (vs.float() - target).pow(2).mean(dim=(1, 3, 4))  # (R, T)
                keep = free[rows]
                e_s = torch.where(keep, swapped, 0.0).sum(1) / keep.sum(1).clamp(min=1)
                e_c = per_frame[rows].sum(1) / keep.sum(1).clamp(min=1)
                term = binding_loss(e_c, e_s, bind.margin)
                gap = ((e_s - e_c) / e_c.clamp(min=1e-12)).detach().sum()
                loss = loss + bind.weight * term
            logs["binding_sum"] = term.detach() * len(rows)
            logs["binding_gap_sum"] = gap
            logs["binding_rows"] = torch.tensor(float(len(rows)))
        dec = self.config.decoder_loss
        if dec.weight:  # logged as sum and count: the mean per row is decoder_sum / decoder_rows
            rows = batch["decoder_rows"]
            pixel = x0.new_zeros(())
            if len(rows):
                if next(self.vae.parameters()).device != x0.device:  # loaded on the CPU; the DiT trains on x0's device
                    self.vae.to(x0.device)
                target = batch["decoder_frames"] if dec.target == "frames" else decoded_target(self.vae, x0[rows])
                pixel = decoder_loss(self.vae, clean_estimate(xt[rows], v[rows], t[rows]), target)
                loss = loss + dec.weight * pixel
            logs["decoder_sum"] = pixel.detach() * len(rows)
            logs["decoder_rows"] = torch.tensor(float(len(rows)))
        return loss, logs

    def batch_tokens(self, batch: dict[str, Tensor]) -> int:
        """Transformer tokens of a batch (for the trainer's tokens/s)."""
        x0 = batch["latents"]
        return x0.shape[0] * bucket_tokens(tuple(x0.shape[1:]), self.dit_config.patch_size)

    def batch_flops(self, batch: dict[str, Tensor]) -> float:
        """Training FLOPs of a batch (forward + backward = 3 forwards), for the trainer's MFU."""
        x0 = batch["latents"]
        grid = tuple(n // p for n, p in zip(x0.shape[2:], self.dit_config.patch_size))
        return 3.0 * x0.shape[0] * self.dit_config.forward_flops(grid, batch["text"].shape[1])

    def _binned(self, per_frame: Tensor, t: Tensor, free: Tensor, shift: float) -> dict[str, Tensor]:
        """Loss by noise level, as unbiased estimates: sum over the generated frames in a bin
        divided by the bin's expected count, so a bin a batch misses counts as 0 and log
        averages over steps converge to E[loss | t in bin] (a plain per-batch bin mean would
        be undefined)."""
        logs = {}
        count = free.sum().clamp(min=1)
        for lo, hi in zip(TIME_BINS, TIME_BINS[1:]):
            # every key on every step: the trainer averages each log over all steps of a window
            p = max(time_bin_probability(lo, hi, self.config.flow, shift, self.t_range), 1e-12)
            inside = free & (t >= lo) & ((t < hi) if hi < 1.0 else (t <= hi))  # (B, T)
            logs[f"loss_t{lo:.2f}-{hi:.2f}"] = (per_frame * inside).sum() / (count * p)
        return logs

    def validation_batches(self):
        """The fixed validation batches (the trainer's `validate_every`), built anew each time
        from the validation cache: per training bucket it holds, its first
        `validation.clips_per_bucket` clips in batches, each with noise for every validation
        time, seeded by (validation.seed, bucket, batch)."""
        v = self.config.validation
        if self.val_cache is None:
            return
        for k, bucket in enumerate(b for b in self.buckets if b in self.val_cache.buckets):
            n = min(v.clips_per_bucket, self.val_cache.num_clips(bucket))
            for j, start in enumerate(range(0, n, v.batch_size)):
                data = self.val_cache.get(bucket, list(range(start, min(start + v.batch_size, n))))
                x0 = data["latents"]  # (B, C, T, h, w)
                gen = torch.Generator().manual_seed(int(np.random.default_rng([v.seed, k, j]).integers(2**63 - 1)))
                noise = torch.randn((x0.shape[0], len(v.times), *x0.shape[1:]), generator=gen)  # (B, K, C, T, h, w)
                extras = {k: data[k] for k in CONDITION_KEYS if k in data}
                yield {"latents": x0, "noise": noise, "text": data["text"], "mask": data["mask"], **extras}

    def validation_losses(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """(sum, count) of each validation loss over a batch: the mean squared velocity error of
        every latent at each validation time (`val_loss_t0.30`), and over all of them (`val_loss`)."""
        x0, text, mask = batch["latents"], batch["text"], batch["mask"]
        out, total = {}, torch.zeros((), device=x0.device)
        count = torch.tensor(float(x0.shape[0]), device=x0.device)
        for k, t in enumerate(self.config.validation.times):
            noise = batch["noise"][:, k]
            times = torch.full(x0.shape[:1] + x0.shape[2:3], t, device=x0.device)  # (B, T)
            x, extra = self.dit_input(interpolate(x0, noise, times), batch)
            v = model(x, 1000.0 * times, text, mask, **extra)
            err = (v.float() - velocity_target(x0, noise).float()).pow(2).mean(dim=(1, 2, 3, 4)).sum()
            out[f"val_loss_t{t:.2f}"] = (err, count)
            total = total + err
        out["val_loss"] = (total, count * len(self.config.validation.times))
        return out

    def samples(self, model: nn.Module) -> dict[str, Tensor]:
        """Preview: the caption of a cached clip generated from fixed noise (a Wan
        image-to-video model: from the clip's first frame too), beside that clip as the VAE
        decodes it (uint8 (F, H, 2W, 3))."""
        if self.vae is None:
            return {}
        bucket = SAMPLE_BUCKET if SAMPLE_BUCKET in self.buckets else max(self.buckets)
        device = next(model.parameters()).device
        data = {k: v.to(device) for k, v in self.cache.get(bucket, [0]).items()}
        x0, text, mask = data["latents"], data["text"], data["mask"]
        empty_text, empty_mask = self.cache.empty_text.to(device), self.cache.empty_mask.to(device)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(device)

        def velocity(x: Tensor, t: float, text: Tensor, mask: Tensor) -> Tensor:
            x, extra = self.dit_input(x, data)
            return model(x, 1000.0 * t, text, mask, **extra)

        cond = lambda x, t: velocity(x, t, text, mask)  # noqa: E731
        uncond = lambda x, t: velocity(x, t, empty_text, empty_mask)  # noqa: E731
        times = sampling_timesteps(SAMPLE_STEPS, self.shift(tuple(x0.shape[1:]))).tolist()
        z = euler(guided(cond, uncond, SAMPLE_GUIDANCE), noise, times)  # (1, C, T, h, w)
        vae_device = next(self.vae.parameters()).device
        pair = torch.cat([z, x0]).float().to(vae_device)
        video = self.vae.decode(self.vae.denormalize(pair))  # (2, 3, F, H, W) in [-1, 1]
        video = torch.cat([video[0], video[1]], dim=-1)  # (3, F, H, 2W): generated | cached
        video = video.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
        return {bucket_name(bucket): video.permute(1, 2, 3, 0).cpu()}  # (F, H, 2W, 3)


# ---------------------------------------------------------------------------- export and the run


def export_dit(state_dict: dict[str, Tensor], config: DiTConfig, out_dir: str | Path, *, name: str = "kino-dit",
               training: dict | None = None) -> Path:
    """Write a model folder with a `dit/` component (config.json + model.safetensors, plus
    training.json: the VAE and text encoder its latents and text came from) and a kino.json."""
    out = Path(out_dir)
    save_component(out / "dit", config.to_dict(), state_dict)
    if training is not None:
        tmp = out / "dit" / "training.json.tmp"
        tmp.write_text(json.dumps(training, indent=2) + "\n", encoding="utf-8")
        tmp.replace(out / "dit" / "training.json")
    write_manifest(out, name, {"dit": ("dit", "DiT")})
    return out


def export_lora(state_dict: dict[str, Tensor], config: DiTRunConfig, path: str | Path, **training) -> Path:
    """Write the LoRA weights of a trained, LoRA-adapted DiT's state dict alone to `path`
    (.safetensors; rank, alpha, targets in its metadata) and, beside it, a JSON record of its
    sha256, the base it adapts (with the base weights' sha256) and `training` facts."""
    base_sha256 = _base_sha256(config)
    path = Path(path)
    digest = save_lora(path, state_dict, config.lora, base=str(config.init_from), base_sha256=base_sha256)
    write_record(path, digest, rank=config.lora.rank, alpha=config.lora.alpha, targets=config.lora.targets,
                 dropout=config.lora.dropout, base=str(config.init_from), base_sha256=base_sha256,
                 ema=config.train.ema_decay is not None, **training)
    return path


def default_vae_folder(init_from: str | None) -> Path:
    """The VAE used when the config names none: init_from's when it is a model folder with a
    VAE (the latents its DiT was trained on), else the shipped default."""
    if init_from is not None:
        manifest = read_manifest(model_folder(init_from))
        if manifest is not None and "vae" in manifest.get("components", {}):
            return model_folder(init_from)
    return default_model_dir()


def pin_lora_base(config: DiTRunConfig) -> None:
    """A LoRA run's checkpoints hold the LoRA alone and resume rebuilds the base from
    init_from, so the run folder records the base DiT's sha256 (OUT/lora_base.json) and a
    resume refuses a base whose weights changed since."""
    from kino.training.checkpoint import latest_checkpoint

    out = Path(config.train.out_dir)
    sha = _base_sha256(config)
    record = out / "lora_base.json"
    if record.is_file() and latest_checkpoint(out) is not None:
        pinned = json.loads(record.read_text(encoding="utf-8"))["base_sha256"]
        if pinned != sha:
            raise KinoUserError(f"{out} holds a LoRA run on a base DiT with weights sha256 {pinned[:16]}..., but "
                                f"init_from {config.init_from} now has {sha[:16]}...: resuming would adapt other "
                                "weights. Restore that base or start a new run folder")
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(json.dumps({"init_from": str(config.init_from), "base_sha256": sha}) + "\n", encoding="utf-8")
    tmp.replace(record)


def _base_sha256(config: DiTRunConfig) -> str:
    """The sha256 of the weights a LoRA run adapts: init_dit_file, or init_from's DiT file."""
    if config.init_dit_file is not None:
        from kino.models.hub import resolve_file

        return sha256_file(resolve_file(config.init_dit_file))
    return _dit_weights_sha256(model_folder(config.init_from), dit_component(config))


def _dit_weights_sha256(root: Path, component: str = "dit") -> str:
    manifest = read_manifest(root)
    folder = root / manifest["components"][component]["path"] if manifest is not None else root
    return weights_sha256(folder)


def run_train_dit(config: DiTRunConfig, *, text_encoder=None) -> Path | None:
    """Build the latent cache if needed, train (resuming from train.out_dir), export
    OUT/model/ (EMA weights when EMA is on) and return its path; None when stopped by a
    signal (a checkpoint is saved: run again to resume). With a [lora] section the export
    is the LoRA alone, OUT/lora.safetensors (+ OUT/lora.json), and that file is returned.

    `text_encoder` defaults to MiniLM (`MiniLMEncoder(max_length=cache.text_max_length)`), or to
    init_from's own when that is not MiniLM (`own_text_encoder`: Wan's UMT5), which is loaded
    only when captions must be encoded here (Shapes World caches; a video cache was encoded by
    `kino preprocess` already).

    Under torchrun every process calls this: rank 0 builds the cache while the others wait,
    all train, and rank 0 writes the model folder (None on the other ranks).
    """
    from tqdm.auto import tqdm

    from kino.models.vae.pretrained import load_vae
    from kino.training.distributed import init_processes
    from kino.training.trainer import Trainer, resolve_device

    vae_path = Path(config.vae) if config.vae is not None else default_vae_folder(config.init_from)
    if config.vae is None and not vae_path.exists():
        raise KinoUserError(f"the shipped default VAE is not installed at {vae_path}: set vae = \"MODEL_DIR\" "
                            "in the config to a trained VAE folder")
    vae = load_vae(vae_path)
    own = own_text_encoder(config.init_from, config.init_text_encoder_file) if text_encoder is None else None
    if text_encoder is None and (own is None or config.dataset is None):
        text_encoder = training_text_encoder(config)
    if config.init_from is not None:  # fail now, not after building the cache
        if text_encoder is not None:
            text_dim = text_encoder.dim
        else:  # the video cache holds the features already
            from kino.data.preprocess import open_video_cache

            text_dim = open_video_cache(config.cache.dir, config.dataset, vae).text_dim
        check_init_from(config.init_from, target_dit_config(config, text_dim), size_label(config))
    c = config.cache
    procs = init_processes(config.train.parallel, resolve_device(config.train.device))
    show = config.train.progress and procs.is_main
    if config.dataset is None:
        if procs.is_main:
            build_world_cache(
                c.dir, vae, text_encoder, clips_per_bucket=c.clips_per_bucket, split=c.split, seed=c.seed,
                buckets=c.bucket_list(),
                progress=lambda it: tqdm(it, desc="latent cache", unit="batch", file=sys.stderr, disable=not show),
            )
            if c.loop_dir is not None:
                build_world_cache(
                    c.loop_dir, vae, text_encoder, clips_per_bucket=c.loop_clips_per_bucket, split=c.split,
                    seed=c.seed, buckets=[b for b in c.bucket_list() if b[0] >= 1 + 2 * vae.config.time_stride],
                    motion="loop",
                    progress=lambda it: tqdm(it, desc="loop cache", unit="batch", file=sys.stderr, disable=not show),
                )
        procs.barrier()
        cache = LatentCache(c.dir)
    else:  # made by `kino preprocess` (kino/data/preprocess.py)
        from kino.data.preprocess import open_video_cache

        cache = open_video_cache(c.dir, config.dataset, vae)
    loop_cache = LatentCache(c.loop_dir) if config.dataset is None and c.loop_dir is not None else None
    val_cache = None
    if config.train.validate_every:
        v = config.validation
        if v.dir is None:  # Shapes World: its eval split, encoded once beside the training cache
            if procs.is_main:
                build_world_cache(
                    c.dir + "-val", vae, text_encoder, clips_per_bucket=v.clips_per_bucket, split="eval",
                    seed=v.seed, buckets=c.bucket_list(),
                    progress=lambda it: tqdm(it, desc="validation cache", unit="batch", file=sys.stderr,
                                             disable=not show),
                )
            procs.barrier()
        val_cache = LatentCache(v.dir if v.dir is not None else c.dir + "-val")
    task = DiTTask(config, cache, vae=vae, loop_cache=loop_cache, val_cache=val_cache,
                   tokenizer=getattr(text_encoder, "tokenizer", None), text_encoder=text_encoder)
    if config.lora is not None:
        pin_lora_base(config)
    trainer = Trainer(task, config.train, run_config=config)
    result = trainer.fit()
    if result.interrupted:
        return None
    state_dict = trainer.export_state_dict()  # collective under FSDP2
    if not procs.is_main:
        return None
    if config.lora is not None:
        return export_lora(state_dict, config, Path(config.train.out_dir) / "lora.safetensors",
                           steps=result.step, vae_sha256=cache.vae_sha256)
    training = {
        "steps": result.step,
        "ema": config.train.ema_decay is not None,
        "vae_sha256": cache.vae_sha256,
        **({"vae_latent_sha256": cache.vae_latent_sha256} if cache.vae_latent_sha256 else {}),
        "vae": str(vae_path),
        "text_encoder": cache.meta["text_encoder"],
        "latent_cache": str(cache.root),
        **({"loop_cache": str(config.cache.loop_dir)} if config.cache.loop_dir is not None else {}),
    }
    if config.init_from is not None:  # a later stage: say what it started from
        training["init_from"] = str(config.init_from)
    out = export_dit(state_dict, task.dit_config, Path(config.train.out_dir) / "model",
                     training=training)
    from kino.models.text.encoder import MiniLMEncoder

    if isinstance(text_encoder, MiniLMEncoder):  # a real encoder: make the folder a whole pipeline
        from kino.models.dit.pretrained import load_dit
        from kino.pipeline import SHAPES_WORLD_NAME, Pipeline

        if config.expert is None:
            pipe = Pipeline(vae, load_dit(out), text_encoder, init_from_defaults(config.init_from),
                            name=SHAPES_WORLD_NAME)
        else:  # one expert of two: the parent's pipeline around it
            pipe = with_trained_expert(Pipeline.from_pretrained(model_folder(config.init_from)), load_dit(out), config)
        pipe.save_pretrained(out)
    elif own is not None:  # a fine-tuned Wan model: the parent's pipeline with the new DiT
        from kino.models.dit.pretrained import load_dit
        from kino.pipeline import Pipeline

        parent = with_trained_expert(Pipeline.from_pretrained(model_folder(config.init_from)), load_dit(out), config)
        parent.name = f"{parent.name} (fine-tuned)"
        parent.save_pretrained(out)
    return out


def with_trained_expert(parent, dit, config: DiTRunConfig):
    """`parent` (the init_from pipeline) with the DiT a run trained in its place: the one DiT,
    the expert `config.expert` of two, or, with `config.boundary`, that expert beside the
    parent's one DiT as the other expert, split at the boundary (dit_component has refused a
    boundary on a two-expert parent)."""
    from dataclasses import replace

    if config.boundary is None:
        setattr(parent, dit_component(config), dit)
        return parent
    parent.dit, parent.dit_2 = (dit, parent.dit) if config.expert == 1 else (parent.dit, dit)
    parent.defaults = replace(parent.defaults, boundary=config.boundary)
    return parent


def dit_component(config: DiTRunConfig) -> str:
    """The component of init_from a run trains: "dit", or a two-expert model's "dit_2"
    (`expert = 2`). A two-expert init_from needs `expert`, a one-DiT one refuses 2."""
    if config.init_from is None:
        if config.expert is not None:
            raise KinoUserError("expert names a DiT of a two-expert init_from (Wan2.2 A14B); this run has none")
        return "dit"
    manifest = read_manifest(model_folder(config.init_from))
    two = manifest is not None and "dit_2" in manifest.get("components", {})
    if two and config.expert is None:
        raise KinoUserError(f"init_from {config.init_from} has two DiT experts (Wan2.2 A14B): set expert = 1 "
                            "(high-noise) or 2 (low-noise) to say which one trains")
    if two and config.boundary is not None:
        raise KinoUserError(f"init_from {config.init_from} has two DiT experts already; boundary splits a one-DiT "
                            "model: remove it")
    if not two and config.expert is not None:
        if config.boundary is None:
            raise KinoUserError(f"expert = {config.expert}, but init_from {config.init_from} has one DiT: set "
                                "boundary to split it into two experts")
        return "dit"  # the expert starts as init_from's one DiT
    return "dit_2" if config.expert == 2 else "dit"


def training_times(config: DiTRunConfig) -> tuple[float, float]:
    """The flow-time range a run trains on: flow.t_min..t_max, or, for an expert of a
    two-expert model with those at 0 and 1, its side of the model's boundary."""
    flow = config.flow
    if config.expert is None or (flow.t_min, flow.t_max) != (0.0, 1.0):
        return flow.t_min, flow.t_max
    boundary = config.boundary or init_from_defaults(config.init_from).boundary
    if boundary is None:
        raise KinoUserError(f"init_from {config.init_from} records no experts' boundary; set flow.t_min / t_max")
    return (boundary, 1.0) if config.expert == 1 else (0.0, boundary)


def own_text_encoder(init_from: str | None, file: str | None = None) -> tuple[dict, Path] | None:
    """(config, folder) of the text encoder a fine-tune of `init_from` must train with when that
    model folder's own is not MiniLM: a converted Wan2.1 / Wan2.2 folder's UMT5 (512 tokens;
    its DiT reads 4096-wide features). None: kino's MiniLM at `cache.text_max_length`, as
    kino's own models are trained. Configs only: cheap. `file`: the UMT5's weights come from
    this file (`init_text_encoder_file`), so the folder's are neither needed nor checked."""
    from kino.models.hub import weights_replaced

    if init_from is None:
        return None
    folder = model_folder(init_from)
    manifest = read_manifest(folder) if folder.is_dir() else None
    if manifest is None or "text_encoder" not in manifest.get("components", {}):
        if file is not None:
            raise KinoUserError(f"init_text_encoder_file stands in for init_from's UMT5 text encoder; {folder} has no "
                                "text encoder (a kino model folder converted from Wan holds one)")
        return None
    comp = load_component(folder, "text_encoder", weights=False, skip=weights_replaced(text_encoder=file))
    if comp.config.get("kind") == "minilm" and file is not None:
        raise KinoUserError(f"init_text_encoder_file stands in for a UMT5 text encoder (Wan models); {folder}'s is "
                            "MiniLM")
    return None if comp.config.get("kind") == "minilm" else (comp.config, comp.folder)


def training_text_encoder(config: DiTRunConfig, device: str | torch.device = "cpu"):
    """The text encoder that encodes a run's captions: init_from's own (own_text_encoder; its
    weights from init_text_encoder_file when set) or MiniLM at cache.text_max_length."""
    own = own_text_encoder(config.init_from, config.init_text_encoder_file)
    if own is not None and config.cache.text_clauses:
        raise KinoUserError("cache.text_clauses is MiniLM's clause-wise encoding; init_from's text encoder is "
                            f"{own[0].get('kind')!r}: drop text_clauses")
    if own is not None:  # in its recorded dtype (bf16) on a GPU; fp32 on a CPU, where bf16 crawls
        from kino.models.text.encoder import load_text_encoder

        return load_text_encoder(own[0], device, own[1], None if torch.device(device).type == "cuda" else "float32",
                                 file=config.init_text_encoder_file)
    from kino.models.text.encoder import MiniLMEncoder

    return MiniLMEncoder(max_length=config.cache.text_max_length,  # small: on the CPU, as always
                         clauses=config.cache.text_clauses)


def init_from_defaults(init_from: str | None):
    """The generation defaults (kino.json "pipeline": steps, guidance, guidance interval, ...)
    of the pipeline folder a fine-tune started from, so that its model is measured and used as
    its parent was; the library's defaults for a fresh model or a parent without them."""
    from kino.models.folder import read_manifest
    from kino.pipeline import GenerationDefaults

    manifest = read_manifest(model_folder(init_from)) if init_from is not None else None
    return GenerationDefaults.from_dict((manifest or {}).get("pipeline", {}))
