"""Diffusion transformer over spacetime latent patches, of the Wan2.1 DiT family.

Latents (B, 16, T, H, W) are cut into 1x2x2 patches by a strided Conv3d, giving
T * H/2 * W/2 tokens. Every block runs full spatio-temporal self-attention with
3D rotary position embeddings (the head dimension split into time, height and
width parts), cross-attention to the text tokens, and a feed-forward layer; the
self-attention and the feed-forward layer are modulated (shift, scale, gate:
AdaLN) by the timestep. The head projects each token back to its patch of
velocity, and `unpatchify` reassembles (B, 16, T, H, W).

Timesteps: the model takes t in [0, 1000], one per latent frame (B, T); a (B,)
or scalar t applies to every frame. t = 1000 * sigma, where flow matching
mixes x_sigma = (1 - sigma) x_0 + sigma * noise: t = 0 is a clean frame (a
condition, in image-to-video or extension), t = 1000 pure noise. This is
Wan2.1's scale, so its weights need no rescaling. Every token is modulated by
its own frame's t; the text and the rest of the network do not depend on t.

Sizes are native: the token grid and the RoPE positions come from the input's
shape, so any T and any H, W divisible by the patch size go through the same
weights (up to `rope_max_len` patches along each axis).

Absolute positions (optional, `abs_pos_embed`; off in Wan2.1's sizes): RoPE only
tells a token where the others are relative to it, so from pure noise (t = 1000,
translation-invariant) a RoPE-only model cannot say "early frames hold the object
on the right, late frames on the left", which is what "moving left" means on
average. With `abs_pos_embed`, every token also gets a linear map of Fourier
features of its normalised place in the clip: time i / (F - 1) (0 for one
frame), height and width (index + 0.5) / count, each in [0, 1], so any size and
length is covered without interpolation. The map starts at zero: a model grown
from a RoPE-only one computes the same function until it has trained.

Text: tokens (B, L, text_dim) with an optional bool mask (B, L), True for real
tokens. Padded tokens get no attention weight; a row with no real token at all
(an unconditional prompt encoded as pure padding) makes cross-attention add
nothing but its output bias, and no NaN.

Image branch (optional, `img_dim`; Wan2.1 I2V-14B and FLF2V-14B): CLIP image features
(B, N, img_dim) (the penultimate layer of a ViT-H/14: N = 257 per image, 1280 wide) are
embedded by `img_emb` (LayerNorm, Linear, exact GELU, Linear to `dim`, LayerNorm; FLF2V
first adds a learned position `img_emb.emb_pos` over its `img_pos_len` = 2 x 257 tokens of
the first and the last frame), and every block's cross-attention attends to them with its
own keys and values (`k_img`, `norm_k_img`, `v_img`; the same queries, no mask) beside the
text, the two attention outputs summed before `o`. The latents then carry the conditioning
too (`in_channels` 36 = 16 noisy + 4 mask + 16 image latents), which is the caller's layout.

VACE (optional, `vace_layers`; Wan2.1 VACE-1.3B / 14B, Alibaba's "all-in-one video creation and
editing"): a second, parallel stack of blocks reads a context video beside the noise. Its
input, `vace` (B, vace_in_channels, T', H, W), is what the caller makes of a source video, a
mask of what to generate and reference images (96 channels in Wan: the latents of the kept
pixels, the latents of the pixels to regenerate, and the pixel mask folded into 64 channels);
`vace_patch_embedding` cuts it into patches like the latents (T' <= T: missing frames are
zero tokens). `vace_blocks.0` first adds the noisy tokens through `before_proj`, each VACE
block is a plain block over the context tokens, and its `after_proj` output (a "hint") is
added, times a scale, after the main block `vace_layers[k]`. Without `vace` the VACE branch
does not run, and the main blocks compute the base model they were trained from.

Parameter names follow Wan2.1's original release exactly (patch_embedding,
text_embedding.{0,2}, time_embedding.{0,2}, time_projection.1, blocks.N.
{norm3, self_attn, cross_attn, ffn.{0,2}, modulation}, head.{head, modulation}, and for
I2V img_emb.{proj.{0,1,3,4}, emb_pos}, cross_attn.{k_img, v_img, norm_k_img}; for VACE
vace_patch_embedding, vace_blocks.N.{...block's names, before_proj (N = 0), after_proj}),
so its checkpoints need no renaming; `adapters.py` maps diffusers' layout.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kino.errors import KinoUserError
from kino.models.folder import reject_unknown_fields

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: each (L, head_dim / 2), fp32
POSITION_BANDS = 4  # Fourier frequencies per axis of the absolute-position embedding
INTEGER_ROPE = (1.0, 1.0, 1.0)  # rope_scale of Wan2.1 and of every DiT not regrown with finer patches


class DiTInputError(KinoUserError, ValueError):
    """Latents, timesteps or text the DiT cannot take; the message names what is allowed."""


# ---------------------------------------------------------------------------- attention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention: q (B, Lq, H, Dh), k and v (B, Lk, H, Dh) -> (B, Lq, H, Dh).

    `mask` (B, Lk) bool marks the keys that exist (True); the others get no weight. A row
    whose keys are all masked attends to nothing and returns zeros (softmax over no keys
    would be 0/0). Every attention in the model goes through here: the one place other
    kernels (flash, varlen, sequence-parallel) plug in.
    """
    q, k, v = (u.transpose(1, 2) for u in (q, k, v))  # (B, H, L, Dh): SDPA's layout, views only
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    has_keys = mask.any(dim=-1)  # (B,)
    # Let empty rows attend everywhere (finite softmax), then zero them: no data-dependent branch.
    safe = (mask | ~has_keys[:, None])[:, None, None, :]  # (B, 1, 1, Lk)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe)  # (B, H, Lq, Dh)
    return (out * has_keys[:, None, None, None].to(out.dtype)).transpose(1, 2)


