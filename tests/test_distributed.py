"""Distributed training on CPU with gloo and 2 processes: FSDP2 equals one process,
Ulysses sequence parallelism equals the plain DiT, kill -9 + resume is exact, throughput logs.

Processes are started the way torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
environment) but by the test itself, in their own session, so that `kill -9` can take down a
whole job at once like a lost machine. Everything is tiny: each run takes a few seconds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from kino.training.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
TIMEOUT = 240  # seconds for one run, on a busy 2-core machine

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, *args, command: list[str] | None = None) -> list[subprocess.Popen]:
    """Start `world` worker processes in one new session (torchrun's environment); each runs
    tests/dist_worker.py with `args`, or `command`."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        if world == 1:
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
                env.pop(key)
        procs.append(subprocess.Popen(command or [sys.executable, str(WORKER), *map(str, args)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    return procs


def run(world: int, *args) -> None:
    for attempt in range(2):
        procs = launch(world, *args)
        outputs = []
        try:
            for p in procs:
                outputs.append(p.communicate(timeout=TIMEOUT)[0])
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        # the free port can be taken between _free_port() and rank 0 binding it: launch again
        if attempt == 0 and any(p.returncode and "ddress already in use" in out for p, out in zip(procs, outputs)):
            continue
        break
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --- FSDP2 --------------------------------------------------------------------------------


def test_fsdp_two_processes_match_one(tmp_path):
    """Same global batch of 4: one process, and 2 FSDP2 ranks with 2 rows each. The sum of
    gradients is reduced in another order, so agreement is to float32 rounding, not bitwise:
    losses within 1e-5 relative over 6 steps (AdamW, warmup, cosine, clipping, EMA)."""
    one, two = tmp_path / "one", tmp_path / "two"
    run(1, one, 6)
    run(2, two, 6)
    a, b = metrics(one), metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-7)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
    wa, wb = load_file(one / "final.safetensors"), load_file(two / "final.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)
    assert (two / "checkpoints" / "step-00000006" / "dcp" / ".metadata").is_file()


def test_gradient_accumulation_matches_the_whole_batch(tmp_path):
    """`train.grad_accum = 2`: the global batch of 4 in micro-batches (2 of 2 rows in one
    process; 2 of 1 row on each of 2 FSDP2 ranks) trains as the whole batch does, to float32
    rounding: losses, gradient norms and final weights."""
    one, accum, both = tmp_path / "one", tmp_path / "accum", tmp_path / "both"
    run(1, one, 4)
    run(1, accum, 4, "--accum", 2)
    run(2, both, 4, "--accum", 2)
    for out in (accum, both):
        for ra, rb in zip(metrics(one), metrics(out), strict=True):
            assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-7)
            assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
        wa, wb = load_file(one / "final.safetensors"), load_file(out / "final.safetensors")
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)
    # 4 rows do not split into 3 micro-batches: a clear error before any step
    with pytest.raises(AssertionError, match="does not split evenly over 3 gradient accumulation micro-batches"):
        run(1, tmp_path / "odd", 2, "--accum", 3)


def test_bf16_mixed_precision_with_sequence_parallelism_trains(tmp_path):
    """FSDP2 bf16 compute (fp32 master weights and reductions) with 2-way sequence parallelism:
    runs on gloo and stays near fp32 (bf16 has 8 mantissa bits: losses within 1%). Speed in
    bf16 is a GPU matter; on CPUs without AMX it is slow, hence fp32 is the CPU default."""
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    run(1, fp32, 3)
    run(2, bf16, 3, "--precision", "bf16", "--sp", 2)
    for ra, rb in zip(metrics(fp32), metrics(bf16)):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-2)


# --- Ulysses sequence parallelism ---------------------------------------------------------


def _sequence_parallel_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from kino.models.dit import DIT_SIZES, DiT
    from kino.training.distributed import ParallelConfig, init_processes, parallelize

    procs = init_processes(ParallelConfig(sequence_parallel=world))
    torch.manual_seed(0)
    plain = DiT(DIT_SIZES["tiny"])
    with torch.no_grad():  # nonzero head and biases, so every parameter gets a gradient
        for p in plain.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = DiT(DIT_SIZES["tiny"])
    model.load_state_dict(plain.state_dict())
    # sequence parallelism alone (FSDP would shard the gradients we compare): procs without the mesh
    sp_only = type(procs)(rank=procs.rank, world_size=1, sp_size=world, sp_group=procs.sp_group)
    model = parallelize(model, ParallelConfig(sequence_parallel=world), sp_only)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 3, 4, 6, generator=g)  # grid (3, 2, 3): 6 tokens per frame, 3 per rank
    t = torch.rand(2, 3, generator=g) * 1000
    text = torch.randn(2, 5, 24, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    target = torch.randn(2, 16, 3, 4, 6, generator=g)
    results = {}
    for name, m in (("plain", plain), ("sp", model)):
        out_ = m(x, t, text, mask)
        (out_ - target).square().mean().backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        if name == "sp":  # each rank holds its tokens' share of every gradient
            for gr in grads.values():
                dist.all_reduce(gr)
        results[name] = (out_.detach(), grads)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def test_sequence_parallel_forward_and_backward_match(tmp_path):
    """2 ranks, each with half of every frame's tokens: the output equals the plain DiT's to
    float32 rounding (atol 1e-5) and the gradients summed over the ranks equal its gradients."""
    import torch.multiprocessing as mp

    out = tmp_path / "sp.pt"
    mp.start_processes(_sequence_parallel_worker, args=(2, _free_port(), str(out)), nprocs=2, start_method="spawn")
    results = torch.load(out, weights_only=True)
    (plain_out, plain_grads), (sp_out, sp_grads) = results["plain"], results["sp"]
    torch.testing.assert_close(sp_out, plain_out, rtol=1e-5, atol=1e-5)
    assert plain_out.abs().max() > 0.1
    for name, grad in plain_grads.items():
        torch.testing.assert_close(sp_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sequence_parallel_training_matches_one_process(tmp_path):
    """2 ranks splitting each clip (dp 1 x sp 2, FSDP2 over both) train like one process."""
    one, sp = tmp_path / "one", tmp_path / "sp"
    run(1, one, 4)
    run(2, sp, 4, "--sp", 2, "--ac")
    for ra, rb in zip(metrics(one), metrics(sp)):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-7)
    wa, wb = load_file(one / "final.safetensors"), load_file(sp / "final.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)


# --- exact resume after kill -9 -----------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2])
def test_kill_9_and_resume_is_exact(tmp_path, world):
    """8 steps straight vs: a run that checkpoints every 4 steps, trains one step past the
    checkpoint at 4, then hangs until the test kills every process with SIGKILL; restarted,
    it resumes at step 4 and finishes. Weights, EMA and every logged loss are bitwise equal,
    and each step saw the same batch (the data order resumes where it was)."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(world, straight, 8, "--checkpoint-every", 4)

    procs = launch(world, killed, 8, "--checkpoint-every", 4, "--stall", 5)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not any(step == 4 for step, _ in list_checkpoints(killed)):
            assert time.monotonic() < deadline, "no checkpoint at step 4"
            assert all(p.poll() is None for p in procs), procs[0].communicate()[0]
            time.sleep(0.2)
        time.sleep(1.0)  # let it run step 5 (logged, not checkpointed) and stall in batch(5)
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * world
    assert [s for s, _ in list_checkpoints(killed)] == [4]

    run(world, killed, 8, "--checkpoint-every", 4)
    a, b = metrics(straight), metrics(killed)
    assert [r["step"] for r in b] == list(range(1, 9))  # rows past the checkpoint were dropped, then redone
    for key in ("loss", "grad_norm", "batch_sum", "lr"):
        assert [r[key] for r in b] == [r[key] for r in a], key
    for name in ("final.safetensors", "final_ema.safetensors"):
        wa, wb = load_file(straight / name), load_file(killed / name)
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (name, k)
    assert [s for s, _ in list_checkpoints(killed)] == [4, 8]


def test_two_process_checkpoint_resumes_in_one_process(tmp_path):
    """DCP reshards on load: 4 steps on 2 ranks, then 4 more in one process, track a
    one-process run (to FSDP's float32 reduction-order rounding)."""
    one, moved = tmp_path / "one", tmp_path / "moved"
    run(1, one, 8)
    run(2, moved, 4)
    run(1, moved, 8)
    a, b = metrics(one), metrics(moved)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)


def test_sigterm_to_one_rank_stops_all_at_one_step_with_a_checkpoint(tmp_path):
    """torchrun forwards SIGTERM to every worker, but the ranks may see it at different steps;
    they agree on the step to stop after, save one checkpoint there, exit 0 and resume."""
    out = tmp_path / "run"
    procs = launch(2, out, 10**6)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "metrics.jsonl").is_file() or len(metrics(out)) < 3:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], outputs
    (step, folder), = list_checkpoints(out)
    assert metrics(out)[-1]["step"] == step and f"done {step}" in outputs[0]
    assert json.loads((folder / "state.json").read_text())["world_size"] == 2
    run(2, out, step + 2)
    assert [r["step"] for r in metrics(out)][-3:] == [step, step + 1, step + 2]


