"""Low-rank adaptation (LoRA) of any model's linear layers, applied from outside the model.

Training: `apply_lora(model, config)` freezes the model and swaps each targeted `nn.Linear`
for a `LoRALinear` that keeps the same weight and bias Parameters (so the base keys of the
state dict are unchanged) and adds a trainable update

    y = x W^T + b + (alpha / rank) * up(down(dropout(x)))      down (rank, in), up (out, rank)

with `up` zero-initialised: the adapted model starts exactly equal to the base.

Files: `save_lora` writes only the LoRA weights as safetensors, keys
`<module>.lora_down.weight` / `<module>.lora_up.weight` naming the adapted module, and
rank, alpha, the target patterns and the base model (its name and the sha256 of its DiT
weights) in the safetensors metadata (format "kino-lora").

Generation: `fuse_lora` adds scale * (alpha / rank) * up @ down to each named module's
weight, so sampling costs nothing extra; the original weights are kept on the side and
`unfuse_lora` copies them back, bit for bit (subtracting the update again would not be
exact in floating point).

kino implements this itself rather than depending on peft: it is a few dozen lines, the
file format and the fuse/unfuse contract are ours either way, and the model code stays free
of adapter hooks.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kino import __version__
from kino.errors import KinoUserError
from kino.models.folder import WeightsIntegrityError, sha256_file
from kino.models.gguf import GGUFLinear, dequantize
from kino.models.hub import resolve_file

LORA_FORMAT = "kino-lora"
DOWN, UP = ".lora_down.weight", ".lora_up.weight"

# The DiT blocks' attention projections (self and cross) and feed-forward layers.
DIT_TARGETS = ("blocks.*.self_attn.[qkvo]", "blocks.*.cross_attn.[qkvo]", "blocks.*.ffn.[02]")


@dataclass
class LoRAConfig:
    """Which linear layers get a LoRA update and its size.

    `targets` are shell-style patterns (fnmatch: `*`, `?`, `[qkv]`) over module names as
    `model.named_modules()` gives them, e.g. "blocks.*.self_attn.q"; every pattern must
    match at least one linear layer. The update is scaled by alpha / rank, so alpha keeps
    the step size comparable when the rank changes.
    """

    rank: int = 16
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: list(DIT_TARGETS))
    dropout: float = 0.0  # on the LoRA branch's input, in training only

    def __post_init__(self):
        if self.rank < 1:
            raise KinoUserError(f"lora.rank must be >= 1, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise KinoUserError(f"lora.alpha must be a positive number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise KinoUserError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise KinoUserError("lora.targets must list at least one module name pattern")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (see the module docstring). The
    base may be a GGUF-quantized layer (kino/models/gguf.py): its weight is then dequantized
    as it runs and the LoRA trains on the quantized base (as QLoRA does)."""

    def __init__(self, base: nn.Linear | GGUFLinear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.qtype = getattr(base, "qtype", None)  # a GGUF base's quantization type
        # The base's own Parameters under the same names: the state dict keeps its base keys.
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # the LoRA's own dtype: the base weight's, or for a GGUF base (bytes) its bias's, else float32
        floats = [p.dtype for p in (base.weight, base.bias) if p is not None and p.is_floating_point()]
        kw = dict(device=base.weight.device, dtype=floats[0] if floats else torch.float32)
        self.lora_down = nn.Linear(self.in_features, rank, bias=False, **kw)
        self.lora_up = nn.Linear(rank, self.out_features, bias=False, **kw)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = alpha / rank
        self.reset_lora()

    def reset_lora(self) -> None:
        # down: nn.Linear's default init (the LoRA paper's code); up: zero, so the update
        # starts at exactly 0 and the first steps only move `up` (the gradient of down is
        # up^T times the output gradient, 0 at first).
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: Tensor) -> Tensor:
        update = self.lora_up(self.lora_down(self.dropout(x)))  # (..., out)
        weight = self.weight if self.qtype is None else dequantize(self.weight, self.qtype,
                                                                   (self.out_features, self.in_features), x.dtype)
        return F.linear(x, weight, self.bias) + update * self.scale

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.lora_down.out_features}"


