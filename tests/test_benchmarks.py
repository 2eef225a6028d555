"""Benchmark scripts run end to end at tiny sizes on the CPU, so that they stay working between the
runs that fill BENCHMARKS.md. The GPU suite's scripts above all: benchmarks/gpu_suite.sh runs them
at Wan2.1-1.3B sizes on a GPU when one is lent, and a session with a GPU must not spend its
device time finding a broken script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import import_script

ROOT = Path(__file__).resolve().parents[1]


def _script(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, env=env, timeout=600)


def _run(script: str, *args: str) -> dict:
    """A benchmark's JSON result line (its last line of output)."""
    res = _script(script, *args)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_dit_peer_compares_the_same_computation():
    out = _run("bench_dit_peer.py", "--size", "tiny", "--latent", "2x4x4", "--text", "4", "--repeats", "1")
    assert out["tokens"] == 2 * 2 * 2 and out["relative_l2_diff"] < 1e-5  # fp32: the same model
    assert out["kino_s"] > 0 and out["diffusers_s"] > 0
    vace = _run("bench_dit_peer.py", "--size", "tiny-vace", "--latent", "2x4x4", "--text", "4", "--repeats", "1")
    assert vace["relative_l2_diff"] < 1e-5 and vace["size"] == "tiny-vace"  # against WanVACETransformer3DModel


@pytest.mark.slow
def test_load_memory_reports_both_reads():
    out = _run("bench_load_memory.py", "--size", "tiny")
    assert out["file"]["dtype"] == "torch.float32" and out["bfloat16"]["dtype"] == "torch.bfloat16"
    assert out["file_mib"] > 0 and "growth_mib" in out["file"]


@pytest.mark.slow
def test_pipeline_memory_runs_a_whole_generation_in_small_gpu_mode():
    out = _run("bench_pipeline_memory.py", "--dit", "tiny", "--vae", "tiny", "--frames", "5", "--height", "32",
               "--width", "32", "--device", "cpu", "--weights-dtype", "fp8", "--swap-blocks", "1", "--offload",
               "model", "--vae-tile", "64", "--cfg", "sequential", "--text-device", "cpu")
    assert out["video"] == [5, 32, 32, 3] and out["peak_rss_mib"] > 0
    assert out["plan"]["weights_dtype"] == "fp8" and out["plan"]["cfg"] == "sequential"


@pytest.mark.slow
def test_memory_plan_check_passes_on_the_cpu():
    res = _script("check_memory_plans.py", "--device", "cpu", "--frames", "5", "--height", "32", "--width", "32",
                  "--steps", "2")
    assert res.returncode == 0 and "6/6 plans as expected on cpu" in res.stdout, res.stdout + res.stderr[-2000:]


def test_gpu_suite_script_parses():
    res = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_suite.sh")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_preprocess_benchmark_times_every_phase():
    out = _run("bench_preprocess.py", "--n", "2", "--upscale", "2", "--grain", "1", "--repeats", "1",
               "--buckets", "17x64x64", "17x64x96", "17x96x64")
    assert out["videos"] == 2 and out["clips"] == 2 and out["skipped"] == 0
    assert out["source_frames"] == 3 * (17 + 33)  # 8 -> 24 fps: every frame three times
    assert set(out["seconds"]) == {"decode", "text", "preprocess"} and 0 < out["decode_share"] < 1


