"""Latent cache: clips encoded once by the VAE and the text encoder, so that
training the diffusion transformer never runs either of them per step. This module builds
Shapes World caches; kino/data/preprocess.py writes real video datasets in the same format
(its clips carry `keys`, where they came from, instead of scene `indices`), and
`LatentCache` reads both.

Layout::

    CACHE/
      cache.json                        what built it: VAE sha256 + config, text encoder,
                                        split, seed, dtypes, buckets and their shards
      empty_prompt.safetensors          text (1, L, D), mask (1, L): the encoding of ""
      17x64x96/shard-00000.safetensors  latents (N, 16, T, h, w) bfloat16, normalised
                                        text (N, L, D) float16, mask (N, L) bool
      17x64x96/shard-00000.json         captions and scene indices of those N clips

A bucket is (frames, height, width) in pixels; every clip of a bucket has that shape, so a
batch drawn from one bucket stacks without padding. Clip i of bucket (F, H, W) is Shapes
World scene `clip_index((F, H, W), i)` of (split, seed), rendered at that size and length:
indices never collide across buckets, so every clip in the cache is a distinct scene, and
any shard can be rebuilt on its own.

Resume: each shard is written to a temporary file and renamed into place, its JSON sidecar
last; a shard counts as done when both exist and the sidecar lists the expected scenes.
Rerunning `build_world_cache` skips done shards. A cache belongs to one VAE (latents from
two VAEs cannot be mixed): a rebuild with another VAE is refused.

Dtypes, measured with the small VAE (early checkpoint) and MiniLM: the reader returns
float32, storage is halved.
- latents bfloat16: rounding error RMS 1.7e-3 on unit-variance latents, which adds ~3e-6 to
  the flow-matching MSE and is far below the noise of any trained timestep (t < 0.01 has
  probability ~2e-6 under the logit-normal); decoding bf16-rounded latents matches decoding
  the fp32 ones at 88-94 dB PSNR, where the VAE's own reconstructions are at 17-19 dB (that
  early checkpoint) and ~30 dB at best for a trained one: ~60 dB of margin.
- text float16: MiniLM features are within |x| < 6 (fp16 holds 65504; checked at build),
  relative RMS rounding 2e-4. At 32 tokens x 384 the text is most of a clip's bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from kino import __version__
from kino.errors import KinoUserError
from kino.tasks.conditioning import to_model_range
from kino.world.captions import FRAME_COUNTS, SIZES
from kino.world.generator import loop_progress, render, scene_at

CACHE_JSON = "cache.json"
EMPTY_PROMPT = "empty_prompt.safetensors"
FORMAT = 1
LATENT_DTYPE = torch.bfloat16
TEXT_DTYPE = torch.float16
CLIPS_PER_BUCKET_MAX = 10**7  # clip_index leaves room for this many clips per bucket
ENCODE_BATCH = 8  # clips per VAE / text encoder call; recorded, since batching changes rounding

Bucket = tuple[int, int, int]  # (frames, height, width) in pixels
_NAME = re.compile(r"^(\d+)x(\d+)x(\d+)$")
# Fields of cache.json that fix what a latent means; a rebuild must agree on all of them (and on
# "vae", matched by same_latents). World caches have split, seed and shard_size; video caches
# (kino/data/preprocess.py) have source (the dataset) instead.
_IDENTITY = ("format", "text_encoder", "split", "seed", "shard_size", "source", "encode_batch",
             "latent_dtype", "text_dtype", "motion", "loop", "image_condition")
MOTIONS = ("linear", "loop")  # how a world cache's clips move (build_world_cache)
LOOP_RENDER = {"wave": "cosine", "period": "frames - 1 - time_stride"}


def loop_period(frames: int, time_stride: int) -> int:
    """The period of a loop cache's clips of `frames` frames: latent frame T - 1 repeats latent frame 1."""
    return frames - 1 - time_stride


# ---------------------------------------------------------------------------- buckets


def default_buckets() -> list[Bucket]:
    """Every Shapes World frame count x every size: images (F = 1) included."""
    return [(f, h, w) for f in FRAME_COUNTS for h, w in SIZES]


