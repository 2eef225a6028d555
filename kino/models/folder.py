"""Model folders: the on-disk layout every kino model uses.

    MODEL/
      kino.json              {"name", "kino_version", "components": {"vae": {"path": "vae",
                              "class": "VideoVAE", "files": {"model.safetensors": "<sha256>", ...}}}}
      vae/config.json        the component's typed config, as JSON
      vae/model.safetensors  its weights

A component folder (config.json + model.safetensors) also loads on its own, e.g. straight
from a training run. When a kino.json lists a file's sha256, the file is checked before use,
so shipped or downloaded weights that were altered are refused.

Weights over `save_component`'s shard size (5 GB by default, as transformers writes them) are
split, in the layout of transformers and diffusers: model-00001-of-0000N.safetensors ... and
model.safetensors.index.json ({"metadata": {"total_size"}, "weight_map": {name: file}}). A
Wan2.1-14B DiT converted to float32 is 57 GB, more than one file the Hugging Face Hub takes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, fields
from fnmatch import fnmatch
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kino import __version__
from kino.errors import KinoUserError

MANIFEST = "kino.json"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
SHARD_PATTERN = "model-*-of-*.safetensors"
MAX_SHARD_BYTES = 5 * 10**9


class WeightsIntegrityError(KinoUserError):
    """A weights file whose sha256 differs from the one recorded for it."""


def reject_unknown_fields(cls, d: dict, what: str | None = None, error: type[Exception] = ValueError) -> None:
    """Config dicts from disk must name only fields of the dataclass `cls`."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise error(f"unknown {what or cls.__name__ + ' fields'} {unknown}; known: {sorted(known)}")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- hashes of big files, once
#
# Checking a 14B model's 28 GB on every load costs a minute. `checked_sha256` hashes a file
# once and records the digest with the file's identity (device, inode, size, mtime and ctime
# in ns); while that identity is unchanged, a later load takes the recorded digest. Writing
# to a file changes its mtime and ctime, and ctime cannot be set back by ordinary means, so an
# altered file is hashed again. The record is a JSON file in the user's cache folder
# ($KINO_CACHE_DIR, else $XDG_CACHE_HOME/kino, else ~/.cache/kino); KINO_VERIFY_CACHE=0 hashes
# every time. Files under RECORD_MIN_BYTES are always hashed (it is as fast as a lookup).
RECORD_MIN_BYTES = 256 << 20
RECORD_NAME = "verified-sha256.json"