@pytest.mark.slow
def test_memory_benchmark_runs_gguf_plans(tmp_path):
    res = _script("bench_memory.py", "--size", "tiny", "--latent", "2x4x4", "--text", "8", "--plans", "fp8",
                  "gguf-Q8_0+swap1", "--gguf-dir", str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| gguf-Q8_0+swap1 |")]
    assert len(rows) == 1 and (tmp_path / "tiny-Q8_0.gguf").is_file()
    assert json.loads(res.stderr.strip().splitlines()[-1])["plan"] == "gguf-Q8_0+swap1"


@pytest.mark.slow
def test_text_memory_benchmark_runs_its_plans(tmp_path):
    res = _script("bench_text_memory.py", "--tiny", "--layers", "1", "--text", "8", "--plans", "bf16", "gguf-Q4_K",
                  "--gguf-dir", str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| gguf-Q4_K |")]
    assert len(rows) == 1 and (tmp_path / "umt5-tiny-1-Q4_K.gguf").is_file()
    last = json.loads(res.stderr.strip().splitlines()[-1])
    assert last["plan"] == "gguf-Q4_K" and last["peak_mib"] >= last["setup_mib"] > 0 and last["encode_s"] > 0


def test_quantize_benchmark_times_every_type():
    res = _script("bench_quantize.py", "--shape", "8x256", "--repeats", "1", "--threads", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| Q")]
    assert len(rows) == 10 and sum(" - |" not in r for r in rows) == 5  # the five K-quants are also written


def test_vae_eval_workers_and_refinement(tmp_path):
    """eval_vae.py over two worker processes reconstructs the same clips as one process, and
    `--refine-latents` (and `--refine-palette`, `--refine-method`) run through it, `--start` scores the same clips
    as a full run (the shipped VAE; the figures are BENCHMARKS.md's)."""
    def psnrs(*args):
        out = tmp_path / "-".join(args)
        res = _script("eval_vae.py", "--n", "4", "--seed", "1", "--out", str(out), *args)
        assert res.returncode == 0 and "world evaluator" in res.stdout, res.stderr[-2000:]
        return json.loads((out / "summary.json").read_text())["psnr"]

    one, two = psnrs("--refine-latents", "2"), psnrs("--refine-latents", "2", "--workers", "2")
    assert one == two and len(one) == 4
    plain = psnrs()
    assert all(one[name] > plain[name] for name in plain), (plain, one)
    assert psnrs("--start", "2") == {name: plain[name] for name in sorted(plain)[2:]}  # the same clips 2, 3
    assert psnrs("--refine-latents", "2", "--refine-palette", "0.2") != one  # the palette term reaches the fit
    assert psnrs("--refine-latents", "2", "--refine-method", "adam") != one  # and so does the optimizer


def test_vae_eval_flicker_splits_steps_at_chunk_boundaries():
    """A reconstruction off by a constant has no temporal error; one whose error changes at
    every chunk (frames 1-4, 5-8, ...) has it only on the steps crossing a boundary."""
    eval_vae = import_script("benchmarks", "eval_vae")
    clip = torch.randint(40, 200, (9, 4, 4, 3), dtype=torch.uint8)
    across, inside = eval_vae.step_errors(clip, clip + 3)
    assert len(across) == 2 and len(inside) == 6 and max(across + inside) == 0  # steps 0->1, 4->5 cross
    chunk = torch.tensor([0, 1, 1, 1, 1, 2, 2, 2, 2], dtype=torch.uint8).view(9, 1, 1, 1)
    across, inside = eval_vae.step_errors(clip, clip + 5 * chunk)
    assert across == [5.0, 5.0] and inside == [0.0] * 6


def test_binding_diagnostic_tells_own_from_other_attributes(tmp_path):
    """eval_t2v's binding counts on true two-object clips: every object that moved shows its own
    direction and fill; the same clips under captions whose motions (and shapes) are swapped
    between the objects show the other object's."""
    from kino.world.captions import parse_caption
    from kino.world.dataset import evaluate_rows, read_rows, write_rows, write_samples

    eval_t2v, sensitivity = import_script("benchmarks", "eval_t2v"), import_script("benchmarks", "text_sensitivity")
    rows = write_samples(tmp_path, 40, split="eval", seed=3, frames=17, size=(64, 64), objects=2)
    true = eval_t2v.binding_rates(evaluate_rows(tmp_path, read_rows(tmp_path)))
    assert true["motion"]["objects"] >= 4 and true["shape"]["objects"] >= 10, true
    assert true["motion"]["own"] == true["motion"]["objects"] and true["motion"]["other"] == 0
    assert true["shape"]["own"] == true["shape"]["objects"] and true["shape"]["other"] == 0

    swapped = []
    for row in rows:
        caption = parse_caption(row["caption"])
        caption = sensitivity.swap_attribute(sensitivity.swap_attribute(caption, "motion"), "shape")
        assert sorted(str(caption).split()) == sorted(row["caption"].split())  # the same words
        swapped.append({**row, "caption": str(caption)})
    write_rows(tmp_path, swapped)
    crossed = eval_t2v.binding_rates(evaluate_rows(tmp_path, read_rows(tmp_path)))
    assert crossed["motion"] == {**true["motion"], "own": 0, "other": true["motion"]["own"]}
    assert crossed["shape"] == {**true["shape"], "own": 0, "other": true["shape"]["own"]}

    # direction, pairs: on true clips every object moves its own way; with the motions swapped,
    # exactly the objects whose two direction words differ move "the other's way"
    write_rows(tmp_path, rows)
    direction = eval_t2v.direction_rate(evaluate_rows(tmp_path, read_rows(tmp_path)))["pair"]
    assert direction["objects"] >= 8 and direction["right_way"] == direction["objects"], direction
    assert direction["other_way"] == 0
    write_rows(tmp_path, [{**row, "caption": str(sensitivity.swap_attribute(parse_caption(row["caption"]), "motion"))}
                          for row in rows])
    swapped_direction = eval_t2v.direction_rate(evaluate_rows(tmp_path, read_rows(tmp_path)))["pair"]
    crossing = sum(2 for row in rows for a, b in [parse_caption(row["caption"]).objects]
                   if a.motion in eval_t2v.DIRECTIONS and b.motion in eval_t2v.DIRECTIONS and a.motion != b.motion)
    same = sum(2 for row in rows for a, b in [parse_caption(row["caption"]).objects]
               if a.motion in eval_t2v.DIRECTIONS and a.motion == b.motion)
    assert crossing > 0 and swapped_direction["other_way"] == crossing
    # the rest moved their own way only if their words were the same (or their new word's motion
    # is a small drift: a growing triangle's centre moves down)
    assert same <= swapped_direction["right_way"] <= swapped_direction["objects"] - crossing


def test_placement_diagnostic_reads_where_an_object_starts():
    """The evaluator's start_x / start_y are the first quarter's centroid from the frame's centre
    (a rendered clip: its trajectory); eval_t2v's placement counts an object as placed for its
    motion when it starts more than 0.05 of the frame away against its direction."""
    from kino.world.evaluator import ClipResult, evaluate_clip
    from kino.world.generator import render, scene_at, trajectory

    scene = scene_at("eval", 5, 0, frames=17, size=(64, 96), objects=1)
    info = evaluate_clip(render(scene), scene.text).details["objects"][0]
    cx, cy, _ = trajectory(scene.caption.objects[0], scene.centers[0], 17, 64, 96)
    assert info["start_x"] == pytest.approx(cx[:4].mean() / 96 - 0.5, abs=0.02)
    assert info["start_y"] == pytest.approx(cy[:4].mean() / 64 - 0.5, abs=0.02)

    eval_t2v = import_script("benchmarks", "eval_t2v")

    def result(*starts):
        objects = [{"present_frames": 17, "start_x": x, "start_y": y, "dx": dx, "dy": 0.0} for x, y, dx in starts]
        return ClipResult(False, {}, {"objects": objects})

    results = [
        ({"caption": "a large red circle moving left on a black background", "frames": 17},
         result((0.2, 0.0, -0.3))),  # starts right of centre, moves left: placed, own way
        ({"caption": "a large red circle moving right and a small blue square moving up on a black background",
          "frames": 17}, result((0.2, 0.0, -0.3), (0.0, 0.3, 0.0))),  # against; below centre, for "up"
        ({"caption": "a large red circle moving left and a small blue square moving down on a black background",
          "frames": 17}, result((0.03, 0.0, -0.3), (0.0, -0.2, 0.0))),  # too near the centre; above: placed
    ]
    rates = eval_t2v.placement_rates(results)
    assert rates["single"] == {"objects": 1, "placed": 1, "placed_own_way": 1, "other_own_way": 0}
    assert rates["pair"] == {"objects": 4, "placed": 2, "placed_own_way": 0, "other_own_way": 1}


@pytest.mark.slow
def test_compose_probe_at_weight_zero_is_plain_generation(tmp_path):
    """The composed DiT folds the parts' guidance into the conditional half only: at weight 0 the
    probe's clips are the plain pipeline's, bit for bit (same process); at weight 1 they differ.
    Guided away from its swapped caption, a clip changes unless the swap changes nothing. The
    script runs end to end."""
    from kino.pipeline import Pipeline
    from kino.world.captions import parse_caption

    compose = import_script("benchmarks", "probe_compose")
    pipe = Pipeline.from_pretrained(None)
    rows = compose.pair_rows(4, 0, 7)
    assert rows
    plain = [pipe.generate(r["caption"], frames=r["frames"], height=r["height"], width=r["width"],
                           seed=r["seed"]).video for r in rows]
    assert all(torch.equal(a, b) for a, b in zip(compose.composed_videos(pipe, rows, 0.0), plain))
    assert not any(torch.equal(a, b) for a, b in zip(compose.composed_videos(pipe, rows, 1.0), plain))
    # row 0's objects share shape and motion, so its swapped caption is itself; row 1's move apart
    assert [len({o.motion for o in parse_caption(r["caption"]).objects}) for r in rows[:2]] == [1, 2]
    contrast = compose.composed_videos(pipe, rows[:2], 2.0, contrast="both")
    # the swapped caption runs as a batch of one beside the pipeline's batch of two: on some
    # CPUs that differs in the last bits, so row 0 may move by a grey level, where row 1 moves
    diff = [(a.int() - b.int()).abs().float() for a, b in zip(contrast, plain)]
    assert diff[0].max() <= 2 and diff[0].mean() < 1e-3 and diff[1].mean() > 0.1, [d.mean() for d in diff]
    res = _script("probe_compose.py", "--weight", "1", "--n", "4", "--held-out", "0", "--seed", "7",
                  "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["clips"] == len(rows)


def test_best_of_probe_scores_candidates_and_counts_the_picks(tmp_path):
    """Candidate 0 is the plain sampler's clip at the prompt's own seed; the analysis counts
    candidate 0, each candidate, the oracle and each score's pick as written."""
    from kino.pipeline import Pipeline
    from kino.world.dataset import read_rows
    from kino.data.video_io import read_video

    best_of = import_script("benchmarks", "probe_best_of")
    res = _script("probe_best_of.py", "--n", "2", "--candidates", "2", "--workers", "1", "--seed", "7",
                  "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["records"]) == 4 and all(len(r["losses"]) == len(best_of.TIMES) for r in report["records"])
    row = report["rows"][1]
    plain = Pipeline.from_pretrained(None).generate(row["caption"], frames=row["frames"], height=row["height"],
                                                     width=row["width"], seed=row["seed"]).video
    clip, _ = read_video(tmp_path / "cand-0" / read_rows(tmp_path / "cand-0")[1]["file"])
    # stored as lossless H.264 in YUV 4:4:4: RGB comes back within a grey level or two
    diff = (torch.as_tensor(clip).int() - plain.int()).abs()
    assert diff.max() <= 2 and diff.float().mean() < 0.5, (diff.max(), diff.float().mean())

    def record(i, c, passed, lc, lu):
        return {"index": i, "candidate": c, "passed": passed, "losses": {str(t): [lc, lu] for t in best_of.TIMES}}

    fake = {"args": {"candidates": 2}, "rows": [{}, {}, {}],
            "records": [record(0, 0, False, 0.2, 0.3), record(0, 1, True, 0.1, 0.15),  # lower L_c passes
                        record(1, 0, True, 0.1, 0.3), record(1, 1, False, 0.2, 0.3),
                        record(2, 0, False, 0.1, 0.2), record(2, 1, False, 0.1, 0.2)]}
    (tmp_path / "fake.json").write_text(json.dumps(fake))
    out = best_of.analyse(tmp_path / "fake.json")
    assert out["each"] == [1, 1] and out["any"] == 2
    assert out["picks"]["-L_c", best_of.TIMES] == 2  # the lower loss passes in both prompts
    assert out["picks"]["L_u - L_c", best_of.TIMES] == 1  # 0.05 against 0.1, then 0.2 against 0.1


def test_segregation_probe_labels_phrases_and_changes_only_two_object_prompts(tmp_path):
    """Each object's phrase is labelled, the shared words are not; segregated cross-attention
    changes a two-object clip, leaves a one-object clip as it was, and does nothing above its
    t_max."""
    from kino.pipeline import Pipeline

    seg = import_script("benchmarks", "probe_segregate")
    pipe = Pipeline.from_pretrained(None)
    tok = pipe.text_encoder.tokenizer
    two = "a small red circle moving left and a large blue square moving up on a black background"
    labels, tokens = seg.phrase_labels(tok, two, pipe.text_encoder.max_length)
    words = tok.convert_ids_to_tokens(tok(two, padding="max_length", max_length=len(labels))["input_ids"])
    phrase = {k: " ".join(w for w, lab in zip(words, labels.tolist()) if lab == k) for k in (1, 2)}
    assert phrase == {1: "a small red circle moving left", 2: "a large blue square moving up"}
    assert tokens == len(tok(two)["input_ids"]) and labels[tokens:].eq(seg.SHARED).all()
    one = "a large green triangle moving right on a white background"

    def video(p, caption):
        return p.generate(caption, frames=1, height=64, width=64, seed=3, steps=4).video

    plain = [video(pipe, c) for c in (two, one)]
    seg.segregate(pipe, t_max=1.0)
    assert not torch.equal(video(pipe, two), plain[0]) and torch.equal(video(pipe, one), plain[1])
    idle = Pipeline.from_pretrained(None)
    seg.segregate(idle, t_max=-1.0)
    assert torch.equal(video(idle, two), plain[0])
    # the script: the two-object rows only, set up in each of two processes, scored
    res = _script("probe_segregate.py", "--n", "2", "--held-out", "0", "--seed", "5353", "--workers", "2",
                  "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())["report"]
    assert report["clips"] == 1 and report["kinds"]["image"]["clips"] == 1  # row 0, two objects; row 1 has one


def test_autoguidance_probe_sends_the_skip_pass_to_the_weak_dit():
    """The wrapped DiT runs the weak DiT for the sampler's skip-layer pass and its own otherwise;
    with the model as its own weak version the guidance term vanishes (within rounding)."""
    from kino.models.folder import default_model_dir
    from kino.pipeline import Pipeline

    ag = import_script("benchmarks", "probe_autoguidance")
    pipe = Pipeline.from_pretrained(None)
    caption = "a small red circle moving left on a black background"
    plain = pipe.generate(caption, frames=1, height=64, width=64, seed=3, steps=4).video
    main = pipe.dit
    ag.use_weak(pipe, str(default_model_dir()))
    wrapped, weak = pipe.dit, pipe.dit.weak
    x, t = torch.randn(1, 16, 1, 8, 8), torch.full((1, 1), 500.0)
    text, mask = pipe.text_encoder.encode([caption])
    with torch.no_grad():
        weak.head.head.bias.add_(1.0)  # tell the two apart
        assert torch.equal(wrapped(x, t, text, mask), main(x, t, text, mask))
        assert torch.equal(wrapped(x, t, text, mask, skip_blocks=(0,)), weak(x, t, text, mask))
        weak.head.head.bias.sub_(1.0)
    same = pipe.generate(caption, frames=1, height=64, width=64, seed=3, steps=4, skip_guidance=1.0,
                         skip_blocks=(0,), skip_interval=(0.0, 1.0)).video
    assert (same.int() - plain.int()).abs().max() <= 2


def test_text_binding_probe_reads_what_is_there_and_nothing_else():
    """The probe's classifier finds a label written linearly into the features and stays near
    chance on labels the features do not hold; the script runs end to end on MiniLM."""
    probe = import_script("benchmarks", "text_binding_probe").probe
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 7, (1000,), generator=gen)
    x = torch.randn(1000, 32, generator=gen)
    x[:, :7] += 6 * torch.nn.functional.one_hot(y, 7)
    assert probe(x, y, 7, 800) > 0.95
    assert probe(x, torch.randint(0, 7, (1000,), generator=gen), 7, 800) < 0.3
    out = _run("text_binding_probe.py", "--n", "300")
    assert out["captions"] == 300 and len([k for k in out if k.startswith("word")]) == 4
    assert all(0.0 <= v <= 1.0 for k, v in out.items() if k.startswith("word"))
    # encoded clause by clause, a direction word's feature holds its own object's colour and not the other's
    out = _run("text_binding_probe.py", "--n", "300", "--clauses")
    assert out["word 1 -> own colour"] > 0.9 and out["word 2 -> own colour"] > 0.9
    assert out["word 1 -> other colour"] < 0.35 and out["word 2 -> other colour"] < 0.35


def test_task_eval_scores_true_clips_and_splits_by_objects(tmp_path):
    """The world clips a task eval starts from pass when scored as its outputs, and the summary
    counts passes apart for one- and two-object captions."""
    from kino.data.video_io import read_video

    tasks = import_script("benchmarks", "eval_tasks")
    rows = tasks.build_cases("i2v", 6, 5151, tmp_path)
    cases = [tasks.score_case("i2v", row, tmp_path, read_video(tmp_path / row["_source"])[0]) for row in rows]
    objects = [len(row["caption"].split(" and a ")) for row in rows]
    assert [c["objects"] for c in cases] == objects and set(objects) == {1, 2}
    assert all(c["passed"] for c in cases) and all(c["kept_psnr"] == float("inf") for c in cases)
    cases[0]["passed"] = False  # a miss is counted where its caption's objects say
    summary = tasks.summarize("i2v", cases)
    ones, twos = objects.count(1), objects.count(2)
    lost = (1, 0) if objects[0] == 1 else (0, 1)
    assert summary["pass_one_object"] == f"{ones - lost[0]}/{ones}"
    assert summary["pass_two_objects"] == f"{twos - lost[1]}/{twos}"
    assert summary["pass_rate"] == round(5 / 6, 4)