def bucket_name(bucket: Bucket) -> str:
    return "x".join(str(int(n)) for n in bucket)


def parse_bucket(text: str) -> Bucket:
    """'17x64x96' -> (17, 64, 96)."""
    m = _NAME.match(text.strip())
    if m is None:
        raise KinoUserError(f"invalid bucket {text!r}: write FRAMESxHEIGHTxWIDTH, e.g. 17x64x96")
    return tuple(int(g) for g in m.groups())  # type: ignore[return-value]


def clip_index(bucket: Bucket, i: int) -> int:
    """Scene index of clip i of `bucket`: a key made of the bucket's own numbers (not its
    position in a list, so adding buckets never changes existing clips), times 10^7."""
    f, h, w = bucket
    return ((f * 1000 + h) * 1000 + w) * CLIPS_PER_BUCKET_MAX + i


def _check_bucket(bucket: Bucket, vae_config) -> None:
    f, h, w = bucket
    s = vae_config.space_stride
    if f < 1 or (f - 1) % vae_config.time_stride or h % s or w % s or not (0 < h < 1000 and 0 < w < 1000):
        raise KinoUserError(
            f"invalid bucket {bucket_name(bucket)}: frames must be 1 + {vae_config.time_stride}k and height, "
            f"width multiples of {s} below 1000")


def latent_shape(bucket: Bucket, vae_config) -> tuple[int, int, int, int]:
    """(C, T, h, w) of one clip's latents."""
    f, h, w = bucket
    s = vae_config.space_stride
    return vae_config.z_dim, vae_config.latent_frames(f), h // s, w // s


# ---------------------------------------------------------------------------- identity


# The decoder half of a VideoVAE: it takes no part in making latents.
DECODER_PREFIXES = ("decoder.", "conv2.")
DECODER_CONFIG = ("decoder_base_dim",)  # VAEConfig fields that shape the decoder alone
# VAEConfig fields added after caches and trained models recorded VAE identities (Wan2.2's
# layout), with the value every earlier VAE has: left out of the hashes at that value.
LATER_FIELDS = {"residual": False, "patch_size": 1}


