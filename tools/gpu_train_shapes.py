"""Train the Shapes World DiT on a lent GPU in one call of the device tool, and bring it home.

A call of the device tool runs at most 10 minutes, takes the working tree plus at most 64 MiB,
and brings back at most 8 files of at most 16 MiB. So the GPU side (`train`) renders and encodes
a fresh latent cache there (the VAE and the text encoder on the GPU; the text encoder is the
compact MiniLM of tools/compact_minilm.py, carried as .gpu/minilm), trains the run config for
what is left of a wall-clock budget (`--minutes`, for the whole command; the training's share
becomes `train.max_minutes`), exports, and writes the DiT to $OUT in pieces under
16 MiB with a summary (sha256, steps, timings, throughput). Here, `join` checks and joins the
pieces into a whole pipeline folder (the shipped VAE, text encoder and generation defaults with
the new DiT) for `benchmarks/eval_t2v.py --model`.

Here, once (the folder is git-ignored, ~11 MiB):
    python tools/compact_minilm.py --out .gpu/minilm
On the device (carry [".gpu"], timeout_s ~560; see BENCHMARKS.md, "Training on a lent GPU"):
    PYTHONPATH=. python3 tools/gpu_train_shapes.py train --config configs/dit_gpu_stage17.toml \\
        --text-encoder .gpu/minilm --minutes 8 --out $OUT
Back here:
    python tools/gpu_train_shapes.py join --from FILES_AT --out runs/dit_gpu/model

`train --smoke` runs the same path on a CPU at a toy size (two small buckets, a few clips,
batch 2, seconds of training): the dry run CI makes (tests/test_tools.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

EXPORT_MINUTES = 0.5  # kept from the training budget: the export's reload and the pieces
PIECE_BYTES = 15 * 2**20  # the device tool brings back files of at most 16 MiB
SUMMARY = "summary.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def smoke_config(cfg, root: Path) -> None:
    """The toy size of `--smoke`, in place: CPU, two small buckets, few clips, batch 2."""
    cfg.cache.dir = str(root / "cache")
    cfg.cache.clips_per_bucket = 4
    cfg.cache.buckets = ["1x64x64", "9x64x64"]
    cfg.data.batch_size = 2
    cfg.decoder_loss.rows = 1
    cfg.train.out_dir = str(root / "run")
    cfg.train.device = "cpu"
    cfg.train.warmup_steps = 1
    cfg.train.log_every = 1
    cfg.train.progress = False


def train(args) -> int:
    import torch

    from kino.data.latent_cache import build_world_cache
    from kino.models.vae.pretrained import load_vae
    from kino.training.config import load_config
    from kino.training.dit import DiTRunConfig, default_vae_folder, run_train_dit
    from kino.training.trainer import resolve_device

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compact_minilm import CompactMiniLM

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, DiTRunConfig)
    if args.smoke:
        smoke_config(cfg, Path(args.work))
    begun = time.monotonic()

    def minutes_left() -> float:  # what the budget leaves for training, less the export's margin
        return args.minutes - (time.monotonic() - begun) / 60.0 - EXPORT_MINUTES

    device = resolve_device(cfg.train.device)
    summary = {"config": str(args.config), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
               else "cpu", "torch": torch.__version__, "minutes": args.minutes}

    if device.type == "cuda":  # the VAE and MiniLM run in fp32 here: TF32 tensor cores for their matmuls
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    start = time.monotonic()
    vae_path = Path(cfg.vae) if cfg.vae is not None else default_vae_folder(cfg.init_from)
    vae = load_vae(vae_path).to(device)
    encoder = CompactMiniLM(args.text_encoder, device=device)
    c = cfg.cache
    build_world_cache(c.dir, vae, encoder, clips_per_bucket=c.clips_per_bucket, split=c.split, seed=c.seed,
                      buckets=c.bucket_list())
    del vae
    summary["cache_seconds"] = round(time.monotonic() - start, 1)
    cfg.train.max_minutes = minutes_left()
    print(f"latent cache: {summary['cache_seconds']} s; training for {cfg.train.max_minutes:.2f} min", flush=True)
    if cfg.train.max_minutes < 0.01:
        raise SystemExit(f"the latent cache took the whole budget of {args.minutes} min: give more --minutes "
                         "or fewer cache.clips_per_bucket")

    start = time.monotonic()
    try:
        model = run_train_dit(cfg, text_encoder=encoder)  # the cache is complete: it trains, then exports
    except Exception:  # the CUDA path has not run before its first lent GPU: keep the error, try once more
        (out / "error.txt").write_text(traceback.format_exc())
        traceback.print_exc()
        cfg.train.max_minutes = minutes_left()
        if cfg.train.max_minutes < 0.5:
            raise
        # the simplest run of the same recipe: fp32, no decoder loss, in a fresh folder
        cfg.train.precision, cfg.decoder_loss.weight = "fp32", 0.0
        cfg.train.out_dir += "-retry"
        summary["retry"] = "fp32, no decoder loss (error.txt: the first attempt's error)"
        print(f"retrying: {summary['retry']}, {cfg.train.max_minutes:.2f} min", flush=True)
        model = run_train_dit(cfg, text_encoder=encoder)
    summary["train_seconds"] = round(time.monotonic() - start, 1)
    if model is None:
        raise SystemExit("the run was stopped by a signal before it could export")
    dit = model / "dit"  # the export of a run with another text encoder than MiniLM: the DiT alone
    data = (dit / "model.safetensors").read_bytes()
    pieces = []
    for k in range(0, len(data), PIECE_BYTES):
        name = f"dit.safetensors.{k // PIECE_BYTES:02d}"
        (out / name).write_bytes(data[k:k + PIECE_BYTES])
        pieces.append(name)
    for name in ("config.json", "training.json"):
        shutil.copy(dit / name, out / f"dit_{name}")
    rows = (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(rows[-400:]) + "\n")
    summary.update(pieces=pieces, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data),
                   steps=json.loads((dit / "training.json").read_text())["steps"],
                   last=json.loads(rows[-1]) if rows else None)
    (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary), flush=True)
    return 0


def join(args) -> int:
    from kino.errors import KinoUserError
    from kino.models.dit.pretrained import load_dit
    from kino.pipeline import Pipeline

    src, out = Path(args.src), Path(args.out)
    summary = json.loads((src / SUMMARY).read_text())
    work = out.parent / (out.name + ".dit")
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "model.safetensors", "wb") as f:
        for name in summary["pieces"]:
            f.write((src / name).read_bytes())
    if _sha256(work / "model.safetensors") != summary["sha256"]:
        raise KinoUserError(f"the pieces in {src} do not join into the DiT the device exported (sha256 differs)")
    for name in ("config.json", "training.json"):
        shutil.copy(src / f"dit_{name}", work / name)
    pipe = Pipeline.from_pretrained(args.base)
    pipe.dit = load_dit(work)
    (out / "dit").mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "training.json", out / "dit" / "training.json")  # the manifest lists it too
    pipe.save_pretrained(out)
    shutil.rmtree(work)
    print(f"wrote {out}: the DiT of {summary['steps']} steps ({summary['device']}) in {args.base or 'the shipped'} "
          "pipeline")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="on the GPU machine: cache, train for --minutes, export pieces to --out")
    t.add_argument("--config", required=True, type=Path)
    t.add_argument("--text-encoder", required=True, help="the compact MiniLM folder (tools/compact_minilm.py)")
    t.add_argument("--minutes", type=float, required=True,
                   help="the whole command's budget: the cache, then training for what is left (train.max_minutes) "
                        f"less {EXPORT_MINUTES} min for the export")
    t.add_argument("--out", required=True, help="where the pieces go ($OUT on the device)")
    t.add_argument("--smoke", action="store_true", help="a CPU dry run at a toy size")
    t.add_argument("--work", default="runs/gpu_smoke", help="--smoke's cache and run folder")
    j = sub.add_parser("join", help="here: join the pieces into a pipeline folder")
    j.add_argument("--from", dest="src", required=True, help="the folder the device's files landed in")
    j.add_argument("--out", required=True)
    j.add_argument("--base", default=None, help="pipeline folder whose VAE, text encoder and defaults to keep "
                   "(default: the shipped model)")
    args = ap.parse_args(argv)
    return train(args) if args.command == "train" else join(args)


if __name__ == "__main__":
    sys.exit(main())
