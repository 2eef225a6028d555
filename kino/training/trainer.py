"""One trainer for every model in kino (the video VAE, the diffusion transformer).

The trainer owns the loop: seeding, AdamW, the learning-rate schedule, EMA, gradient
clipping, autocast, checkpoints, automatic resume, logging and clean stops on SIGTERM.
Everything model-specific lives in a *task* (see `TrainTask`): it builds the model,
produces the batch for a step and computes the loss.

Resume is exact: the batch is a function of the step, and a checkpoint carries the
model, optimizer, scheduler, EMA and every RNG state, so on CPU N straight steps and
N/2 steps + restart + N/2 steps end with the same weights bit for bit.

Under `torchrun` (kino/training/distributed.py) every process builds the same model,
`parallelize()` shards it with FSDP2 (and splits clips for sequence parallelism), each
data-parallel rank trains on its rows of the step's global batch, and checkpoints go through
torch.distributed.checkpoint. One process without options runs exactly as before.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kino.errors import KinoUserError
from kino.training.checkpoint import (
    Checkpoint,
    capture_rng_state,
    is_distributed_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_distributed_checkpoint,
    remove_stale_temp,
    restore_rng_state,
    save_checkpoint,
    save_distributed_checkpoint,
)
from kino.training.config import TrainConfig, config_to_dict
from kino.training.distributed import Processes, init_processes, parallelize

SAMPLE_FPS = 8  # frame rate of the GIFs logged from task.samples


class TrainTask(Protocol):
    """The model-specific half of training. The trainer calls, in this order:

    - `build_model()` once, right after seeding: a fresh model on CPU (the trainer moves
      it to the device). Must be deterministic given the torch seed.
    - `batch(step)` before optimizer step `step` (0-based): a dict of CPU tensors (the
      trainer moves them). Must be a deterministic function of `step`, so that the data
      position is the step and resume needs no data-loader state. The batch size, for
      the samples/s figure, is dim 0 of the first tensor.
    - `loss(model, batch)` under autocast, in train mode: the scalar loss to minimise and
      a dict of extra values to log (floats or 0-dim tensors; tensors are only read at
      log steps, so returning them avoids a device sync every step).
      Under data parallelism each rank gets its rows of the batch (dim 0 split evenly)
      and the gradient is the mean over ranks of each rank's loss.
    - `batch_tokens(batch)` and `batch_flops(batch)` (optional): transformer tokens and training FLOPs
      (forward + backward, from the model's own count) of the whole batch, for the logged
      tokens/s and MFU.
    - `samples(model)` (optional method) every `sample_every` steps, in eval mode under
      `torch.no_grad()`, with the EMA weights when EMA is on: uint8 videos
      (F, H, W, 3) by name, logged to TensorBoard as animated GIFs. Random draws here do
      not disturb the training RNG streams.
    - `validation_batches()` and `validation_losses(model, batch)` (optional) every
      `validate_every` steps and at the end, in eval mode under `torch.no_grad()`, with the
      trained weights and the EMA weights: fixed held-out batches (an
      iterable of CPU tensor dicts, built the same way each time) and, per batch, a
      (sum, count) pair of 0-dim tensors for each loss; the trainer logs sum / count over
      all batches to OUT/validation.jsonl and TensorBoard (val/).
    """

    def build_model(self) -> nn.Module: ...

    def batch(self, step: int) -> dict[str, Tensor]: ...

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float | Tensor]]: ...


@dataclass
class TrainResult:
    step: int  # steps completed when fit() returned
    start_step: int  # step this fit() resumed from (0 for a fresh run)
    losses: dict[str, float]  # the last logged loss and task logs
    interrupted: bool  # stopped early by SIGINT/SIGTERM (after saving a checkpoint)
    checkpoint: Path | None  # the newest checkpoint folder


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier on `config.lr` for optimizer step `step` (0-based): linear warmup, then
    constant or a cosine down to `min_lr_ratio` at `decay_steps` (default max_steps)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps  # the first step already moves the weights
    if config.lr_schedule == "constant":
        return 1.0
    total = config.decay_steps if config.decay_steps is not None else config.max_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class EMA:
    """fp32 exponential moving average of a model's trainable parameters."""

    def __init__(self, model: nn.Module, decay: float, start_step: int = 0):
        self.decay = decay
        self.start_step = start_step
        self.shadow = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold in the weights after optimizer step `step` (1-based: steps completed)."""
        for name, p in model.named_parameters():
            s = self.shadow.get(name)
            if s is None:
                continue
            if step <= self.start_step:
                s.copy_(p.detach())
            else:
                s.lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
            raise KinoUserError(f"EMA weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, s in self.shadow.items():
            s.copy_(state[name])


class Trainer:
    """`Trainer(task, config).fit()` trains, checkpoints and resumes from `config.out_dir`.

    `run_config` is the full resolved config to record in `OUT/config.json` and each
    checkpoint (e.g. a dataclass holding model, data and train sections); default `config`.
    After `setup()` (called by `fit()`), `model`, `ema`, `optimizer`, `scheduler` and
    `step` are available.
    """

    def __init__(self, task: TrainTask, config: TrainConfig, *, run_config: Any = None):
        self.task = task
        self.config = config
        self.run_config = run_config if run_config is not None else config
        self.out_dir = Path(config.out_dir)
        self.device = resolve_device(config.device)
        self.autocast_dtype = resolve_precision(config.precision, self.device)
        self.model: nn.Module | None = None
        self.ema: EMA | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.step = 0
        self.start_step = 0
        self._saved_step: int | None = None
        self.procs = Processes()  # this process's place in a torchrun job (set in setup)

    # --- setup and resume ---------------------------------------------------------------

    def setup(self) -> None:
        """Seed, build model/EMA/optimizer/scheduler, and resume from the newest
        checkpoint in out_dir if there is one. Idempotent."""
        if self.model is not None:
            return
        cfg = self.config
        self.procs = init_processes(cfg.parallel, self.device)
        if self.procs.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", self.procs.local_rank)
        _seed_everything(cfg.seed)  # the same seed everywhere: every rank builds the same weights
        if self.procs.distributed and cfg.parallel.meta_init:
            model = self._build_on_rank0()
        else:
            model = self.task.build_model().to(self.device)
            model.train()
            model = parallelize(model, cfg.parallel, self.procs, param_dtype=self.autocast_dtype)
        self.model = model
        if cfg.ema_decay is not None:
            self.ema = EMA(model, cfg.ema_decay, cfg.ema_start)
        self.optimizer = self._build_optimizer(model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))

        if self.procs.is_main:
            remove_stale_temp(self.out_dir)
        self.procs.barrier()
        path = latest_checkpoint(self.out_dir)
        if path is not None:
            self._resume(path)
            self._saved_step = self.step
        self.start_step = self.step

    def _build_on_rank0(self) -> nn.Module:
        """`parallel.meta_init`: rank 0 builds the model in CPU memory, every rank builds it on
        the meta device (no memory), shards it with `parallelize`, allocates its own shards on
        its device, and rank 0's weights are broadcast into them. The weights, and the torch
        RNG after the build, are those of the plain path, where every rank builds the whole
        model: the run is the same."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full = self.task.build_model() if self.procs.is_main else None
        torch.set_rng_state(self.procs.broadcast(torch.get_rng_state()))  # as if every rank had built it
        with torch.device("meta"):
            model = self.task.build_model()
        model.train()
        model = parallelize(model, self.config.parallel, self.procs, param_dtype=self.autocast_dtype)
        model.to_empty(device=self.device)
        state = full.state_dict() if full is not None else {}
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full, state
        return model

    def _build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        # Decay matrices (linear/conv kernels, embeddings), not biases or norm gains.
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": self.config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise KinoUserError("the task's model has no trainable parameters")
        return torch.optim.AdamW(groups, lr=self.config.lr, betas=self.config.betas, **self._optimizer_impl())

    def _optimizer_impl(self) -> dict[str, Any]:
        # fused kernels on CUDA; elsewhere torch's default (per-tensor loop) implementation
        return {"fused": True} if self.device.type == "cuda" else {"fused": None, "foreach": None}

    def _resume(self, path: Path) -> None:
        if is_distributed_checkpoint(path):
            return self._resume_distributed(path)
        if self.procs.distributed:
            raise KinoUserError(f"{path} was written by a single-process run; a run of several processes "
                                "resumes only from its own (torch.distributed.checkpoint) checkpoints")
        ckpt = load_checkpoint(path)
        try:
            missing, unexpected = self.model.load_state_dict(ckpt.model, strict=False)
        except RuntimeError as e:
            raise KinoUserError(
                f"checkpoint {path} does not fit the model this config builds "
                f"(was the model config changed?): {e}"
            ) from None
        missing = sorted(set(missing) - _frozen_names(self.model))  # frozen ones come from build_model()
        if missing or unexpected:
            raise KinoUserError(
                f"checkpoint {path} does not fit the model this config builds (was the model config "
                f"changed?): missing {missing[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        if self.ema is not None:
            if ckpt.ema is not None:
                self.ema.load_state_dict(ckpt.ema)
            else:
                warnings.warn(f"{path} has no EMA weights; the EMA starts from the current weights")
                self.ema = EMA(self.model, self.config.ema_decay, self.config.ema_start)
        self.optimizer.load_state_dict(ckpt.optimizer["optimizer"])
        self.scheduler.load_state_dict(ckpt.optimizer["scheduler"])
        for group in self.optimizer.param_groups:  # the implementation follows this device
            group.update(self._optimizer_impl())
        restore_rng_state(ckpt.rng)  # last: nothing above may draw from the restored streams
        self.step = ckpt.step

    def _sharded_state(self) -> dict[str, Any]:
        """Model, optimizer and EMA as torch.distributed.checkpoint saves and loads them in place."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        state = {"model": get_model_state_dict(self.model),
                 "optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()  # shards like the parameters; loaded in place
        return state

    def _resume_distributed(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        state = self._sharded_state()
        try:
            step, scheduler, rng = load_distributed_checkpoint(path, state, self.procs.rank)
        except Exception as e:  # DCP reports a missing or misshapen key as a CheckpointException
            raise KinoUserError(f"checkpoint {path} does not fit the model and training this config builds "
                                f"(was the model config or EMA changed?): {e}") from None
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(scheduler)
        for group in self.optimizer.param_groups:
            group.update(self._optimizer_impl())
        restore_rng_state(rng)  # last, as in _resume
        self.step = step

    # --- the loop -----------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train until `max_steps` (resuming if out_dir has a checkpoint), checkpointing
        every `checkpoint_every` steps and at the end. A first SIGINT/SIGTERM finishes the
        current step, saves a checkpoint and returns (interrupted=True); a second aborts."""
        self.setup()
        cfg = self.config
        main = self.procs.is_main
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            _write_json(self.out_dir / "config.json", config_to_dict(self.run_config))
            if self.start_step:
                print(f"kino: resuming {self.out_dir} from its checkpoint at step {self.start_step}", file=sys.stderr)
        if self.step >= cfg.max_steps and self._saved_step == self.step:
            return TrainResult(self.step, self.start_step, {}, False, latest_checkpoint(self.out_dir))

        losses: dict[str, float] = {}
        deadline = None if cfg.max_minutes is None else time.monotonic() + 60.0 * cfg.max_minutes
        window = _Window(self.device, self.procs, peak_flops(cfg.peak_tflops, self.device, self.autocast_dtype))
        with _StopOnSignal() as stop, _RunLog(self.out_dir, self.step, enabled=main) as log, tqdm(
            total=cfg.max_steps, initial=self.step, disable=not (cfg.progress and main), file=sys.stderr,
            unit="step", desc="train", dynamic_ncols=True,
        ) as bar:
            interrupted = False  # stopped early by agreement of all ranks (a late signal is not)
            while self.step < cfg.max_steps:
                lr = self.scheduler.get_last_lr()[0]
                loss, logs, grad_norm, sizes = self._train_step()
                window.add(loss, logs, *sizes)
                bar.update(1)
                step = self.step
                # every rank stops after the same step, or the next collective would wait forever:
                # decide once, here, for all ranks. A signal landing after this agreement (the
                # handler can run between any two bytecodes) waits for the next step's; acting on
                # it now would send this rank alone into the log's and the checkpoint's collectives.
                stopping = self.procs.any(stop.requested is not None)
                if stopping and stop.requested is None:
                    stop.requested = "a signal to another process"
                # the time budget, agreed on the same way (clocks differ between processes)
                out_of_time = deadline is not None and self.procs.any(time.monotonic() >= deadline)
                if step % cfg.log_every == 0 or step == cfg.max_steps or stopping or out_of_time:
                    row = window.flush(step, lr=lr, grad_norm=float(grad_norm))
                    losses = {k: v for k, v in row.items() if k in window.names}
                    log.scalars(step, row, task_keys=window.names)
                    bar.set_postfix(loss=f"{row['loss']:.4g}")
                    if not math.isfinite(row["loss"]):
                        raise FloatingPointError(
                            f"loss is {row['loss']} at step {step}; the last good checkpoint is "
                            f"{latest_checkpoint(self.out_dir)}"
                        )
                if stopping:
                    interrupted = True
                    break
                if out_of_time:
                    if main:
                        print(f"kino: train.max_minutes ({cfg.max_minutes:g}) reached at step {step}", file=sys.stderr)
                    break
                if cfg.validate_every and (step % cfg.validate_every == 0 or step == cfg.max_steps):
                    with window.paused():
                        self._validate(log, step)
                if cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.max_steps):
                    with window.paused():
                        self._log_samples(log, step)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                    with window.paused():
                        self.save_checkpoint()
            path = self.save_checkpoint() if self._saved_step != self.step else latest_checkpoint(self.out_dir)
        if interrupted and main:
            print(f"kino: stopped by {stop.requested} at step {self.step}; saved {path}", file=sys.stderr)
        return TrainResult(self.step, self.start_step, losses, interrupted, path)

    def _train_step(self) -> tuple[Tensor, dict[str, float | Tensor], Tensor, tuple[int, int, float]]:
        cfg = self.config
        full = self.task.batch(self.step)
        sizes = (_batch_size(full), _task_count(self.task, "batch_tokens", full),
                 _task_count(self.task, "batch_flops", full))
        mine = _rows(full, self.procs.dp_rank, self.procs.dp_size)
        k = cfg.grad_accum
        losses, logs = [], {}
        for part in range(k):  # the mean gradient of k micro-batches, as k data-parallel ranks would give
            batch = {key: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v
                     for key, v in (_rows(mine, part, k, "gradient accumulation micro-batches") if k > 1
                                    else mine).items()}
            with self._autocast():
                micro, micro_logs = self.task.loss(self.model, batch)
            scale = (self.procs.grad_scale if self.procs.sp_size > 1 else 1.0) / k
            (micro * scale if scale != 1.0 else micro).backward()
            losses.append(micro.detach())
            for name, value in micro_logs.items():
                logs[name] = value if k == 1 else logs.get(name, 0.0) + value / k
        loss = losses[0] if k == 1 else torch.stack(losses).mean()
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf  # inf: measure only
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2: already reduced over ranks
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        return loss, logs, grad_norm, sizes

    def _autocast(self):
        return torch.autocast(
            device_type=self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        )

    def _validate(self, log: _RunLog, step: int) -> dict[str, float] | None:
        """The task's validation losses on its fixed held-out batches, with the weights being
        trained (EMA weights too when EMA is on: `ema_` keys). A task without
        `validation_batches` has none. Under several processes each data-parallel group takes
        its rows of every batch and the sums are averaged over all ranks."""
        batches = getattr(self.task, "validation_batches", None)
        if batches is None:
            return None
        sums: dict[str, list[Tensor]] = {}
        with _rng_preserved(), torch.no_grad(), self._autocast():
            for prefix in ("", "ema_") if self.ema is not None else ("",):
                with self._weights(ema=prefix == "ema_") as model:
                    for full in batches():
                        batch = {k: v.to(self.device) if isinstance(v, Tensor) else v
                                 for k, v in _rows(full, self.procs.dp_rank, self.procs.dp_size).items()}
                        for key, (total, count) in self.task.validation_losses(model, batch).items():
                            acc = sums.setdefault(prefix + key, [torch.zeros((), dtype=torch.float64)] * 2)
                            sums[prefix + key] = [acc[0] + total.double().cpu(), acc[1] + count.double().cpu()]
        row = {"step": step}
        for key, (total, count) in sums.items():
            both = self.procs.mean(torch.stack([total, count]))  # sp peers repeat their group's rows: a ratio of means
            row[key] = float(both[0] / both[1].clamp_min(1e-12))
        log.validation(step, row)
        return row

    @contextmanager
    def _weights(self, ema: bool):
        """The model in eval mode for the body, carrying the EMA weights when `ema`: swapped
        into its own parameters in place (each rank its shards under FSDP2, so every rank can
        take part in the forwards) and swapped back bit for bit after, so training goes on
        exactly as if nothing had happened."""
        # FSDP2 keeps the root's gathered (unsharded) weights after a forward: put every module
        # back on its shards, which are what is swapped here and what the next forward gathers
        reshard = getattr(self.model, "reshard", lambda: None)
        saved: dict[str, Tensor] = {}
        reshard()
        params = dict(self.model.named_parameters())
        try:
            with torch.no_grad():
                for name, shadow in (self.ema.shadow.items() if ema else ()):
                    saved[name] = params[name].detach().clone()
                    params[name].detach().copy_(shadow.to(params[name].dtype))
            self.model.eval()
            yield self.model
        finally:
            self.model.train()
            reshard()
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].detach().copy_(value)

    def _log_samples(self, log: _RunLog, step: int) -> None:
        """The task's previews, with the EMA weights when EMA is on. Under several processes
        every rank runs them (the forwards are collective under FSDP2) and rank 0 logs."""
        sample = getattr(self.task, "samples", None)
        if sample is None:
            return
        with _rng_preserved(), torch.no_grad(), self._autocast(), self._weights(ema=self.ema is not None) as model:
            videos = sample(model)
        log.videos(step, videos)

    # --- checkpoints and export ---------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write a checkpoint for the current step (atomically) and prune old ones. Under
        several processes: a collective torch.distributed.checkpoint save."""
        if self.procs.distributed:
            path = save_distributed_checkpoint(
                self.step, self._sharded_state(), self.scheduler.state_dict(), config_to_dict(self.run_config),
                self.out_dir, self.procs, keep_last=self.config.keep_last,
            )
            self._saved_step = self.step
            return path
        # Frozen parameters (a LoRA's base model) never change and build_model() rebuilds
        # them, so checkpoints leave them out: a LoRA checkpoint holds the LoRA alone.
        frozen = _frozen_names(self.model)
        ckpt = Checkpoint(
            step=self.step,
            model={k: v for k, v in self.model.state_dict().items() if k not in frozen},
            optimizer={"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
            rng=capture_rng_state(),
            ema=self.ema.state_dict() if self.ema is not None else None,
            config=config_to_dict(self.run_config),
        )
        path = save_checkpoint(ckpt, self.out_dir, keep_last=self.config.keep_last)
        self._saved_step = self.step
        return path

    def export_state_dict(self, ema: bool | None = None) -> dict[str, Tensor]:
        """The model's state dict on CPU (copies), with the EMA weights in place of the
        trained ones when `ema` is True (default: whenever EMA is on). Collective under
        FSDP2: every rank must call it (each gets the whole state dict)."""
        self.setup()
        use_ema = self.ema is not None if ema is None else ema
        if use_ema and self.ema is None:
            raise KinoUserError("EMA weights were requested but EMA is off (ema_decay = none)")
        # Parameters are matched by identity so tied weights get the EMA value under every name.
        names = {id(p): n for n, p in self.model.named_parameters()}
        out = {}
        for key, value in self.model.state_dict(keep_vars=True).items():
            name = names.get(id(value))
            if use_ema and name in self.ema.shadow:
                value = self.ema.shadow[name].to(value.dtype)
            if hasattr(value, "full_tensor"):  # an FSDP2 shard (DTensor): gather the whole tensor
                value = value.full_tensor()
            out[key] = value.detach().to("cpu", copy=True)
        return out

    def ema_model(self) -> nn.Module:
        """A copy of the model carrying the EMA weights, in eval mode."""
        self.setup()
        if self.ema is None:
            raise KinoUserError("EMA is off (ema_decay = none)")
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.export_state_dict(ema=True))
        return model.eval()


# --- devices and precision --------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KinoUserError("device 'cuda' was requested but no CUDA device is available; use device = \"cpu\"")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for plain fp32."""
    if precision == "fp32":
        return None
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return torch.bfloat16 if bf16_ok else None
    if device.type == "cuda" and not bf16_ok:
        raise KinoUserError("precision 'bf16' was requested but this GPU does not support bf16; use fp32")
    return torch.bfloat16


