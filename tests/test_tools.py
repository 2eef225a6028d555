"""Scripts under tools/ run end to end on the shipped model, so they stay working between uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

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
