"""Training configuration: the `TrainConfig` dataclass and a strict loader that reads
TOML or JSON into any (possibly nested) config dataclass.

The loader is strict on purpose: a misspelt key or a string where a number belongs is
reported with the key, the file and the allowed keys, instead of being silently ignored
and leaving a default in place for a multi-day run.

TOML has no null, so an optional field (`float | None`) is switched off with the string
"none" there; JSON may use either null or "none".
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from kino.errors import KinoUserError
from kino.training.distributed import ParallelConfig

C = TypeVar("C")


@dataclass
class TrainConfig:
    """Everything the generic trainer needs; the model and data live in the task."""

    out_dir: str  # checkpoints/, tb/, metrics.jsonl and config.json go here
    max_steps: int = 1000
    # A wall-clock budget for this invocation: after the first step that ends past it the run
    # finishes as at max_steps (final checkpoint; `kino train` exports), at that step. A rerun
    # resumes there and trains up to this long again. None: no budget.
    max_minutes: float | None = None
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0  # applied to matrices only, never to biases or norm gains
    warmup_steps: int = 0  # linear warmup from lr/warmup_steps to lr
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1  # cosine ends at lr * min_lr_ratio
    # The cosine decays over this many steps (None: max_steps). Set it when a run is
    # stopped early and continued, so that the schedule does not depend on max_steps.
    decay_steps: int | None = None
    grad_clip: float | None = 1.0  # max global grad norm; None: no clipping
    # Gradient accumulation: each rank's rows of a step's batch go through forward and backward
    # in this many equal micro-batches (activations of one micro-batch at a time), then one
    # optimizer step. The step's batch, and so the data and the schedule, do not change.
    grad_accum: int = 1
    ema_decay: float | None = None  # None: no EMA
    ema_start: int = 0  # until this step the EMA just copies the weights
    checkpoint_every: int = 1000  # 0: only the final checkpoint
    keep_last: int = 3
    log_every: int = 10
    sample_every: int = 0  # 0: never call task.samples
    # steps between validations (the task's fixed held-out batches, logged to validation.jsonl
    # and TensorBoard val/); 0: never. Also at the last step when on.
    validate_every: int = 0
    seed: int = 0
    # auto: bf16 autocast on CUDA devices that support it, fp32 elsewhere (bf16 matmuls
    # on CPUs without AMX are hundreds of times slower than fp32).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: bool = True  # tqdm bar on stderr
    # Peak FLOP/s of one device in TFLOP/s at the training precision, for the logged MFU;
    # None: looked up for known GPUs (H100/H200/A100 bf16), else no MFU is logged.
    peak_tflops: float | None = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # processes and devices (torchrun)

    def __post_init__(self):
        _check_literals(self)
        problems = []
        if self.max_steps < 0:
            problems.append("max_steps must be >= 0")
        if self.max_minutes is not None and not (self.max_minutes > 0 and math.isfinite(self.max_minutes)):
            problems.append("max_minutes must be a positive number of minutes (or none)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append("lr must be a positive number")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            problems.append("betas must be in [0, 1)")
        if self.weight_decay < 0:
            problems.append("weight_decay must be >= 0")
        if self.warmup_steps < 0:
            problems.append("warmup_steps must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append("min_lr_ratio must be in [0, 1]")
        if self.decay_steps is not None and self.decay_steps < 1:
            problems.append("decay_steps must be >= 1 (or none)")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            problems.append("peak_tflops must be > 0 (or none)")
        if self.grad_accum < 1:
            problems.append("grad_accum must be >= 1")
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append("grad_clip must be > 0 (or none to disable clipping)")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            problems.append("ema_decay must be in [0, 1) (or none to disable EMA)")
        for name in ("ema_start", "checkpoint_every", "sample_every", "validate_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        for name in ("keep_last", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if problems:
            raise KinoUserError("invalid training config: " + "; ".join(problems))


# --- loading ---------------------------------------------------------------------------


def load_config(path: str | Path, cls: type[C]) -> C:
    """Read a `.toml` or `.json` file into the dataclass `cls` (nested dataclasses are
    tables / objects). Missing keys keep their defaults; unknown keys, wrong types and
    unreadable files raise `KinoUserError`."""
    path = Path(path)
    if not path.is_file():
        raise KinoUserError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = _toml_module().loads(path.read_text(encoding="utf-8"))
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
        else:
            raise KinoUserError(f"config file {path}: unknown format {suffix!r}; use .toml or .json")
    except (ValueError, UnicodeDecodeError) as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise KinoUserError(f"config file {path} is not valid {suffix[1:].upper()}: {e}") from None
    if not isinstance(data, dict):
        raise KinoUserError(f"config file {path}: the top level must be a table/object")
    return config_from_dict(data, cls, source=str(path))


def config_from_dict(data: dict[str, Any], cls: type[C], *, source: str = "<dict>") -> C:
    """Build the dataclass `cls` from plain data (as parsed from TOML/JSON), strictly."""
    return _build(cls, data, prefix="", source=source)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass; `config_from_dict` reads it back."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"expected a dataclass instance, got {type(config).__name__}")
    return _plain(config)


def _toml_module():
    try:
        import tomllib  # Python >= 3.11

        return tomllib
    except ModuleNotFoundError:
        pass
    try:
        import tomli

        return tomli
    except ModuleNotFoundError:
        raise KinoUserError(
            "reading TOML configs on Python < 3.11 needs the tomli package: pip install tomli"
        ) from None


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def _build(cls: type, data: Any, *, prefix: str, source: str):
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        raise KinoUserError(f"config file {source}: {where} must be a table/object, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise KinoUserError(
            f"config file {source}: unknown key {prefix + unknown[0]!r} in {where}; "
            f"allowed keys: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key=key, source=source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                # a required sub-table: build it from nothing so the error names its keys
                kwargs[name] = _build(hints[name], {}, prefix=key + ".", source=source)
            else:
                raise KinoUserError(f"config file {source}: missing required key {key!r}")
    try:
        return cls(**kwargs)
    except KinoUserError as e:
        raise KinoUserError(f"config file {source}: {e}") from None


def _convert(tp: Any, value: Any, *, key: str, source: str) -> Any:
    def wrong(expected: str):
        return KinoUserError(
            f"config file {source}: key {key!r} must be {expected}, got {_describe(value)}"
        )

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=key + ".", source=source)
    if origin is Union or origin is types.UnionType:
        members = typing.get_args(tp)
        if type(None) in members and (value is None or (isinstance(value, str) and value.lower() == "none")):
            return None
        sections = [m for m in members if dataclasses.is_dataclass(m)]
        if isinstance(value, dict) and len(sections) == 1:
            # an optional section given as a table: build it, so its own errors name the bad key
            return _build(sections[0], value, prefix=key + ".", source=source)
        for member in members:
            if member is type(None):
                continue
            try:
                return _convert(member, value, key=key, source=source)
            except KinoUserError:
                continue
        raise wrong(" or ".join(_type_name(m) for m in members))
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) in {type(a) for a in allowed}:
            return value
        raise wrong("one of " + ", ".join(repr(a) for a in allowed))
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise wrong(_type_name(tp))
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, key=f"{key}[{i}]", source=source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise wrong(f"a list of {len(args)} values")
        return tuple(_convert(a, v, key=f"{key}[{i}]", source=source) for i, (a, v) in enumerate(zip(args, value)))
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise wrong(_type_name(tp))
        return [_convert(arg, v, key=f"{key}[{i}]", source=source) for i, v in enumerate(value)]
    if origin is dict:
        _, arg = typing.get_args(tp) or (str, Any)
        if not isinstance(value, dict):
            raise wrong("a table/object")
        return {str(k): _convert(arg, v, key=f"{key}.{k}", source=source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise wrong("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong("a string")
    if tp is Path:
        if isinstance(value, str):
            return Path(value)
        raise wrong("a path string")
    raise TypeError(f"config field {key!r} has a type the loader does not support: {tp!r}")


def _check_literals(config: Any) -> None:
    """Reject a value outside a `Literal[...]` field's choices (the loader checks this too,
    but configs are also built directly in Python)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        tp = hints[f.name]
        if typing.get_origin(tp) is Literal:
            allowed = typing.get_args(tp)
            value = getattr(config, f.name)
            if value not in allowed:
                raise KinoUserError(
                    f"{f.name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}"
                )


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return '"none"'
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path string"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) in (tuple, list):
        return "a list"
    return getattr(tp, "__name__", repr(tp))


def _describe(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "table"}
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{kind.get(type(value), type(value).__name__)} {text}"
