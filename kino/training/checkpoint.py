"""Training checkpoints: one folder per step, written atomically.

Layout::

    OUT/checkpoints/step-00001000/
        model.safetensors   model weights (the state dict, on CPU)
        ema.safetensors     fp32 EMA shadow weights, one per trainable parameter (if EMA)
        optimizer.pt        {"optimizer": ..., "scheduler": ...}   (torch.save)
        rng.pt              torch CPU / CUDA, numpy and python RNG states as tensors and ints
        state.json          {"step", "kino_version", "config", "files"}; written last

Atomicity: everything is first written into `step-XXXXXXXX.tmp-<pid>` next to the final
folder, each file is fsynced, then the folder is renamed into place (a rename within one
directory is atomic on POSIX). A run killed mid-write leaves only a `.tmp-` folder, which
`latest_checkpoint` never returns and `remove_stale_temp` deletes later.

`.pt` files are only ever read with `torch.load(..., weights_only=True)`: they hold
tensors and plain containers, nothing that needs unpickling arbitrary code.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import kino

CHECKPOINTS = "checkpoints"
_FINAL = re.compile(r"^step-(\d{8})$")
_TEMP = re.compile(r"^step-\d{8}\.(?:tmp|old)-(\d+)$")


@dataclass
class Checkpoint:
    """What one checkpoint holds, as plain state dicts on CPU."""

    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # {"optimizer": optimizer.state_dict(), "scheduler": ...}
    rng: dict[str, Any]  # from capture_rng_state()
    ema: dict[str, torch.Tensor] | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the resolved run config
    kino_version: str = kino.__version__


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `out_dir`, oldest first, as (step, folder)."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _FINAL.match(entry.name)
        # state.json is written last, so its presence marks a complete folder even if
        # someone copied checkpoints around by hand without the atomic rename
        if m and (entry / "state.json").is_file():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder in `out_dir`, or None."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def save_checkpoint(ckpt: Checkpoint, out_dir: str | Path, *, keep_last: int | None = None) -> Path:
    """Write `ckpt` atomically to `OUT/checkpoints/step-XXXXXXXX/`, then delete all but
    the newest `keep_last` complete checkpoints. Returns the final folder."""
    final = checkpoint_dir(out_dir, ckpt.step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if tmp.exists():  # left by an earlier process that happened to have our pid
        shutil.rmtree(tmp)
    tmp.mkdir()

    files = ["model.safetensors"]
    _save_safetensors(ckpt.model, tmp / "model.safetensors")
    if ckpt.ema is not None:
        files.append("ema.safetensors")
        _save_safetensors(ckpt.ema, tmp / "ema.safetensors")
    files += ["optimizer.pt", "rng.pt", "state.json"]
    _torch_save(ckpt.optimizer, tmp / "optimizer.pt")
    _torch_save(ckpt.rng, tmp / "rng.pt")
    state = {"step": ckpt.step, "kino_version": ckpt.kino_version, "config": ckpt.config, "files": files}
    finish_checkpoint(tmp, final, state, out_dir, keep_last)
    return final


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder (tensors land on CPU)."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    ema_path = path / "ema.safetensors"
    return Checkpoint(
        step=int(state["step"]),
        model=load_file(path / "model.safetensors", device="cpu"),
        optimizer=torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        rng=torch.load(path / "rng.pt", map_location="cpu", weights_only=True),
        ema=load_file(ema_path, device="cpu") if ema_path.is_file() else None,
        config=state["config"],
        kino_version=state["kino_version"],
    )


def prune_checkpoints(out_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints; returns those deleted."""
    if keep_last < 1:
        raise ValueError("keep_last must be >= 1")
    doomed = [p for _, p in list_checkpoints(out_dir)[:-keep_last]]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def remove_stale_temp(out_dir: str | Path) -> list[Path]:
    """Delete `.tmp-`/`.old-` folders left by killed runs: those whose writer is gone (or
    is this very process, before it starts writing). Returns the folders removed."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    removed = []
    for entry in root.iterdir():
        m = _TEMP.match(entry.name)
        if m and entry.is_dir() and not _other_process_alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


# --- RNG state ----------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG a training step may draw from, as tensors / ints / floats so that
    the file loads with `weights_only=True`."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        for i, s in enumerate(cuda_states):
            torch.cuda.set_rng_state(s, i)


# --- file helpers -------------------------------------------------------------------------


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # A private contiguous CPU copy: safetensors refuses tensors that share storage
    # (tied weights) and needs contiguous memory.
    plain = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    save_file(plain, str(path), metadata={"format": "pt", "kino_version": kino.__version__})
    _fsync_file(path)


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; directories cannot be opened this way on Windows.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def finish_checkpoint(tmp: Path, final: Path, state: dict, out_dir, keep_last: int | None) -> None:
    """Write state.json last (its presence marks a complete checkpoint), fsync, publish the
    folder atomically as `final`, then prune to the newest `keep_last`."""
    with open(tmp / "state.json", "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    publish_folder(tmp, final)
    if keep_last is not None:
        prune_checkpoints(out_dir, keep_last)


def publish_folder(tmp: Path, final: Path) -> None:
    """Rename a fully written temp folder to `final`, atomically; a `final` already there
    (the same step saved again) is moved aside first, then dropped."""
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)


def _other_process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    if os.name == "nt":  # os.kill there terminates the process; assume it is alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


# --- distributed checkpoints (torch.distributed.checkpoint) -------------------------------
#
# A run of several processes writes the same folder layout, with the sharded parts through
# DCP, each rank writing its own shards of the model, optimizer and EMA::
#
#     step-00001000/
#         dcp/                 {"model", "optimizer", "ema"} state dicts (DCP: .metadata + one file per rank)
#         scheduler.pt         the LR schedule (rank 0)
#         rng-00000.pt ...     each rank's RNG states
#         state.json           {"step", "format": "dcp", "world_size", ...}; written last, by rank 0
#
# The data position is the step (batches are functions of the step). DCP reshards on load,
# so the model, optimizer and EMA resume on any number of processes; RNG streams are per rank.
# Atomicity is the single-process one: every rank writes into rank 0's `.tmp-<pid>` folder,
# all ranks fsync and meet at a barrier, then rank 0 writes state.json and renames.


def save_distributed_checkpoint(step: int, state: dict[str, Any], scheduler: dict[str, Any], config: dict[str, Any],
                                out_dir: str | Path, procs, *, keep_last: int | None = None) -> Path:
    """Collective: every rank calls it with its own `state` ({"model", "optimizer", "ema"}
    as from `torch.distributed.checkpoint.state_dict`). Returns the final folder."""
    import torch.distributed.checkpoint as dcp

    final = checkpoint_dir(out_dir, step)
    tmp = final.with_name(f"{final.name}.tmp-{procs.broadcast(os.getpid())}")
    if procs.is_main:
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    procs.barrier()
    dcp.save(state, checkpoint_id=str(tmp / "dcp"))  # collective; files are fsynced (sync_files)
    _torch_save(capture_rng_state(), tmp / f"rng-{procs.rank:05d}.pt")
    if procs.is_main:
        _torch_save(scheduler, tmp / "scheduler.pt")
    procs.barrier()  # every rank's files are on disk
    if procs.is_main:
        files = ["dcp", "scheduler.pt"] + [f"rng-{r:05d}.pt" for r in range(procs.world_size)] + ["state.json"]
        meta = {"step": step, "format": "dcp", "world_size": procs.world_size, "kino_version": kino.__version__,
                "config": config, "files": files}
        finish_checkpoint(tmp, final, meta, out_dir, keep_last)
    procs.barrier()
    return final


def is_distributed_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "dcp").is_dir()


def load_distributed_checkpoint(path: str | Path, state: dict[str, Any], rank: int) -> tuple[int, dict, dict]:
    """Load a DCP checkpoint in place into `state` (the same structure as saved, sharded
    as this run shards it). Returns (step, scheduler state, this rank's RNG state: rank 0's
    when the checkpoint was written by fewer processes)."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    rng_path = path / f"rng-{rank:05d}.pt"
    if not rng_path.is_file():
        rng_path = path / "rng-00000.pt"
    rng = torch.load(rng_path, map_location="cpu", weights_only=True)
    scheduler = torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True)
    return int(meta["step"]), scheduler, rng
