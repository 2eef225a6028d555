"""`kino preprocess`: encode a video dataset (kino/data/datasets.py) once into the latent
cache format of kino/data/latent_cache.py, so that DiT training reads latents and text
features and never runs the VAE or the text encoder.

Layout (the same `cache.json`, `empty_prompt.safetensors` and bucket shards as a Shapes
World cache; `LatentCache` reads both)::

    CACHE/
      cache.json                         identity (VAE sha256, text encoder, dataset) and, once
                                         complete, the buckets, their shards, clip and skip counts
      empty_prompt.safetensors
      17x64x96/part-00003.safetensors    the clips of part 3 that fell into bucket 17x64x96
      17x64x96/part-00003.json           their captions and keys (where each came from)
      parts/part-00003.json              part 3 is done: its files and byte sizes, its skipped
                                         samples with reasons; written last

Work is split by **part** (a tar shard, or `part_size` rows of a captions file). Rank r of
W (the `RANK` and `WORLD_SIZE` that torchrun sets; 0 of 1 otherwise) takes parts r, r + W,
... No process group is needed: ranks share nothing but the folder. A rerun skips every
part whose marker is in place with the same inputs (`Part.digest`), so a killed run
resumes where it stopped; a part cut short is done again from its start. Whichever rank
finds every part done writes the final cache.json (complete: true), listing each bucket's
shards in part order: the clip order, and so training, does not depend on how many ranks
built the cache or in which order they finished.

Within a part, clips of one bucket are encoded in batches of `ENCODE_BATCH` in the part's
order, as `OnTheFlyLatents` also can; see its docstring for what "training on the cache
equals training on the fly" means exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from kino import __version__
from kino.data.datasets import Bucket, Clip, Part, Skipped, VideoDatasetConfig, dataset_parts, iter_clips
from kino.data.latent_cache import (CACHE_JSON, EMPTY_PROMPT, ENCODE_BATCH, FORMAT, LATENT_DTYPE, TEXT_DTYPE,
                                    LatentCache, _check_bucket, _check_same, _encode_latents, _encode_text,
                                    _write_atomic, _write_json, bucket_name, latent_shape, same_latents, vae_identity,
                                    text_encoder_info, write_shard_files)
from kino.errors import KinoUserError
from kino.training.config import config_to_dict

log = logging.getLogger(__name__)
PARTS = "parts"


@dataclass
class PreprocessReport:
    root: Path
    complete: bool  # False while parts of other ranks are missing
    parts_done: int  # by this call
    clips: int  # in the whole cache when complete, else in this call's parts
    skipped: list[Skipped]  # likewise


def rank_and_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) from the environment torchrun sets; (0, 1) without it."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise KinoUserError("RANK and WORLD_SIZE must be integers") from None
    if not 0 <= rank < world:
        raise KinoUserError(f"RANK must be in [0, WORLD_SIZE), got RANK={rank}, WORLD_SIZE={world}")
    return rank, world


class WanImageCondition:
    """What a Wan image-to-video DiT reads beside a clip's noise, computed once per clip as
    `Pipeline.image_condition` does at generation: the normalised VAE latents of [the clip's
    first frame, black frames..., (its last frame: FLF2V)] (`image_latents`, stored bf16) and,
    with a CLIP image encoder (Wan2.1), the given frames' features (`image_features`, fp16;
    FLF2V: the first frame's tokens, then the last's). Wan's mask of the given frames is fixed
    by the clip's length; the trainer builds it."""

    def __init__(self, vae, clip=None, last: bool = False):
        self.vae, self.clip, self.last = vae, clip, last

    def record(self) -> dict:
        return {"kind": "wan-first-last-frame" if self.last else "wan-first-frame",
                "clip": None if self.clip is None else self.clip.reference()}

    @torch.no_grad()
    def __call__(self, videos: list[Tensor], keys: list[str] | None = None) -> dict[str, Tensor]:
        given = [0, -1] if self.last else [0]
        conds = []
        for v in videos:  # (3, F, H, W): the given frames kept, black between
            cond = torch.zeros_like(v)
            cond[:, given] = v[:, given]
            conds.append(cond)
        out = {"image_latents": _encode_latents(self.vae, conds)}  # (b, Z, T, h, w) bf16
        if self.clip is not None:
            device = next(self.clip.model.parameters()).device
            out["image_features"] = torch.stack([
                torch.cat([self.clip.encode(v[None, :, i].float().to(device)).float().cpu()[0] for i in given])
                for v in videos]).to(TEXT_DTYPE)  # (b, N per frame x given frames, D)
        return out


