"""Training the video VAE on Shapes World: the VAE task for the generic trainer, and export.

The VAE is fully convolutional, so it trains on short crops (a few frames, small tiles)
that cost a fraction of a full clip, and is checked on full clips. Crops keep the causal
structure: a crop's first frame is encoded alone like any clip's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from kino.errors import KinoUserError
from kino.models.folder import save_component, write_manifest
from kino.models.vae import VAE_SIZES, VAEConfig, VideoVAE
from kino.training.config import TrainConfig
from kino.world.captions import BACKGROUNDS, COLORS, FRAME_COUNTS
from kino.world.evaluator import PALETTE_NAMES
from kino.world.generator import render, scene_at


@dataclass
class VAEDataConfig:
    split: str = "train"
    seed: int = 0
    batch_size: int = 4
    crop_frames: list[int] = field(default_factory=lambda: [1, 5, 9])  # each 4k+1, one per step
    crop_size: int = 32  # square spatial crop in pixels (multiple of 8); 0 = whole frame


@dataclass
class VAELossConfig:
    # MSE, not L1: on flat-colored worlds L1's constant-size gradients learn edges slowly
    # (measured: overfitting 4 crops for 100 steps reaches 23.9 dB with MSE, 19.8 dB with L1)
    l1: float = 0.0
    mse: float = 1.0
    kl: float = 1e-6
    # Shapes World's flat colours: cross-entropy of each decoded pixel's nearest world colour
    # (logits -|rec - c|^2 / palette_temperature over the world's ten colours, in [-1, 1])
    # against the original pixel's nearest one. The world's evaluator reads a clip through
    # that nearest-colour map, where a rounded corner or a blunted tip turns a square into a
    # circle and a triangle into one; MSE charges little for those few pixels (BENCHMARKS.md,
    # VAE). 0 = off. The temperature is about a sixth of the closest two colours' squared distance.
    palette: float = 0.0
    palette_temperature: float = 0.05

    def __post_init__(self):
        if min(self.l1, self.mse, self.kl, self.palette) < 0 or self.palette_temperature <= 0:
            raise KinoUserError(f"loss weights must be >= 0 and palette_temperature > 0; got {self}")


@dataclass
class VAERunConfig:
    """`kino train vae --config FILE`: a TOML/JSON file with these sections."""

    model: str = "small"  # a named size in VAE_SIZES
    stats_clips: int = 64  # train clips whose latents set the exported latents_mean/std
    init_from: str | None = None  # start from this model folder's VAE ("default": the shipped one)
    # "all", or "decoder": fine-tune only the decoder (and post-quant conv) of init_from's VAE.
    # The encoder, hence every latent and the latent normalisation, stays bit for bit, so a DiT
    # trained on this VAE's latents stays valid with the new decoder.
    train_only: str = "all"
    # Grow init_from's decoder this many times wider before training (kino/models/vae/grow.py:
    # the wider decoder starts out decoding what the narrow one did; the encoder stays as is).
    widen_decoder: int = 1
    data: VAEDataConfig = field(default_factory=VAEDataConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/vae"))

    def __post_init__(self):
        if self.model not in VAE_SIZES:
            raise KinoUserError(f"unknown VAE size {self.model!r}: allowed {', '.join(VAE_SIZES)}")
        if any(f < 1 or (f - 1) % 4 for f in self.data.crop_frames):
            raise KinoUserError(f"data.crop_frames must be 4k+1 values, got {self.data.crop_frames}")
        if self.train_only not in ("all", "decoder"):
            raise KinoUserError(f"train_only must be 'all' or 'decoder', got {self.train_only!r}")
        if self.train_only == "decoder" and self.init_from is None:
            raise KinoUserError("train_only = \"decoder\" fine-tunes a trained VAE's decoder: set init_from = "
                                "\"MODEL_DIR\" (or \"default\")")
        if not isinstance(self.widen_decoder, int) or self.widen_decoder < 1:
            raise KinoUserError(f"widen_decoder must be a whole number >= 1, got {self.widen_decoder!r}")
        if self.widen_decoder > 1 and self.init_from is None:
            raise KinoUserError("widen_decoder grows a trained VAE's decoder: set init_from = \"MODEL_DIR\" "
                                "(or \"default\")")
        if self.data.crop_size % 8 or self.data.crop_size < 0:
            raise KinoUserError(f"data.crop_size must be a multiple of 8 (0 = whole frame), got {self.data.crop_size}")


def to_model_range(video: np.ndarray) -> Tensor:
    """uint8 (F, H, W, 3) -> float (3, F, H, W) in [-1, 1]."""
    return torch.from_numpy(video).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(video: Tensor) -> Tensor:
    """float (3, F, H, W) in [-1, 1] -> uint8 (F, H, W, 3)."""
    return video.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 3, 0)


def world_crops(step: int, data: VAEDataConfig) -> Tensor:
    """The batch of `step`: (B, 3, T, S, S) crops of world clips, a pure function of step."""
    rng = np.random.default_rng([data.seed, step])
    t = int(rng.choice(data.crop_frames))
    clips = []
    for j in range(data.batch_size):
        frames = int(rng.choice([f for f in FRAME_COUNTS if f >= t]))
        scene = scene_at(data.split, data.seed, step * data.batch_size + j, frames=frames)
        video = render(scene)  # (F, H, W, 3)
        F, H, W = video.shape[:3]
        s = data.crop_size or min(H, W)
        t0, y0, x0 = (int(rng.integers(0, n - k + 1)) for n, k in ((F, t), (H, s), (W, s)))
        clips.append(to_model_range(video[t0:t0 + t, y0:y0 + s, x0:x0 + s]))
    return torch.stack(clips)  # (B, 3, T, S, S)


# the evaluator's palette, in its order: the colours its nearest-colour map chooses from
WORLD_PALETTE = torch.tensor([(BACKGROUNDS | COLORS)[n] for n in PALETTE_NAMES], dtype=torch.float32) / 127.5 - 1.0


def palette_loss(rec: Tensor, x: Tensor, temperature: float) -> Tensor:
    """Mean cross-entropy of the decoded pixels' nearest world colour (logits -|rec - c|^2 /
    temperature) against the original's nearest one. rec, x: (B, 3, T, H, W) in [-1, 1]."""
    pal = WORLD_PALETTE.to(device=rec.device, dtype=torch.float32)

    def dist2(v: Tensor) -> Tensor:
        return (v.float().movedim(1, -1)[..., None, :] - pal).pow(2).sum(-1)  # (B, T, H, W, 10)

    with torch.no_grad():
        labels = dist2(x).argmin(-1)  # (B, T, H, W)
    logits = -dist2(rec) / temperature
    return nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten())


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """PSNR in dB of [-1, 1] images (peak-to-peak 2)."""
    mse = (a.float() - b.float()).pow(2).mean()
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