# --- throughput ---------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2])
def test_throughput_fields_in_logs(tmp_path, world):
    """samples/s, tokens/s and TFLOP/s always; MFU when the device peak is given."""
    run(world, tmp_path / "plain", 2)
    run(world, tmp_path / "peak", 2, "--peak-tflops", 0.5)
    for row in metrics(tmp_path / "plain"):
        assert row["samples_per_s"] > 0 and row["tokens_per_s"] == pytest.approx(row["samples_per_s"] * 8)
        assert row["tflops_per_s"] > 0 and "mfu" not in row
    for row in metrics(tmp_path / "peak"):
        assert row["mfu"] == pytest.approx(row["tflops_per_s"] / (0.5 * world))


def test_dit_flop_count_matches_torch_flop_counter(monkeypatch):
    """DiTConfig.forward_flops (the MFU numerator) against torch's FlopCounterMode, with SDPA
    written out as matmuls (the counter does not see CPU SDPA kernels): within 2%, the
    time embedding and other small terms the formula leaves out."""
    from torch.nn import functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from kino.models.dit import DIT_SIZES, DiT

    def sdpa(q, k, v, attn_mask=None):
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        return scores.softmax(-1) @ v

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    config = DIT_SIZES["small"]
    model = DiT(config)
    for grid, text_len in (((5, 8, 8), 32), ((1, 8, 12), 32)):
        x = torch.randn(2, 16, grid[0], 2 * grid[1], 2 * grid[2])
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, torch.full((2, grid[0]), 500.0), torch.randn(2, text_len, config.text_dim))
        assert 2 * config.forward_flops(grid, text_len) == pytest.approx(counter.get_total_flops(), rel=0.02)