# ---------------------------------------------------------------------------- applying


def target_names(model: nn.Module, patterns: list[str] | tuple[str, ...]) -> list[str]:
    """Names of the linear layers (nn.Linear, GGUFLinear) of `model` matching any pattern, in
    model order. A pattern that matches no linear layer is a user error (a typo would train
    nothing)."""
    linears = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, GGUFLinear))]
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in linears):
            examples = ", ".join(linears[:3] + [n for n in linears if n.startswith("blocks.0.")][:4])
            raise KinoUserError(f"lora target {pattern!r} matches no linear layer of the model; "
                                f"linear layers are named like {examples}")
    return [name for name in linears if any(fnmatchcase(name, p) for p in patterns)]


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze every parameter of `model` and replace each targeted nn.Linear, in place, by a
    LoRALinear around it; returns the adapted module names. Draws `down`'s init from the
    global torch RNG (deterministic after seeding)."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise KinoUserError("the model already has LoRA layers")
    names = target_names(model, config.targets)
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), config.rank, config.alpha, config.dropout))
    return names


def lora_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The LoRA entries of a (LoRA-adapted) model's state dict, as CPU copies."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()
            if k.endswith(DOWN) or k.endswith(UP)}


# ---------------------------------------------------------------------------- files


def save_lora(path: str | Path, state_dict: dict[str, Tensor], config: LoRAConfig,
              base: str | None = None, base_sha256: str | None = None) -> str:
    """Write the LoRA weights of `state_dict` (a LoRA-adapted model's; other keys are left
    out) to a .safetensors file, atomically; returns its sha256. `base` and `base_sha256`
    name the model it was trained on and the sha256 of its weights file (informative:
    fusing checks the shapes; a different base only draws a warning)."""
    from safetensors.torch import save_file

    tensors = lora_state_dict(state_dict)
    if not tensors:
        raise KinoUserError("the model has no LoRA weights to save")
    metadata = {"format": LORA_FORMAT, "rank": str(config.rank), "alpha": repr(float(config.alpha)),
                "targets": json.dumps(list(config.targets)), "kino_version": __version__}
    if base is not None:
        metadata["base"] = base
    if base_sha256 is not None:
        metadata["base_sha256"] = base_sha256
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return sha256_file(path)


@dataclass
class LoRAFile:
    """A LoRA file as read back: per adapted module, down (rank, in) and up (out, rank) and
    the factor of its update (alpha / rank); files from other trainers (`format` other than
    kino's, see kino/convert/lora_formats.py) may also hold differences added as they are,
    to a bias (`bias`) or a whole weight (`diff`, by module or parameter name)."""

    path: Path
    rank: int
    alpha: float
    targets: list[str]
    down: dict[str, Tensor]
    up: dict[str, Tensor]
    sha256: str
    base: str | None = None
    base_sha256: str | None = None
    format: str = LORA_FORMAT
    scales: dict[str, float] = field(default_factory=dict)  # alpha / rank per module (default: the file's)
    bias: dict[str, Tensor] = field(default_factory=dict)
    diff: dict[str, Tensor] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return list(dict.fromkeys([*self.down, *self.bias, *self.diff]))

    def delta(self, name: str, scale: float = 1.0) -> Tensor:
        """scale * alpha / rank * up @ down for module `name`, in fp32: (out, in)."""
        factor = self.scales.get(name, self.alpha / self.rank)
        return (scale * factor) * (self.up[name].float() @ self.down[name].float())


