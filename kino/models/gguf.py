"""GGUF weights: quantized DiTs in llama.cpp's file format, kept quantized while they run.

Quantized Wan DiTs are commonly published as GGUF files (one file per DiT, Wan's original
parameter names, made with ComfyUI-GGUF's converter: Q8_0 down to Q2_K, mixed "K_M" files);
a 14B DiT in Q4_K is about 9 GB instead of 28 GB in bf16. kino reads them with the `gguf`
package (llama.cpp's own reader, an optional dependency: `pip install kino-video[gguf]`):

- The linear layers of the DiT's blocks (98% of its weights) keep the file's bytes as they
  are, in a `GGUFLinear` whose `weight` is those bytes (uint8); each call dequantizes its
  weight in the input's dtype on the input's device, multiplies, and drops it, so at most one
  layer's weight exists dequantized at a time. Moving, offloading and block swapping move
  the quantized bytes.
- Every other quantized tensor (embeddings, the head, 5-D or 3-D tables) is dequantized
  once, as it is read; unquantized ones (F32, F16, BF16) are read as they are.
- A tensor the converter flattened to make it fit GGUF keeps its real shape in the metadata
  key `comfy.gguf.orig_shape.NAME`, which is honoured.

The dequantizers below are torch code (so they run on the GPU), written from the block
layouts of ggml's quantization types; tests/test_gguf.py checks each against the `gguf`
package's numpy reference and a whole DiT against diffusers' GGUF loader.

A LoRA on a `GGUFLinear` is not fused (its weight is not a float tensor): it is kept as
low-rank factors and added on the fly, W x + s * up (down x), the unfused form of the same
update.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kino.errors import KinoUserError
from kino.models.gguf_quant import K_WRITERS, quantize_k

QK_K = 256  # elements per super-block of the K-quants
ORIG_SHAPE = "comfy.gguf.orig_shape."
PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI checkpoint prefixes


# ---------------------------------------------------------------------------- bit fields


def _f16(b: Tensor) -> Tensor:
    """(n, 2) little-endian bytes -> (n, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def _fields(b: Tensor, width: int, count: int) -> Tensor:
    """Unsigned `width`-bit fields of bytes (..., k): (..., count, k), field i = bits [i*width, (i+1)*width)."""
    shifts = torch.arange(0, width * count, width, dtype=torch.uint8, device=b.device).view(count, 1)
    return (b.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def _low_high(qs: Tensor) -> Tensor:
    """(n, k) bytes -> (n, 2k): the k low nibbles, then the k high ones."""
    return _fields(qs, 4, 2).flatten(-2)


def _high_bits(qh: Tensor) -> Tensor:
    """(n, 4) bytes -> (n, 32): bit j of the little-endian 32-bit word."""
    return _fields(qh, 1, 8).transpose(-1, -2).flatten(-2)


# ---------------------------------------------------------------------------- 32-element blocks


# (In place where a fresh float tensor allows it: the same values, fewer temporaries; a DiT or
# text encoder dequantizes every layer on every call.)


def _q8_0(b: Tensor) -> Tensor:  # d (f16), 32 x int8
    return b[:, 2:].view(torch.int8).float().mul_(_f16(b[:, :2]))


def _q4_0(b: Tensor) -> Tensor:  # d, 16 bytes of nibbles; (q - 8) * d
    return _low_high(b[:, 2:]).float().sub_(8).mul_(_f16(b[:, :2]))


def _q4_1(b: Tensor) -> Tensor:  # d, m, 16 bytes of nibbles; q * d + m
    return _low_high(b[:, 4:]).float().mul_(_f16(b[:, :2])).add_(_f16(b[:, 2:4]))


def _q5_0(b: Tensor) -> Tensor:  # d, 32 high bits, 16 bytes of nibbles; (q - 16) * d
    q = _low_high(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4)
    return q.float().sub_(16).mul_(_f16(b[:, :2]))


def _q5_1(b: Tensor) -> Tensor:  # d, m, 32 high bits, 16 bytes of nibbles; q * d + m
    q = _low_high(b[:, 8:]) | (_high_bits(b[:, 4:8]) << 4)
    return q.float().mul_(_f16(b[:, :2])).add_(_f16(b[:, 2:4]))


# ---------------------------------------------------------------------------- 256-element super-blocks


def _q2_k(b: Tensor) -> Tensor:  # 16 scale bytes (4-bit scale, 4-bit min), 64 bytes of 2-bit q, d, dmin
    n = b.shape[0]
    sc = b[:, :16]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    q = _fields(b[:, 16:80].reshape(n, 2, 32), 2, 4).reshape(n, 16, 16).float()
    q.mul_((d * (sc & 15).float()).unsqueeze(-1)).sub_((dmin * (sc >> 4).float()).unsqueeze(-1))
    return q.reshape(n, QK_K)


def _q3_k(b: Tensor) -> Tensor:  # 32 bytes of high bits, 64 bytes of 2-bit q, 12 bytes of 6-bit scales, d
    n = b.shape[0]
    high = _fields(b[:, :32].reshape(n, 1, 32), 1, 8).reshape(n, 16, 16)
    low = _fields(b[:, 32:96].reshape(n, 2, 32), 2, 4).reshape(n, 16, 16)
    s = b[:, 96:108]
    sc = _fields(s[:, :8], 4, 2).reshape(n, 16) | (_fields(s[:, 8:12], 2, 4).reshape(n, 16) << 4)
    scale = _f16(b[:, 108:110]) * (sc.float() - 32)
    q = high.float().sub_(1).mul_(4).add_(low)  # low - 4 (1 - high): a clear high bit subtracts 4 (exact)
    return q.mul_(scale.unsqueeze(-1)).reshape(n, QK_K)


def _k_scales(s: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K / Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, each (n, 8)."""
    s = s.reshape(-1, 3, 4)
    a, m, hi = s[:, 0], s[:, 1], s[:, 2]
    scales = torch.cat([a & 63, (hi & 15) | ((a >> 2) & 48)], dim=-1)
    mins = torch.cat([m & 63, (hi >> 4) | ((m >> 2) & 48)], dim=-1)
    return scales.float(), mins.float()


def _scale_min(q: Tensor, b: Tensor) -> Tensor:
    """Q4_K / Q5_K: (n, 8, 32) float q -> d * scale * q - dmin * min, in place, as (n, 256)."""
    sc, mn = _k_scales(b[:, 4:16])
    q.mul_((_f16(b[:, :2]) * sc).unsqueeze(-1)).sub_((_f16(b[:, 2:4]) * mn).unsqueeze(-1))
    return q.reshape(-1, QK_K)


def _q4_k(b: Tensor) -> Tensor:  # d, dmin, 12 scale bytes, 128 bytes of nibbles
    n = b.shape[0]
    return _scale_min(_fields(b[:, 16:].reshape(n, 4, 32), 4, 2).reshape(n, 8, 32).float(), b)


def _q5_k(b: Tensor) -> Tensor:  # d, dmin, 12 scale bytes, 32 bytes of high bits, 128 bytes of nibbles
    n = b.shape[0]
    high = _fields(b[:, 16:48].reshape(n, 1, 32), 1, 8).reshape(n, 8, 32)
    return _scale_min((_fields(b[:, 48:].reshape(n, 4, 32), 4, 2).reshape(n, 8, 32) | (high << 4)).float(), b)


def _q6_k(b: Tensor) -> Tensor:  # 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, d
    n = b.shape[0]
    low = _fields(b[:, :128].reshape(n, 2, 64), 4, 2).reshape(n, 8, 32)
    high = _fields(b[:, 128:192].reshape(n, 2, 32), 2, 4).reshape(n, 8, 32)
    q = (low | (high << 4)).float().sub_(32).reshape(n, 16, 16)
    scale = _f16(b[:, 208:210]) * b[:, 192:208].view(torch.int8).float()
    return q.mul_(scale.unsqueeze(-1)).reshape(n, QK_K)


@dataclass(frozen=True)
class QuantType:
    name: str
    block: int  # elements per block
    nbytes: int  # bytes per block
    dequantize: Callable[[Tensor], Tensor]  # (n, nbytes) uint8 -> (n, block) float32


# ggml's type numbers (the GGUF file's tensor types)
QUANT_TYPES = {
    8: QuantType("Q8_0", 32, 34, _q8_0),
    2: QuantType("Q4_0", 32, 18, _q4_0),
    3: QuantType("Q4_1", 32, 20, _q4_1),
    6: QuantType("Q5_0", 32, 22, _q5_0),
    7: QuantType("Q5_1", 32, 24, _q5_1),
    10: QuantType("Q2_K", QK_K, 84, _q2_k),
    11: QuantType("Q3_K", QK_K, 110, _q3_k),
    12: QuantType("Q4_K", QK_K, 144, _q4_k),
    13: QuantType("Q5_K", QK_K, 176, _q5_k),
    14: QuantType("Q6_K", QK_K, 210, _q6_k),
}
FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # F32, F16, BF16
SUPPORTED = ", ".join(["F32", "F16", "BF16", *(q.name for q in QUANT_TYPES.values())])


def dequantize(raw: Tensor, qtype: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """The values of a quantized tensor (its bytes, any shape) as a `shape` tensor of `dtype`."""
    q = QUANT_TYPES[qtype]
    return q.dequantize(raw.reshape(-1, q.nbytes)).reshape(shape).to(dtype)


@dataclass
class GGUFTensor:
    """A quantized tensor as the file holds it: its bytes (rows of blocks), type and real shape."""

    raw: Tensor  # uint8
    qtype: int
    shape: tuple[int, ...]

    @property
    def type_name(self) -> str:
        return QUANT_TYPES[self.qtype].name

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.raw, self.qtype, self.shape, dtype)


# ---------------------------------------------------------------------------- reading


def _gguf(path: Path):
    try:
        import gguf
    except ImportError:
        raise KinoUserError(f"{path} is a GGUF file: reading or writing it needs the gguf package "
                            "(pip install 'kino-video[gguf]', or pip install gguf)") from None
    return gguf


def _reader(path: Path):
    gguf = _gguf(path)
    try:
        # copy-on-write mapping: the bytes stay the page cache's until something writes them
        return gguf.GGUFReader(path, mode="c")
    except Exception as e:  # the reader raises ValueError / struct and numpy errors on a damaged file
        raise KinoUserError(f"{path} is not a valid GGUF file ({type(e).__name__}: {e})") from None


def strip_prefix(name: str) -> str:
    """A tensor name without ComfyUI's checkpoint prefix."""
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _orig_shape(reader, name: str) -> tuple[int, ...] | None:
    field = reader.get_field(ORIG_SHAPE + name)
    return None if field is None else tuple(int(v) for v in field.contents())


def read_gguf(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, Tensor | GGUFTensor]:
    """The tensors of a GGUF file by name (ComfyUI's `model.diffusion_model.` prefix dropped):
    F32 / F16 / BF16 ones as tensors (converted to `dtype` when given), quantized ones as
    `GGUFTensor`s over the file's bytes. Any other tensor type is an error naming the tensor."""
    path = Path(path)
    if not path.is_file():
        raise KinoUserError(f"GGUF file {path} does not exist")
    reader = _reader(path)
    out: dict[str, Tensor | GGUFTensor] = {}
    for t in reader.tensors:  # numpy views of the (writable, copy-on-write) mapping
        shape = _orig_shape(reader, t.name) or tuple(int(d) for d in reversed(t.shape.tolist()))
        kind = int(t.tensor_type)
        if kind in FLOAT_TYPES:
            data = torch.from_numpy(t.data)
            value = (data.view(torch.int16).view(torch.bfloat16) if kind == 30 else data).reshape(shape)
            out[strip_prefix(t.name)] = value.to(dtype) if dtype is not None else value
        elif kind in QUANT_TYPES:
            out[strip_prefix(t.name)] = GGUFTensor(torch.from_numpy(t.data), kind, shape)
        else:
            raise KinoUserError(f"{path}: tensor {t.name} is of type {t.tensor_type.name}, which kino does "
                                f"not read; allowed: {SUPPORTED}")
    if not out:
        raise KinoUserError(f"{path} holds no tensors")
    return out


def read_gguf_metadata(path: str | Path) -> dict[str, str | int | float]:
    """A GGUF file's scalar metadata (architecture, name, sizes, epsilons) by key; arrays (the
    tokenizer's vocabulary, shapes) are left out."""
    path = Path(path)
    if not path.is_file():
        raise KinoUserError(f"GGUF file {path} does not exist")
    out = {}
    for key, field in _reader(path).fields.items():
        if key.startswith("GGUF.") or len(field.types) != 1:
            continue  # the header's own fields; arrays
        value = field.contents()
        if isinstance(value, (str, int, float)):
            out[key] = value
    return out


# ---------------------------------------------------------------------------- the layers


def _byte_rows(rows: int, width: int, qtype: int, device, byte_dtype: torch.dtype) -> nn.Parameter:
    """An empty frozen parameter for `rows` quantized rows of `width` values. The bytes are
    uint8, or int8 where a host model must see a dtype it leaves alone: transformers' T5 and
    UMT5 feed-forward layers cast their input to `wo.weight.dtype` unless that is int8 (as for
    8-bit quantized weights), which a uint8 weight would turn into a cast to bytes."""
    q = QUANT_TYPES[qtype]
    if width % q.block:
        raise ValueError(f"{q.name} rows hold blocks of {q.block}; {width} values do not divide")
    return nn.Parameter(torch.empty(rows, width // q.block * q.nbytes, dtype=byte_dtype, device=device),
                        requires_grad=False)


class GGUFLinear(nn.Module):
    """A linear layer whose weight stays in a GGUF quantization type: `weight` holds the file's
    bytes (uint8, (out, bytes per row)); each call dequantizes it in the input's dtype.
    LoRAs (`add_lora`) are added unfused: y = W x + b + up (down x)."""

    def __init__(self, in_features: int, out_features: int, qtype: int, bias: bool = True,
                 device: torch.device | str | None = None, byte_dtype: torch.dtype = torch.uint8):
        super().__init__()
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        self.weight = _byte_rows(out_features, in_features, qtype, device, byte_dtype)
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None
        self.register_buffer("lora_down", None, persistent=False)  # (R, in), several LoRAs stacked
        self.register_buffer("lora_up", None, persistent=False)  # (out, R), their scales folded in

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.weight.view(torch.uint8), self.qtype, (self.out_features, self.in_features), dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.lora_down is not None:
            down = self.lora_down.to(x.device, x.dtype)
            y = y + F.linear(F.linear(x, down), self.lora_up.to(x.device, x.dtype))
        return y

    def add_lora(self, up: Tensor, down: Tensor) -> None:
        """Add the update up @ down (out, R) @ (R, in), scale already in `up`."""
        device = self.weight.device
        up, down = up.float().to(device), down.float().to(device)
        if self.lora_down is None:
            self.lora_down, self.lora_up = down, up
        else:
            self.lora_down = torch.cat([self.lora_down, down])
            self.lora_up = torch.cat([self.lora_up, up], dim=1)

    def clear_loras(self) -> None:
        self.lora_down = self.lora_up = None

    def extra_repr(self) -> str:
        lora = "" if self.lora_down is None else f", lora_rank={self.lora_down.shape[0]}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"type={QUANT_TYPES[self.qtype].name}, bias={self.bias is not None}{lora}")


class GGUFEmbedding(nn.Module):
    """A lookup table whose rows stay in a GGUF quantization type (a text encoder's token
    embedding: UMT5-XXL's is a billion values): each call dequantizes only the rows it looks
    up, into the dtype of the (empty) `like` buffer, which follows the model's `.to(dtype)`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: int, device: torch.device | str | None = None,
                 byte_dtype: torch.dtype = torch.uint8):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.qtype = num_embeddings, embedding_dim, qtype
        self.weight = _byte_rows(num_embeddings, embedding_dim, qtype, device, byte_dtype)
        # never on the meta device: it holds no values, and a meta model's weights are assigned, not its buffers
        self.register_buffer("like", torch.empty(0), persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.weight.view(torch.uint8)[ids.reshape(-1)]
        return dequantize(rows, self.qtype, (*ids.shape, self.embedding_dim), self.like.dtype)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.weight.view(torch.uint8), self.qtype, (self.num_embeddings, self.embedding_dim), dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, type={QUANT_TYPES[self.qtype].name}"


def dequantize_modules(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model` with every GGUFLinear / GGUFEmbedding replaced in place by a plain nn.Linear /
    nn.Embedding holding its dequantized weight in `dtype` (e.g. to save it as floats)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, GGUFLinear):
            plain = nn.Linear(module.in_features, module.out_features, module.bias is not None, device="meta")
            if module.bias is not None:
                plain.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        elif isinstance(module, GGUFEmbedding):
            plain = nn.Embedding(module.num_embeddings, module.embedding_dim, device="meta")
        else:
            continue
        plain.weight = nn.Parameter(module.dequantized(dtype), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, plain)
    return model


EMBEDDING_KEPT = 1 << 16  # lookup tables of at least this many values stay quantized (token embeddings)


def build_with_gguf(model: nn.Module, state: dict[str, Tensor | GGUFTensor], keep: list[nn.Module], source: Path,
                    dtype: torch.dtype, byte_dtype: torch.dtype = torch.uint8) -> dict[str, Tensor]:
    """For a model built on the meta device and a state dict holding GGUF tensors: every
    `nn.Linear` inside the `keep` modules whose weight is quantized becomes a (meta)
    `GGUFLinear` of that type, every large `nn.Embedding` there (a token table) a
    `GGUFEmbedding`, and the state dict returned holds their bytes (as `byte_dtype`); every
    other quantized tensor is dequantized to `dtype`. Shapes are checked against the
    model's, naming the file and the tensor on a mismatch."""
    modules = dict(model.named_modules())
    kept = {id(m) for k in keep for m in k.modules()}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, GGUFTensor):
            out[key] = value
            continue
        owner, _, param = key.rpartition(".")
        module = modules.get(owner)
        if param == "weight" and isinstance(module, (nn.Linear, nn.Embedding)):
            linear = isinstance(module, nn.Linear)
            wanted = tuple(module.weight.shape)
            if tuple(value.shape) != wanted:
                raise KinoUserError(f"{source}: {key} is {tuple(value.shape)}, the model's {wanted}")
            # a layer whose rows are not whole blocks (a converter flattened it) is dequantized once instead
            if (id(module) in kept and wanted[1] % QUANT_TYPES[value.qtype].block == 0
                    and (linear or module.weight.numel() >= EMBEDDING_KEPT)):
                layer = (GGUFLinear(module.in_features, module.out_features, value.qtype, module.bias is not None,
                                    "meta", byte_dtype) if linear
                         else GGUFEmbedding(*wanted, value.qtype, "meta", byte_dtype))
                parent, _, child = owner.rpartition(".")
                setattr(modules[parent] if parent else model, child, layer)
                modules[owner] = layer
                out[key] = value.raw.reshape(layer.weight.shape).view(byte_dtype)
                continue
        out[key] = value.dequantize(dtype)
    return out


# ---------------------------------------------------------------------------- writing

# the gguf package quantizes the 32-element types; kino the K-quants (kino/models/gguf_quant.py)
WRITE_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K", "BF16", "F16")
KEEP_F32 = 1024  # tensors this small stay F32, as ComfyUI-GGUF's converter keeps them
BLOCK_PREFIXES = ("blocks.", "vace_blocks.")


def dit_tensor_type(key: str, a, type_name: str, block: int) -> str:
    """The type a DiT tensor is written in (`write_gguf`): the blocks' matrices (of more than
    1,024 elements, rows of whole blocks) `type_name`; other matrices F16 (inside its range);
    vectors, norms, modulation tables and the 5-D patch embedding F32."""
    matrix = a.ndim == 2 and a.size > KEEP_F32 and not key.endswith("modulation")
    if matrix and key.startswith(BLOCK_PREFIXES) and a.shape[1] % block == 0:
        return type_name
    return "F16" if matrix and float(abs(a).max()) < 6e4 else "F32"


def write_gguf(state: dict[str, Tensor], path: str | Path, type_name: str, arch: str = "wan",
               tensor_type: Callable = dit_tensor_type, metadata: Callable | None = None) -> dict[str, int]:
    """Write a state dict as a GGUF file (names as given), each tensor in the type
    `tensor_type(key, array, type_name, block)` says (`type_name`, F16 or F32); `metadata`
    (given the gguf package's writer) adds key-value fields. By default a DiT (kino's names,
    which are Wan's) that kino, ComfyUI-GGUF and diffusers read: its blocks' matrices in
    `type_name`, the other matrices (the text, time and position embeddings, the head: under
    2% of a Wan DiT's weights) in F16, the rest F32 (`dit_tensor_type`). ComfyUI-GGUF's
    converter quantizes the matrices outside the blocks too; on the shipped model the head
    alone then adds as much error to the DiT's output as all 80 block matrices
    (BENCHMARKS.md), so kino keeps them near-exact. Written to a temporary name, then renamed.
    Returns how many tensors went to each type."""
    path = Path(path)
    gguf = _gguf(path)
    if type_name not in WRITE_TYPES:
        raise KinoUserError(f"GGUF type {type_name!r} cannot be written here; allowed: {', '.join(WRITE_TYPES)}")
    qtype = gguf.GGMLQuantizationType[type_name]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    tmp = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch, use_temp_file=True)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if metadata is not None:
        metadata(writer)
    counts: dict[str, int] = {}
    for key, value in state.items():
        a = value.detach().float().cpu().numpy()
        name = tensor_type(key, a, type_name, block)
        if name == type_name and type_name in K_WRITERS:
            data = quantize_k(torch.from_numpy(a), type_name).numpy()
        elif name == type_name:
            data = gguf.quants.quantize(a, qtype)
        else:
            data = a.astype("float16") if name == "F16" else a
        writer.add_tensor(key, data, raw_dtype=None if name in ("F16", "F32") else qtype)
        counts[name] = counts.get(name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return counts
