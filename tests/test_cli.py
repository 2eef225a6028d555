"""The `kino` command: world sample -> eval end to end, and clear exit-2 errors for bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

from kino import __version__
from kino.cli import main
from kino.data.video_io import read_metadata, read_video
from kino.world.captions import SIZES
from kino.world.dataset import evaluate_folder, write_samples


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_version_and_help():
    r = subprocess.run([sys.executable, "-m", "kino", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and __version__ in r.stdout
    r = subprocess.run([sys.executable, "-m", "kino", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "world" in r.stdout


def test_world_round_trip_through_lossless_files_passes_100_percent(tmp_path):
    """Generator -> writer -> reader -> evaluator on >= 300 clips of every size, frame count,
    shape, color, background, motion, with two-object scenes and images."""
    n = 0
    for size in SIZES:
        write_samples(tmp_path / f"{size}", 105, "eval", seed=7, size=size)
        report = evaluate_folder(tmp_path / f"{size}")
        assert report["pass_rate"] == 1.0, report["failures"][:3]
        assert set(report["kinds"]) == {"image", "single", "pair"}
        n += report["clips"]
    assert n >= 300
    rows = [json.loads(line) for line in (tmp_path / f"{SIZES[0]}" / "captions.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"file", "caption", "frames", "height", "width", "fps"}
    assert {r["frames"] for r in rows} == {1, 9, 17, 25, 33}
    images = [r for r in rows if r["frames"] == 1]
    assert images and all(r["file"].endswith(".png") for r in images)
    video, fps = read_video(tmp_path / f"{SIZES[0]}" / rows[0]["file"])
    assert video.shape[0] == rows[0]["frames"]
    meta = read_metadata(tmp_path / f"{SIZES[0]}" / rows[0]["file"])
    assert meta["caption"] == rows[0]["caption"] and meta["kino_version"] == __version__


def test_world_sample_and_eval_cli(tmp_path, capsys):
    out = tmp_path / "w"
    code, stdout, _ = run(capsys, "world", "sample", "--out", str(out), "--n", "6", "--split", "eval",
                          "--frames", "9", "--size", "64x96", "--objects", "2", "--seed", "3", "--quiet")
    assert code == 0 and str(out) in stdout
    rows = [json.loads(x) for x in (out / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["frames"] == 9 and r["width"] == 96 and " and " in r["caption"] for r in rows)
    code, stdout, _ = run(capsys, "world", "eval", str(out), "--quiet")
    assert code == 0 and "pass rate 100.0%" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["pass_rate"] == 1.0 and report["kinds"]["pair"]["clips"] == 6
    code, stdout, _ = run(capsys, "world", "eval", str(out), "--json", "--quiet")
    assert json.loads(stdout)["clips"] == 6


def test_eval_scores_a_broken_clip_as_failed(tmp_path, capsys):
    out = tmp_path / "w"
    write_samples(out, 4, "eval", seed=1, frames=9)
    rows = [json.loads(x) for x in (out / "captions.jsonl").read_text().splitlines()]
    # swap the background word for another valid one: the background check must fail
    bg = next(b for b in ("black", "gray", "white") if f"on a {b} background" not in rows[1]["caption"])
    rows[1]["caption"] = rows[1]["caption"].rsplit(" on a ", 1)[0] + f" on a {bg} background"
    (out / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code, stdout, _ = run(capsys, "world", "eval", str(out), "--quiet")
    report = json.loads((out / "report.json").read_text())
    assert code == 0 and report["passed"] == 3 and report["checks"]["background"]["passed"] == 3
    assert report["failures"][0]["file"] == rows[1]["file"] and report["failures"][0]["failed"] == ["background"]


@pytest.mark.parametrize("argv,needle", [
    (["world", "sample", "--out", "{tmp}/x", "--n", "2", "--frames", "8"], "4k+1"),
    (["world", "sample", "--out", "{tmp}/x", "--n", "2", "--size", "50x50"], "allowed 64x64"),
    (["world", "sample", "--out", "{tmp}/x", "--n", "2", "--size", "big"], "HxW"),
    (["world", "sample", "--out", "{tmp}/x", "--n", "0"], "at least 1"),
    (["world", "sample", "--out", "{tmp}/x", "--n", "2", "--objects", "3"], "invalid choice"),
    (["world", "sample", "--out", "{tmp}/x", "--n", "2", "--split", "test"], "invalid choice"),
    (["world", "sample", "--n", "2"], "--out"),
    (["world", "sample", "--out", "{tmp}/afile", "--n", "2"], "not a folder"),
    (["world", "eval", "{tmp}/missing"], "not a folder"),
    (["world", "eval", "{tmp}"], "captions.jsonl"),
    (["world", "eval", "{tmp}/badjson"], "not valid JSON"),
    (["world", "eval", "{tmp}/badcaption"], "invalid caption"),
    (["world", "eval", "{tmp}/badvideo"], "cannot read video"),
    (["world"], "sample"),
    (["frobnicate"], "invalid choice"),
    (["vae", "reconstruct", "{tmp}/missing.mp4", "--out", "{tmp}/r"], "does not exist"),
    (["vae", "reconstruct", "{tmp}/afile", "--out", "{tmp}/r", "--device", "cuda"], "CUDA"),
    (["vae", "reconstruct", "{tmp}/afile", "--out", "{tmp}/r", "--refine-latents", "-1"], "--refine-latents"),
    (["vae", "reconstruct", "{tmp}/afile", "--out", "{tmp}/r", "--refine-latents", "2", "--refine-palette", "-1"],
     "--refine-palette"),
    (["vae", "reconstruct", "{tmp}/afile", "--out", "{tmp}/r", "--refine-palette", "0.05"], "--refine-latents N"),
    (["vae", "reconstruct", "{tmp}/afile", "--out", "{tmp}/r", "--refine-method", "lbfgs"], "--refine-latents N"),
    (["vae", "reconstruct", "{tmp}/afile", "--out", "{tmp}/r", "--refine-latents", "2", "--refine-method", "sgd"],
     "--refine-method"),
    (["train", "vae", "--config", "{tmp}/nope.toml"], "does not exist"),
    (["train", "vae", "--config", "{tmp}/bad.toml"], "unknown"),
    (["train", "dit", "--config", "{tmp}/bad.toml"], "unknown"),
    (["train", "dit", "--config", "{tmp}/nope.toml"], "does not exist"),
])
def test_bad_input_exits_2_with_a_clear_message(tmp_path, argv, needle):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "captions.jsonl").write_text("{not json\n")
    (tmp_path / "badcaption").mkdir()
    (tmp_path / "badcaption" / "captions.jsonl").write_text(json.dumps({"file": "a.mp4", "caption": "a dog"}) + "\n")
    (tmp_path / "badvideo").mkdir()
    (tmp_path / "badvideo" / "a.mp4").write_bytes(np.random.default_rng(0).bytes(2000))
    (tmp_path / "badvideo" / "captions.jsonl").write_text(
        json.dumps({"file": "a.mp4", "caption": "a small red circle growing on a black background"}) + "\n")
    (tmp_path / "bad.toml").write_text('model = "small"\nfrobs = 3\n')
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    r = subprocess.run([sys.executable, "-m", "kino", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
