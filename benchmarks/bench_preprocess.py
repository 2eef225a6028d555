"""Throughput of `kino preprocess` on ordinary compressed video: decoding, VAE encoding and text
encoding of a folder dataset into the latent cache that `kino train dit` reads.

    python benchmarks/bench_preprocess.py [--n 24] [--upscale 6] [--source-fps 24] [--grain 2]
        [--repeats 3] [--vae DIR] [--device cpu|cuda] [--buckets 1x64x64 17x64x96 33x64x96 ...]

The source videos are Shapes World `eval` scenes (17 and 33 frames in turn at 8 fps, every world size),
made to look like a typical web clip: each frame scaled up `--upscale` times (6: 384x576 from
64x96), each frame repeated to `--source-fps` (24 fps: a 33-frame scene lasts 4.1 s, 99 frames),
with Gaussian grain (`--grain` grey levels, new in every frame) so that the stream carries a
camera clip's detail rather than flat colours (the bitrate is reported), stored as H.264 yuv420p
(crf 18, `write_video`'s default), beside a captions.jsonl. They are
written once; then each repeat times, in fresh processes' worth of state (new cache folder):
  * `decode`: the dataset reader alone (kino/data/datasets.py `iter_clips`: PyAV decoding with
    sampling to the dataset's 8 fps, bucket choice, resize and crop), nothing encoded;
  * `text`: the text encoder (MiniLM, `cache.text_max_length` 32) on every caption;
  * `preprocess`: the whole `build_video_cache` (decode + VAE + text + shard writing), as
    `kino preprocess` runs it on one rank.
Reported: medians over the repeats of seconds and clips/s, source frames decoded per second,
and the share of the whole that decoding takes. One JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kino.data.datasets import Skipped, VideoDatasetConfig, dataset_parts, iter_clips  # noqa: E402
from kino.data.latent_cache import _encode_text  # noqa: E402
from kino.data.preprocess import build_video_cache  # noqa: E402
from kino.data.video_io import write_video  # noqa: E402
from kino.world.captions import FPS  # noqa: E402
from kino.world.generator import render, scene_at  # noqa: E402

BUCKETS = ["1x64x64", "1x64x96", "1x96x64", "17x64x64", "17x64x96", "17x96x64", "33x64x64", "33x64x96", "33x96x64"]


def make_dataset(folder: Path, n: int, upscale: int, source_fps: int, seed: int,
                 grain: float = 0.0) -> tuple[Path, int]:
    """n world scenes as web-like mp4 files and their captions.jsonl; returns the file and the
    number of source frames written."""
    if source_fps % FPS:
        raise SystemExit(f"--source-fps must be a multiple of the world's {FPS} fps")
    repeat = source_fps // FPS
    rows, frames = [], 0
    for i in range(n):
        scene = scene_at("eval", seed, i, frames=(17, 33)[i % 2])
        video = render(scene)
        big = np.repeat(np.repeat(np.repeat(video, repeat, axis=0), upscale, axis=1), upscale, axis=2)
        if grain > 0:
            noise = np.random.default_rng([seed, i]).normal(0.0, grain, big.shape[:3] + (1,)).astype(np.float32)
            big = np.clip(big + noise, 0, 255).astype(np.uint8)
        name = f"{i:05d}.mp4"
        write_video(folder / name, big, source_fps)
        rows.append({"path": name, "caption": scene.text})
        frames += big.shape[0]
    path = folder / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path, frames


def time_decode(dataset: VideoDatasetConfig) -> tuple[float, int, int]:
    t = time.perf_counter()
    clips = skipped = 0
    for part in dataset_parts(dataset):
        for item in iter_clips(part, dataset.fps, dataset.bucket_list()):
            if isinstance(item, Skipped):
                skipped += 1
            else:
                clips += 1
    return time.perf_counter() - t, clips, skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--upscale", type=int, default=6)
    ap.add_argument("--source-fps", type=int, default=24)
    ap.add_argument("--grain", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=9090)
    ap.add_argument("--vae", default=None, help="VAE model folder (default: the shipped one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--buckets", nargs="+", default=BUCKETS)
    args = ap.parse_args()

    from kino.models.text.encoder import MiniLMEncoder
    from kino.models.vae.pretrained import load_vae
    from kino.training.dit import default_vae_folder

    device = torch.device(args.device)
    vae = load_vae(Path(args.vae) if args.vae else default_vae_folder("default"), device)
    text_encoder = MiniLMEncoder(max_length=32)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "videos").mkdir()
        captions, source_frames = make_dataset(tmp / "videos", args.n, args.upscale, args.source_fps, args.seed,
                                               args.grain)
        size_mb = sum(p.stat().st_size for p in (tmp / "videos").glob("*.mp4")) / 2**20
        mbit_s = size_mb * 8 * 2**20 / 1e6 / (source_frames / args.source_fps)
        dataset = VideoDatasetConfig(captions=str(captions), fps=float(FPS), buckets=args.buckets, part_size=8)
        captions_text = [json.loads(line)["caption"] for line in captions.read_text().splitlines()]
        decode, text, whole = [], [], []
        clips = skipped = 0
        for r in range(args.repeats):
            seconds, clips, skipped = time_decode(dataset)
            decode.append(seconds)
            t = time.perf_counter()
            _encode_text(text_encoder, captions_text)
            text.append(time.perf_counter() - t)
            t = time.perf_counter()
            report = build_video_cache(tmp / f"cache{r}", vae, text_encoder, dataset)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            whole.append(time.perf_counter() - t)
            assert report.complete and report.clips == clips, (report, clips)
    med = {k: statistics.median(v) for k, v in (("decode", decode), ("text", text), ("preprocess", whole))}
    print(f"{args.n} videos, {source_frames} source frames ({size_mb:.1f} MB, {mbit_s:.1f} Mbit/s), {clips} clips, "
          f"{skipped} skipped; median of {args.repeats}")
    print("| phase | seconds | clips/s | source frames/s |")
    print("|---|---|---|---|")
    for k, s in med.items():
        print(f"| {k} | {s:.2f} | {clips / s:.2f} | {source_frames / s:.0f} |")
    print(json.dumps({
        "videos": args.n, "clips": clips, "skipped": skipped, "source_frames": source_frames,
        "source_mb": round(size_mb, 2), "mbit_s": round(mbit_s, 2), "upscale": args.upscale,
        "source_fps": args.source_fps, "grain": args.grain,
        "seconds": {k: round(v, 3) for k, v in med.items()},
        "clips_per_s": round(clips / med["preprocess"], 3), "decode_share": round(med["decode"] / med["preprocess"], 3),
        "runs": {"decode": decode, "text": text, "preprocess": whole},
        "device": args.device, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
    }))


if __name__ == "__main__":
    main()