# ---------------------------------------------------------------------------- small functions


def check_skip_blocks(blocks: Collection[int], num_layers: int) -> frozenset[int]:
    """The set of block indices to skip, each in [0, num_layers), or a clear error."""
    try:
        skip = frozenset(operator.index(b) for b in blocks)
    except TypeError:
        raise DiTInputError(f"blocks to skip are block indices (integers), got {blocks!r}") from None
    bad = sorted(b for b in skip if not 0 <= b < num_layers)
    if bad:
        raise DiTInputError(f"no block {bad[0]} to skip: this DiT has blocks 0..{num_layers - 1}")
    return skip


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (..., ) -> (..., dim): [cos(t f_i), sin(t f_i)], f_i = max_period^(-i / (dim/2)).

    Computed in fp32 the way diffusers does (same operations, so the same rounding): at
    t = 1000 the largest angles are ~1000 rad, where one fp32 ulp is 6e-5, so any other
    formula would already differ visibly. Wan's original code uses fp64 here; the two differ
    by that rounding only.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / half)  # (half,)
    angles = t.float()[..., None] * freqs  # (..., half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (..., dim)


def rope_frequencies(grid: tuple[int, int, int], axes_dims: tuple[int, int, int], theta: float, device,
                     scale: tuple[float, float, float] = INTEGER_ROPE) -> Rope:
    """cos and sin of the rotary angles for a (frames, height, width) token grid, tokens in (t, h, w) order.

    The head dimension is split into a time, a height and a width part (`axes_dims`); each
    part rotates its channel pairs by its own axis' position, the token's index along that
    axis times `scale` (1 in Wan; 0.5 for a DiT whose patches were halved on that axis, so
    that two neighbouring tokens stand as far apart as before, `grow.py`). Angles are taken in fp64 on
    the CPU (positions times frequencies lose precision in fp32 at large positions) and only
    the per-axis tables, sum(grid) rows, travel to `device`.
    """
    parts_cos, parts_sin = [], []
    for axis, (n, d, step) in enumerate(zip(grid, axes_dims, scale)):
        inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
        angles = torch.outer(torch.arange(n, dtype=torch.float64) * step, inv_freq)  # (n, d/2)
        shape = [1, 1, 1, d // 2]
        shape[axis] = n
        size = (*grid, d // 2)
        parts_cos.append(angles.cos().float().to(device).view(shape).expand(size))
        parts_sin.append(angles.sin().float().to(device).view(shape).expand(size))
    cos = torch.cat(parts_cos, dim=-1).flatten(0, 2)  # (F*H*W, Dh/2)
    sin = torch.cat(parts_sin, dim=-1).flatten(0, 2)
    return cos, sin


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate adjacent channel pairs (x[2i], x[2i+1]) of (B, L, H, Dh) by the angles in `rope`."""
    cos, sin = (u[:, None, :] for u in rope)  # (L, 1, Dh/2)
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each (B, L, H, Dh/2)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, L, H, Dh/2, 2)
    return out.flatten(-2).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, F*S, D) * (1 + scale) + shift, with shift and scale (B, F, D) per frame."""
    frames = shift.shape[1]
    y = x.unflatten(1, (frames, -1)) * (1 + scale[:, :, None]) + shift[:, :, None]  # (B, F, S, D)
    return y.flatten(1, 2)


def gate(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Residual x + y * g, with g (B, F, D) per frame; summed in fp32, returned in x's dtype."""
    frames = g.shape[1]
    out = x.float().unflatten(1, (frames, -1)) + y.float().unflatten(1, (frames, -1)) * g[:, :, None]
    return out.flatten(1, 2).to(x.dtype)  # (B, L, D)


# ---------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, computed in fp32 (Wan's q/k norm, across all heads)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


class FloatLayerNorm(nn.LayerNorm):
    """LayerNorm in fp32 that returns fp32: the modulation math after it stays in fp32 as in Wan."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class Attention(nn.Module):
    """Self-attention (context=None, with RoPE) or cross-attention to `context` (no positions).

    With `image` (Wan's I2V cross-attention), the queries also attend to image tokens
    through their own key/value projections, and the two outputs are summed before `o`.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float, image: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        if image:  # Wan's WanI2VCrossAttention: image tokens (already `dim` wide) as extra keys/values
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        # Set from outside by `parallelize` on self-attention when a clip's tokens are split
        # across ranks: it then attends over every rank's tokens (kino/training/sequence_parallel.py).
        self.sequence_parallel = None

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        rope: Rope | None = None,
        image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        source = x if context is None else context
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))  # (B, L, H, Dh)
        k = self.norm_k(self.k(source)).unflatten(-1, (self.num_heads, -1))  # (B, Lk, H, Dh)
        v = self.v(source).unflatten(-1, (self.num_heads, -1))
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if self.sequence_parallel is None:
            out = attention(q, k, v, context_mask)  # (B, L, H, Dh)
        else:
            out = self.sequence_parallel.attention(attention, q, k, v, context_mask)
        if image is not None:  # (B, Li, D) embedded image tokens, all real
            k_img = self.norm_k_img(self.k_img(image)).unflatten(-1, (self.num_heads, -1))
            v_img = self.v_img(image).unflatten(-1, (self.num_heads, -1))
            out = out + attention(q, k_img, v_img)
        return self.o(out.flatten(2))  # (B, L, D)


class Block(nn.Module):
    """AdaLN-modulated self-attention, plain cross-attention to text, modulated feed-forward.

    Wan's names: norm1 before self-attention, norm3 before cross-attention (the only one
    with weights, when cross_attn_norm), norm2 before the feed-forward layer.
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        dim, eps = config.dim, config.eps
        self.norm1 = FloatLayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = Attention(dim, config.num_heads, config.qk_norm, eps)
        self.norm3 = FloatLayerNorm(dim, eps) if config.cross_attn_norm else nn.Identity()
        self.cross_attn = Attention(dim, config.num_heads, config.qk_norm, eps, image=config.img_dim is not None)
        self.norm2 = FloatLayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(config.ffn_dim, dim)
        )
        # Learned offsets added to the timestep's projection: shift, scale, gate for self-attention, then FFN.
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))

    def forward(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None,
        rope: Rope,
        image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, F*S, D) tokens, e (B, F, 6, D) per-frame time projection, context (B, Lt, D) text,
        image (B, Li, D) embedded image tokens (I2V DiTs only)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e.float()).unbind(2)  # (B, F, D)
        y = self.self_attn(modulate(self.norm1(x), shift1, scale1).to(x.dtype), rope=rope)
        x = gate(x, y, gate1)
        x = x + self.cross_attn(self.norm3(x).to(x.dtype), context, context_mask, image=image)
        y = self.ffn(modulate(self.norm2(x), shift2, scale2).to(x.dtype))
        return gate(x, y, gate2)  # (B, L, D)


class VaceBlock(Block):
    """A VACE block (Wan's VaceWanAttentionBlock): a plain block over the context tokens; the
    first also takes in the noisy tokens (`before_proj`), and each gives a hint for its main
    block through `after_proj`."""

    def __init__(self, config: DiTConfig, first: bool) -> None:
        super().__init__(config)
        self.before_proj = nn.Linear(config.dim, config.dim) if first else None
        self.after_proj = nn.Linear(config.dim, config.dim)

    def forward(self, c: torch.Tensor, x: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
        """c (B, L, D) context tokens, x (B, L, D) the noisy tokens before the main blocks, then
        Block's arguments -> (hint, c after this block)."""
        if self.before_proj is not None:
            c = self.before_proj(c) + x
        c = super().forward(c, *args)
        return self.after_proj(c), c


class Head(nn.Module):
    """Modulated norm and a linear layer from each token to its patch: (B, L, D) -> (B, L, pt*ph*pw*C)."""

    def __init__(self, dim: int, out_channels: int, patch_size: tuple[int, int, int], eps: float) -> None:
        super().__init__()
        self.norm = FloatLayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_channels * math.prod(patch_size))
        self.modulation = nn.Parameter(torch.empty(1, 2, dim))  # offsets for shift, scale

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """e (B, F, D): the per-frame time embedding itself (before the 6-way projection)."""
        shift, scale = (self.modulation.float()[:, None] + e.float()[:, :, None]).unbind(2)  # (B, F, D)
        return self.head(modulate(self.norm(x), shift, scale).to(x.dtype))


class ImageEmbedding(nn.Module):
    """Wan's MLPProj: CLIP image features (B, N, img_dim) -> (B, N, dim) context tokens.

    `proj` keeps Wan's nn.Sequential indices (0 LayerNorm, 1 Linear, 2 GELU, 3 Linear,
    4 LayerNorm; torch's default eps 1e-5, exact GELU). FLF2V adds `emb_pos` (1, pos_len,
    img_dim) to the features of the first and last frame, concatenated along N first.
    """

    def __init__(self, img_dim: int, dim: int, pos_len: int | None) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            FloatLayerNorm(img_dim), nn.Linear(img_dim, img_dim), nn.GELU(), nn.Linear(img_dim, dim),
            FloatLayerNorm(dim),
        )
        self.emb_pos = nn.Parameter(torch.zeros(1, pos_len, img_dim)) if pos_len is not None else None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.emb_pos is not None:
            image = image + self.emb_pos.to(image.dtype)
        weight = self.proj[1].weight
        y = self.proj[3](self.proj[2](self.proj[1](self.proj[0](image).to(weight.dtype))))
        return self.proj[4](y).to(weight.dtype)


class _Hinted(nn.Module):
    """A main block followed by its VACE hint: block(x, ...) + hint (for one forward pass)."""

    def __init__(self, block: nn.Module, hint: torch.Tensor) -> None:
        super().__init__()
        self.block, self.hint = block, hint

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        return self.block(x, *args) + self.hint.to(x.dtype)


# ---------------------------------------------------------------------------- the model


def position_features(grid: tuple[int, int, int], bands: int, device) -> torch.Tensor:
    """(F*h*w, 6 * bands) Fourier features of each token's normalised (time, height, width)
    place, in the token order of the patch embedding: sin and cos of pi * k * a, k = 1..bands,
    for a = i / (F - 1) (0 when F = 1), (j + 0.5) / h and (l + 0.5) / w."""
    f, h, w = grid
    time = torch.arange(f, device=device, dtype=torch.float32) / max(f - 1, 1)
    height = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    width = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    coords = torch.stack(torch.meshgrid(time, height, width, indexing="ij"), dim=-1).reshape(-1, 3)  # (L, 3)
    angles = math.pi * coords[:, :, None] * torch.arange(1, bands + 1, device=device, dtype=torch.float32)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)  # (L, 3 * 2 * bands)


