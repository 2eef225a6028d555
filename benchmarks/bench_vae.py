"""Video VAE speed and memory on this machine.

    python benchmarks/bench_vae.py speed  [--model DIR | --wan22] [--repeats 5]
    python benchmarks/bench_vae.py memory [--model DIR]

speed:  encode / decode frames/s of kino's VideoVAE and, in the same run with the same
        weights, diffusers' AutoencoderKLWan (the peer), as a ratio; then the time of a decode
        with gradients (decode, then backward to the latents) for both. --wan22: Wan2.2's VAE
        layout (residual stages, 2x2 patches, 48 channels) at a fifth of its width (base 32,
        decoder 48), random weights built in diffusers and loaded into kino.
memory: peak resident memory added by decoding 33 vs 129 frames (each measured in a
        fresh process, so one run's allocations cannot hide another's).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys

import torch
from timing import median_time, proc_status_kib


def _load(model_dir):
    from kino.models.vae.pretrained import load_vae

    return load_vae(model_dir)


def _clip(frames: int, h: int, w: int) -> torch.Tensor:
    from kino.training.vae import to_model_range
    from kino.world.generator import render, scene_at

    video = render(scene_at("eval", 0, 1, frames=min(frames, 33), size=(h, w)))
    x = to_model_range(video)[None]
    reps = -(-frames // x.shape[2])
    return x.repeat(1, 1, reps, 1, 1)[:, :, :frames]


@torch.no_grad()
def speed(args):
    from diffusers import AutoencoderKLWan

    from kino.models.vae.adapters import to_diffusers

    if args.wan22:
        from kino.models.vae import config_from_diffusers, from_diffusers
        from kino.models.vae.model import VideoVAE

        torch.manual_seed(0)
        peer = AutoencoderKLWan(base_dim=32, decoder_base_dim=48, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                temperal_downsample=[False, True, True], is_residual=True, patch_size=2,
                                in_channels=12, out_channels=12, scale_factor_spatial=16,
                                latents_mean=[0.0] * 48, latents_std=[1.0] * 48).eval()
        vae = VideoVAE(config_from_diffusers(dict(peer.config))).eval()
        vae.load_state_dict(from_diffusers(peer.state_dict()))
    else:
        vae = _load(args.model)
        cfg = vae.config
        peer = AutoencoderKLWan(base_dim=cfg.base_dim, decoder_base_dim=cfg.decoder_dim, z_dim=cfg.z_dim,
                                dim_mult=cfg.dim_mult, num_res_blocks=cfg.num_res_blocks,
                                attn_scales=cfg.attn_scales, temperal_downsample=cfg.temporal_downsample,
                                dropout=0.0).eval()
        peer.load_state_dict(to_diffusers(vae.state_dict()), strict=False)
    print(f"# {platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| clip | kino encode fr/s | kino decode fr/s | diffusers encode fr/s | diffusers decode fr/s "
          "| encode ratio kino/diffusers time | decode ratio |")
    print("|---|---|---|---|---|---|---|")
    grads = []
    for frames, h, w in [(1, 64, 64), (17, 64, 64), (33, 64, 96)]:
        x = _clip(frames, h, w)
        z = vae.encode(x)[0]
        k_enc = median_time(lambda: vae.encode(x), args.repeats)
        k_dec = median_time(lambda: vae.decode(z), args.repeats)
        d_enc = median_time(lambda: peer.encode(x), args.repeats)
        d_dec = median_time(lambda: peer.decode(z), args.repeats)
        print(f"| {frames}x{h}x{w} | {frames / k_enc:.1f} | {frames / k_dec:.1f} | {frames / d_enc:.1f} | "
              f"{frames / d_dec:.1f} | {k_enc / d_enc:.2f} | {k_dec / d_dec:.2f} |")
        grads.append((f"{frames}x{h}x{w}", median_time(lambda: _decode_backward(vae.decode, z), args.repeats),
                      median_time(lambda: _decode_backward(lambda v: peer.decode(v).sample, z), args.repeats)))
    print("\nDecoding with gradients (latents -> pixels, then the backward pass of a squared error to the latents:"
          " the DiT's decoder loss and latent refinement):\n")
    print("| clip | kino decode+backward s | diffusers decode+backward s | ratio kino/diffusers time |")
    print("|---|---|---|---|")
    for clip, k, d in grads:
        print(f"| {clip} | {k:.3f} | {d:.3f} | {k / d:.2f} |")


def _decode_backward(decode, z: torch.Tensor) -> None:
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        decode(z).square().mean().backward()


@torch.no_grad()
def _decode_peak(args):
    """Child process: peak RSS growth (MiB) of decoding `args.frames` frames from latents
    (no encode beforehand, so no earlier peak can hide the decoder's)."""
    import gc

    vae = _load(args.model)
    s = vae.config.space_stride
    z = torch.randn(1, vae.config.z_dim, vae.config.latent_frames(args.frames), args.height // s, args.width // s)
    vae.decode(z[:, :, :2])  # warm-up: allocator pools and lazy initialisation
    gc.collect()
    base = proc_status_kib("VmRSS")
    out = vae.decode(z)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"frames": args.frames, "base_mib": base / 1024, "peak_mib": peak / 1024,
                      "added_mib": (peak - base) / 1024, "output_mib": out.numel() * 4 / 2**20}))


def memory(args):
    print("| frames | size | peak RSS MiB | added by decode MiB | output tensor MiB |")
    print("|---|---|---|---|---|")
    res = {}
    for frames in (33, 129):
        cmd = [sys.executable, __file__, "_child", "--frames", str(frames), "--height", str(args.height),
               "--width", str(args.width)] + (["--model", args.model] if args.model else [])
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        res[frames] = r
        print(f"| {frames} | {args.height}x{args.width} | {r['peak_mib']:.0f} | {r['added_mib']:.1f} | "
              f"{r['output_mib']:.1f} |")
    print(f"peak RSS ratio 129/33 frames: {res[129]['peak_mib'] / res[33]['peak_mib']:.3f}; "
          f"added-by-decode ratio: {res[129]['added_mib'] / res[33]['added_mib']:.3f} "
          f"(of which the output tensor itself: {res[129]['output_mib'] - res[33]['output_mib']:.1f} MiB more)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("speed", "memory", "_child"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--wan22", action="store_true", help="speed: Wan2.2's VAE layout at reduced width")
    ap.add_argument("--frames", type=int, default=33)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=96)
    args = ap.parse_args()
    {"speed": speed, "memory": memory, "_child": _decode_peak}[args.what](args)


if __name__ == "__main__":
    main()