def test_meta_init_builds_the_model_once_and_trains_the_same(tmp_path):
    """parallel.meta_init: rank 0 alone builds the model, the other rank starts from the meta
    device and gets its shards by broadcast; the run ends bitwise where the plain run does."""
    run(2, tmp_path / "plain", 4)
    run(2, tmp_path / "meta", 4, "--meta-init")
    for name in ("final.safetensors", "final_ema.safetensors"):
        a, b = load_file(str(tmp_path / "plain" / name)), load_file(str(tmp_path / "meta" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    losses = [[r["loss"] for r in metrics(tmp_path / d)] for d in ("plain", "meta")]
    assert losses[0] == losses[1]


def test_validation_and_previews_leave_training_untouched(tmp_path):
    """Validating and sampling every 2 steps (the EMA weights swapped into the FSDP2 shards and
    back) changes nothing in the run: weights and EMA equal a run without, bit for bit, for 1
    and 2 processes; and both process counts log the same validation losses."""
    rows = {}
    for world in (1, 2):
        plain, peek = tmp_path / f"plain{world}", tmp_path / f"peek{world}"
        run(world, plain, 4)
        run(world, peek, 4, "--peek", 2)
        for name in ("final.safetensors", "final_ema.safetensors"):
            a, b = load_file(str(plain / name)), load_file(str(peek / name))
            assert all(torch.equal(a[k], b[k]) for k in a), (world, name)
        rows[world] = [json.loads(line) for line in (peek / "validation.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows[world]] == [2, 4]
        assert set(rows[world][0]) == {"step", "val_loss", "ema_val_loss"}
    for one, two in zip(rows[1], rows[2]):
        for key in ("val_loss", "ema_val_loss"):
            assert one[key] == pytest.approx(two[key], rel=1e-4)


# --- the CLI under torchrun ---------------------------------------------------------------


def test_cli_train_dit_in_two_processes_exits_cleanly(tmp_path):
    """`torchrun --nproc-per-node 2 -m kino train dit`: both ranks train, rank 0 exports the
    model and reports it, and both exit 0 (the gloo-teardown abort must not turn a finished
    run into a failure: kino.cli.run)."""
    from kino.data.latent_cache import build_world_cache
    from kino.models.folder import load_component, save_component, write_manifest
    from kino.models.text import MiniLMEncoder
    from kino.models.vae import VAE_SIZES, VideoVAE

    torch.manual_seed(0)
    vae = VideoVAE(VAE_SIZES["tiny"]).eval()
    save_component(tmp_path / "vae" / "vae", vae.config.to_dict(), vae.state_dict())
    write_manifest(tmp_path / "vae", "tiny-vae", {"vae": ("vae", "VideoVAE")})
    buckets = ["1x32x32", "5x32x32"]
    build_world_cache(tmp_path / "cache", vae, MiniLMEncoder(max_length=16), clips_per_bucket=4,
                      buckets=[tuple(int(v) for v in b.split("x")) for b in buckets], shard_size=256)
    config = tmp_path / "run.toml"
    config.write_text(f"""model = "tiny"
vae = "{tmp_path / 'vae'}"
[cache]
dir = "{tmp_path / 'cache'}"
clips_per_bucket = 4
buckets = {json.dumps(buckets)}
text_max_length = 16
[data]
batch_size = 4
[train]
out_dir = "{tmp_path / 'run'}"
max_steps = 2
lr = 1e-3
log_every = 1
checkpoint_every = 0
progress = false
device = "cpu"
validate_every = 2
sample_every = 2
ema_decay = 0.9
[validation]
clips_per_bucket = 2
batch_size = 2
""")
    procs = launch(2, command=[sys.executable, "-m", "kino", "train", "dit", "--config", str(config)])
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    assert "model folder" in outputs[0] and "model folder" not in outputs[1]
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2]
    load_component(tmp_path / "run" / "model", "dit")  # sha256-checked
    # validation under FSDP2: each rank scores its rows, rank 0 logs the mean over both
    (row,) = [json.loads(line) for line in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]
    assert row["step"] == 2 and 0 < row["val_loss"] < 100 and 0 < row["ema_val_loss"] < 100
    # previews too: both ranks sample with the EMA weights swapped into their shards, rank 0 logs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"tensors": 0, "images": 0}).Reload()
    assert any(tag.startswith("samples/") for tags in events.Tags().values() if isinstance(tags, list) for tag in tags)


def test_cli_generate_under_torchrun_splits_a_clip_and_shares_a_batch(tmp_path):
    """`torchrun --nproc-per-node 2 -m kino generate`: one clip is sampled with the DiT's
    tokens split across both processes (Ulysses) and equals the one-process clip up to float
    rounding (attention sums in another order); a --batch is shared out by rows and gives the
    one-process clips bit for bit, with one captions.jsonl in row order."""
    import numpy as np
    from conftest import save_tiny_pipeline

    from kino.cli import main
    from kino.data.video_io import read_metadata, read_video

    model = save_tiny_pipeline(tmp_path / "model", "tiny-sp", frames=5, height=32, width=32, steps=3, guidance=3.0)
    prompt = "a small red circle moving left on a black background"
    common = ["--model", str(model), "--seed", "3", "-q"]
    assert main(["generate", prompt, "-o", str(tmp_path / "one.png"), "--frames", "1", *common]) == 0
    assert main(["generate", prompt, "-o", str(tmp_path / "one.mp4"), *common]) == 0
    # the first-block cache's distance is reduced over the ranks (a huge threshold: reuse after the first call)
    cached = ["--cache-threshold", "1e9", "--frames", "1"]
    assert main(["generate", prompt, "-o", str(tmp_path / "onec.png"), *cached, *common]) == 0
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"caption": prompt.replace("red", c), "frames": f}) + "\n"
                            for c, f in (("red", 5), ("blue", 1), ("green", 5))))
    assert main(["generate", "--batch", str(rows), "--out", str(tmp_path / "b1"), *common]) == 0
    for args in (["-o", str(tmp_path / "two.png"), "--frames", "1"], ["-o", str(tmp_path / "two.mp4")],
                 ["-o", str(tmp_path / "twoc.png"), *cached],
                 ["--batch", str(rows), "--out", str(tmp_path / "b2")]):
        procs = launch(2, command=[sys.executable, "-m", "kino", "generate", *([] if "--batch" in args else [prompt]),
                                   *args, *common])
        outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
        for p, out in zip(procs, outputs):
            assert p.returncode == 0, out
        assert outputs[0].strip() and not outputs[1].strip()  # rank 0 reports, rank 1 stays quiet
    assert read_metadata(tmp_path / "twoc.png")["cache_reused"] == "2/3"
    for name in ("one.png", "one.mp4", "onec.png"):
        one, two = (read_video(tmp_path / name.replace("one", n))[0].astype(np.int16) for n in ("one", "two"))
        assert one.shape == two.shape, name
        diff = np.abs(one - two)
        if name.endswith(".png"):
            assert diff.max() <= 2, name
        else:  # lossy H.264 (crf 18) can turn a grey level's difference in a frame into several
            assert diff.mean() < 0.5 and (diff > 2).mean() < 0.05 and diff.max() <= 24, (name, diff.max(), diff.mean())
    assert read_metadata(tmp_path / "two.mp4")["seed"] == "3"
    # 48x48: 3x3 tokens per latent frame do not split over 2 ranks -> a clear error on both, exit 2
    procs = launch(2, command=[sys.executable, "-m", "kino", "generate", prompt, "-o", str(tmp_path / "odd.mp4"),
                               "--size", "48x48", *common])
    for p in procs:
        out = p.communicate(timeout=TIMEOUT)[0]
        assert p.returncode == 2 and "9 tokens evenly" in out and "Traceback" not in out, out
    b1, b2 = ((tmp_path / b / "captions.jsonl").read_text() for b in ("b1", "b2"))
    assert b1 == b2 and len(b1.splitlines()) == 3
    for row in map(json.loads, b1.splitlines()):
        one, two = (read_video(tmp_path / b / row["file"])[0] for b in ("b1", "b2"))
        assert np.array_equal(one, two)