class DiT(nn.Module):
    """Velocity model: latents (B, C, T, H, W), t (B, T) in [0, 1000], text (B, L, text_dim) -> (B, C_out, T, H, W)."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        patch = config.patch_size
        self.patch_embedding = nn.Conv3d(config.in_channels, dim, kernel_size=patch, stride=patch)
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        # Wan2.1 I2V / FLF2V: CLIP image features -> extra cross-attention context (module doc).
        self.img_emb = ImageEmbedding(config.img_dim, dim, config.img_pos_len) if config.img_dim is not None else None
        # A plain ModuleList: activation checkpointing, FSDP and compile wrap its entries from outside.
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.num_layers)])
        self.head = Head(dim, config.out_channels, config.patch_size, config.eps)
        # Wan2.1 VACE (module doc): the context's patch embedding and its own stack of blocks.
        self.vace_patch_embedding = self.vace_blocks = None
        if config.vace_layers:
            self.vace_patch_embedding = nn.Conv3d(config.vace_in_channels, dim, kernel_size=patch, stride=patch)
            self.vace_blocks = nn.ModuleList([VaceBlock(config, i == 0) for i in range(len(config.vace_layers))])
        # kino's addition, off for Wan2.1 (see the module doc): absolute place -> token offset.
        self.pos_embedding = nn.Linear(6 * POSITION_BANDS, dim) if config.abs_pos_embed else None
        # Set from outside by `parallelize` to split each clip's tokens across ranks (Ulysses):
        # None keeps every token on this device.
        self.sequence_parallel = None
        # Set from outside for one sampling run (kino/models/dit/cache.py): None runs every block.
        self.step_cache = None
        self.init_weights()

    def init_weights(self) -> None:
        if next(self.parameters()).is_meta:  # built to be given a file's tensors (load_module):
            return  # nothing to draw, and meta-device init would import torch._dynamo (~1 s)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)  # Wan's default for every linear layer
                nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, FloatLayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Xavier over the flattened kernel, like a linear layer over the patch (Wan); a Conv3d's
        # own fans would count the kernel volume on the output side too.
        for embed in (self.patch_embedding, self.vace_patch_embedding):
            if embed is not None:
                nn.init.xavier_uniform_(embed.weight.view(self.config.dim, -1))
                nn.init.zeros_(embed.bias)
        # Small conditioning embeddings (Wan): text and time start as gentle perturbations.
        for embedding in (self.text_embedding, self.time_embedding):
            for m in embedding:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        # Modulation offsets ~ N(0, 1/dim), as Wan: the gates start small but nonzero, so every
        # block passes gradient from the first step that the head lets through.
        for m in self.modules():
            if isinstance(m, (Block, Head)):
                nn.init.normal_(m.modulation, std=self.config.dim**-0.5)
        # A fresh VACE branch adds nothing (zero hints), as ControlNet's zero convolutions.
        for block in self.vace_blocks or ():
            nn.init.zeros_(block.after_proj.weight)
            nn.init.zeros_(block.after_proj.bias)
        # Zero-init the output layer (DiT; Wan's release does the same): a fresh model predicts
        # zero velocity, the mean of the target under any symmetric noise, so training starts
        # from a flat, small loss rather than from random outputs. Until it has taken a step,
        # only the head receives gradient (everything else reaches the loss through its weight).
        nn.init.zeros_(self.head.head.weight)
        nn.init.zeros_(self.head.head.bias)
        if self.img_emb is not None and self.img_emb.emb_pos is not None:
            nn.init.zeros_(self.img_emb.emb_pos)  # Wan's: torch.zeros
        # Zero too: absolute positions start as no change, so a RoPE-only model grows one exactly.
        if self.pos_embedding is not None:
            nn.init.zeros_(self.pos_embedding.weight)
            nn.init.zeros_(self.pos_embedding.bias)

    def all_blocks(self) -> list[nn.Module]:
        """Every transformer block in the order a forward pass runs them: a VACE DiT's VACE
        blocks, then the main ones (for memory plans, sharding and compiling, which treat
        each block alike)."""
        return [*(self.vace_blocks or ()), *self.blocks]

    # -- pieces of the forward pass, public so that callers and tests can look inside

    def frame_timesteps(self, t: torch.Tensor | float, batch: int, frames: int, device) -> torch.Tensor:
        """Scalar, (B,) or (B, T) timesteps -> (B, T / pt): one per token frame."""
        t = torch.as_tensor(t, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.ndim == 1 and t.shape[0] == batch:
            t = t[:, None].expand(batch, frames)
        if t.shape != (batch, frames):
            raise DiTInputError(
                f"t must be a scalar, ({batch},) or ({batch}, {frames}) (one per latent frame), in [0, 1000]; "
                f"got shape {tuple(t.shape)}"
            )
        pt = self.config.patch_size[0]
        if pt > 1:
            per_patch = t.unflatten(1, (frames // pt, pt))  # (B, F, pt)
            if not (per_patch == per_patch[..., :1]).all():
                raise DiTInputError(f"the {pt} latent frames of a temporal patch must share one t")
            t = per_patch[..., 0]
        return t  # (B, F)

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, F) timesteps -> e (B, F, D) for the head and e0 (B, F, 6, D) for the blocks.

        Rows are computed independently, so frame k's modulation depends on t[:, k] only.
        """
        weight = self.time_embedding[0].weight
        e = self.time_embedding(timestep_embedding(t, self.config.freq_dim).to(weight.dtype))  # (B, F, D)
        e0 = self.time_projection(e).unflatten(-1, (6, self.config.dim))  # (B, F, 6, D)
        return e, e0

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, F*h*w, pt*ph*pw*C) head output -> (B, C, F*pt, h*ph, w*pw); per token (pt, ph, pw, C) as in Wan."""
        pt, ph, pw = self.config.patch_size
        x = x.unflatten(1, grid).unflatten(-1, (pt, ph, pw, -1))  # (B, F, h, w, pt, ph, pw, C)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, F, pt, h, ph, w, pw)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # (B, C, T, H, W)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        skip_blocks: Collection[int] = (),
        vace: torch.Tensor | None = None,
        vace_scale: float | Sequence[float] | torch.Tensor = 1.0,
    ) -> torch.Tensor:
        """Velocity for latents x (B, C, T, H, W) at timesteps t ((B, T), (B,) or scalar, in [0, 1000])
        given text tokens (B, L, text_dim) and an optional mask (B, L), True for real tokens.

        `image` (B, N, img_dim): CLIP image features, required by a DiT with an image branch
        (`img_dim`) and refused by one without; FLF2V's N is `img_pos_len` (first frame's
        tokens, then the last frame's).

        `skip_blocks`: indices of transformer blocks to leave out (their input passes on
        unchanged, and so does a VACE hint after them): the weakened model of skip-layer
        guidance (`sample_latents`).

        `vace` (B, vace_in_channels, T', H, W), T' <= T: a VACE DiT's context (module doc);
        `vace_scale`: the weight of its hints, one number or one per VACE block."""
        grid = self._check_inputs(x, text, text_mask)
        self._check_image(image, x.shape[0])
        scales = self._check_vace(vace, vace_scale, x.shape)
        skip = check_skip_blocks(skip_blocks, len(self.blocks))
        b, _, frames = x.shape[:3]
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)  # (B, F*h*w, D), in (t, h, w) order
        if self.pos_embedding is not None:
            weight = self.pos_embedding.weight
            tokens = tokens + self.pos_embedding(position_features(grid, POSITION_BANDS, x.device).to(weight.dtype))
        rope = rope_frequencies(grid, self.config.rope_dims, self.config.rope_theta, x.device, self.config.rope_scale)
        e, e0 = self.embed_time(self.frame_timesteps(t, b, frames, x.device))  # (B, F, D), (B, F, 6, D)
        context = self.text_embedding(text)  # (B, L, D)
        mask = None if text_mask is None else text_mask.bool()
        image_tokens = None if image is None else self.img_emb(image)  # (B, N, D)
        controls = None
        if vace is not None:  # (B, F'*h*w, D) context tokens, zeros for the frames it lacks
            embed = self.vace_patch_embedding
            controls = embed(vace.to(embed.weight.dtype)).flatten(2).transpose(1, 2)
            controls = F.pad(controls, (0, 0, 0, tokens.shape[1] - controls.shape[1]))
        sp = self.sequence_parallel
        if sp is not None:  # keep this rank's tokens, with the RoPE angles of their global positions
            if controls is not None:
                controls = sp.shard(controls, rope, grid)[0]
            tokens, rope = sp.shard(tokens, rope, grid)  # (B, F*h*w/P, D)
        args = (e0, context, mask, rope, image_tokens)
        hints = {}  # VACE: every hint first (Wan's order), each added after its main block
        if controls is not None:
            for layer, block, scale in zip(self.config.vace_layers, self.vace_blocks, scales):
                hint, controls = block(controls, tokens, *args)
                hints[layer] = hint * scale
        run = [_Hinted(block, hints[i]) if i in hints else block
               for i, block in enumerate(self.blocks) if i not in skip]
        if self.step_cache is not None and len(run) > 1:
            key = (tuple(x.shape), tuple(sorted(skip)), None if image is None else tuple(image.shape),
                   None if vace is None else tuple(vace.shape))
            tokens = self.step_cache.run(run, tokens, args, key, text, None if sp is None else sp.group)
        else:
            for block in run:
                tokens = block(tokens, *args)
        out = self.head(tokens, e)  # (B, L, pt*ph*pw*C_out)
        if sp is not None:
            out = sp.gather(out, grid)  # (B, F*h*w, pt*ph*pw*C_out)
        return self.unpatchify(out, grid)  # (B, C_out, T, H, W)

    def _check_vace(self, vace: torch.Tensor | None, scale, shape: torch.Size) -> list:
        """The per-VACE-block scales, or a clear error for a context the DiT cannot take."""
        c = self.config
        if vace is None:
            return []
        if not c.vace_layers:
            raise DiTInputError("this DiT has no VACE branch (vace_layers): it takes no VACE context")
        b, _, frames, height, width = shape
        if vace.ndim != 5 or vace.shape[0] != b or vace.shape[1] != c.vace_in_channels \
                or vace.shape[3:] != (height, width) or not 1 <= vace.shape[2] <= frames:
            raise DiTInputError(f"a VACE context must be a ({b}, {c.vace_in_channels}, T', {height}, {width}) tensor "
                                f"with 1 <= T' <= {frames} (the latents' frames); got shape {tuple(vace.shape)}")
        if vace.shape[2] % c.patch_size[0]:
            raise DiTInputError(f"a VACE context's frames must be a multiple of {c.patch_size[0]}")
        n = len(c.vace_layers)
        scales = torch.as_tensor(scale, dtype=torch.float32).flatten().tolist()
        if len(scales) == 1:
            scales = scales * n
        if len(scales) != n or not all(math.isfinite(s) for s in scales):
            raise DiTInputError(f"the VACE scale is one number or {n} (one per VACE block), all finite; got {scale!r}")
        return scales

    def _check_image(self, image: torch.Tensor | None, batch: int) -> None:
        c = self.config
        if c.img_dim is None:
            if image is not None:
                raise DiTInputError("this DiT has no image branch (img_dim is None): it takes no image features")
            return
        n = "N" if c.img_pos_len is None else str(c.img_pos_len)
        if image is None or image.ndim != 3 or image.shape[0] != batch or image.shape[2] != c.img_dim \
                or image.shape[1] == 0 or (c.img_pos_len is not None and image.shape[1] != c.img_pos_len):
            got = "none" if image is None else f"shape {tuple(image.shape)}"
            raise DiTInputError(f"this DiT has an image branch: image features must be a ({batch}, {n}, {c.img_dim}) "
                                f"tensor (CLIP's penultimate hidden states); got {got}")

    def _check_inputs(
        self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None
    ) -> tuple[int, int, int]:
        c = self.config
        if x.ndim != 5 or x.shape[1] != c.in_channels or 0 in x.shape:
            raise DiTInputError(
                f"latents must be a non-empty (B, {c.in_channels}, T, H, W) tensor (an image is T = 1); "
                f"got shape {tuple(x.shape)}"
            )
        sizes = x.shape[2:]
        bad = [(name, n, p) for name, n, p in zip(("frames", "height", "width"), sizes, c.patch_size) if n % p]
        if bad:
            def near(n: int, p: int) -> str:
                lo, hi = n // p * p, -(-n // p) * p
                return f"{hi}" if lo in (0, hi) else f"{lo} or {hi}"

            allowed = ", ".join(f"{name} {near(n, p)}" for name, n, p in bad)
            raise DiTInputError(
                f"latent frames, height and width must be multiples of the patch size "
                f"{'x'.join(map(str, c.patch_size))}; got {'x'.join(map(str, sizes))} (nearest allowed: {allowed})"
            )
        grid = tuple(n // p for n, p in zip(sizes, c.patch_size))
        if max(grid) > c.rope_max_len:
            raise DiTInputError(f"at most {c.rope_max_len} patches along each axis (rope_max_len); got a {grid} grid")
        if text.ndim != 3 or text.shape[0] != x.shape[0] or text.shape[2] != c.text_dim or text.shape[1] == 0:
            raise DiTInputError(
                f"text must be a ({x.shape[0]}, L, {c.text_dim}) tensor with L >= 1; got shape {tuple(text.shape)}"
            )
        if text_mask is not None and (text_mask.shape != text.shape[:2] or text_mask.is_floating_point()):
            raise DiTInputError(
                f"text_mask must be a bool (or 0/1 integer) tensor of shape {tuple(text.shape[:2])}, True for real "
                f"tokens; got {text_mask.dtype} {tuple(text_mask.shape)}"
            )
        return grid  # (F, h, w)


# ---------------------------------------------------------------------------- configs and sizes


@dataclass
class DiTConfig:
    """Size of a DiT. Defaults are kino's "small" size.

    `dim` is the model width, split into `num_heads` heads; `text_dim` is the width of the
    text encoder's tokens (384 for all-MiniLM-L6-v2, 4096 for UMT5-XXL). RoPE splits each
    head into a time part and equal height and width parts (`rope_dims`, Wan's split).
    """

    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 16
    out_channels: int = 16
    dim: int = 256
    ffn_dim: int = 1024
    freq_dim: int = 256
    text_dim: int = 384
    num_heads: int = 4
    num_layers: int = 8
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_len: int = 1024
    rope_theta: float = 10000.0
    abs_pos_embed: bool = False  # kino's absolute-position embedding (module doc); Wan2.1 has none
    # Wan2.1 I2V / FLF2V image branch (module doc): width of the CLIP image features (1280), and
    # the length of FLF2V's learned position over the image tokens (2 x 257). None: no branch.
    img_dim: int | None = None
    img_pos_len: int | None = None
    # RoPE position of a token = its index along (t, h, w) times this (kino's; 1 in Wan2.1): a
    # DiT regrown with halved patches (grow.py) keeps its trained geometry with 0.5.
    rope_scale: tuple[float, float, float] = INTEGER_ROPE
    # Wan2.1 VACE (module doc): the main blocks after which the VACE blocks' hints are added
    # (one VACE block each; the first must be 0), and the context's channels. None: no VACE.
    vace_layers: tuple[int, ...] | None = None
    vace_in_channels: int = 96

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self.rope_scale = tuple(float(s) for s in self.rope_scale)
        if len(self.rope_scale) != 3 or min(self.rope_scale) <= 0:
            raise ValueError(f"rope_scale must be three positive numbers (t, h, w); got {self.rope_scale}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive ints (t, h, w); got {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} must be divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 8:
            raise ValueError(f"head_dim (dim / num_heads) must be even and >= 8 for 3D RoPE; got {self.head_dim}")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even; got {self.freq_dim}")
        if self.img_dim is not None and self.img_dim < 1:
            raise ValueError(f"img_dim must be a positive width or None; got {self.img_dim}")
        if self.vace_layers is not None:
            self.vace_layers = tuple(int(i) for i in self.vace_layers)
            layers = self.vace_layers
            if not layers or layers[0] != 0 or list(layers) != sorted(set(layers)) or layers[-1] >= self.num_layers:
                raise ValueError(f"vace_layers must be increasing block indices starting at 0, below num_layers "
                                 f"{self.num_layers}; got {list(layers)}")
            if self.vace_in_channels < 1:
                raise ValueError(f"vace_in_channels must be positive; got {self.vace_in_channels}")
        if self.img_pos_len is not None and (self.img_dim is None or self.img_pos_len < 1):
            raise ValueError(f"img_pos_len ({self.img_pos_len}) needs an image branch (img_dim) and must be positive")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Channels of each head rotated by the (t, h, w) position; all even, summing to head_dim."""
        hw = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * hw, hw, hw

    def forward_flops(self, grid: tuple[int, int, int], text_len: int, image_len: int = 0) -> float:
        """Matmul FLOPs (2 per multiply-add) of one clip's forward pass with a (F, h, w) token
        grid, `text_len` text tokens and `image_len` image tokens (I2V): the model's own count, for MFU (training = 3x this;
        activation checkpointing's recompute is not counted, by convention). Norms, RoPE,
        softmax and the time embedding (one row per frame) are left out: under 1% here."""
        d, n, lt = self.dim, math.prod(grid), text_len
        patch = math.prod(self.patch_size)
        block = (
            4 * n * d * d  # self-attention q, k, v, o
            + 2 * n * n * d  # scores and weighted values
            + 2 * n * d * d + 2 * lt * d * d  # cross-attention q, o on tokens; k, v on text
            + 2 * n * lt * d  # cross-attention scores and values
            + 2 * n * d * self.ffn_dim  # feed-forward
        )
        embed = n * self.in_channels * patch * d + lt * (self.text_dim * d + d * d)
        if self.abs_pos_embed:
            embed += n * 6 * POSITION_BANDS * d
        if self.img_dim is not None and image_len:
            li = image_len
            block += 2 * li * d * d + 2 * n * li * d  # k_img, v_img; scores and values
            embed += li * (self.img_dim * self.img_dim + self.img_dim * d)
        head = n * d * self.out_channels * patch
        vace = 0
        if self.vace_layers:  # its blocks, their after_proj (and the first's before_proj), the context's patches
            vace = len(self.vace_layers) * (block + n * d * d) + n * d * d + n * self.vace_in_channels * patch * d
        return 2.0 * (self.num_layers * block + embed + head + vace)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        for key in ("img_dim", "img_pos_len"):  # written only when set: T2V configs stay as they were
            if d[key] is None:
                del d[key]
        if self.vace_layers is None:
            del d["vace_layers"], d["vace_in_channels"]
        else:
            d["vace_layers"] = list(self.vace_layers)
        if self.rope_scale == INTEGER_ROPE:  # likewise: Wan's and every earlier kino config
            del d["rope_scale"]
        else:
            d["rope_scale"] = list(self.rope_scale)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DiTConfig:
        reject_unknown_fields(cls, d)
        return cls(**d)


DIT_SIZES: dict[str, DiTConfig] = {
    # Every layer kind at the smallest widths RoPE allows: tests only.
    "tiny": DiTConfig(dim=32, ffn_dim=64, freq_dim=32, text_dim=24, num_heads=2, num_layers=2),
    "tiny-abspos": DiTConfig(dim=32, ffn_dim=64, freq_dim=32, text_dim=24, num_heads=2, num_layers=2,
                             abs_pos_embed=True),
    "tiny-abspos-3": DiTConfig(dim=32, ffn_dim=64, freq_dim=32, text_dim=24, num_heads=2, num_layers=3,
                               abs_pos_embed=True),
    "tiny-vace": DiTConfig(dim=32, ffn_dim=64, freq_dim=32, text_dim=24, num_heads=2, num_layers=3, vace_layers=(0, 2)),
    "tiny-abspos-p1": DiTConfig(dim=32, ffn_dim=64, freq_dim=32, text_dim=24, num_heads=2, num_layers=2,
                                abs_pos_embed=True, patch_size=(1, 1, 1), rope_scale=(1.0, 0.5, 0.5)),
    # kino's default for Shapes World, trained on a CPU (MiniLM text tokens, 384 wide): 256 wide,
    # 8 layers, 4 heads of 64. 9.16M params. Batch 8, 32 text tokens, one CPU thread beside a busy
    # process: 17x64x64 clips (5x8x8 latents, 80 tokens) fwd 0.21-0.24 s, fwd+bwd 0.53-0.75 s;
    # 64x96 images (1x8x12 latents, 24 tokens) fwd 0.07 s, fwd+bwd 0.22-0.26 s. (384 wide, 6 heads:
    # 20.4M params, 0.61 s / 1.54 s on the clips: twice the step time for a world this simple.)
    "small": DiTConfig(),
    # "small" with kino's absolute-position embedding (the shipped default from stage 5 on; a
    # "small" DiT grows into it exactly: the new layer starts at zero).
    "small-abspos": DiTConfig(abs_pos_embed=True),
    # "small-abspos" 12 blocks deep (13.4M params): a trained "small-abspos" grows into it exactly
    # (kino/models/dit/grow.py: new blocks start as the identity), ~1.5x its step time.
    "small-abspos-12": DiTConfig(abs_pos_embed=True, num_layers=12),
    # "small-abspos" over 1x1x1 patches: one token per latent pixel (4x the tokens; 9.15M params).
    # A trained "small-abspos" regrows into it (grow.py: approximately, RoPE positions halved).
    "small-abspos-p1": DiTConfig(abs_pos_embed=True, patch_size=(1, 1, 1), rope_scale=(1.0, 0.5, 0.5)),
    # "small-abspos-p1" 12 blocks deep (13.4M params): the shipped DiT grows into it exactly.
    "small-abspos-p1-12": DiTConfig(abs_pos_embed=True, patch_size=(1, 1, 1), rope_scale=(1.0, 0.5, 0.5),
                                    num_layers=12),
    # "small-abspos-p1"'s token grid over the latents of VAE_SIZES["small-s4"] (space x4): 1x2x2
    # patches of 16 channels, so a token is again 8x8 pixels; a trained "small-abspos-p1" moves
    # to those latents through `grow.change_latents` (9.17M params, as "small-abspos").
    "small-abspos-s4": DiTConfig(abs_pos_embed=True, patch_size=(1, 2, 2), rope_scale=(1.0, 0.5, 0.5)),
    # Wan2.1 T2V 1.3B and 14B (UMT5-XXL text); their weights load into these via adapters.
    "wan2.1-1.3b": DiTConfig(dim=1536, ffn_dim=8960, text_dim=4096, num_heads=12, num_layers=30),
    "wan2.1-14b": DiTConfig(dim=5120, ffn_dim=13824, text_dim=4096, num_heads=40, num_layers=40),
    # Wan2.1 I2V-14B (480p and 720p share it) and FLF2V-14B: 36 input channels (noise, mask, image
    # latents) and the CLIP image branch (ViT-H/14 features, 1280 wide; FLF2V: 2 x 257 positions).
    "wan2.1-i2v-14b": DiTConfig(in_channels=36, dim=5120, ffn_dim=13824, text_dim=4096, num_heads=40, num_layers=40,
                                img_dim=1280),
    "wan2.1-flf2v-14b": DiTConfig(in_channels=36, dim=5120, ffn_dim=13824, text_dim=4096, num_heads=40,
                                  num_layers=40, img_dim=1280, img_pos_len=514),
    # Wan2.2: T2V-A14B and I2V-A14B are two experts of these sizes each (wan2.1-14b; I2V without
    # the CLIP branch); TI2V-5B reads Wan2.2's 48-channel latents.
    # Wan2.1 VACE: the T2V DiTs with a VACE branch (every other block of the 1.3B, every fifth of the 14B).
    "wan2.1-vace-1.3b": DiTConfig(dim=1536, ffn_dim=8960, text_dim=4096, num_heads=12, num_layers=30,
                                  vace_layers=tuple(range(0, 30, 2))),
    "wan2.1-vace-14b": DiTConfig(dim=5120, ffn_dim=13824, text_dim=4096, num_heads=40, num_layers=40,
                                 vace_layers=tuple(range(0, 40, 5))),
    "wan2.2-i2v-a14b": DiTConfig(in_channels=36, dim=5120, ffn_dim=13824, text_dim=4096, num_heads=40, num_layers=40),
    "wan2.2-ti2v-5b": DiTConfig(in_channels=48, out_channels=48, dim=3072, ffn_dim=14336, text_dim=4096, num_heads=24,
                                num_layers=30),
}
