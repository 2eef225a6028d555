"""VAE round trip of files or of a Shapes World folder, with PSNR per clip."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from kino import __version__
from kino.data.video_io import read_video
from kino.errors import KinoUserError
from kino.models.vae.model import VideoVAE
from kino.models.vae.refine import Refinement
from kino.world.captions import FPS
from kino.world.dataset import read_rows, write_clip, write_rows


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


@torch.no_grad()
def reconstruct_video(model: VideoVAE, video: np.ndarray, refine: int | Refinement = 0) -> np.ndarray:
    """uint8 (F, H, W, 3) -> its VAE reconstruction, same shape (`refine`: latent refinement, as
    `VideoVAE.reconstruct` takes it)."""
    device = next(model.parameters()).device
    x = torch.from_numpy(video).to(device).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, F, H, W)
    rec = model.reconstruct(x, refine=refine)[0]  # (3, F, H, W)
    return rec.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def _plan(inputs: list[Path]) -> tuple[list[tuple[Path, str]], list[dict] | None]:
    """(source, output name) pairs, plus the captions rows when the input is a clip folder."""
    if len(inputs) == 1 and inputs[0].is_dir():
        rows = read_rows(inputs[0])
        return [(inputs[0] / r["file"], r["file"]) for r in rows], rows
    pairs = []
    for p in inputs:
        if p.is_dir():
            raise KinoUserError(f"{p} is a folder: give one folder with captions.jsonl, or video/image files")
        if not p.exists():
            raise KinoUserError(f"input {p} does not exist")
        pairs.append((p, p.stem))
    names = [n for _, n in pairs]
    if len(set(names)) != len(names):
        raise KinoUserError("two inputs share a file name stem; their outputs would overwrite each other")
    return pairs, None


def reconstruct_inputs(model: VideoVAE, inputs: list[Path], out: Path,
                       progress: Callable[[Iterable], Iterable] = iter,
                       refine: int | Refinement = 0) -> list[tuple[str, float]]:
    """Reconstruct every input into `out` (lossless), returning (name, PSNR dB) per clip.
    A clip folder's captions.jsonl is copied so `kino world eval OUT` scores the results.
    `refine`: latent refinement (`kino.models.vae.refine.Refinement`, or its step count; 0: off)."""
    pairs, rows = _plan([Path(p) for p in inputs])
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KinoUserError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    results, out_rows = [], []
    captions = {r["file"]: r["caption"] for r in rows or []}
    for src, name in progress(pairs):
        video, fps = read_video(src)
        rec = reconstruct_video(model, video, refine)
        if rows is None:  # lossless storage, by frame count
            name = f"{name}.png" if len(rec) == 1 else f"{name}.mp4"
        row = write_clip(out, name, rec, caption=captions.get(name, ""), fps=fps or FPS,
                         metadata={"source": str(src), "task": "vae reconstruct", "kino_version": __version__})
        out_rows.append(row)
        results.append((name, psnr_uint8(video, rec)))
    if rows is not None:
        write_rows(out, [{**r, "file": o["file"]} for r, o in zip(rows, out_rows)])
    return results