VACE_TASKS = ("text", "first", "first-half", "last-half", "first-last")  # kept frames: none, ..., both ends


def vace_kept_frames(task: str, frames: int) -> Tensor:
    """(frames,) 1 on the pixel frames a VACE training task keeps, 0 on those to generate."""
    kept = torch.zeros(frames)
    half = (frames + 1) // 2
    if task in ("first", "first-last"):
        kept[0] = 1
    if task == "first-last":
        kept[-1] = 1
    if task == "first-half":
        kept[:half] = 1
    if task == "last-half":
        kept[frames - half:] = 1
    return kept


class WanVaceContext:
    """What a Wan2.1 VACE DiT reads beside a clip's noise when fine-tuned on it: one of kino's
    frame tasks per clip (`VACE_TASKS`, chosen by the clip's key, so the same clip always gets
    the same task): nothing kept (text to video), its first frame (image to video), its first or
    last half (extend forward or backward), its first and last frames (connect). Stored as the
    VACE context's latents (`vace_latents`: the kept frames' and the others' VAE latents apart,
    as `Pipeline.vace_condition` makes them, bf16) and the kept pixel frames (`vace_kept`);
    the trainer folds the mask."""

    def __init__(self, vae):
        self.vae = vae

    def record(self) -> dict:
        return {"kind": "wan-vace", "tasks": list(VACE_TASKS)}

    @staticmethod
    def task(key: str) -> str:
        return VACE_TASKS[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(VACE_TASKS)]

    @torch.no_grad()
    def __call__(self, videos: list[Tensor], keys: list[str] | None = None) -> dict[str, Tensor]:
        keys = keys if keys is not None else [str(i) for i in range(len(videos))]
        kept = [vace_kept_frames(self.task(k), v.shape[1]) for k, v in zip(keys, videos)]
        inactive = [v * m[None, :, None, None] for v, m in zip(videos, kept)]
        reactive = [v * (1 - m)[None, :, None, None] for v, m in zip(videos, kept)]
        latents = torch.cat([_encode_latents(self.vae, inactive), _encode_latents(self.vae, reactive)], dim=1)
        return {"vace_latents": latents, "vace_kept": torch.stack(kept).to(torch.float16)}  # (b, 2Z, T, h, w), (b, F)


def _identity(vae, text_encoder, dataset: VideoDatasetConfig, image: WanImageCondition | None = None) -> dict:
    return {
        "format": FORMAT,
        "complete": False,
        "kino_version": __version__,
        "vae": vae_identity(vae),
        "text_encoder": text_encoder_info(text_encoder),
        "source": {"kind": "videos", **config_to_dict(dataset)},
        "encode_batch": ENCODE_BATCH,
        "latent_dtype": str(LATENT_DTYPE).removeprefix("torch."),
        "text_dtype": str(TEXT_DTYPE).removeprefix("torch."),
        **({"image_condition": image.record()} if image is not None else {}),
    }


def _marker(root: Path, part: Part) -> Path:
    return root / PARTS / f"{part.name}.json"