# bf16 dense tensor-core peaks (FLOP/s) of GPUs whose MFU the trainer reports without being told
_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def peak_flops(peak_tflops: float | None, device: torch.device, dtype: torch.dtype | None) -> float | None:
    """Peak FLOP/s of one device for MFU: the configured value, else a known GPU's bf16 peak."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type == "cuda" and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        for key, value in _PEAK_BF16.items():
            if key in name:
                return value
    return None


def _rows(batch: dict[str, Any], rank: int, ranks: int, what: str = "data-parallel ranks") -> dict[str, Any]:
    """Share `rank` of `ranks` (a data-parallel rank's, a micro-batch's): a contiguous slice of
    every batch tensor's rows."""
    if ranks == 1:
        return batch
    size = _batch_size(batch)
    if size % ranks:
        raise KinoUserError(f"the batch of {size} does not split evenly over {ranks} {what}")
    share = size // ranks
    return {k: v[rank * share:(rank + 1) * share] if isinstance(v, Tensor) and v.ndim else v
            for k, v in batch.items()}


def _task_count(task: TrainTask, name: str, batch: dict[str, Any]) -> float:
    fn = getattr(task, name, None)
    return float(fn(batch)) if fn is not None else 0.0


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device
    np.random.seed(seed % 2**32)
    random.seed(seed)