def read_lora(path: str | Path) -> LoRAFile:
    """Read and check a LoRA file: kino's own, or a Wan2.1 LoRA in the wan, musubi or
    diffusers layout (kino/convert/lora_formats.py). When a JSON record beside it (same stem,
    `.json`, as `kino train dit` writes) names this file and its sha256, the file is checked
    first."""
    from safetensors import safe_open

    from kino.convert.lora_formats import read_foreign

    path = resolve_file(path)  # ORG/NAME/FILE: one file of a Hub repository
    if not path.exists():
        raise KinoUserError(f"LoRA file {path} does not exist")
    if not path.is_file():
        raise KinoUserError(f"LoRA file {path} is not a file")
    digest = sha256_file(path)
    _check_record(path, digest)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a file that is not one
        raise KinoUserError(f"LoRA file {path} is not a safetensors file ({e})") from None
    if metadata.get("format") != LORA_FORMAT:
        foreign = read_foreign(path, tensors, metadata)
        if foreign is None:
            raise KinoUserError(
                f"{path} is not a kino LoRA file (its safetensors metadata lacks format={LORA_FORMAT!r}) nor a "
                "Wan2.1 LoRA with keys under diffusion_model., lora_unet_ or transformer.")
        ranks = sorted({d.shape[0] for d in foreign["down"].values()})
        lora = LoRAFile(path, ranks[-1] if ranks else 0, float(ranks[-1]) if ranks else 0.0, [], foreign["down"],
                        foreign["up"], digest, format=foreign["format"], scales=foreign["scales"],
                        bias=foreign["bias"], diff=foreign["diff"])
        lora.targets = lora.modules  # every module it names
        return lora
    try:
        rank, alpha = int(metadata["rank"]), float(metadata["alpha"])
        targets = json.loads(metadata.get("targets", "[]"))
    except (KeyError, ValueError) as e:
        raise KinoUserError(f"LoRA file {path} has invalid metadata (rank, alpha, targets): {e}") from None
    if rank < 1 or not (math.isfinite(alpha) and alpha > 0):
        raise KinoUserError(f"LoRA file {path} has invalid metadata: rank {rank}, alpha {alpha}")
    down = {k[: -len(DOWN)]: v for k, v in tensors.items() if k.endswith(DOWN)}
    up = {k[: -len(UP)]: v for k, v in tensors.items() if k.endswith(UP)}
    other = sorted(k for k in tensors if not (k.endswith(DOWN) or k.endswith(UP)))
    unpaired = sorted(set(down) ^ set(up))
    if other or unpaired or not down:
        why = (f"unexpected keys {other[:3]}" if other else f"modules without both down and up weights {unpaired[:3]}"
               if unpaired else "no LoRA weights")
        raise KinoUserError(f"LoRA file {path} is malformed: {why}")
    for name in down:
        d, u = down[name], up[name]
        if d.ndim != 2 or u.ndim != 2 or d.shape[0] != rank or u.shape[1] != rank:
            raise KinoUserError(f"LoRA file {path} is malformed: {name} has down {tuple(d.shape)} and up "
                                f"{tuple(u.shape)}, expected (rank, in) and (out, rank) with rank {rank}")
    return LoRAFile(path, rank, alpha, targets, down, up, digest, metadata.get("base"), metadata.get("base_sha256"))


