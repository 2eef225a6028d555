"""Small-GPU mode: where a pipeline's weights live and in what precision while it generates.

Each measure is one field of `MemoryPlan` (one flag of `kino generate`) and they combine:

- `dtype`: the DiT's compute dtype ("auto": bfloat16 on CUDA, float32 elsewhere).
- `weights`: DiT block weights stored as "bf16" or "fp8" (float8 e4m3 with one fp32 scale per
  output row) and turned into the compute dtype one block at a time, just before that block
  runs; only one block (two while the next is prefetched) exists in the compute dtype.
- `swap_blocks`: that many of the DiT's blocks (the last ones) keep their weights in CPU
  memory (pinned on CUDA) and are copied to the GPU one block at a time, the next block's
  copy overlapping the current block's compute on a side stream.
- `offload = "model"`: the text encoder, the DiT and the VAE stay in CPU memory and move to
  the GPU only while they run (one at a time).
- `vae_tile`: the VAE encodes and decodes frames larger than this many pixels in blended
  spatial tiles (`VideoVAE.enable_tiling`).
- `cfg = "sequential"`: the guided and unguided DiT calls run one after the other instead of
  as one batch of two (half the activations, same result up to float rounding).
- the text encoder's device is `Pipeline.from_pretrained(text_device=...)` (`--text-device cpu`).

On the CPU every measure still does what it says (storage dtypes, tiling, sequential
guidance) but there is no second memory to offload to; the peak-memory figures for a GPU
are in BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from kino.errors import KinoUserError

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
STORAGE = {"bf16": torch.bfloat16, "fp8": FP8}
COMPUTE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OFFLOAD = ("none", "model")
CFG = ("batch", "sequential")


@dataclass(frozen=True)
class MemoryPlan:
    dtype: str = "auto"
    weights: str | None = None  # None: blocks stored in the compute dtype
    swap_blocks: int = 0
    offload: str = "none"
    vae_tile: int | None = None  # pixels (square tiles, overlap a quarter of the tile)
    cfg: str = "batch"

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in COMPUTE:
            raise KinoUserError(f"unknown dtype {self.dtype!r}: allowed auto, {', '.join(COMPUTE)}")
        if self.weights is not None and self.weights not in STORAGE:
            raise KinoUserError(f"unknown weight storage {self.weights!r}: allowed {', '.join(STORAGE)}")
        if self.swap_blocks < 0:
            raise KinoUserError(f"swap_blocks must be >= 0, got {self.swap_blocks}")
        if self.offload not in OFFLOAD:
            raise KinoUserError(f"unknown offload {self.offload!r}: allowed {', '.join(OFFLOAD)}")
        if self.vae_tile is not None and (self.vae_tile < 64 or self.vae_tile % 32):
            raise KinoUserError(f"vae_tile must be a multiple of 32 pixels, at least 64; got {self.vae_tile}")
        if self.cfg not in CFG:
            raise KinoUserError(f"unknown cfg mode {self.cfg!r}: allowed {', '.join(CFG)}")

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return COMPUTE[self.dtype]

    @property
    def streams_blocks(self) -> bool:
        return self.weights is not None or self.swap_blocks > 0


# ---------------------------------------------------------------------------- fp8


def quantize_fp8(w: Tensor) -> tuple[Tensor, Tensor]:
    """(out, in) weights -> float8 e4m3 values and one fp32 scale per output row, w ~ q * scale."""
    amax = w.detach().float().abs().amax(dim=1, keepdim=True)  # (out, 1)
    scale = (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_fp8(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return (q.float() * scale).to(dtype)


# ---------------------------------------------------------------------------- one block's weights


class StoredWeights:
    """A module's parameters kept elsewhere (another device, a storage dtype) and put in
    place, in the compute dtype on the compute device, only while the module runs.

    Matrices (2-D weights) are stored as `storage` ("bf16" / "fp8" / None = compute dtype);
    vectors (biases, norms, modulation tables) and convolutions stay in the compute dtype,
    on the storage device; GGUF layers' quantized bytes (kino/models/gguf.py) stay as they
    are. Between calls each parameter holds an empty placeholder.
    """

    def __init__(self, module: nn.Module, compute_device: torch.device, compute_dtype: torch.dtype,
                 storage_device: torch.device, storage: str | None):
        self.module, self.device, self.dtype = module, compute_device, compute_dtype
        pin = storage_device.type == "cpu" and compute_device.type == "cuda" and torch.cuda.is_available()
        self.stored: list[tuple[nn.Parameter, Tensor, Tensor | None]] = []  # (param, values, fp8 scale)
        for p in module.parameters():
            w = p.detach()
            scale = None
            if not w.is_floating_point():  # a GGUF layer's quantized bytes, kept as they are
                pass
            elif w.ndim == 2 and storage == "fp8":
                w, scale = quantize_fp8(w)
                scale = scale.to(storage_device)
            elif w.ndim == 2 and storage is not None:
                w = w.to(STORAGE[storage])
            else:
                w = w.to(compute_dtype)
            w = w.to(storage_device).contiguous()
            self.stored.append((p, w.pin_memory() if pin else w, scale))
        self.placeholder = torch.empty(0, device=compute_device, dtype=compute_dtype)
        self.release()

    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() + (0 if s is None else s.numel() * 4) for _, w, s in self.stored)

    def materialized(self, stream: torch.cuda.Stream | None = None) -> list[Tensor]:
        """The parameters' values on the compute device in the compute dtype (issued on
        `stream` when given: the caller waits for it before use)."""
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            out = []
            for _, w, scale in self.stored:
                w = w.to(self.device, non_blocking=True)
                if scale is not None:
                    out.append(dequantize_fp8(w, scale.to(self.device, non_blocking=True), self.dtype))
                else:
                    out.append(w.to(self.dtype) if w.is_floating_point() else w)
            return out

    def install(self, values: list[Tensor]) -> None:
        for (p, _, _), v in zip(self.stored, values):
            p.data = v

    def release(self) -> None:
        for p, _, _ in self.stored:
            p.data = self.placeholder


class BlockStreamer:
    """Runs a stack of blocks (the DiT's) with `StoredWeights`, one block in place at a time.

    On CUDA the next block's weights are copied and converted on a side stream while the
    current block computes; elsewhere they are put in place just before the block runs.
    `detach()` puts every block's weights back in place for good (in the compute dtype, on
    the compute device; fp8-stored blocks keep their fp8 rounding).
    """

    def __init__(self, blocks: Sequence[nn.Module], compute_device: torch.device, compute_dtype: torch.dtype,
                 storage: str | None, swap: int):
        n = len(blocks)
        swap = min(swap, n)
        self.stores = []
        for i, block in enumerate(blocks):
            where = torch.device("cpu") if i >= n - swap else compute_device
            self.stores.append(StoredWeights(block, compute_device, compute_dtype, where, storage))
        self.stream = torch.cuda.Stream(compute_device) if compute_device.type == "cuda" else None
        self.pending: dict[int, tuple[list[Tensor], torch.cuda.Event | None]] = {}
        self.hooks = []
        for i, block in enumerate(blocks):
            self.hooks.append(block.register_forward_pre_hook(self._before(i)))
            self.hooks.append(block.register_forward_hook(self._after(i)))

    def _fetch(self, i: int) -> None:
        if i in self.pending or i >= len(self.stores):
            return
        values = self.stores[i].materialized(self.stream)
        event = None
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record(self.stream)
        self.pending[i] = (values, event)

    def _before(self, i: int):
        def hook(module, args):
            for j in [j for j in self.pending if j < i]:  # prefetched for a block the forward skipped
                del self.pending[j]
            self._fetch(i)
            values, event = self.pending.pop(i)
            if event is not None:
                current = torch.cuda.current_stream(self.stores[i].device)
                current.wait_event(event)
                for v in values:  # made on the side stream, used and freed on this one
                    v.record_stream(current)
            self.stores[i].install(values)
            self._fetch(i + 1)  # overlaps this block's compute on CUDA
        return hook

    def _after(self, i: int):
        def hook(module, args, output):
            self.stores[i].release()
            if i == len(self.stores) - 1:
                self.pending.clear()  # a prefetch past the last block is never used
        return hook

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.stores)

    def detach(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        self.pending.clear()
        for store in self.stores:
            store.install(store.materialized())


# ---------------------------------------------------------------------------- host memory

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def _weight_files(root: Path) -> Iterator[Path]:
    """The weight files under a model folder (none when it is not a folder)."""
    if root.is_dir():
        yield from (p for p in root.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def weights_bytes(folder: str | Path) -> int:
    """Bytes of the weight files under a model folder: what loading it puts in host memory,
    at most (weights stored in fp32 and read into bf16 take half)."""
    return sum(p.stat().st_size for p in _weight_files(Path(folder)))


DIT_FOLDERS = ("dit", "dit_2", "transformer", "transformer_2", "high_noise_model", "low_noise_model")


def dit_weights_bytes(folder: str | Path) -> int:
    """Bytes of the DiT weight files of a model folder: kino's dit/ (and dit_2/), diffusers'
    transformer/ (and transformer_2/), Wan's diffusion_pytorch_model*.safetensors at the top
    (or in Wan2.2's high_noise_model/ and low_noise_model/)."""
    root = Path(folder)

    def is_dit(p: Path) -> bool:
        parent = p.parent.relative_to(root).parts
        return parent[0] in DIT_FOLDERS if parent else p.name.startswith("diffusion_pytorch_model")

    return sum(p.stat().st_size for p in _weight_files(root) if is_dit(p))


def host_memory_bytes() -> int | None:
    """Host memory a load may use now: $KINO_LOAD_MEMORY (bytes) when set, else the smaller of
    MemAvailable (/proc/meminfo) and what the cgroup (a container's limit) has left; None when
    neither can be read."""
    if os.environ.get("KINO_LOAD_MEMORY"):
        try:
            return int(float(os.environ["KINO_LOAD_MEMORY"]))
        except ValueError:
            raise KinoUserError(f"KINO_LOAD_MEMORY must be a number of bytes, got {os.environ['KINO_LOAD_MEMORY']!r}")
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:  # cgroup v2
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def load_waves(processes: int, model_bytes: int, available: int | None) -> int:
    """How many of a machine's `processes` may load a model of `model_bytes` at once with
    `available` bytes of host memory (keeping a fifth spare): all of them when that is
    unknown, at least one."""
    if available is None or model_bytes <= 0:
        return processes
    return max(1, min(processes, int(0.8 * available) // model_bytes))


# ---------------------------------------------------------------------------- whole components


@contextlib.contextmanager
def placed(module: nn.Module | None, device: torch.device, offload: bool) -> Iterator[None]:
    """With offload, `module` sits on `device` inside the block and back in CPU memory after."""
    if not offload or module is None:
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