def cache_dir() -> Path:
    if os.environ.get("KINO_CACHE_DIR"):
        return Path(os.environ["KINO_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kino"


def _file_identity(stat: os.stat_result) -> list[int]:
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _read_record(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # none yet, or damaged: start afresh
    return data if isinstance(data, dict) else {}


def checked_sha256(path: str | Path) -> str:
    """sha256 of a file, taken from the record of an earlier hash while the file is unchanged
    (see above); otherwise computed (and recorded, for big files)."""
    path = Path(path).resolve()
    stat = path.stat()
    use_record = stat.st_size >= RECORD_MIN_BYTES and os.environ.get("KINO_VERIFY_CACHE", "1") != "0"
    if not use_record:
        return sha256_file(path)
    record_path = cache_dir() / RECORD_NAME
    entry = _read_record(record_path).get(str(path))
    if isinstance(entry, dict) and entry.get("identity") == _file_identity(stat):
        return str(entry["sha256"])
    digest = sha256_file(path)
    if _file_identity(path.stat()) != _file_identity(stat):
        return digest  # changed while it was read: hash it again next time
    try:  # best effort: a read-only home only costs the next load a hash
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record = _read_record(record_path)
        record = {k: v for k, v in record.items() if Path(k).exists()}  # forget deleted files
        record[str(path)] = {"identity": _file_identity(stat), "sha256": digest}
        tmp = record_path.with_name(f"{record_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
        os.replace(tmp, record_path)
    except OSError:
        pass
    return digest


def default_model_dir() -> Path:
    """The model shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "weights" / "default"


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def is_weights_file(name: str) -> bool:
    """A component's weights: model.safetensors, or its shards and their index."""
    return name in (WEIGHTS, WEIGHTS_INDEX) or fnmatch(name, SHARD_PATTERN)


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """The tensors in their order, cut into groups of at most `max_bytes` (a bigger tensor alone)."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > max_bytes:
            groups.append({})
            size = 0
        groups[-1][key] = t
        size += n
    return groups


def save_component(folder: str | Path, config: dict, state_dict: dict[str, torch.Tensor],
                   max_shard_bytes: int = MAX_SHARD_BYTES) -> dict[str, str]:
    """Write config.json + model.safetensors, or, when the weights are over `max_shard_bytes`,
    their shards and index (module docstring); weights files of an earlier save that the new
    one does not use are removed. Returns {file: sha256}."""
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    groups = _shards(tensors, max_shard_bytes)
    names = [WEIGHTS] if len(groups) == 1 else [f"model-{i:05d}-of-{len(groups):05d}.safetensors"
                                                 for i in range(1, len(groups) + 1)]
    for name, group in zip(names, groups):
        tmp = folder / (name + ".tmp")
        save_file(group, str(tmp), metadata={"format": "pt", "kino_version": __version__})
        os.replace(tmp, folder / name)
    if len(groups) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _atomic_json(folder / WEIGHTS_INDEX, {"metadata": {"total_size": total},
                                              "weight_map": {k: n for n, g in zip(names, groups) for k in g}})
        names.append(WEIGHTS_INDEX)
    for old in folder.iterdir():
        if is_weights_file(old.name) and old.name not in names:
            old.unlink()
    _atomic_json(folder / CONFIG, config)
    return {name: sha256_file(folder / name) for name in (CONFIG, *names)}


def weights_files(folder: str | Path) -> list[Path]:
    """A component folder's weights files: model.safetensors, else the shards its index names."""
    folder = Path(folder)
    if (folder / WEIGHTS).is_file() or not (folder / WEIGHTS_INDEX).is_file():
        return [folder / WEIGHTS]
    try:
        weight_map = json.loads((folder / WEIGHTS_INDEX).read_text())["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise KinoUserError(f"{folder / WEIGHTS_INDEX} is not a valid weights index ({e})") from None
    bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or not fnmatch(n, SHARD_PATTERN)]
    if bad:
        raise KinoUserError(f"{folder / WEIGHTS_INDEX} names files that are not shards beside it: {bad[:3]}")
    return [folder / n for n in names]


def combined_sha256(digests: dict[str, str]) -> str | None:
    """One digest for a component's weights from {file: sha256} (a manifest's record, or
    `save_component`'s return): a single model.safetensors' own sha256, for shards the sha256
    of their "name sha256" lines (index left out: it only maps names); None when there are none."""
    if WEIGHTS in digests:
        return digests[WEIGHTS]
    shards = sorted(n for n in digests if fnmatch(n, SHARD_PATTERN))
    if not shards:
        return None
    return hashlib.sha256("".join(f"{n} {digests[n]}\n" for n in shards).encode()).hexdigest()


def weights_sha256(folder: str | Path) -> str:
    """`combined_sha256` of a component folder's weights files (big ones from the record of an
    earlier hash while unchanged: `checked_sha256`)."""
    return combined_sha256({p.name: checked_sha256(p) for p in weights_files(folder)})


def write_manifest(root: str | Path, name: str, components: dict[str, tuple[str, str]],
                   extra: dict | None = None) -> Path:
    """components: {component: (subfolder, class name)}; hashes every file under each subfolder.
    `extra` adds top-level sections (e.g. the pipeline's generation defaults)."""
    root = Path(root)
    entries = {}
    for comp, (sub, cls) in components.items():
        folder = root / sub  # nested files too (a UMT5 text encoder keeps umt5/ and tokenizer/ inside)
        files = {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}
        entries[comp] = {"path": sub, "class": cls, "files": files}
    _atomic_json(root / MANIFEST, {"name": name, "kino_version": __version__, "components": entries,
                                   **(extra or {})})
    return root / MANIFEST


@dataclass
class Component:
    folder: Path
    config: dict
    state_dict: dict[str, torch.Tensor]
    model_name: str


def read_manifest(root: str | Path) -> dict | None:
    """kino.json of a model folder, or None for a bare component folder."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise KinoUserError(f"{path} is not valid JSON ({e.msg})") from None


def read_safetensors(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, floating-point ones converted to `dtype` one tensor
    at a time as they are read (a 14B model stored in fp32 never sits in memory in fp32)."""
    state = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            state[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return state


def load_component(path: str | Path, component: str, weights: bool = True,
                   dtype: torch.dtype | None = None, skip: tuple[str, ...] = ()) -> Component:
    """Load `component` from a model folder (checking sha256 sums) or a bare component folder.
    weights=False: a component described by its config alone (e.g. a reference to a text
    encoder whose files ship in a package). `dtype` converts floating-point weights as they
    are read. Files matching a `skip` pattern (relative to the model folder, fnmatch) are
    neither needed nor checked (their weights come from another file)."""
    root = Path(path)
    if not root.exists():
        raise KinoUserError(f"model folder {root} does not exist")
    manifest = root / MANIFEST
    if manifest.is_file():
        try:
            meta = json.loads(manifest.read_text())
            entry = meta["components"][component]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise KinoUserError(f"{manifest} has no valid entry for component {component!r} ({e})") from None
        folder, name = root / entry["path"], meta.get("name", root.name)
        for fname, expected in entry["files"].items():
            if (is_weights_file(fname) and not weights) or any(fnmatch(f"{entry['path']}/{fname}", p) for p in skip):
                continue  # a component read for its config alone; weights that come from elsewhere
            f = folder / fname
            if not f.is_file():
                raise KinoUserError(f"{f} is missing: {manifest} lists it for component {component!r}")
            actual = checked_sha256(f)
            if actual != expected:
                raise WeightsIntegrityError(
                    f"{f} failed its integrity check: sha256 {actual} but {manifest} records {expected}; "
                    "the file was altered or corrupted — reinstall kino or re-download the model")
    else:
        folder, name = root, root.name
    files = [folder / CONFIG, *weights_files(folder)] if weights else [folder / CONFIG]
    for f in files:
        if not f.is_file():
            raise KinoUserError(f"{f} is missing: a {component} folder holds {CONFIG} and {WEIGHTS} (or its "
                                f"shards and {WEIGHTS_INDEX}), or a model folder has {MANIFEST} naming its components")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise KinoUserError(f"{folder / CONFIG} is not valid JSON ({e.msg})") from None
    if not weights:
        return Component(folder, config, {}, name)
    state = {}
    for f in files[1:]:
        try:
            part = read_safetensors(f, dtype)
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise KinoUserError(f"{f} is not a valid safetensors file ({e})") from None
        if state.keys() & part.keys():
            raise KinoUserError(f"{f} repeats tensors of another shard: {sorted(state.keys() & part.keys())[:3]}")
        state.update(part)
    return Component(folder, config, state, name)


def load_module(path: str | Path | None, component: str, config_cls, model_cls,
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A frozen model of `model_cls(config_cls.from_dict(config.json))` in eval mode, in `dtype`,
    from a model folder (sha256-checked) or a bare component folder; None = the shipped default.
    Built on the meta device and given the file's tensors (no random init, no second copy)."""
    from kino.models.hub import resolve_model  # hub imports this module

    comp = load_component(default_model_dir() if path is None else resolve_model(path), component, dtype=dtype)
    try:
        config = config_cls.from_dict(comp.config)
    except (TypeError, ValueError) as e:
        raise KinoUserError(f"{comp.folder / CONFIG} is not a valid {component} config: {e}") from None
    with torch.device("meta"):
        model = model_cls(config)
    try:
        model.load_state_dict(comp.state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise KinoUserError(f"{comp.folder} holds weights that do not fit its config: {e}") from None
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
