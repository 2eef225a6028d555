"""Reading third-party weight files safely, with errors that name the file.

`.pth` files are pickles: only `torch.load(weights_only=True)` touches them, so a file that
would run code (or holds anything but tensors and plain containers) is refused, not loaded.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

from kino.errors import KinoUserError


def rename_key(key: str, rules: list[tuple[str, str]]) -> str | None:
    """`key` renamed by the first regex rule that matches it; None when none does."""
    for pattern, replacement in rules:
        new = re.sub(pattern, replacement, key)
        if new != key:
            return new
    return None


def load_pth(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} state dict from a `.pth`, loaded weights-only on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise KinoUserError(f"{path} is missing")
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # a legacy (non-zip) file
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KinoUserError(f"{path} is not a weights-only checkpoint (it holds pickled objects that "
                            f"torch.load(weights_only=True) refuses to run: {first}); kino loads no other kind") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise KinoUserError(f"{path} is not a readable PyTorch checkpoint ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise KinoUserError(f"{path} is not a state dict (a flat mapping of names to tensors)")
    return state


def load_safetensors(paths: list[Path], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The union of one or more safetensors files (the shards of one model), floating-point
    tensors converted to `dtype` as they are read."""
    from kino.models.folder import read_safetensors

    if not paths:
        raise KinoUserError("no .safetensors files to load")
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        try:
            part = read_safetensors(path, dtype)
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise KinoUserError(f"{path} is not a valid safetensors file ({e})") from None
        clash = set(part) & set(state)
        if clash:
            raise KinoUserError(f"{path} repeats tensors of another shard: {sorted(clash)[:4]}")
        state.update(part)
    return state


def shards(folder: Path, stem: str) -> list[Path]:
    """`stem.safetensors`, or its shards `stem-0000i-of-0000n.safetensors`, in `folder`."""
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    return sorted(folder.glob(f"{stem}-*-of-*.safetensors"))


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise KinoUserError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KinoUserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise KinoUserError(f"{path} does not hold a JSON object")
    return data


def one_line(e: Exception, limit: int = 400) -> str:
    """torch's load_state_dict report (one line per problem) as one line."""
    text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text if len(text) <= limit else text[:limit] + " ..."


FP8_SCALES = (".scale_weight", ".weight_scale")  # ComfyUI's and other converters' per-weight scale names
FP8_DROPPED = (".scale_input", ".input_scale")  # activation scales for fp8 matmuls: not needed here


def fp8_weights(state: dict[str, torch.Tensor], dtype: torch.dtype | None, source: Path) -> dict[str, torch.Tensor]:
    """A state dict with "fp8 scaled" weights made plain: each `X.weight` that has a scale
    `X.scale_weight` (or `X.weight_scale`: a scalar, or one per output row) becomes
    weight x scale, computed in float32; the scales, activation scales and the `scaled_fp8`
    marker are dropped. Every floating-point tensor then goes to `dtype` (None: as stored,
    float8 ones to bfloat16: nothing computes in float8 here)."""
    out, scales = {}, {}
    for key, value in state.items():
        if key == "scaled_fp8" or key.endswith(FP8_DROPPED):
            continue
        scale = next((key[:-len(s)] for s in FP8_SCALES if key.endswith(s)), None)
        if scale is not None:
            scales[scale + ".weight"] = value
        else:
            out[key] = value
    for key, scale in scales.items():
        if key not in out:
            raise KinoUserError(f"{source}: a scale for {key} but no such weight")
        w = out[key].float()
        out[key] = w * (scale.float().reshape(-1, *[1] * (w.ndim - 1)) if scale.numel() > 1 else scale.float())
    float8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    return {k: v.to(dtype or (torch.bfloat16 if v.dtype in float8 else v.dtype)) if v.is_floating_point() else v
            for k, v in out.items()}
