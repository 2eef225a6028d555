"""`--model ORG/NAME`: model folders from the Hugging Face Hub (kino/models/hub.py), tested
offline on a huggingface_hub cache the test writes the way the Hub's client does (files named
by the hash the Hub records, snapshot links to them), with HF_HUB_OFFLINE on."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from kino.errors import KinoUserError
from kino.models.hub import git_blob_sha1, hub_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(cache: Path, repo: str, folder: Path, commit: str = COMMIT) -> Path:
    """Put `folder`'s files into a huggingface_hub cache as repository `repo` (revision main):
    weights under their sha256 (the Hub's LFS files), the rest under their git blob sha1."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    (root / "blobs").mkdir()
    snapshot = root / "snapshots" / commit
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        lfs = path.suffix in (".safetensors", ".pth", ".bin")
        name = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(path)
        (root / "blobs" / name).write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(root / "blobs" / name, link.parent), link)
    return snapshot


def hub_without(tmp_path: Path, monkeypatch, repo: str, folder: Path, removed: str) -> tuple[Path, list]:
    """A copy of `folder` without its files matching the glob `removed` (weights that come from
    another file), served offline as Hub repository `repo` from a fresh cache; returns the copy
    and a list that records every snapshot_download's keyword arguments (its ignore patterns)."""
    import shutil

    import huggingface_hub
    from huggingface_hub import constants

    copy = tmp_path / f"{folder.name}-without"
    shutil.copytree(folder, copy)
    for f in copy.glob(removed):
        f.unlink()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_cache(tmp_path / "hf", repo, copy)
    calls = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append(k) or real(*a, **k))
    return copy, calls


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("KINO_CACHE_DIR", str(tmp_path / "kino-cache"))
    return cache