def _part_done(root: Path, part: Part) -> dict | None:
    """The part's marker when the part is complete with the same inputs, else None."""
    try:
        marker = json.loads(_marker(root, part).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if marker.get("digest") != part.digest:
        return None
    for stem, size in marker.get("files", {}).items():
        data = (root / stem).with_suffix(".safetensors")
        if not (data.is_file() and data.stat().st_size == size and (root / stem).with_suffix(".json").is_file()):
            return None
    return marker


def build_video_cache(
    out_dir: str | Path,
    vae,
    text_encoder,
    dataset: VideoDatasetConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    progress: Callable[[Iterable], Iterable] | None = None,
    image: WanImageCondition | None = None,
) -> PreprocessReport:
    """Encode this rank's parts of `dataset` into `out_dir` (resumably) and, when every part is
    done, complete the cache. Skipped samples are logged (warning) as met and reported.
    `image`: also each clip's Wan image-to-video conditioning (for fine-tuning such a model)."""
    root = Path(out_dir)
    buckets = dataset.bucket_list()
    for b in buckets:
        _check_bucket(b, vae.config)
    parts = dataset_parts(dataset)  # user errors (no captions file, ...) before anything is written
    meta = _identity(vae, text_encoder, dataset, image)
    index_path = root / CACHE_JSON
    if index_path.is_file():
        try:
            old = json.loads(index_path.read_text(encoding="utf-8"))
        except ValueError:
            raise KinoUserError(f"{index_path} is not valid JSON: delete {root} and preprocess again") from None
        _check_same(old, meta, root)
        if old.get("complete") and old.get("parts") == [p.name for p in parts] \
                and all(_part_done(root, p) for p in parts):
            return _report(root, old, parts_done=0)
    root.mkdir(parents=True, exist_ok=True)
    (root / PARTS).mkdir(exist_ok=True)
    _write_json(index_path, {**meta, "parts": [p.name for p in parts]})  # complete: false until the end

    empty_text, empty_mask = _encode_text(text_encoder, [""])
    _write_atomic(root / EMPTY_PROMPT, lambda p: save_file({"text": empty_text, "mask": empty_mask}, str(p)))

    todo = [p for p in parts[rank::world_size] if _part_done(root, p) is None]
    clips, skipped = 0, []
    for part in (progress or iter)(todo):
        marker = _encode_part(root, part, vae, text_encoder, dataset.fps, buckets, image)
        clips += marker["clips"]
        skipped += [Skipped(**s) for s in marker["skipped"]]

    if all(_part_done(root, p) for p in parts):
        final = _finish(root, meta, parts, buckets, vae.config)
        return _report(root, final, parts_done=len(todo))
    return PreprocessReport(root, False, len(todo), clips, skipped)


def _encode_part(root: Path, part: Part, vae, text_encoder, fps: float, buckets: list[Bucket],
                 image: WanImageCondition | None = None) -> dict:
    for stale in root.glob(f"*/{part.name}.*.tmp-*"):  # this part's leftovers from a killed run (ours alone)
        stale.unlink(missing_ok=True)
    pending: dict[Bucket, list[Clip]] = {}
    encoded: dict[Bucket, list[tuple[Tensor, Tensor, Tensor, list[str], list[str]]]] = {}
    skipped: list[Skipped] = []

    def flush(bucket: Bucket) -> None:
        batch = pending.pop(bucket, [])
        if batch:
            encoded.setdefault(bucket, []).append(_encode_clips(vae, text_encoder, batch, image))

    for item in iter_clips(part, fps, buckets):
        if isinstance(item, Skipped):
            log.warning("skipped %s: %s", item.key, item.reason)
            skipped.append(item)
            continue
        pending.setdefault(item.bucket, []).append(item)
        if len(pending[item.bucket]) == ENCODE_BATCH:
            flush(item.bucket)
    for bucket in list(pending):
        flush(bucket)

    files = {}
    for bucket in buckets:  # bucket order, so a part's files are the same on every run
        if bucket in encoded:
            stem = f"{bucket_name(bucket)}/{part.name}"
            files[stem] = _write_part_shard(root / stem, bucket, encoded[bucket])
    marker = {"part": part.name, "digest": part.digest, "files": files,
              "clips": sum(sum(len(e[3]) for e in v) for v in encoded.values()),
              "skipped": [s.to_dict() for s in skipped]}
    _write_json(_marker(root, part), marker)  # last: its presence marks the part done
    return marker


def _encode_clips(vae, text_encoder, clips: Sequence[Clip], image: WanImageCondition | None = None) -> tuple:
    latents = _encode_latents(vae, [c.video for c in clips])  # (b, Z, T, h, w) bf16
    text, mask = _encode_text(text_encoder, [c.caption for c in clips])  # (b, L, D) fp16, (b, L)
    encoded = (latents, text, mask, [c.caption for c in clips], [c.key for c in clips])
    return encoded if image is None else (*encoded, image([c.video for c in clips], [c.key for c in clips]))


def _write_part_shard(stem: Path, bucket: Bucket, parts: list) -> int:
    return write_shard_files(stem, bucket, parts, keys=[k for p in parts for k in p[4]])


def _finish(root: Path, meta: dict, parts: list[Part], buckets: list[Bucket], vae_config) -> dict:
    markers = [_part_done(root, p) for p in parts]
    shards: dict[Bucket, list[str]] = {b: [] for b in buckets}
    counts: dict[Bucket, int] = {b: 0 for b in buckets}
    for marker in markers:  # part order: the clip order of every bucket
        for stem in marker["files"]:
            side = json.loads((root / stem).with_suffix(".json").read_text(encoding="utf-8"))
            b = tuple(side["bucket"])
            shards[b].append(stem)
            counts[b] += len(side["captions"])
    skipped = [s for m in markers for s in m["skipped"]]
    final = {
        **meta,
        "complete": True,
        "parts": [p.name for p in parts],
        "clips": sum(counts.values()),
        "buckets": [{"name": bucket_name(b), "bucket": list(b), "latent_shape": list(latent_shape(b, vae_config)),
                     "clips": counts[b], "shards": shards[b]} for b in buckets if counts[b]],
        "empty_buckets": [bucket_name(b) for b in buckets if not counts[b]],
        "skipped_count": len(skipped),
        "skipped": skipped,
    }
    if not final["buckets"]:
        raise KinoUserError(f"no usable clip in the dataset ({len(skipped)} skipped; see the log): nothing to "
                            "train on")
    _write_json(root / CACHE_JSON, final)
    return final


def _report(root: Path, meta: dict, parts_done: int) -> PreprocessReport:
    return PreprocessReport(root, True, parts_done, int(meta["clips"]), [Skipped(**s) for s in meta["skipped"]])


def run_preprocess(config, *, text_encoder=None, progress: bool = True) -> PreprocessReport:
    """`kino preprocess --config FILE`: encode `config.dataset` (a DiTRunConfig, the one
    `kino train dit` then reads) into `config.cache.dir` with `config.vae` and the text encoder
    of `config.init_from` when that is not MiniLM (a converted Wan folder's UMT5), else MiniLM
    (`cache.text_max_length` tokens); this rank's parts only under torchrun."""
    from tqdm.auto import tqdm

    from kino.models.vae.pretrained import load_vae
    from kino.training.dit import default_vae_folder, training_text_encoder
    from kino.training.trainer import resolve_device

    if config.dataset is None:
        raise KinoUserError("the config has no [dataset] section: `kino preprocess` encodes a video dataset "
                            "(see configs/dit_videos.toml); Shapes World caches are built by `kino train dit`")
    rank, world = rank_and_world()
    dataset_parts(config.dataset)  # a bad captions file or shard list fails before any model loads
    vae_path = Path(config.vae) if config.vae is not None else default_vae_folder(config.init_from)  # as training
    if not vae_path.exists():
        raise KinoUserError(f"the VAE folder {vae_path} does not exist: set vae = \"MODEL_DIR\" in the config")
    device = resolve_device(config.train.device)
    if device.type == "cuda":  # under torchrun: this rank's own GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    vae = load_vae(vae_path, device)
    if text_encoder is None:  # init_from's own (a Wan folder's UMT5), else MiniLM
        text_encoder = training_text_encoder(config, device)
    return build_video_cache(
        config.cache.dir, vae, text_encoder, config.dataset, rank=rank, world_size=world,
        progress=lambda it: tqdm(it, desc=f"preprocess rank {rank}/{world}", unit="part", disable=not progress),
        image=wan_image_condition(config, vae, device),
    )


def wan_image_condition(config, vae, device) -> WanImageCondition | WanVaceContext | None:
    """The image conditioning a fine-tune of `config.init_from` needs in its cache: for a Wan
    image-to-video model (its DiT reads 2 x z_dim + 4 channels: I2V, and FLF2V with the last
    frame too), with its CLIP encoder when it has one (Wan2.1; Wan2.2 I2V-A14B has none); for a
    Wan2.1 VACE model its context (`WanVaceContext`); None for every other model."""
    from kino.models.folder import load_component, read_manifest
    from kino.training.dit import init_dit, model_folder

    if config.init_from is None:
        return None
    _, dit_config = init_dit(config.init_from)
    if dit_config.vace_layers:  # a Wan2.1 VACE model: its context (WanVaceContext)
        return WanVaceContext(vae)
    if dit_config.in_channels != 2 * vae.config.z_dim + vae.config.time_stride:
        return None
    folder = model_folder(config.init_from)
    clip = None
    if "image_encoder" in (read_manifest(folder) or {}).get("components", {}):
        from kino.models.clip import CLIPImageEncoder

        comp = load_component(folder, "image_encoder", weights=False)
        clip = CLIPImageEncoder.from_reference(comp.config, comp.folder, device=device)
    return WanImageCondition(vae, clip, last=dit_config.img_pos_len is not None)  # FLF2V: the last frame too


def open_video_cache(path: str | Path, dataset: VideoDatasetConfig, vae=None) -> LatentCache:
    """The preprocessed cache of `dataset` at `path`, checked to be complete, of this dataset
    and (when given) of this VAE."""
    root = Path(path)
    if not (root / CACHE_JSON).is_file():
        raise KinoUserError(f"no preprocessed cache at {root}: run `kino preprocess --config FILE` with this "
                            "config first")
    cache = LatentCache(root)
    source = cache.meta.get("source")
    if source != {"kind": "videos", **config_to_dict(dataset)}:
        raise KinoUserError(f"the cache {root} was not made from this config's [dataset] (it holds {source}): "
                            "run `kino preprocess` with this config, or point cache.dir elsewhere")
    if vae is not None and not same_latents(cache.meta["vae"], vae_identity(vae)):
        raise KinoUserError(f"the cache {root} was made with another VAE than this config's: preprocess again")
    return cache


# ---------------------------------------------------------------------------- on the fly


class OnTheFlyLatents:
    """The same clips as `build_video_cache` makes, encoded when a batch asks for them: the
    interface of `LatentCache` that DiTTask uses, with the VAE and the text encoder in the
    training step. For small datasets and for checking the cache.

    Clips are decoded once at construction (kept in memory as float pixels); each `get`
    encodes the clips it returns, one VAE call per clip. With `like_cache` (default)
    latents are rounded to bfloat16 and text to float16, as the cache stores them: on CPU
    the batches then equal the cache's bit for bit (tests/test_datasets.py). A backend
    whose float rounding depends on the VAE's batch size (the cache encodes up to
    ENCODE_BATCH clips per call) could move a value by one bf16 step (2^-8 relative).
    """

    def __init__(self, dataset: VideoDatasetConfig, vae, text_encoder, like_cache: bool = True):
        self.vae, self.text_encoder, self.like_cache = vae, text_encoder, like_cache
        self.root = Path("<on the fly>")
        order = dataset.bucket_list()
        clips: dict[Bucket, list[Clip]] = {b: [] for b in order}
        self.skipped: list[Skipped] = []
        for part in dataset_parts(dataset):
            for item in iter_clips(part, dataset.fps, order):
                if isinstance(item, Skipped):
                    self.skipped.append(item)
                else:
                    clips[item.bucket].append(item)
        self._clips = {b: c for b, c in clips.items() if c}
        self.buckets: list[Bucket] = list(self._clips)
        self.text_dim = int(text_encoder.dim)
        self.latent_channels = int(vae.config.z_dim)
        text, mask = _encode_text(text_encoder, [""])
        self.empty_text, self.empty_mask = text.float(), mask  # (1, L, D), (1, L)
        self.text_length = int(mask.shape[1])

    def num_clips(self, bucket: Bucket) -> int:
        return len(self._clips[bucket])

    def latent_shape(self, bucket: Bucket) -> tuple[int, int, int, int]:
        return latent_shape(bucket, self.vae.config)

    def captions(self, bucket: Bucket) -> list[str]:
        return [c.caption for c in self._clips[bucket]]

    def keys(self, bucket: Bucket) -> list[str]:
        return [c.key for c in self._clips[bucket]]

    def get(self, bucket: Bucket, indices) -> dict[str, Tensor]:
        chosen = [self._clips[bucket][int(i)] for i in np.asarray(indices)]
        captions = [c.caption for c in chosen]
        if self.like_cache:
            latents = torch.cat([_encode_latents(self.vae, [c.video]) for c in chosen])  # (B, Z, T, h, w) bf16
            text, mask = _encode_text(self.text_encoder, captions)  # (B, L, D) fp16, (B, L)
        else:
            device = next(self.vae.parameters()).device
            with torch.no_grad():
                latents = torch.cat([self.vae.normalize(self.vae.encode(c.video[None].to(device))[0]).cpu()
                                     for c in chosen])  # (B, Z, T, h, w)
                text, mask = self.text_encoder.encode(captions)  # (B, L, D), (B, L)
        return {"latents": latents.float(), "text": text.float().cpu(), "mask": mask.bool().cpu()}