SHARD_CHECK = """
import json, sys, torch
from kino.errors import KinoUserError
from kino.models.memory import MemoryPlan
from kino.pipeline import Pipeline
from kino.training.distributed import init_processes, shutdown_processes
procs = init_processes()
torch.set_num_threads(1)
try:  # block streaming keeps weights off the device another way: refused before anything changes
    Pipeline.from_pretrained(sys.argv[1]).set_memory(MemoryPlan(swap_blocks=1), "cpu", shard=procs.fsdp_mesh)
except KinoUserError as e:
    refused = str(e)
pipe = Pipeline.from_pretrained(sys.argv[1])
models = (("dit", pipe.dit), ("text", pipe.text_encoder.model))
full = {name: sum(p.numel() for p in m.parameters()) for name, m in models}
pipe.set_memory(MemoryPlan(), "cpu", shard=procs.fsdp_mesh)
local = {name: sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in m.parameters())
         for name, m in models}
try:
    pipe.load_lora(sys.argv[1] + "/missing.safetensors")
except KinoUserError as e:
    late = str(e)
clip = pipe.generate("a small red circle moving left on a black background", frames=1, seed=3)
print(json.dumps({"rank": procs.rank, "full": full, "local": local, "refused": refused, "late": late,
                  "sum": int(clip.video.long().sum())}))
shutdown_processes()
"""


