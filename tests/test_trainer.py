"""The generic trainer on a toy task: learning, bitwise-exact resume across processes,
atomic checkpoints, SIGTERM, strict config loading and TensorBoard output.

Run as a script (`python tests/test_trainer.py CONFIG.json`) it trains the toy task with
that config in a fresh process, which the resume and SIGTERM tests rely on.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # when run as a script
    sys.path.insert(0, str(REPO))

from kino.errors import KinoUserError  # noqa: E402
from kino.training import (  # noqa: E402
    TrainConfig,
    Trainer,
    config_from_dict,
    config_to_dict,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_config,
)


@pytest.fixture(autouse=True)
def one_thread():
    # The toy ops are tiny: extra intra-op threads only spin, and crawl when the CPU is shared.
    # The fresh-process runs below use one thread too, so results match bit for bit.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ToyTask:
    """Regress y = sin(x @ A) from x with a small MLP that has dropout; the loss adds input
    noise from the global RNG, so exact resume needs the RNG state restored too."""

    dim = 8

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Linear(self.dim, 32), nn.GELU(), nn.Dropout(0.1), nn.LayerNorm(32), nn.Linear(32, self.dim)
        )

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(16, self.dim, generator=g)  # (B, D)
        a = torch.linspace(-1, 1, self.dim * self.dim).reshape(self.dim, self.dim)
        return {"x": x, "y": torch.sin(x @ a)}

    def loss(self, model, batch):
        x = batch["x"] + 0.01 * torch.randn_like(batch["x"])
        err = model(x) - batch["y"]
        loss = err.pow(2).mean()
        return loss, {"mae": err.abs().mean().detach(), "const": 1.0}

    def samples(self, model):
        torch.randn(3)  # draws here must not disturb training
        x = torch.linspace(-2, 2, 4 * 16 * 16 * self.dim).reshape(4 * 16 * 16, self.dim)
        y = model(x).mean(-1).reshape(4, 16, 16, 1).expand(4, 16, 16, 3)  # (F, H, W, 3)
        return {"recon": ((y.tanh() + 1) * 127.5).to(torch.uint8)}


def toy_config(out_dir, **overrides) -> TrainConfig:
    base = dict(
        out_dir=str(out_dir), max_steps=8, lr=3e-3, weight_decay=0.01, warmup_steps=2,
        lr_schedule="cosine", decay_steps=8, grad_clip=0.5, ema_decay=0.9, ema_start=1,
        checkpoint_every=0, keep_last=3, log_every=2, seed=7, device="cpu", progress=False,
    )
    base.update(overrides)
    return TrainConfig(**base)


def run_in_subprocess(config: TrainConfig, tmp_path: Path, *, wait: bool = True):
    path = tmp_path / f"config-{os.getpid()}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(config_to_dict(config)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(Path(__file__).resolve()), str(path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# --- training -----------------------------------------------------------------------------


def test_loss_decreases(tmp_path):
    cfg = toy_config(tmp_path, max_steps=150, lr=1e-2, lr_schedule="constant", ema_decay=None, log_every=10)
    result = Trainer(ToyTask(), cfg).fit()
    rows = metrics(tmp_path)
    assert result.step == 150 and not result.interrupted
    assert [r["step"] for r in rows] == list(range(10, 151, 10))
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert set(result.losses) == {"loss", "mae", "const"} and result.losses["const"] == 1.0
    assert all(r["lr"] > 0 and r["grad_norm"] > 0 and r["steps_per_s"] > 0 for r in rows)


def test_max_minutes_finishes_early_and_a_rerun_resumes(tmp_path, monkeypatch):
    clock = iter(range(0, 100_000, 30))  # every reading of the clock is 30 s after the last
    monkeypatch.setattr("kino.training.trainer.time.monotonic", lambda: float(next(clock)))
    cfg = toy_config(tmp_path, max_steps=50, max_minutes=2.0, log_every=10)
    first = Trainer(ToyTask(), cfg).fit()  # the deadline falls a few steps in
    assert 1 <= first.step <= 4 and not first.interrupted
    assert first.checkpoint.name == f"step-{first.step:08d}" and metrics(tmp_path)[-1]["step"] == first.step
    straight = Trainer(ToyTask(), toy_config(tmp_path / "straight", max_steps=6, log_every=10)).fit()
    second = Trainer(ToyTask(), toy_config(tmp_path, max_steps=6, log_every=10)).fit()
    assert (second.start_step, second.step) == (first.step, 6)
    assert_same(load_checkpoint(second.checkpoint).model, load_checkpoint(straight.checkpoint).model)
    with pytest.raises(KinoUserError, match="max_minutes"):
        toy_config(tmp_path, max_minutes=0)


def test_resume_is_bitwise_exact_across_processes(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    Trainer(ToyTask(), toy_config(straight)).fit()

    first = Trainer(ToyTask(), toy_config(split, max_steps=4)).fit()
    assert first.step == 4 and first.checkpoint.name == "step-00000004"
    result = run_in_subprocess(toy_config(split), tmp_path)
    assert result["start_step"] == 4 and result["step"] == 8

    a = load_checkpoint(straight / "checkpoints" / "step-00000008")
    b = load_checkpoint(split / "checkpoints" / "step-00000008")
    assert_same(a.model, b.model, "model")
    assert a.ema is not None
    assert_same(a.ema, b.ema, "ema")
    assert_same(a.optimizer, b.optimizer, "optimizer")
    assert_same(a.rng, b.rng, "rng")
    assert not torch.equal(a.ema["0.weight"], a.model["0.weight"])  # the EMA is really averaging
    # the resumed run logs the steps after the checkpoint, once
    assert [r["step"] for r in metrics(split)] == [2, 4, 6, 8]
    assert [r["loss"] for r in metrics(split)] == [r["loss"] for r in metrics(straight)]


def test_export_state_dict_and_ema_model(tmp_path):
    trainer = Trainer(ToyTask(), toy_config(tmp_path, max_steps=3))
    trainer.fit()
    raw, ema = trainer.export_state_dict(ema=False), trainer.export_state_dict()
    assert set(raw) == set(ema) == set(trainer.model.state_dict())
    assert torch.equal(ema["0.weight"], trainer.ema.shadow["0.weight"])
    assert not torch.equal(ema["0.weight"], raw["0.weight"])
    copy = trainer.ema_model()
    assert not copy.training and torch.equal(copy.state_dict()["4.bias"], ema["4.bias"])
    # resuming a finished run does nothing
    again = Trainer(ToyTask(), toy_config(tmp_path, max_steps=3)).fit()
    assert again.step == again.start_step == 3


# --- checkpoints --------------------------------------------------------------------------


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    Trainer(ToyTask(), toy_config(tmp_path, max_steps=6, checkpoint_every=2, keep_last=2)).fit()
    root = tmp_path / "checkpoints"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 6]
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004", "step-00000006"]
    assert sorted(p.name for p in (root / "step-00000006").iterdir()) == [
        "ema.safetensors", "model.safetensors", "optimizer.pt", "rng.pt", "state.json",
    ]
    state = json.loads((root / "step-00000006" / "state.json").read_text())
    assert state["step"] == 6 and state["config"]["max_steps"] == 6 and "kino_version" in state

    # a crash mid-write leaves a temp folder (even one that looks complete) ...
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    crashed = root / f"step-00000010.tmp-{dead.pid}"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"half a file")
    (crashed / "state.json").write_text('{"step": 10}')
    # ... and a folder with the final name but no state.json is not complete either
    (root / "step-00000009").mkdir()
    assert latest_checkpoint(tmp_path) == root / "step-00000006"

    result = Trainer(ToyTask(), toy_config(tmp_path, max_steps=8, checkpoint_every=2, keep_last=2)).fit()
    assert result.start_step == 6 and result.step == 8
    assert not crashed.exists()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6, 8]


def test_pt_files_load_with_weights_only(tmp_path):
    Trainer(ToyTask(), toy_config(tmp_path, max_steps=2)).fit()
    folder = latest_checkpoint(tmp_path)
    opt = torch.load(folder / "optimizer.pt", weights_only=True)
    assert set(opt) == {"optimizer", "scheduler"} and opt["scheduler"]["last_epoch"] == 2
    rng = torch.load(folder / "rng.pt", weights_only=True)
    assert rng["torch"].dtype == torch.uint8 and rng["python"]["state"].numel() == 625
    # the training package never calls torch.load without weights_only=True
    for source in (REPO / "kino" / "training").glob("*.py"):
        for call in re.findall(r"torch\.load\([^)]*\)", source.read_text()):
            assert "weights_only=True" in call, f"{source.name}: {call}"


def test_sigterm_saves_a_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "run"
    cfg = toy_config(out, max_steps=10**7, decay_steps=None, checkpoint_every=0, log_every=1)
    proc = run_in_subprocess(cfg, tmp_path, wait=False)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            path = out / "metrics.jsonl"
            if path.exists() and path.read_text().count("\n") >= 5:
                break
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.05)
        else:
            raise AssertionError("the training subprocess logged nothing")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["interrupted"] and "SIGTERM" in stderr
    step = result["step"]
    assert step > 0 and latest_checkpoint(out).name == f"step-{step:08d}"
    assert metrics(out)[-1]["step"] == step

    resumed = Trainer(ToyTask(), toy_config(out, max_steps=step + 2, decay_steps=None)).fit()
    assert resumed.start_step == step and resumed.step == step + 2 and not resumed.interrupted


# --- configs ------------------------------------------------------------------------------


@dataclass
class ToyModelConfig:
    width: int = 32
    kind: Literal["mlp", "conv"] = "mlp"
    scales: tuple[float, ...] = (1.0,)


@dataclass
class ToyRunConfig:
    train: TrainConfig
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    note: str = ""


def test_load_config_toml_and_json(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        'note = "toy"\n'
        "[train]\n"
        'out_dir = "runs/toy"\n'
        "max_steps = 20\n"
        "lr = 1\n"  # an integer where a float goes is fine
        "betas = [0.9, 0.95]\n"
        'ema_decay = "none"\n'
        'lr_schedule = "cosine"\n'
        "[model]\n"
        'kind = "conv"\n'
        "scales = [1, 0.5]\n"
    )
    cfg = load_config(toml, ToyRunConfig)
    assert cfg.train.max_steps == 20 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.betas == (0.9, 0.95) and cfg.train.ema_decay is None
    assert cfg.model == ToyModelConfig(width=32, kind="conv", scales=(1.0, 0.5)) and cfg.note == "toy"

    js = tmp_path / "run.json"
    js.write_text(json.dumps(config_to_dict(cfg)))
    assert load_config(js, ToyRunConfig) == cfg
    assert config_from_dict(config_to_dict(cfg), ToyRunConfig) == cfg


def test_load_config_rejects_bad_keys_and_types(tmp_path):
    def error(text: str, suffix=".toml") -> str:
        path = tmp_path / f"bad{suffix}"
        path.write_text(text)
        try:
            load_config(path, ToyRunConfig)
        except KinoUserError as e:
            assert str(path) in str(e)
            return str(e)
        raise AssertionError("no KinoUserError")

    msg = error('[train]\nout_dir = "x"\nlearning_rate = 0.1\n')
    assert "'train.learning_rate'" in msg and "lr" in msg and "max_steps" in msg  # names the allowed keys
    assert "'train.lr'" in error('[train]\nout_dir = "x"\nlr = "fast"\n')
    assert "'train.max_steps'" in error('[train]\nout_dir = "x"\nmax_steps = 1.5\n')
    assert "'train.progress'" in error('{"train": {"out_dir": "x", "progress": 1}}', ".json")
    assert "'model.kind'" in error('[train]\nout_dir = "x"\n[model]\nkind = "rnn"\n')
    assert "'colour'" in error('colour = 1\n[train]\nout_dir = "x"\n')
    assert "'train.out_dir'" in error("note = 'no train table'\n")
    assert "keep_last" in error('[train]\nout_dir = "x"\nkeep_last = 0\n')
    assert "not valid TOML" in error("[train\n")


def test_toml_without_tomllib_or_tomli_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python 3.10
    monkeypatch.setitem(sys.modules, "tomli", None)
    path = tmp_path / "run.toml"
    path.write_text('[train]\nout_dir = "x"\n')
    try:
        load_config(path, ToyRunConfig)
    except KinoUserError as e:
        assert "pip install tomli" in str(e)
    else:
        raise AssertionError("no KinoUserError")


# --- TensorBoard --------------------------------------------------------------------------


def test_tensorboard_scalars_and_gif_samples(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(ToyTask(), toy_config(tmp_path, max_steps=4, sample_every=2)).fit()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/mae", "opt/lr", "opt/grad_norm", "perf/steps_per_s", "perf/samples_per_s"):
        assert tag in tags["scalars"], tag
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4]
    images = acc.Images("samples/recon")
    assert [e.step for e in images] == [2, 4]
    assert images[0].encoded_image_string.startswith(b"GIF89a")
    assert (images[0].width, images[0].height) == (16, 16)


def test_training_runs_without_tensorboard(tmp_path, monkeypatch):
    from kino.training import trainer as trainer_module

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setattr(trainer_module, "_warned_no_tensorboard", False)
    with pytest.warns(UserWarning, match="tensorboard is not installed"):
        result = Trainer(ToyTask(), toy_config(tmp_path, max_steps=4, sample_every=2)).fit()
    assert result.step == 4 and not (tmp_path / "tb").exists()
    assert [r["step"] for r in metrics(tmp_path)] == [2, 4]


# --- fresh-process entry point ----------------------------------------------------------


if __name__ == "__main__":
    torch.set_num_threads(1)
    result = Trainer(ToyTask(), load_config(sys.argv[1], TrainConfig)).fit()
    print(json.dumps({"step": result.step, "start_step": result.start_step, "interrupted": result.interrupted}))
