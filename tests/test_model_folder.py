"""Model folders' integrity checks: a big file's sha256 is recorded once and reused while the
file is unchanged; any change to it (even with its mtime put back) means hashing it again."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kino.models import folder
from kino.errors import KinoUserError
from kino.models.folder import (RECORD_NAME, WeightsIntegrityError, checked_sha256, combined_sha256, load_component,
                                save_component, sha256_file, weights_sha256, write_manifest)


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


def test_weights_over_the_shard_size_are_saved_in_shards_and_load_back(tmp_path):
    """Big weights go into model-0000i-of-0000N.safetensors + index (transformers' layout): every
    shard is in the manifest and checked, the load is the same dict, a re-save in one file
    removes the shards, and a config-only load needs none of them."""
    torch.manual_seed(0)
    weights = {f"blocks.{i}.w": torch.randn(32, 32) for i in range(5)}  # 4 KiB each
    weights["head"] = torch.randn(8)
    comp = tmp_path / "m" / "net"
    files = save_component(comp, {"n": 1}, weights, max_shard_bytes=9000)  # two 4 KiB tensors a shard
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(files) == sorted(["config.json", *shards, "model.safetensors.index.json"])
    assert not (comp / "model.safetensors").exists()
    index = json.loads((comp / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["blocks.0.w"] == shards[0] and index["weight_map"]["head"] == shards[2]
    assert index["metadata"]["total_size"] == 5 * 32 * 32 * 4 + 8 * 4
    write_manifest(tmp_path / "m", "m", {"net": ("net", "Net")})
    loaded = load_component(tmp_path / "m", "net").state_dict
    assert list(loaded) == list(weights) and all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert load_component(comp, "net").state_dict.keys() == weights.keys()  # the bare folder too
    manifest = json.loads((tmp_path / "m" / "kino.json").read_text())["components"]["net"]["files"]
    assert combined_sha256(manifest) == weights_sha256(comp) != combined_sha256({shards[0]: "0" * 64})

    data = bytearray((comp / shards[1]).read_bytes())
    data[-1] ^= 0x01
    (comp / shards[1]).write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match="00002-of-00003.safetensors failed its integrity check"):
        load_component(tmp_path / "m", "net")
    (comp / shards[1]).unlink()
    assert load_component(tmp_path / "m", "net", weights=False).config == {"n": 1}
    with pytest.raises(KinoUserError, match="00002-of-00003.safetensors is missing"):
        load_component(comp, "net")

    files = save_component(comp, {"n": 2}, weights)  # under the default size: one file again
    assert sorted(files) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in comp.iterdir()) == ["config.json", "model.safetensors"]
    assert combined_sha256(files) == files["model.safetensors"] == weights_sha256(comp)


def test_a_bad_shard_index_is_a_clear_error(tmp_path):
    comp = tmp_path / "net"
    save_component(comp, {"n": 1}, {"a": torch.ones(4), "b": torch.ones(4)}, max_shard_bytes=16)
    index = comp / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "../elsewhere.safetensors"}}))
    with pytest.raises(KinoUserError, match="not shards beside it"):
        load_component(comp, "net")
    index.write_text("{}")
    with pytest.raises(KinoUserError, match="not a valid weights index"):
        load_component(comp, "net")
    with pytest.raises(ValueError, match="max_shard_bytes"):
        save_component(comp, {}, {"a": torch.ones(1)}, max_shard_bytes=0)