def write_record(path: str | Path, sha256: str, **info) -> Path:
    """The JSON record beside a LoRA file: its name, sha256 and how it was made."""
    path = Path(path)
    record = path.with_suffix(".json")
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(json.dumps({"file": path.name, "sha256": sha256, **info}, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, record)
    return record


def _check_record(path: Path, digest: str) -> None:
    record = path.with_suffix(".json")
    if not record.is_file():
        return
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return  # not our record: nothing to check against
    if isinstance(data, dict) and data.get("file") == path.name and "sha256" in data and data["sha256"] != digest:
        raise WeightsIntegrityError(f"{path} failed its integrity check: sha256 {digest} but {record} records "
                                    f"{data['sha256']}; the file was altered or corrupted")


# ---------------------------------------------------------------------------- fusing


def _target(params: dict[str, nn.Parameter], modules: dict[str, nn.Module], name: str, what: str):
    """The parameter a LoRA entry changes: the module's weight or bias, or (a `diff` of) a
    parameter named directly (e.g. a block's `modulation`)."""
    if what == "bias":
        return f"{name}.bias"
    return f"{name}.weight" if name in modules else name


def fuse_lora(model: nn.Module, lora: LoRAFile, scale: float, originals: dict[str, Tensor]) -> None:
    """W += scale * alpha / rank * up @ down for every low-rank module of `lora`, and
    scale * each difference the file holds (bias: `bias`, whole weights: `diff`), in place.

    Every entry is checked before any weight changes (a misfit file changes nothing).
    `originals` receives a copy of each parameter before its first change, by parameter
    name (it may already hold some from earlier fusions); `unfuse_lora(model, originals)`
    restores them bit for bit.

    A GGUF-quantized layer (kino/models/gguf.py `GGUFLinear`) cannot take a fused update: it
    keeps the low-rank factors and adds them as it runs (the same update, unfused); a
    whole-weight difference (`diff`) for one is refused.
    """
    if isinstance(scale, bool) or not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise KinoUserError(f"LoRA scale must be a finite number, got {scale!r}")
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    problems = []
    for name in lora.down:
        m = modules.get(name)
        want = (lora.up[name].shape[0], lora.down[name].shape[1])
        if m is None:
            problems.append(f"{name} does not exist")
        elif not isinstance(m, (nn.Linear, GGUFLinear)):
            problems.append(f"{name} is a {type(m).__name__}, not a linear layer")
        elif (m.out_features, m.in_features) != want:
            problems.append(f"{name} is {m.out_features}x{m.in_features}, the LoRA's update {want[0]}x{want[1]}")
    for what, entries in (("bias", lora.bias), ("diff", lora.diff)):
        for name, value in entries.items():
            key = _target(params, modules, name, what)
            if key not in params:
                problems.append(f"{key} does not exist")
            elif what == "diff" and isinstance(modules.get(key.rpartition(".")[0]), GGUFLinear):
                problems.append(f"{key} is GGUF-quantized: a whole-weight difference cannot be added to it")
            elif tuple(params[key].shape) != tuple(value.shape):
                problems.append(f"{key} is {tuple(params[key].shape)}, the LoRA's {what} {tuple(value.shape)}")
    if problems:
        raise KinoUserError(f"LoRA file {lora.path} does not fit this model ({len(problems)} of its "
                            f"{len(lora.modules)} layers): " + "; ".join(problems[:3]))
    quantized = [name for name in lora.down if isinstance(modules[name], GGUFLinear)]
    changes: list[tuple[str, Tensor]] = [(f"{name}.weight", lora.delta(name, scale)) for name in lora.down
                                         if name not in quantized]
    changes += [(_target(params, modules, n, "bias"), scale * v.float()) for n, v in lora.bias.items()]
    changes += [(_target(params, modules, n, "diff"), scale * v.float()) for n, v in lora.diff.items()]
    with torch.no_grad():
        for key, delta in changes:
            p = params[key]
            if key not in originals:
                originals[key] = p.detach().clone()
            p.copy_((p.float() + delta.to(p.device)).to(p.dtype))
        for name in quantized:
            factor = scale * lora.scales.get(name, lora.alpha / lora.rank)
            modules[name].add_lora(factor * lora.up[name].float(), lora.down[name])
            originals.setdefault(name + UNFUSED, torch.empty(0))


UNFUSED = "#unfused"  # `originals` key suffix: a GGUF layer that holds unfused LoRA factors


def unfuse_lora(model: nn.Module, originals: dict[str, Tensor]) -> None:
    """Copy the parameters saved by `fuse_lora` back (bit for bit), drop the factors of GGUF
    layers, and empty `originals`."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, value in originals.items():
            if key.endswith(UNFUSED):
                modules[key[:-len(UNFUSED)]].clear_loras()
            else:
                params[key].copy_(value)
    originals.clear()
