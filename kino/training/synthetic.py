"""A DiT training task on random data: the same model, loss and step as `DiTTask` without a
latent cache, for tests and benchmarks of the training machinery (parallelism, resume,
throughput). Every batch is a pure function of (seed, step), like the real task's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kino.diffusion.flow import interpolate, velocity_target
from kino.models.dit import DiT, DiTConfig


@dataclass
class SyntheticDiT:
    """Flow matching on Gaussian "latents" (B, C, T, h, w) with random text tokens."""

    config: DiTConfig
    batch_size: int = 4
    latent: tuple[int, int, int] = (2, 4, 4)  # latent frames, height, width
    text_len: int = 8
    seed: int = 0
    perturb: float = 0.0  # seeded noise added to every fresh weight (the zero-init head gives no signal)
    stall_at: int | None = None  # tests: batch(stall_at) sleeps forever (a process to kill -9)

    def build_model(self) -> nn.Module:
        model = DiT(self.config)
        if self.perturb:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(self.perturb * torch.randn_like(p))
        return model

    def batch(self, step: int) -> dict[str, Tensor]:
        if step == self.stall_at:
            while True:
                time.sleep(1)
        return self._draw(torch.Generator().manual_seed(self.seed * 1_000_003 + step))

    def _draw(self, g: torch.Generator) -> dict[str, Tensor]:
        b, c = self.batch_size, self.config.in_channels
        x0 = torch.randn((b, c, *self.latent), generator=g)  # (B, C, T, h, w)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.rand((b, 1), generator=g).expand(b, self.latent[0]).contiguous()  # (B, T)
        text = torch.randn((b, self.text_len, self.config.text_dim), generator=g)  # (B, L, D)
        return {"latents": x0, "noise": noise, "t": t, "text": text}

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x0, noise, t = batch["latents"], batch["noise"], batch["t"]
        v = model(interpolate(x0, noise, t), 1000.0 * t, batch["text"])  # (B, C, T, h, w)
        loss = (v.float() - velocity_target(x0, noise).float()).pow(2).mean()
        return loss, {"batch_sum": x0.sum()}  # batch_sum: tests check the data order with it

    def validation_batches(self):
        """Two fixed held-out batches, from a stream apart from the training batches'."""
        for k in range(2):
            yield self._draw(torch.Generator().manual_seed(self.seed * 1_000_003 + 10**9 + k))

    def validation_losses(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        x0, noise, t = batch["latents"], batch["noise"], batch["t"]
        v = model(interpolate(x0, noise, t), 1000.0 * t, batch["text"])
        err = (v.float() - velocity_target(x0, noise).float()).pow(2).mean(dim=(1, 2, 3, 4)).sum()
        return {"val_loss": (err, torch.tensor(float(x0.shape[0]), device=x0.device))}

    def samples(self, model: nn.Module) -> dict[str, Tensor]:
        """A preview for the machinery's tests: the velocity at a fixed input, its first three
        channels as a uint8 video (T, h, w, 3)."""
        batch = self._draw(torch.Generator().manual_seed(self.seed * 1_000_003 + 2 * 10**9))
        device = next(model.parameters()).device
        x, text = batch["latents"][:1].to(device), batch["text"][:1].to(device)
        v = model(x, torch.full((1,), 500.0, device=device), text)[0, :3].float()  # (3, T, h, w)
        v = (v - v.min()) / (v.max() - v.min()).clamp_min(1e-12)
        return {"velocity": (v * 255).round().to(torch.uint8).permute(1, 2, 3, 0).cpu()}

    def grid(self) -> tuple[int, int, int]:
        return tuple(n // p for n, p in zip(self.latent, self.config.patch_size))

    def batch_tokens(self, batch: dict[str, Tensor]) -> int:
        return batch["latents"].shape[0] * math.prod(self.grid())

    def batch_flops(self, batch: dict[str, Tensor]) -> float:
        return 3.0 * batch["latents"].shape[0] * self.config.forward_flops(self.grid(), self.text_len)