@contextmanager
def _rng_preserved() -> Iterator[None]:
    """Run a block without moving any global RNG stream (sampling must not change training)."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


def _frozen_names(model: nn.Module) -> set[str]:
    """State-dict names of the parameters that do not train."""
    return {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _batch_size(batch: dict[str, Any]) -> int:
    for v in batch.values():
        if isinstance(v, Tensor):
            return int(v.shape[0]) if v.ndim else 1
    return 1


# --- logging ----------------------------------------------------------------------------


class _Window:
    """Accumulates losses between log steps and times them, without a device sync per step."""

    def __init__(self, device: torch.device, procs: Processes | None = None, peak: float | None = None):
        self.device = device
        self.procs = procs or Processes()
        self.peak = peak  # FLOP/s of one device, for MFU
        self.names: list[str] = ["loss"]
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, Tensor | float] = {}
        self.steps = 0
        self.samples = 0
        self.tokens = 0.0
        self.flops = 0.0
        self.excluded = 0.0
        self.start = time.perf_counter()

    def add(self, loss: Tensor, logs: dict[str, float | Tensor], batch_size: int, tokens: float = 0.0,
            flops: float = 0.0) -> None:
        """`batch_size`, `tokens` and `flops` count the step's whole (global) batch."""
        for name, value in {"loss": loss, **logs}.items():
            value = value.detach().float() if isinstance(value, Tensor) else float(value)
            self.sums[name] = self.sums[name] + value if name in self.sums else value
            if name not in self.names:
                self.names.append(name)
        self.steps += 1
        self.samples += batch_size
        self.tokens += tokens
        self.flops += flops

    @contextmanager
    def paused(self) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t

    def flush(self, step: int, *, lr: float, grad_norm: float) -> dict[str, float]:
        names = list(self.sums)
        means = [float(self.sums[name]) / self.steps for name in names]
        seconds = max(time.perf_counter() - self.start - self.excluded, 1e-9)
        if self.procs.distributed:  # losses and time: the mean over ranks (one collective)
            reduced = self.procs.mean(torch.tensor([*means, seconds], dtype=torch.float64)).tolist()
            means, seconds = reduced[:-1], reduced[-1]
        row = {
            "step": step,
            **dict(zip(names, means)),
            "lr": lr,
            "grad_norm": grad_norm,
            "steps_per_s": self.steps / seconds,
            "samples_per_s": self.samples / seconds,
        }
        if self.tokens:
            row["tokens_per_s"] = self.tokens / seconds
        if self.flops:
            row["tflops_per_s"] = self.flops / seconds / 1e12
            if self.peak:
                row["mfu"] = self.flops / seconds / (self.peak * self.procs.world_size)
        row["time"] = time.time()
        self._reset()
        return row


