"""Model folders' integrity checks: a big file's sha256 is recorded once and reused while the
file is unchanged; any change to it (even with its mtime put back) means hashing it again."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kino.models import folder
from kino.models.folder import (RECORD_NAME, WeightsIntegrityError, checked_sha256, load_component, save_component,
                                sha256_file, write_manifest)


@pytest.fixture
def record_env(tmp_path, monkeypatch):
    """A private cache folder and a record threshold small enough for test files."""
    monkeypatch.setenv("KINO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("KINO_VERIFY_CACHE", raising=False)
    monkeypatch.setattr(folder, "RECORD_MIN_BYTES", 1024)
    return tmp_path / "cache" / RECORD_NAME


@pytest.fixture
def count_hashes(monkeypatch):
    calls = []
    real = folder.sha256_file

    def counting(path):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(folder, "sha256_file", counting)
    return calls


def test_big_file_is_hashed_once_while_unchanged(tmp_path, record_env, count_hashes):
    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(4096))
    digest = sha256_file(f)
    assert checked_sha256(f) == digest and len(count_hashes) == 1
    assert checked_sha256(f) == digest and len(count_hashes) == 1  # from the record
    entry = json.loads(record_env.read_text())[str(f.resolve())]
    assert entry["sha256"] == digest

    # altered in place with the same size and its mtime put back: ctime still moves
    stat = f.stat()
    data = bytearray(f.read_bytes())
    data[0] ^= 0xFF
    f.write_bytes(bytes(data))
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert checked_sha256(f) == sha256_file(f) != digest and len(count_hashes) == 2

    # small files are always hashed; KINO_VERIFY_CACHE=0 turns the record off
    small = tmp_path / "s.bin"
    small.write_bytes(b"x" * 100)
    checked_sha256(small), checked_sha256(small)
    assert len(count_hashes) == 4 and str(small.resolve()) not in json.loads(record_env.read_text())
    os.environ["KINO_VERIFY_CACHE"] = "0"
    try:
        checked_sha256(f)
    finally:
        del os.environ["KINO_VERIFY_CACHE"]
    assert len(count_hashes) == 5


def test_damaged_or_unwritable_record_only_costs_a_hash(tmp_path, record_env, count_hashes, monkeypatch):
    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(2048))
    record_env.parent.mkdir(parents=True)
    record_env.write_text("{not json")
    assert checked_sha256(f) == sha256_file(f)
    assert json.loads(record_env.read_text())[str(f.resolve())]["sha256"] == sha256_file(f)
    monkeypatch.setenv("KINO_CACHE_DIR", str(f))  # a file, not a folder: the record cannot be written
    assert checked_sha256(f) == sha256_file(f)


def test_model_folder_check_uses_the_record_and_still_refuses_tampering(tmp_path, record_env, count_hashes):
    weights = {"w": torch.randn(64, 64)}  # 16 KiB of weights: above the test threshold
    save_component(tmp_path / "m" / "net", {"n": 1}, weights)
    write_manifest(tmp_path / "m", "m", {"net": ("net", "Net")})
    count_hashes.clear()
    assert torch.equal(load_component(tmp_path / "m", "net").state_dict["w"], weights["w"])
    hashed = len(count_hashes)
    load_component(tmp_path / "m", "net")
    # the second load hashed only config.json (small); the weights came from the record
    assert hashed == 2 and count_hashes[2:] == [str((tmp_path / "m" / "net" / "config.json").resolve())]

    f = tmp_path / "m" / "net" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match="model.safetensors failed its integrity check"):
        load_component(tmp_path / "m", "net")