def test_generate_with_fsdp_shares_the_weights_over_the_processes(tmp_path, monkeypatch):
    """`--fsdp` (set_memory(shard=)): each of 2 processes keeps half of the DiT's and the text
    encoder's weights (FSDP2) and all of them generate every clip together; a --batch then
    runs row after row on both, and its folder equals the one-process folder (within 2 grey
    levels: the attention sums in another order). Streaming plans, LoRAs after sharding and
    --fsdp without torchrun are refused with clear messages."""
    import numpy as np
    from conftest import save_tiny_pipeline

    from kino.cli import main
    from kino.data.video_io import read_video

    model = save_tiny_pipeline(tmp_path / "model", "tiny-fsdp", frames=5, height=32, width=32, steps=3,
                               guidance=3.0)
    procs = launch(2, command=[sys.executable, "-c", SHARD_CHECK, str(model)])
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    reports = []
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
        reports.append(json.loads(out.strip().splitlines()[-1]))
    for name in ("dit", "text"):  # half each (rank 0 takes the larger half of an odd-sized row)
        assert sum(r["local"][name] for r in reports) == reports[0]["full"][name]
        assert all(0.45 < r["local"][name] / r["full"][name] < 0.55 for r in reports), reports
    for report in reports:
        assert "does not combine with --swap-blocks" in report["refused"]
        assert "fuse LoRAs before sharding" in report["late"]
    assert reports[0]["sum"] == reports[1]["sum"]  # the same clip on both

    prompt = "a small {} circle moving left on a black background"
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"caption": prompt.format(c), "frames": f}) + "\n"
                            for c, f in (("red", 5), ("blue", 1), ("green", 5))))
    common = ["--batch", str(rows), "--model", str(model), "--seed", "3", "-q"]
    assert main(["generate", *common, "--out", str(tmp_path / "b1")]) == 0
    monkeypatch.setenv("KINO_LOAD_MEMORY", "1")  # too little for two copies: the processes load one at a time
    procs = launch(2, command=[sys.executable, "-m", "kino", "generate", *common, "--out", str(tmp_path / "b2"),
                               "--fsdp"])
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    assert "wrote 3 clips" in outputs[0] and not outputs[1].strip()
    assert "loading the model 1 process(es) of each machine at a time" in outputs[0]
    b1, b2 = ((tmp_path / b / "captions.jsonl").read_text() for b in ("b1", "b2"))
    assert b1 == b2 and len(b1.splitlines()) == 3
    for row in map(json.loads, b1.splitlines()):
        one, two = (read_video(tmp_path / b / row["file"])[0].astype(np.int16) for b in ("b1", "b2"))
        assert one.shape == two.shape and np.abs(one - two).max() <= 2, row
    assert [p.name for p in (tmp_path / "b2" / ".kino-batch").iterdir()] == ["part-0.jsonl"]  # rank 0 writes