def vae_identity(vae) -> dict:
    """A cache's record of the VAE its latents came from: `sha256` of the whole model (config,
    latent statistics included, and every tensor of its state dict in name order) and
    `latent_sha256` of what makes latents (the same without the decoder: config, encoder and
    conv1), both in one pass. Caches are matched on the latter, so a decoder fine-tune (which
    leaves every latent bit for bit the same) keeps a cache, and the DiTs trained on it, valid.
    The decoder's width (`decoder_base_dim`) is not part of the latent identity, so a widened
    decoder keeps caches too; unset, it is left out of both hashes, which are then what they
    were before the field existed; so are Wan2.2's layout fields at their defaults (LATER_FIELDS)."""
    config = vae.config.to_dict()
    hashed = {k: v for k, v in config.items() if (k not in DECODER_CONFIG or v is not None)
              and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}
    whole = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode())
    latent = hashlib.sha256(json.dumps({k: v for k, v in hashed.items() if k not in DECODER_CONFIG},
                                       sort_keys=True).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        parts = (f"{name}:{t.dtype}:{tuple(t.shape)}".encode(), t.reshape(-1).view(torch.uint8).numpy().tobytes())
        for h in (whole,) if name.startswith(DECODER_PREFIXES) else (whole, latent):
            for part in parts:
                h.update(part)
    return {"sha256": whole.hexdigest(), "latent_sha256": latent.hexdigest(), "config": config}


def identity_key(recorded: dict, vae_record: dict) -> str:
    """The field two VAE records are compared on: the latent identity when both have one
    (caches written before it existed only have the whole model's sha256)."""
    return "latent_sha256" if "latent_sha256" in recorded and "latent_sha256" in vae_record else "sha256"


def same_latents(recorded: dict, vae_record: dict) -> bool:
    """Whether a cache's recorded VAE (`meta["vae"]`) makes the latents `vae_record`'s VAE makes."""
    key = identity_key(recorded, vae_record)
    return recorded.get(key) == vae_record[key]


def text_encoder_info(encoder) -> dict:
    name = getattr(encoder, "name", None) or f"{type(encoder).__module__}.{type(encoder).__qualname__}"
    return {"name": name, "dim": int(encoder.dim), "max_length": int(encoder.max_length)}


# ---------------------------------------------------------------------------- writing


def _shard_stem(bucket: Bucket, k: int) -> str:
    return f"{bucket_name(bucket)}/shard-{k:05d}"


def _plan(buckets: Sequence[Bucket], clips_per_bucket: int, shard_size: int) -> list[tuple[Bucket, int, range]]:
    """(bucket, shard number, clip numbers) for every shard of the cache."""
    return [
        (b, k, range(start, min(start + shard_size, clips_per_bucket)))
        for b in buckets
        for k, start in enumerate(range(0, clips_per_bucket, shard_size))
    ]


def _shard_done(root: Path, bucket: Bucket, k: int, clips: range) -> bool:
    stem = root / _shard_stem(bucket, k)
    side, data = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not (side.is_file() and data.is_file()):
        return False
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except ValueError:
        return False
    return meta.get("indices") == [clip_index(bucket, i) for i in clips] and meta.get("bytes") == data.stat().st_size


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # per process: ranks never share one
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    _write_atomic(path, lambda p: p.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8"))


def _remove_stale_temp(root: Path) -> None:
    for p in root.glob("**/*.tmp-*"):
        if p.is_file():
            p.unlink()


def _encode_text(encoder, prompts: list[str]) -> tuple[Tensor, Tensor]:
    text, mask = encoder.encode(prompts)
    text = text.detach().float().cpu()
    limit = torch.finfo(TEXT_DTYPE).max
    if not torch.isfinite(text).all() or text.abs().max() >= limit:
        raise KinoUserError(f"the text encoder returned features beyond {TEXT_DTYPE}'s range ({limit}); "
                            "they cannot be cached in that dtype")
    return text.to(TEXT_DTYPE), mask.detach().bool().cpu()  # (B, L, D), (B, L)


@torch.no_grad()
def _encode_latents(vae, videos: list[np.ndarray | Tensor]) -> Tensor:
    """uint8 (F, H, W, 3) arrays, or float (3, F, H, W) tensors in [-1, 1], of one shape."""
    device = next(vae.parameters()).device
    x = torch.stack([v if isinstance(v, Tensor) else to_model_range(v) for v in videos]).to(device)  # (B, 3, F, H, W)
    mean, _ = vae.encode(x)  # posterior mean: the cache stores the distribution's centre
    return vae.normalize(mean).float().cpu().to(LATENT_DTYPE)  # (B, Z, T, h, w)


def _check_same(old: dict, new: dict, root: Path) -> None:
    if not same_latents(old.get("vae", {}), new["vae"]):
        key = identity_key(old.get("vae", {}), new["vae"])
        old_sha = str(old.get("vae", {}).get(key))
        raise KinoUserError(
            f"the latent cache {root} was built with another VAE ({key} {old_sha[:16]}..., "
            f"this one is {new['vae'][key][:16]}...): latents of two VAEs cannot be mixed. Delete {root} "
            "or choose another cache folder")
    differ = [k for k in _IDENTITY if (k in old or k in new) and old.get(k) != new.get(k)]
    if differ:
        details = "; ".join(f"{k}: cache has {old.get(k)!r}, asked {new.get(k)!r}" for k in differ)
        raise KinoUserError(f"the latent cache {root} was built with other settings ({details}). Delete {root} "
                            "or choose another cache folder")


def build_world_cache(
    out_dir: str | Path,
    vae,
    text_encoder,
    *,
    clips_per_bucket: int,
    split: str = "train",
    seed: int = 0,
    buckets: Sequence[Bucket] | None = None,
    shard_size: int = 256,
    progress: Callable[[Iterable], Iterable] | None = None,
    motion: str = "linear",
) -> Path:
    """Render, encode and write `clips_per_bucket` Shapes World clips for every bucket (default:
    `default_buckets()`); returns the cache folder. Resumable: shards already written are kept.

    `motion`: "linear" renders the world's clips as the contract says; "loop" renders the same
    scenes going there and back (`loop_progress`, cosine: slow at both turns) with a period of
    F - 1 - time_stride frames, so the clip's last latent frame (frames F - time_stride .. F - 1)
    shows what latent frame 1 (frames 1 .. time_stride) shows: the data of the loop pattern in
    training (a loop is sampled with its last latent frame tied to latent frame 1; see
    kino/tasks/conditioning.py). Loop caches need at least three latent frames per bucket.

    `vae` is a VideoVAE (posterior means are normalised with its latent statistics);
    `text_encoder` anything with `dim`, `max_length` and `encode(prompts) -> (tokens, mask)`.
    `progress` wraps the list of encode batches still to do (e.g. a tqdm factory).
    """
    root = Path(out_dir)
    buckets = [tuple(int(n) for n in b) for b in (default_buckets() if buckets is None else buckets)]
    if not buckets or len(set(buckets)) != len(buckets):
        raise KinoUserError(f"a cache needs at least one bucket and no repeats; got {buckets}")
    if motion not in MOTIONS:
        raise KinoUserError(f"unknown cache motion {motion!r}: allowed {', '.join(MOTIONS)}")
    stride = vae.config.time_stride
    for b in buckets:
        _check_bucket(b, vae.config)
        if motion == "loop" and b[0] < 1 + 2 * stride:
            raise KinoUserError(f"a loop cache needs clips of at least {1 + 2 * stride} frames (three latent "
                                f"frames); got bucket {bucket_name(b)}")
    if not 1 <= clips_per_bucket <= CLIPS_PER_BUCKET_MAX:
        raise KinoUserError(f"clips_per_bucket must be in [1, {CLIPS_PER_BUCKET_MAX}], got {clips_per_bucket}")
    if shard_size < 1:
        raise KinoUserError(f"shard_size must be >= 1, got {shard_size}")

    meta = {
        "format": FORMAT,
        "complete": False,
        "kino_version": __version__,
        "vae": vae_identity(vae),
        "text_encoder": text_encoder_info(text_encoder),
        "split": split,
        "seed": seed,
        "shard_size": shard_size,
        "encode_batch": ENCODE_BATCH,
        "latent_dtype": str(LATENT_DTYPE).removeprefix("torch."),
        "text_dtype": str(TEXT_DTYPE).removeprefix("torch."),
        "clips_per_bucket": clips_per_bucket,
        **({"motion": motion} if motion != "linear" else {}),  # linear caches predate the key
        **({"loop": LOOP_RENDER} if motion == "loop" else {}),  # loop caches before it tied another frame
        "buckets": [
            {"name": bucket_name(b), "bucket": list(b), "latent_shape": list(latent_shape(b, vae.config)),
             "clips": clips_per_bucket,
             "shards": [_shard_stem(b, k) for k, _ in enumerate(range(0, clips_per_bucket, shard_size))]}
            for b in buckets
        ],
    }
    index_path = root / CACHE_JSON
    if index_path.is_file():
        try:
            old = json.loads(index_path.read_text(encoding="utf-8"))
        except ValueError:
            raise KinoUserError(f"{index_path} is not valid JSON: delete {root} and build the cache again") from None
        _check_same(old, meta, root)
        if old == {**meta, "complete": True} and all(_shard_done(root, b, k, c) for b, k, c in
                                                     _plan(buckets, clips_per_bucket, shard_size)):
            return root

    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp(root)
    _write_json(index_path, meta)  # complete: false until every shard is in place

    empty_text, empty_mask = _encode_text(text_encoder, [""])
    _write_atomic(root / EMPTY_PROMPT, lambda p: save_file({"text": empty_text, "mask": empty_mask}, str(p)))

    todo = [job for job in _plan(buckets, clips_per_bucket, shard_size) if not _shard_done(root, *job)]
    batches = [(bucket, k, clips, clips[j:j + ENCODE_BATCH])
               for bucket, k, clips in todo for j in range(0, len(clips), ENCODE_BATCH)]
    parts: dict[tuple[Bucket, int], list] = {}
    for bucket, k, clips, chunk in (progress or iter)(batches):
        f, h, w = bucket
        scenes = [scene_at(split, seed, clip_index(bucket, i), frames=f, size=(h, w)) for i in chunk]
        moves = None if motion == "linear" else loop_progress(f, loop_period(f, stride))
        latents = _encode_latents(vae, [render(s, moves) for s in scenes])  # (b, Z, T, h, w)
        text, mask = _encode_text(text_encoder, [s.text for s in scenes])  # (b, L, D), (b, L)
        got = parts.setdefault((bucket, k), [])
        got.append((latents, text, mask, [s.text for s in scenes]))
        if chunk[-1] == clips[-1]:  # the shard's last batch: write it
            _write_shard(root, bucket, k, clips, parts.pop((bucket, k)))

    _write_json(index_path, {**meta, "complete": True})
    return root


def write_shard_files(stem: Path, bucket: Bucket, parts: list, **side) -> int:
    """One shard from encoded parts [(latents, text, mask, captions, keys[, extras])]:
    STEM.safetensors, then STEM.json (bucket, captions, `side`, bytes), written last: its
    presence marks the shard done. `extras`, a dict of per-clip tensors (a Wan image-to-video
    model's image conditioning), is stored beside the latents. Returns the tensor file's size."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "latents": torch.cat([p[0] for p in parts]).contiguous(),  # (N, Z, T, h, w)
        "text": torch.cat([p[1] for p in parts]).contiguous(),  # (N, L, D)
        "mask": torch.cat([p[2] for p in parts]).contiguous(),  # (N, L)
    }
    if len(parts[0]) > 5:
        tensors |= {k: torch.cat([p[5][k] for p in parts]).contiguous() for k in parts[0][5]}
    data = stem.with_suffix(".safetensors")
    _write_atomic(data, lambda p: save_file(tensors, str(p), metadata={"kino_version": __version__}))
    size = data.stat().st_size
    _write_json(stem.with_suffix(".json"), {"bucket": list(bucket), **side,
                                            "captions": [c for p in parts for c in p[3]], "bytes": size})
    return size


def _write_shard(root: Path, bucket: Bucket, k: int, clips: range, parts: list) -> None:
    write_shard_files(root / _shard_stem(bucket, k), bucket, parts,
                      indices=[clip_index(bucket, i) for i in clips])


# ---------------------------------------------------------------------------- reading


class LatentCache:
    """A built cache, held in memory: `get(bucket, indices)` returns float32 tensors.

    `buckets` lists the buckets in the order of cache.json; `num_clips(bucket)` their sizes;
    `empty_text`, `empty_mask` (1, L, D), (1, L) encode the empty prompt "" (for caption
    dropout and unconditional guidance). `meta` is cache.json.
    """

    def __init__(self, path: str | Path):
        self.root = Path(path)
        index_path = self.root / CACHE_JSON
        if not index_path.is_file():
            raise KinoUserError(f"no latent cache at {self.root} ({CACHE_JSON} is missing): build it first")
        try:
            self.meta = json.loads(index_path.read_text(encoding="utf-8"))
        except ValueError:
            raise KinoUserError(f"{index_path} is not valid JSON: delete {self.root} and build it again") from None
        if self.meta.get("format") != FORMAT:
            raise KinoUserError(f"{self.root} holds a cache of format {self.meta.get('format')}; this kino reads "
                                f"format {FORMAT}: build it again")
        if not self.meta.get("complete"):
            raise KinoUserError(f"the latent cache {self.root} is incomplete (its build was interrupted): run the "
                                "build again to finish it")
        self.buckets: list[Bucket] = [tuple(e["bucket"]) for e in self.meta["buckets"]]
        self._data: dict[Bucket, dict[str, Tensor]] = {}
        self._captions: dict[Bucket, list[str]] = {}
        self._indices: dict[Bucket, list[int]] = {}
        self._keys: dict[Bucket, list[str]] = {}
        for entry in self.meta["buckets"]:
            self._load_bucket(entry)
        empty = self._load_file(self.root / EMPTY_PROMPT)
        self.empty_text = empty["text"].float()  # (1, L, D)
        self.empty_mask = empty["mask"].bool()  # (1, L)
        self.text_dim = int(self.meta["text_encoder"]["dim"])
        self.text_length = int(self.empty_mask.shape[1])
        self.latent_channels = int(self.meta["vae"]["config"]["z_dim"])
        self.vae_sha256: str = self.meta["vae"]["sha256"]
        self.vae_latent_sha256: str | None = self.meta["vae"].get("latent_sha256")

    def _load_file(self, path: Path) -> dict[str, Tensor]:
        if not path.is_file():
            raise KinoUserError(f"{path} is missing from the latent cache {self.root}: run the build again")
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors has its own error types for damaged files
            raise KinoUserError(f"{path} is not a valid safetensors file ({e}): delete it and run the build "
                                "again") from None

    def _load_bucket(self, entry: dict) -> None:
        bucket: Bucket = tuple(entry["bucket"])
        parts, captions, indices, keys = [], [], [], []
        for stem in entry["shards"]:
            side_path = (self.root / stem).with_suffix(".json")
            if not side_path.is_file():
                raise KinoUserError(f"{side_path} is missing from the latent cache {self.root}: run the build again")
            side = json.loads(side_path.read_text(encoding="utf-8"))
            tensors = self._load_file((self.root / stem).with_suffix(".safetensors"))
            n = len(side["captions"])
            expected = (n, *entry["latent_shape"])
            if tuple(tensors["latents"].shape) != expected or tensors["text"].shape[0] != n:
                raise KinoUserError(f"{self.root / stem} holds latents {tuple(tensors['latents'].shape)}, expected "
                                    f"{expected}: delete it and run the build again")
            parts.append(tensors)
            captions += side["captions"]
            indices += side.get("indices", [])  # world caches: scene indices
            keys += side.get("keys", [])  # video caches: where each clip came from
        self._data[bucket] = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}  # extras included
        self._captions[bucket] = captions
        self._indices[bucket] = indices
        self._keys[bucket] = keys or [str(i) for i in indices]

    def __len__(self) -> int:
        return sum(len(c) for c in self._captions.values())

    def num_clips(self, bucket: Bucket) -> int:
        return len(self._captions[self._key(bucket)])

    def latent_shape(self, bucket: Bucket) -> tuple[int, int, int, int]:
        """(C, T, h, w) of one clip of `bucket`."""
        return tuple(self._data[self._key(bucket)]["latents"].shape[1:])  # type: ignore[return-value]

    def captions(self, bucket: Bucket) -> list[str]:
        return list(self._captions[self._key(bucket)])

    def scene_indices(self, bucket: Bucket) -> list[int]:
        return list(self._indices[self._key(bucket)])

    def keys(self, bucket: Bucket) -> list[str]:
        """Where each clip came from: a video dataset's sample keys, or world scene indices."""
        return list(self._keys[self._key(bucket)])

    def get(self, bucket: Bucket, indices: Sequence[int] | Tensor) -> dict[str, Tensor]:
        """latents (B, C, T, h, w) float32, text (B, L, D) float32, mask (B, L) bool, and any
        extra per-clip tensors the cache holds (float32: a Wan image-to-video model's
        `image_latents` (B, C, T, h, w), `image_features` (B, N, D))."""
        data = self._data[self._key(bucket)]
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return {key: value[idx].bool() if key == "mask" else value[idx].float() for key, value in data.items()}

    def nbytes_per_clip(self, bucket: Bucket) -> int:
        """Bytes one clip of `bucket` takes on disk and in memory (latents + text + mask)."""
        data = self._data[self._key(bucket)]
        return sum(t[0].numel() * t.element_size() for t in data.values())

    def _key(self, bucket: Bucket) -> Bucket:
        key = tuple(int(n) for n in bucket)
        if key not in self._data:
            raise KinoUserError(f"bucket {bucket_name(key)} is not in the latent cache {self.root}; it holds "
                                f"{', '.join(bucket_name(b) for b in self.buckets)}")
        return key  # type: ignore[return-value]

