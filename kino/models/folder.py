"""Model folders: the on-disk layout every kino model uses.

    MODEL/
      kino.json              {"name", "kino_version", "components": {"vae": {"path": "vae",
                              "class": "VideoVAE", "files": {"model.safetensors": "<sha256>", ...}}}}
      vae/config.json        the component's typed config, as JSON
      vae/model.safetensors  its weights

A component folder (config.json + model.safetensors) also loads on its own, e.g. straight
from a training run. When a kino.json lists a file's sha256, the file is checked before use,
so shipped or downloaded weights that were altered are refused.
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


def save_component(folder: str | Path, config: dict, state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """Write config.json + model.safetensors; return {file: sha256}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    tmp = folder / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "kino_version": __version__})
    os.replace(tmp, folder / WEIGHTS)
    _atomic_json(folder / CONFIG, config)
    return {name: sha256_file(folder / name) for name in (CONFIG, WEIGHTS)}


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
            if (fname == WEIGHTS and not weights) or any(fnmatch(f"{entry['path']}/{fname}", p) for p in skip):
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
    for fname in (CONFIG, WEIGHTS) if weights else (CONFIG,):
        if not (folder / fname).is_file():
            raise KinoUserError(f"{folder / fname} is missing: a {component} folder holds {CONFIG} and {WEIGHTS}"
                                f" (or a model folder has {MANIFEST} naming its components)")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise KinoUserError(f"{folder / CONFIG} is not valid JSON ({e.msg})") from None
    if not weights:
        return Component(folder, config, {}, name)
    try:
        state = read_safetensors(folder / WEIGHTS, dtype)
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise KinoUserError(f"{folder / WEIGHTS} is not a valid safetensors file ({e})") from None
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