def test_fsdp_reads_the_dit_in_its_file_dtype_and_casts_block_by_block(tmp_path, monkeypatch):
    """A DiT stored in bf16, generated in fp32 on 2 processes with --fsdp: each process reads
    the file's bf16 weights (memory-mapped, no private copy) and casts each block as it shards
    it; the image equals the one-process image, which converts the whole DiT as it is read.
    The load waves count only a process's share of the DiT."""
    import numpy as np
    import torch
    from conftest import save_tiny_pipeline

    from kino.cli import main
    from kino.data.video_io import read_video
    from kino.models.memory import dit_weights_bytes, weights_bytes
    from kino.pipeline import Pipeline

    model = save_tiny_pipeline(tmp_path / "model", "tiny-bf16", dit_dtype=torch.bfloat16, frames=1, height=32,
                               width=32, steps=3)
    assert Pipeline.from_pretrained(model, dit_dtype=None).dit.patch_embedding.weight.dtype == torch.bfloat16
    dit = dit_weights_bytes(model)
    assert 0 < dit < weights_bytes(model) and dit == (model / "dit" / "model.safetensors").stat().st_size
    args = ["generate", "a small red circle moving left on a black background", "--model", str(model), "-q"]
    assert main([*args, "-o", str(tmp_path / "one.png")]) == 0
    # room for everything but half the DiT in each of the two at once: one wave
    monkeypatch.setenv("KINO_LOAD_MEMORY", str(int(2 * (weights_bytes(model) - dit // 2) / 0.8) + 1))
    procs = launch(2, command=[sys.executable, "-m", "kino", *args, "-o", str(tmp_path / "two.png"), "--fsdp"])
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    assert "waves" not in outputs[0]
    one, two = (read_video(tmp_path / f"{n}.png")[0].astype(np.int16) for n in ("one", "two"))
    assert np.abs(one - two).max() <= 2


def test_a_load_error_in_one_wave_stops_every_process(tmp_path, monkeypatch):
    """Processes loading one after the other (KINO_LOAD_MEMORY too small for two): a user error
    while loading (a LoRA file that is not there) ends both with exit 2 and a message, rather
    than leaving the second waiting for the first."""
    from conftest import save_tiny_pipeline

    model = save_tiny_pipeline(tmp_path / "model", "tiny-waves", frames=1, height=32, width=32, steps=2)
    monkeypatch.setenv("KINO_LOAD_MEMORY", "1")
    procs = launch(2, command=[sys.executable, "-m", "kino", "generate", "a small red circle moving left on a black "
                               "background", "--model", str(model), "--lora", str(tmp_path / "none.safetensors"),
                               "-o", str(tmp_path / "x.png"), "-q"])
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 2 and "Traceback" not in out, out
    assert "none.safetensors does not exist" in outputs[0]
    assert "another process could not load the model" in outputs[1]


def test_load_waves_follow_host_memory(tmp_path, monkeypatch):
    from kino.errors import KinoUserError
    from kino.models.memory import host_memory_bytes, load_waves, weights_bytes

    gb = 10**9
    assert load_waves(8, 28 * gb, 100 * gb) == 2  # 80 GB to use: two 28 GB copies at a time
    assert load_waves(8, 28 * gb, 1000 * gb) == 8 and load_waves(8, 28 * gb, None) == 8
    assert load_waves(8, 28 * gb, 1) == 1 and load_waves(2, 0, 5) == 2
    (tmp_path / "dit").mkdir()
    (tmp_path / "dit" / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "kino.json").write_text("{}")
    assert weights_bytes(tmp_path) == 1000
    monkeypatch.setenv("KINO_LOAD_MEMORY", "5e9")
    assert host_memory_bytes() == 5 * gb
    monkeypatch.setenv("KINO_LOAD_MEMORY", "lots")
    with pytest.raises(KinoUserError, match="KINO_LOAD_MEMORY must be a number of bytes"):
        host_memory_bytes()
    monkeypatch.delenv("KINO_LOAD_MEMORY")
    assert host_memory_bytes() is None or host_memory_bytes() > 0


def test_fsdp_needs_torchrun(tmp_path, capsys):
    from kino.cli import main

    assert main(["generate", "a small red circle moving left on a black background", "-o",
                 str(tmp_path / "x.mp4"), "--fsdp"]) == 2
    assert "run it under torchrun" in capsys.readouterr().err