class VAETask:
    def __init__(self, config: VAERunConfig):
        self.config = config
        base = VAE_SIZES[config.model]
        # the size trained and exported: the named one, its decoder widened if asked (x1: as it is)
        self.vae_config = replace(base, decoder_base_dim=base.decoder_dim * config.widen_decoder)
        self._sample_clip = render(scene_at("eval", 0, 0, frames=17, size=(64, 96), objects=2))

    def build_model(self) -> nn.Module:
        if self.config.init_from is None:
            return VideoVAE(self.vae_config)
        from kino.models.vae.pretrained import load_vae

        source = None if self.config.init_from == "default" else self.config.init_from  # None: the shipped VAE
        model = load_vae(source).requires_grad_(True).train()
        if model.config.to_dict() | {"latents_mean": None, "latents_std": None} != \
                VAE_SIZES[self.config.model].to_dict() | {"latents_mean": None, "latents_std": None}:
            raise KinoUserError(f"init_from {self.config.init_from} holds a VAE of another size than "
                                f"model = {self.config.model!r}")
        if self.config.widen_decoder > 1:
            from kino.models.vae.grow import widen_decoder

            model = widen_decoder(model, self.config.widen_decoder, seed=self.config.train.seed)
        if self.config.train_only == "decoder":
            model.encoder.requires_grad_(False)
            model.conv1.requires_grad_(False)
        return model

    def batch(self, step: int) -> dict[str, Tensor]:
        return {"video": world_crops(step, self.config.data)}

    def loss(self, model: VideoVAE, batch: dict[str, Tensor]):
        x = batch["video"]  # (B, 3, T, H, W)
        with torch.set_grad_enabled(self.config.train_only != "decoder"):
            mean, logvar = model.encode(x)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        rec = model.decode(z, clamp=False)[:, :, : x.shape[2]]  # a clamp would stop gradients on overshoot
        w = self.config.loss
        l1 = (rec - x).abs().mean()
        mse = (rec - x).pow(2).mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = w.l1 * l1 + w.mse * mse + w.kl * kl
        logs = {"l1": l1.detach(), "kl": kl.detach(), "psnr": psnr(rec.detach(), x)}
        if w.palette:
            pal = palette_loss(rec, x, w.palette_temperature)
            loss = loss + w.palette * pal
            logs["palette"] = pal.detach()
        return loss, logs

    def samples(self, model: VideoVAE) -> dict[str, Tensor]:
        x = to_model_range(self._sample_clip)[None]
        rec = model.reconstruct(x)[0]
        return {"reconstruction": torch.cat([to_uint8(x[0]), to_uint8(rec)], dim=2)}  # side by side


@torch.no_grad()
def latent_stats(model: VideoVAE, n: int = 64, seed: int = 12345) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of latent means over n train clips: the config's normalisation."""
    zs = []
    for i in range(n):
        video = render(scene_at("train", seed, i))
        mean, _ = model.encode(to_model_range(video)[None])
        zs.append(mean[0].flatten(1))  # (Z, T*h*w)
    z = torch.cat(zs, dim=1)
    return z.mean(1).tolist(), z.std(1).clamp_min(1e-6).tolist()


def export_vae(model: VideoVAE, config: VAEConfig, out_dir: str | Path, name: str = "kino-vae",
               stats_clips: int = 64, keep_stats: bool = False) -> Path:
    """Write a model folder (kino.json + vae/) with latent statistics measured on world clips,
    or, `keep_stats`, the model's own (a decoder fine-tune: the encoder did not change)."""
    if keep_stats:
        mean, std = model.config.latents_mean, model.config.latents_std
    else:
        mean, std = latent_stats(model, stats_clips)
    cfg = VAEConfig.from_dict({**config.to_dict(), "latents_mean": mean, "latents_std": std})
    out = Path(out_dir)
    save_component(out / "vae", cfg.to_dict(), model.state_dict())
    write_manifest(out, name, {"vae": ("vae", "VideoVAE")})
    return out
