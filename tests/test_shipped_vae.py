"""The VAE shipped inside the package: it loads, passes its sha256 check, and reconstructs
held-out Shapes World clips (a small check; the full measurement is in BENCHMARKS.md)."""

import numpy as np
import pytest
import torch

from conftest import tampered_default_copy
from kino.models.folder import WeightsIntegrityError
from kino.models.vae.pretrained import load_vae
from kino.tasks.reconstruct import psnr_uint8, reconstruct_video
from kino.world.evaluator import evaluate_clip
from kino.world.generator import render, scene_at

# The shipped weights (encoder 7,000 steps, then five decoder-only rounds of 4,000, 8,000,
# 8,000, 6,000 and 2,000 steps, the fourth with the palette loss, the fifth with the temporal
# loss) measure 34.01 dB mean PSNR and a 76.0% evaluator pass rate over 200 fresh eval clips
# (seed 2026, BENCHMARKS.md): the PSNR target (32 dB) is met, the pass-rate target (98%) is met
# only with latent refinement. This test uses other clips (seed 777: 34.3 dB, 7/8 pass; after
# the fourth decoder round 33.3 dB, 8/8; after the third 33.8 dB, 8/8; after the second
# 33.2 dB, 7/8; after the first 32.0 dB, 6/8; before any 30.9 dB, 4/8) and asserts floors under
# those, to catch regressions.
MIN_MEAN_PSNR = 33.8
MIN_PASSED = 7


@pytest.fixture(scope="module")
def vae():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_vae()
    torch.set_num_threads(old)


def test_shipped_vae_reconstructs_world_clips(vae):
    psnrs, passed = [], 0
    cases = [(1, (64, 64)), (9, (64, 96)), (17, (96, 64)), (33, (64, 64))]
    for i, (frames, size) in enumerate(cases * 2):
        scene = scene_at("eval", 777, i, frames=frames, size=size)
        video = render(scene)
        rec = reconstruct_video(vae, video)
        assert rec.shape == video.shape
        psnrs.append(psnr_uint8(video, rec))
        passed += evaluate_clip(rec, scene.caption).passed
    assert np.mean(psnrs) >= MIN_MEAN_PSNR, psnrs
    assert passed >= MIN_PASSED, (passed, psnrs)


def test_tampered_shipped_weights_are_refused(tmp_path):
    copy = tampered_default_copy(tmp_path, "vae")
    with pytest.raises(WeightsIntegrityError, match="sha256"):
        load_vae(copy)