def test_hub_ids_and_folders_are_told_apart(tmp_path, monkeypatch):
    assert hub_id("Wan-AI/Wan2.1-T2V-1.3B-Diffusers") == ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", None)
    assert hub_id("org/name@v1.0") == ("org/name", "v1.0")
    for spec in ("/abs/path", "a/b/c", "name", "./org/name", "../x/y", "org/"):
        assert hub_id(spec) is None, spec
    (tmp_path / "runs" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub_id("runs/model") is None  # a folder on disk wins


def test_generate_from_a_hub_repository(offline_hub, tmp_path, capsys):
    """A kino model folder in the Hub cache loads by its id, through the API and the CLI,
    and generates what the folder itself generates."""
    import numpy as np
    from conftest import save_tiny_pipeline

    from kino.cli import main
    from kino.data.video_io import read_video
    from kino.pipeline import Pipeline

    folder = save_tiny_pipeline(tmp_path / "model", "tiny-hub", frames=1, height=32, width=32, steps=2)
    hub_cache(offline_hub, "kino-org/tiny", folder)
    kw = dict(seed=2)
    local = Pipeline.from_pretrained(folder).generate("a small red circle moving left on a black background", **kw)
    hub = Pipeline.from_pretrained("kino-org/tiny").generate("a small red circle moving left on a black background",
                                                             **kw)
    assert np.array_equal(local.video.numpy(), hub.video.numpy())
    out = tmp_path / "x.png"
    assert main(["generate", "a small red circle moving left on a black background", "--model", "kino-org/tiny",
                 "-o", str(out), "--seed", "2", "-q"]) == 0, capsys.readouterr().err
    assert np.array_equal(read_video(out)[0], local.video.numpy())


def test_hub_files_are_checked_against_the_recorded_hashes(offline_hub, tmp_path, capsys):
    from conftest import save_tiny_pipeline

    from kino.cli import main
    from kino.pipeline import Pipeline

    folder = save_tiny_pipeline(tmp_path / "model", "tiny-hub", frames=1, height=32, width=32, steps=2)
    snapshot = hub_cache(offline_hub, "kino-org/tiny", folder)
    blob = (snapshot / "dit" / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1  # one bit of a weights file
    blob.write_bytes(bytes(data))
    with pytest.raises(KinoUserError, match=r"dit/model.safetensors .* does not match the sha256 the Hub records"):
        Pipeline.from_pretrained("kino-org/tiny")
    snapshot = hub_cache(offline_hub, "kino-org/tiny2", folder)
    config = (snapshot / "kino.json").resolve()
    config.write_text(config.read_text().replace("tiny-hub", "tiny-hux"))
    with pytest.raises(KinoUserError, match=r"kino.json .* does not match the git blob sha1"):
        Pipeline.from_pretrained("kino-org/tiny2")
    # a repository neither here nor reachable: exit 2, one clear line
    assert main(["generate", "x", "--model", "kino-org/absent", "-o", str(tmp_path / "y.png")]) == 2
    err = capsys.readouterr().err
    assert "no folder kino-org/absent here, and it is neither in the local Hugging Face Hub cache" in err
    assert "Traceback" not in err


def test_training_init_from_a_hub_repository(offline_hub, tmp_path):
    from conftest import save_tiny_pipeline

    from kino.training.dit import init_dit

    folder = save_tiny_pipeline(tmp_path / "model", "tiny-hub", frames=1, height=32, width=32, steps=2)
    snapshot = hub_cache(offline_hub, "kino-org/tiny", folder)
    root, config = init_dit("kino-org/tiny")
    assert root == snapshot and config.num_layers >= 1


def test_lora_from_a_hub_repository(offline_hub, tmp_path, capsys):
    """`--lora ORG/NAME/PATH[:SCALE]`: one file of a Hub repository, hash-checked, fuses like
    the local file."""
    import torch
    from conftest import save_tiny_pipeline

    from kino.cli import main
    from kino.models.hub import resolve_file
    from kino.models.lora import LoRAConfig, apply_lora, save_lora
    from kino.pipeline import Pipeline

    folder = save_tiny_pipeline(tmp_path / "model", "tiny-hub", frames=1, height=32, width=32, steps=2)
    pipe = Pipeline.from_pretrained(folder)
    torch.manual_seed(1)
    config = LoRAConfig(rank=2)
    apply_lora(pipe.dit, config)
    for name, p in pipe.dit.named_parameters():
        if "lora_up" in name:
            torch.nn.init.normal_(p, std=0.1)
    (tmp_path / "repo" / "loras").mkdir(parents=True)
    save_lora(tmp_path / "repo" / "loras" / "style.safetensors", pipe.dit.state_dict(), config)
    hub_cache(offline_hub, "kino-org/loras", tmp_path / "repo")
    assert resolve_file("kino-org/loras/loras/style.safetensors").read_bytes() == \
        (tmp_path / "repo" / "loras" / "style.safetensors").read_bytes()
    outs = []
    for lora in (str(tmp_path / "repo" / "loras" / "style.safetensors"), "kino-org/loras/loras/style.safetensors"):
        out = tmp_path / f"{len(outs)}.png"
        assert main(["generate", "a small red circle moving left on a black background", "--model", str(folder),
                     "--lora", lora + ":0.5", "-o", str(out), "-q"]) == 0, capsys.readouterr().err
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert main(["generate", "a small red circle moving left on a black background", "--model", str(folder),
                 "-o", str(tmp_path / "plain.png"), "-q"]) == 0
    assert (tmp_path / "plain.png").read_bytes() != outs[0]  # the LoRA changed the image
    assert main(["generate", "x", "--model", str(folder), "--lora", "kino-org/loras/loras/other.safetensors",
                 "-o", str(tmp_path / "z.png")]) == 2
    assert "no kino-org/loras/loras/other.safetensors here" in capsys.readouterr().err


def test_a_resolved_repository_is_not_fetched_and_hashed_again(offline_hub, tmp_path, monkeypatch):
    import huggingface_hub
    from conftest import save_tiny_pipeline

    from kino.models import hub

    folder = save_tiny_pipeline(tmp_path / "model", "tiny-hub", frames=1, height=32, width=32, steps=2)
    snapshot = hub_cache(offline_hub, "kino-org/once", folder)
    calls = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert hub.resolve_model("kino-org/once") == snapshot == hub.resolve_model("kino-org/once")
    assert len(calls) == 1