_warned_no_tensorboard = False


class _RunLog:
    """TensorBoard events in OUT/tb and one JSON row per log step in OUT/metrics.jsonl."""

    def __init__(self, out_dir: Path, start_step: int, enabled: bool = True):
        self.metrics_path = out_dir / "metrics.jsonl"
        self.validation_path = out_dir / "validation.jsonl"
        self.start_step = start_step
        self.enabled = enabled  # False on every rank but 0 of a distributed run
        self.writer = None
        self._metrics = None

    def __enter__(self) -> _RunLog:
        if not self.enabled:
            return self
        for path in (self.metrics_path, self.validation_path):  # rows of a run that died after its last checkpoint
            _drop_rows_after(path, self.start_step)
        self._metrics = open(self.metrics_path, "a", encoding="utf-8")
        self.writer = _summary_writer(self.metrics_path.parent / "tb", purge_step=self.start_step + 1)
        return self

    def __exit__(self, *exc) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self.writer is not None:
            self.writer.close()

    def scalars(self, step: int, row: dict[str, float], task_keys: list[str]) -> None:
        if not self.enabled:
            return
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self.writer is None:
            return
        for key, value in row.items():
            if key in ("step", "time"):
                continue
            if key in task_keys:
                tag = f"train/{key}"
            elif key in ("lr", "grad_norm"):
                tag = f"opt/{key}"
            else:
                tag = f"perf/{key}"
            self.writer.add_scalar(tag, value, step)

    def validation(self, step: int, row: dict[str, float]) -> None:
        """One row of validation losses: OUT/validation.jsonl and TensorBoard val/."""
        if not self.enabled:
            return
        with open(self.validation_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step":
                    self.writer.add_scalar(f"val/{key}", value, step)
            self.writer.flush()

    def videos(self, step: int, videos: dict[str, Tensor]) -> None:
        if self.writer is None:
            return
        for name, video in videos.items():
            summary = gif_summary(f"samples/{name}", video, fps=SAMPLE_FPS)
            self.writer._get_file_writer().add_summary(summary, global_step=step)
        self.writer.flush()


def _summary_writer(log_dir: Path, purge_step: int):
    global _warned_no_tensorboard
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _warned_no_tensorboard:
            warnings.warn(
                "tensorboard is not installed, so only OUT/metrics.jsonl is written; "
                "install it with: pip install 'kino-video[train]'"
            )
            _warned_no_tensorboard = True
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def encode_gif(video: Tensor, fps: int = SAMPLE_FPS) -> bytes:
    """An animated, looping GIF of uint8 frames (F, H, W, 3) or one image (H, W, 3)."""
    from PIL import Image

    if video.dtype != torch.uint8 or video.ndim not in (3, 4) or video.shape[-1] != 3:
        raise ValueError(f"expected a uint8 video (F, H, W, 3), got {video.dtype} {tuple(video.shape)}")
    frames = video.detach().cpu().numpy()
    if frames.ndim == 3:
        frames = frames[None]
    images = [Image.fromarray(f) for f in frames]  # each (H, W, 3)
    buf = BytesIO()
    images[0].save(
        buf, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0
    )
    return buf.getvalue()


def gif_summary(tag: str, video: Tensor, fps: int = SAMPLE_FPS):
    """A TensorBoard image summary holding an animated GIF (shown animated in the Images
    tab). Built by hand because SummaryWriter.add_video needs moviepy."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    height, width = int(video.shape[-3]), int(video.shape[-2])
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=encode_gif(video, fps))
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def _drop_rows_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a row cut short by a crash
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --- signals ----------------------------------------------------------------------------


class _StopOnSignal:
    """First SIGINT/SIGTERM: ask the loop to stop after the current step (it then saves a
    checkpoint). A second one aborts at once with KeyboardInterrupt, saving nothing."""

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # handlers only work there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        sys.stderr.write(f"\nkino: {self.requested} received; saving a checkpoint after this step "
                         "(send it again to abort without saving)\n")

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
