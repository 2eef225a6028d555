"""DiT (kino.models.dit): shapes, per-frame timesteps, text masks, diffusers parity, goldens.

All on CPU with the tiny size and random weights.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from kino.models.dit import (
    DIT_SIZES,
    DiT,
    DiTConfig,
    DiTInputError,
    attention,
    config_from_diffusers,
    from_diffusers,
    to_diffusers,
)
from kino.models.dit.adapters import to_wan
from kino.models.dit.model import POSITION_BANDS, apply_rope, position_features, rope_frequencies

TINY = DIT_SIZES["tiny"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: OpenMP barriers dominate, and beside another busy process two threads run
    10-30x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb(model: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Add seeded noise to every parameter, so zero-initialised ones (the head, biases) and
    norm weights at 1 take part and a wrong mapping or a skipped layer shows up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


def _model(config: DiTConfig = TINY, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    return _perturb(DiT(config), seed + 1).eval()


def _inputs(batch: int, frames: int, height: int, width: int, text_len: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, frames, height, width, generator=gen)
    t = torch.rand(batch, generator=gen) * 1000
    text = torch.randn(batch, text_len, TINY.text_dim, generator=gen)
    return x, t, text


@pytest.fixture(scope="module")
def tiny() -> DiT:
    return _model()


# ---------------------------------------------------------------------------- config


def test_config_json_roundtrip_and_sizes():
    for name, config in DIT_SIZES.items():
        assert DiTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config, name
        assert sum(config.rope_dims) == config.head_dim and all(d % 2 == 0 for d in config.rope_dims)
    assert DIT_SIZES["small"].head_dim == 64 and DIT_SIZES["wan2.1-1.3b"].rope_dims == (44, 42, 42)
    with pytest.raises(ValueError, match="unknown DiTConfig fields"):
        DiTConfig.from_dict({**TINY.to_dict(), "num_attention_heads": 2})
    with pytest.raises(ValueError, match="divisible by num_heads"):
        DiTConfig(dim=30, num_heads=4)
    counts = {}
    for name, config in DIT_SIZES.items():
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in DiT(config).parameters())
    assert counts == {"tiny": 40_608, "tiny-abspos": 41_408, "tiny-abspos-3": 54_432, "tiny-abspos-p1": 38_288,
                      "tiny-vace": 95_168,  # = diffusers' WanVACETransformer3DModel of that size
                      "small": 9_164_096, "small-abspos": 9_170_496, "small-abspos-12": 13_390_400,
                      "small-abspos-p1": 9_145_872, "small-abspos-p1-12": 13_365_776, "small-abspos-s4": 9_170_496,
                      "wan2.1-1.3b": 1_418_996_800, "wan2.1-14b": 14_288_491_584,
                      # = diffusers' WanTransformer3DModel with image_dim 1280 (and pos_embed_seq_len 514)
                      "wan2.1-i2v-14b": 16_394_878_784, "wan2.1-flf2v-14b": 16_395_536_704,
                      # Wan2.2: an I2V-A14B expert (36 channels in, no CLIP branch) and TI2V-5B
                      "wan2.2-i2v-a14b": 14_288_901_184, "wan2.2-ti2v-5b": 4_999_787_712,
                      # = diffusers' WanVACETransformer3DModel at VACE-1.3B's and its default (VACE-14B's) sizes
                      "wan2.1-vace-1.3b": 2_153_972_032, "wan2.1-vace-14b": 17_337_592_896}


# ---------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("frames", [1, 2, 5])
@pytest.mark.parametrize("size", [(4, 4), (4, 6), (6, 4)])
def test_shapes(tiny, frames, size):
    x, t, text = _inputs(2, frames, *size)
    with torch.no_grad():
        out = tiny(x, t, text)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_bad_inputs_name_what_is_allowed(tiny):
    x, t, text = _inputs(1, 2, 4, 6)
    with pytest.raises(DiTInputError, match=r"patch size 1x2x2; got 2x5x6 \(nearest allowed: height 4 or 6\)"):
        tiny(torch.zeros(1, 16, 2, 5, 6), t, text)
    with pytest.raises(ValueError, match=r"got 2x4x7 \(nearest allowed: width 6 or 8\)"):
        tiny(torch.zeros(1, 16, 2, 4, 7), t, text)
    with pytest.raises(ValueError, match=r"\(B, 16, T, H, W\)"):
        tiny(torch.zeros(1, 8, 2, 4, 6), t, text)
    with pytest.raises(ValueError, match=r"t must be a scalar, \(1,\) or \(1, 2\)"):
        tiny(x, torch.zeros(1, 3), text)
    with pytest.raises(ValueError, match=r"text must be a \(1, L, 24\)"):
        tiny(x, t, torch.zeros(1, 5, 7))
    with pytest.raises(ValueError, match="text_mask must be a bool"):
        tiny(x, t, text, torch.ones(1, 5))
    with pytest.raises(ValueError, match="at most 4 patches"):
        _model(DiTConfig(**{**TINY.to_dict(), "rope_max_len": 4}))(torch.zeros(1, 16, 5, 4, 4), t, text)


# ---------------------------------------------------------------------------- timesteps


def test_shared_per_frame_t_equals_scalar_t(tiny):
    x, t, text = _inputs(2, 3, 4, 6)
    with torch.no_grad():
        per_batch = tiny(x, t, text)
        per_frame = tiny(x, t[:, None].expand(2, 3).clone(), text)
        torch.testing.assert_close(per_frame, per_batch, rtol=0, atol=0)
        scalar = tiny(x, 250.0, text)
        torch.testing.assert_close(tiny(x, torch.full((2, 3), 250.0), text), scalar, rtol=0, atol=0)


def test_each_frame_is_modulated_by_its_own_t(tiny):
    x, _, text = _inputs(2, 3, 4, 6)
    t = torch.tensor([[10.0, 500.0, 900.0], [0.0, 0.0, 1000.0]])
    moved = t.clone()
    moved[:, 1] = 700.0
    with torch.no_grad():
        e, e0 = tiny.embed_time(t)
        e_moved, e0_moved = tiny.embed_time(moved)
        assert e.shape == (2, 3, TINY.dim) and e0.shape == (2, 3, 6, TINY.dim)
        for k in (0, 2):
            torch.testing.assert_close(e_moved[:, k], e[:, k], rtol=0, atol=0)
            torch.testing.assert_close(e0_moved[:, k], e0[:, k], rtol=0, atol=0)
        assert not torch.equal(e_moved[:, 1], e[:, 1]) and not torch.equal(e0_moved[:, 1], e0[:, 1])
        assert not torch.allclose(tiny(x, moved, text), tiny(x, t, text))


# ---------------------------------------------------------------------------- text and masks


def test_attention_masks_keys_and_handles_empty_rows():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 2, 8, generator=gen) for _ in range(3))
    mask = torch.tensor([[True, True, False, False], [True, True, True, True], [False] * 4])
    out = attention(q, k, v, mask)
    torch.testing.assert_close(out[0], attention(q[:1, :], k[:1, :2], v[:1, :2])[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], attention(q, k, v)[1], rtol=0, atol=1e-6)
    assert (out[2] == 0).all()  # no keys: attends to nothing


def test_padding_tokens_change_nothing(tiny):
    x, t, text = _inputs(2, 2, 4, 6, text_len=5)
    gen = torch.Generator().manual_seed(5)
    # Row 0 has 5 real tokens, row 1 has 3: pad both to 9 with junk that the mask hides.
    short = text.clone()
    short[1, 3:] = 0.0
    short_mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    padded = torch.cat([short, torch.randn(2, 4, TINY.text_dim, generator=gen) * 10], dim=1)
    padded[1, 3:5] = torch.randn(2, TINY.text_dim, generator=gen) * 10
    padded_mask = torch.cat([short_mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        expected = torch.cat([tiny(x[:1], t[:1], text[:1]), tiny(x[1:], t[1:], text[1:, :3])])
        torch.testing.assert_close(tiny(x, t, short, short_mask), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(tiny(x, t, padded, padded_mask), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(tiny(x, t, padded, padded_mask.int()), expected, rtol=0, atol=1e-6)


def test_all_padding_prompt_is_finite_and_ignores_the_padding(tiny):
    x, t, text = _inputs(2, 2, 4, 6)
    empty = torch.tensor([[True] * 5, [False] * 5])  # row 1: the unconditional (empty) prompt
    with torch.no_grad():
        out = tiny(x, t, text, empty)
        junk = tiny(x, t, text * 100 + 3, empty)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(junk[1], out[1], rtol=0, atol=0)  # nothing of the padding gets through
    assert not torch.allclose(junk[0], out[0])


# ---------------------------------------------------------------------------- RoPE


def test_rope_scores_depend_on_relative_position_only():
    """<R(p) q, R(p') k> depends on p - p' along each axis: shifting a whole clip changes nothing."""
    dims, grid = TINY.rope_dims, (4, 5, 6)
    cos, sin = rope_frequencies(grid, dims, 10000.0, "cpu")
    assert cos.shape == (4 * 5 * 6, TINY.head_dim // 2)
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, 1, TINY.head_dim, generator=gen).expand(1, 120, 1, -1) for _ in range(2))
    scores = torch.einsum("bqhd,bkhd->qk", apply_rope(q, (cos, sin)), apply_rope(k, (cos, sin))).view(*grid, *grid)
    torch.testing.assert_close(scores[1:, 1:, 1:, 1:, 1:, 1:], scores[:-1, :-1, :-1, :-1, :-1, :-1], rtol=0, atol=1e-5)
    assert not torch.allclose(scores[0, 0, 0, 0, 0, 0], scores[0, 0, 0, 1, 0, 0])  # time moves it
    assert not torch.allclose(scores[0, 0, 0, 0, 0, 0], scores[0, 0, 0, 0, 0, 1])  # width moves it


def test_rope_scale_places_tokens_at_fractional_positions():
    """With rope_scale (1, 0.5, 0.5), token (f, 2i, 2j) of a grid twice as fine sits where token
    (f, i, j) of the plain grid sits; the odd ones sit halfway between."""
    dims = TINY.rope_dims
    plain = rope_frequencies((3, 2, 3), dims, 10000.0, "cpu")
    fine = rope_frequencies((3, 4, 6), dims, 10000.0, "cpu", scale=(1.0, 0.5, 0.5))
    for p, f in zip(plain, fine):
        torch.testing.assert_close(f.view(3, 4, 6, -1)[:, ::2, ::2], p.view(3, 2, 3, -1), rtol=0, atol=0)
    half = rope_frequencies((1, 2, 1), dims, 10000.0, "cpu", scale=(1.0, 0.5, 1.0))[0][1]  # position (0, 0.5, 0)
    full = rope_frequencies((1, 2, 1), dims, 10000.0, "cpu")[0][1]  # (0, 1, 0)
    h = slice(dims[0] // 2, (dims[0] + dims[1]) // 2)  # the height part's angles halve
    torch.testing.assert_close(torch.acos(half[h]), torch.acos(full[h]) / 2, rtol=0, atol=1e-5)
    # written to config.json only when set; Wan's layouts cannot express it
    assert "rope_scale" not in TINY.to_dict() and DIT_SIZES["tiny-abspos-p1"].to_dict()["rope_scale"] == [1, 0.5, 0.5]
    with pytest.raises(ValueError, match="rope_scale must be three positive"):
        DiTConfig(rope_scale=(1.0, 0.0, 0.5))
    scaled = DiTConfig(**{**TINY.to_dict(), "rope_scale": (1.0, 0.5, 0.5)})
    from kino.models.dit.adapters import config_to_diffusers, config_to_wan

    for export in (config_to_wan, config_to_diffusers):
        with pytest.raises(ValueError, match="integer positions"):
            export(scaled)


# ---------------------------------------------------------------------------- diffusers parity


def _diffusers_wan(config: DiTConfig, seed: int):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(
        patch_size=config.patch_size,
        num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        text_dim=config.text_dim,
        freq_dim=config.freq_dim,
        ffn_dim=config.ffn_dim,
        num_layers=config.num_layers,
        cross_attn_norm=config.cross_attn_norm,
        qk_norm="rms_norm_across_heads",
        eps=config.eps,
        rope_max_seq_len=config.rope_max_len,
    ).eval()
    return _perturb(model, seed + 1)  # norm weights start at 1, LayerNorm biases at 0


TIME_PATCH = DiTConfig(**{**TINY.to_dict(), "patch_size": (2, 2, 2)})  # Wan's is 1x2x2; the layout allows more


@pytest.mark.parametrize(
    "config, shape", [(TINY, (1, 4, 6)), (TINY, (3, 6, 4)), (TIME_PATCH, (4, 4, 6))], ids=["image", "clip", "pt2"]
)
def test_matches_diffusers_wan_transformer(config, shape):
    reference = _diffusers_wan(config, seed=3)
    state = reference.state_dict()
    assert config_from_diffusers(dict(reference.config)) == config
    model = DiT(config).eval()
    model.load_state_dict(from_diffusers(state), strict=True)

    x, t, text = _inputs(2, *shape, text_len=5, seed=sum(shape))
    with torch.no_grad():
        expected = reference(x, t, text).sample
        assert expected.std() > 0.1  # a comparison of near-zero outputs would prove little
        torch.testing.assert_close(model(x, t, text), expected, rtol=0, atol=1e-5)

        # Masked padding == diffusers without it (diffusers takes no text mask).
        padded = torch.cat([text, torch.randn(2, 3, config.text_dim)], dim=1)
        mask = torch.arange(8)[None].expand(2, 8) < 5
        torch.testing.assert_close(model(x, t, padded, mask), expected, rtol=0, atol=1e-5)

        # Per-frame t against diffusers' per-token form (diffusers >= 0.35): each token gets its frame's t.
        pt, ph, pw = config.patch_size
        token_frames = shape[0] // pt
        frame_t = torch.rand(2, token_frames, generator=torch.Generator().manual_seed(9)) * 1000
        token_t = frame_t.repeat_interleave(shape[1] * shape[2] // (ph * pw), dim=1)  # (B, F*h*w)
        expected = reference(x, token_t, text).sample
        latent_t = frame_t.repeat_interleave(pt, dim=1)  # (B, T): one per latent frame
        torch.testing.assert_close(model(x, latent_t, text), expected, rtol=0, atol=1e-5)
        if pt > 1:
            with pytest.raises(DiTInputError, match="temporal patch must share one t"):
                model(x, torch.rand(2, shape[0]) * 1000, text)

    back = to_diffusers(from_diffusers(state))
    assert list(back) == list(state) and all(back[k] is state[k] for k in state)


def test_config_from_diffusers_published_wan_configs():
    wan_1_3b = {
        "_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0.dev0", "added_kv_proj_dim": None,
        "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256,
        "image_dim": None, "in_channels": 16, "num_attention_heads": 12, "num_layers": 30, "out_channels": 16,
        "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 4096,
    }  # fmt: skip
    assert config_from_diffusers(wan_1_3b) == DIT_SIZES["wan2.1-1.3b"]
    assert config_from_diffusers({}) == DIT_SIZES["wan2.1-14b"]  # diffusers' defaults are Wan2.1 14B's
    # Wan2.2 TI2V-5B as its release's config.json says it (WanModel, model_type "ti2v")
    from kino.models.dit import config_from_wan

    ti2v = {"_class_name": "WanModel", "_diffusers_version": "0.33.0", "dim": 3072, "eps": 1e-06, "ffn_dim": 14336,
            "freq_dim": 256, "in_dim": 48, "model_type": "ti2v", "num_heads": 24, "num_layers": 30, "out_dim": 48,
            "text_len": 512}
    assert config_from_wan(ti2v) == DIT_SIZES["wan2.2-ti2v-5b"]
    with torch.device("meta"):
        assert round(sum(p.numel() for p in DiT(DIT_SIZES["wan2.2-ti2v-5b"]).parameters()) / 1e9, 1) == 5.0
    # image-to-video: Wan's image branch (tests/test_wan_i2v.py); the added keys/values as wide as the model
    assert config_from_diffusers({**wan_1_3b, "image_dim": 1280, "added_kv_proj_dim": 1536}).img_dim == 1280
    with pytest.raises(ValueError, match="added_kv_proj_dim other than the width 1536"):
        config_from_diffusers({**wan_1_3b, "image_dim": 1280, "added_kv_proj_dim": 5120})


def test_adapters_reject_unknown_layouts(tiny):
    state = to_diffusers(tiny.state_dict())
    # image-to-video keys are renamed (a T2V config then refuses them when the state is loaded)
    assert "img_emb.proj.0.weight" in from_diffusers({**state, "condition_embedder.image_embedder.norm1.weight":
                                                      torch.zeros(4)})
    with pytest.raises(ValueError, match="not in the diffusers layout"):
        from_diffusers({**state, "blocks.0.attn2.something.weight": torch.zeros(4)})
    with pytest.raises(ValueError, match="not in the diffusers layout"):
        from_diffusers({**state, "something.else": torch.zeros(4)})
    no_qk_norm = DiT(DiTConfig(**{**TINY.to_dict(), "qk_norm": False}))
    with pytest.raises(ValueError, match="q/k norms"):
        to_diffusers(no_qk_norm.state_dict())


# ---------------------------------------------------------------------------- absolute positions


def test_position_features_follow_the_token_order():
    f, h, w = 3, 2, 5
    feats = position_features((f, h, w), POSITION_BANDS, "cpu")
    assert feats.shape == (f * h * w, 6 * POSITION_BANDS)
    k = torch.arange(1, POSITION_BANDS + 1, dtype=torch.float32)
    for i, j, l in [(0, 0, 0), (2, 1, 4), (1, 0, 3)]:
        coords = torch.tensor([i / (f - 1), (j + 0.5) / h, (l + 0.5) / w])
        angles = torch.pi * coords[:, None] * k
        expected = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten()
        torch.testing.assert_close(feats[(i * h + j) * w + l], expected)
    # one frame sits at time 0; a grid twice as fine covers the same [0, 1] places
    assert torch.equal(position_features((1, 2, 2), 1, "cpu")[:, 0], torch.zeros(4))
    coarse, fine = position_features((2, 1, 2), 2, "cpu"), position_features((3, 1, 4), 2, "cpu")
    torch.testing.assert_close(coarse[0], position_features((9, 1, 2), 2, "cpu")[0])
    assert not torch.allclose(coarse[1], fine[1])


def test_a_grown_dit_computes_what_it_grew_from_until_it_trains():
    from kino.models.dit.grow import can_grow, grow, new_block_slots

    # new blocks spread evenly between the old ones, each after the one it follows
    assert new_block_slots(8, 12) == [0, 1, -1, 2, 3, -1, 4, 5, -1, 6, 7, -1]
    assert new_block_slots(2, 3) == [0, 1, -1] and new_block_slots(4, 4) == [0, 1, 2, 3]
    plain = _perturb(_model(), seed=3).eval()  # nonzero head and gates: every block matters
    wanted = DIT_SIZES["tiny-abspos-3"]  # one block more and the position layer
    assert can_grow(plain.config, wanted) and not can_grow(wanted, plain.config)
    grown = grow(plain, wanted)
    assert grown.config == wanted and not grown.training
    for i, src in enumerate(new_block_slots(2, 3)):
        new, old = grown.blocks[i].state_dict(), (plain.blocks[src].state_dict() if src >= 0 else None)
        if old is not None:
            assert all(torch.equal(new[k], v) for k, v in old.items())
        else:  # an identity block: its three output projections zero, the rest drawn fresh
            assert all(not new[f"{n}.{p}"].any() for n in ("self_attn.o", "cross_attn.o", "ffn.2")
                       for p in ("weight", "bias"))
            assert new["self_attn.q.weight"].abs().sum() > 0
    for frames, h, w in [(1, 4, 6), (3, 4, 4)]:
        x, t, text = _inputs(2, frames, h, w)
        with torch.no_grad():
            assert torch.equal(grown(x, t, text), plain(x, t, text))
    with torch.no_grad():  # once the new block's projections move, it changes the output
        _perturb(grown.blocks[2].ffn[2], seed=9, std=0.5)
        x, t, text = _inputs(2, 3, 4, 4)
        assert not torch.allclose(grown(x, t, text), plain(x, t, text), atol=1e-3)
    # width, heads or text width would change what the weights mean: refused
    for other in [DiTConfig(**{**TINY.to_dict(), "dim": 64, "ffn_dim": 64}), DiTConfig(**{**TINY.to_dict(), "num_layers": 1})]:
        assert not can_grow(plain.config, other)
        with pytest.raises(ValueError, match="grows only"):
            grow(plain, other)


def test_a_dit_regrown_with_finer_patches_starts_close_to_what_it_was():
    from kino.models.dit.grow import can_grow, grow

    plain = _perturb(_model(), seed=3).eval()  # 1x2x2 patches, no position layer
    wanted = DIT_SIZES["tiny-abspos-p1"]  # 1x1x1, RoPE positions halved, the position layer
    assert can_grow(plain.config, wanted) and not can_grow(wanted, plain.config)
    fine = grow(plain, wanted)
    assert fine.config == wanted
    # the embedding: a latent constant over each 2x2 patch gives every sub-token its old token
    x, t, text = _inputs(2, 3, 4, 6)
    blocky = x[..., ::2, ::2].repeat_interleave(2, 3).repeat_interleave(2, 4)
    with torch.no_grad():
        old_tokens = plain.patch_embedding(blocky)  # (B, D, 3, 2, 3)
        new_tokens = fine.patch_embedding(blocky)  # (B, D, 3, 4, 6)
        torch.testing.assert_close(new_tokens, old_tokens.repeat_interleave(2, 3).repeat_interleave(2, 4))
        # the head: each sub-token predicts the mean of the old token's four sub-patch outputs
        tokens, e = torch.randn(2, 7, 32), torch.randn(2, 1, 32)
        old_out = plain.head(tokens, e).unflatten(-1, (4, 16)).mean(2)  # (pt ph pw, C) rows
        torch.testing.assert_close(fine.head(tokens, e), old_out, rtol=1e-5, atol=1e-6)
        # the whole model: near the old prediction averaged over each patch, far from a fresh
        # 1x1 model's (RoPE's half positions and the new sub-token places make it inexact)
        old = F.avg_pool3d(plain(blocky, t, text), (1, 2, 2)).repeat_interleave(2, 3).repeat_interleave(2, 4)
        err = ((fine(blocky, t, text) - old).norm() / old.norm()).item()
        fresh = ((_model(wanted, seed=5)(blocky, t, text) - old).norm() / old.norm()).item()
        assert err < 0.05 < fresh, (err, fresh)
    # patches that do not divide the old ones, or RoPE positions not shrunk alike: refused
    for other in [DiTConfig(**{**wanted.to_dict(), "rope_scale": (1, 1, 1)}),
                  DiTConfig(**{**wanted.to_dict(), "patch_size": (1, 3, 3), "rope_scale": (1, 2 / 3, 2 / 3)})]:
        assert not can_grow(plain.config, other)
        with pytest.raises(ValueError, match="finer patches"):
            grow(plain, other)


def test_a_dit_moved_to_other_latents_computes_the_same_through_exact_maps():
    from kino.models.dit.grow import change_latents, fit_latent_map, latent_tokens

    old = _model(DIT_SIZES["tiny-abspos-p1"], seed=4)  # 1x1x1 patches of 16 channels
    # new latents: 4 channels at twice the resolution, read in 1x2x2 patches (one token per old
    # token). Their space-to-depth fold, channel c*4 + 2i + j, is an old latent, so the maps
    # are identities when the fold is the kernel's order, and the moved DiT on a new latent
    # must give the old one's output on its fold, unfolded again.
    wanted = DiTConfig(**{**old.config.to_dict(), "patch_size": (1, 2, 2), "in_channels": 4, "out_channels": 4})
    eye = (torch.eye(16), torch.zeros(16))
    moved = change_latents(old, wanted, to_old=eye, to_new=eye).eval()
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(2, 4, 3, 8, 12, generator=gen)
    fold = z.unflatten(3, (4, 2)).unflatten(5, (6, 2)).permute(0, 1, 4, 6, 2, 3, 5).flatten(1, 3)
    assert torch.equal(latent_tokens(z, (1, 2, 2)), latent_tokens(fold, (1, 1, 1)))
    _, t, text = _inputs(2, 3, 4, 6)
    with torch.no_grad():
        out = old(fold, t, text)  # (2, 16, 3, 4, 6) -> back to (2, 4, 3, 8, 12)
        unfold = out.unflatten(1, (4, 2, 2)).permute(0, 1, 4, 5, 2, 6, 3).flatten(5, 6).flatten(3, 4)
        torch.testing.assert_close(moved(z, t, text), unfold, rtol=1e-5, atol=1e-5)
        # an orthogonal mix of the channels with an offset, fitted from paired latents
        q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))
        q, shift = q.float(), torch.randn(16, generator=gen)
        mixed = torch.einsum("kc,bcthw->bkthw", q, fold) + shift[:, None, None, None]
        mix = fit_latent_map(latent_tokens(fold, (1, 1, 1)), latent_tokens(mixed, (1, 1, 1)), ridge=0.0)
        back = fit_latent_map(latent_tokens(mixed, (1, 1, 1)), latent_tokens(fold, (1, 1, 1)), ridge=0.0)
        torch.testing.assert_close(mix[0], q, atol=1e-4, rtol=0)
        torch.testing.assert_close(mix[1], shift, atol=1e-4, rtol=0)
        same = DiTConfig(**{**old.config.to_dict()})
        turned = change_latents(old, same, to_old=back, to_new=mix).eval()
        # data offsets enter a velocity negated: the turned model's output is q @ old - shift
        expect = torch.einsum("kc,bcthw->bkthw", q, out) - shift[:, None, None, None]
        torch.testing.assert_close(turned(mixed, t, text), expect, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="only patch_size"):
        change_latents(old, DiTConfig(**{**wanted.to_dict(), "num_layers": 3}), to_old=eye, to_new=eye)
    with pytest.raises(ValueError, match="wrong shape"):
        change_latents(old, wanted, to_old=(torch.eye(16)[:, :8], torch.zeros(16)), to_new=eye)


def test_abs_pos_embedding_starts_at_zero_then_sees_absolute_places():
    plain = _model()
    grown = DiT(DIT_SIZES["tiny-abspos"])
    missing, unexpected = grown.load_state_dict(plain.state_dict(), strict=False)
    assert set(missing) == {"pos_embedding.weight", "pos_embedding.bias"} and not unexpected
    grown.eval()
    x, t, text = _inputs(2, 3, 4, 6)
    with torch.no_grad():
        assert torch.equal(grown(x, t, text), plain(x, t, text))  # zero-init: the same function
        _perturb(grown.pos_embedding, seed=5, std=0.5)
        out = grown(x, t, text)
        assert not torch.allclose(out, plain(x, t, text), atol=1e-3)
        # a RoPE-only model cannot tell a constant input's frames apart; positions can
        flat = torch.ones(1, 16, 3, 4, 4)
        same = plain(flat, 500.0, text[:1])
        assert torch.allclose(same[:, :, 0], same[:, :, 2], atol=1e-5)
        moved = grown(flat, 500.0, text[:1])
        assert not torch.allclose(moved[:, :, 0], moved[:, :, 2], atol=1e-3)
    # no counterpart in Wan2.1 or diffusers: converting says so
    for convert, needle in [(to_diffusers, "diffusers"), (to_wan, "Wan2.1")]:
        with pytest.raises(ValueError, match=f"absolute-position embedding.*{needle}"):
            convert(grown.state_dict())


# ---------------------------------------------------------------------------- init, numerics, training


def test_skipped_blocks_pass_their_input_on(tiny):
    x, t, text = _inputs(2, 2, 4, 4)
    assert torch.equal(tiny(x, t, text, skip_blocks=()), tiny(x, t, text))
    ref = _model()  # the same weights, with block 1 taken out of the stack
    del ref.blocks[1]
    assert torch.equal(tiny(x, t, text, skip_blocks=[1]), ref(x, t, text))
    assert not torch.allclose(tiny(x, t, text, skip_blocks=[1]), tiny(x, t, text))
    with pytest.raises(DiTInputError, match=f"no block {TINY.num_layers}.*0..{TINY.num_layers - 1}"):
        tiny(x, t, text, skip_blocks=[TINY.num_layers])
    with pytest.raises(DiTInputError, match="integers"):
        tiny(x, t, text, skip_blocks=[0.5])


def test_first_block_cache_reuses_the_other_blocks_only_when_the_first_changes_little():
    from kino.models.dit.cache import FirstBlockCache

    model = _model(DiTConfig(**{**TINY.to_dict(), "num_layers": 3}))
    x, t, text = _inputs(2, 2, 4, 4)
    calls = []
    model.blocks[2].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        plain = model(x, t, text)
        model.step_cache = cache = FirstBlockCache(0.05)
        assert torch.equal(model(x, t, text), plain) and len(calls) == 2  # first call: every block
        # the same input again: the first block adds the same, the rest is reused
        torch.testing.assert_close(model(x, t, text), plain, rtol=0, atol=1e-6)
        assert (cache.calls, cache.reused, len(calls)) == (2, 1, 2)
        # a close timestep is reused (approximately), a far one and other text run in full
        near, far = model(x, t + 1.0, text), model(x, t + 400.0, text)
        assert (cache.calls, cache.reused, len(calls)) == (4, 2, 3)
        model.step_cache = None
        torch.testing.assert_close(near, model(x, t + 1.0, text), rtol=0, atol=0.05)
        torch.testing.assert_close(far, model(x, t + 400.0, text), rtol=0, atol=0)
        model.step_cache = cache
        model(x, t, text + 1.0)  # another prompt: its own entry, which leaves the first one be
        model(x, t, text, skip_blocks=[1])  # skip-layer passes: their own entry too
        assert cache.reused == 2 and sum(len(v) for v in cache.entries.values()) == 3
        model(x, t + 400.0, text)  # the last full call of the first prompt (its reference) was at t + 400
        assert cache.reused == 3
    model.step_cache = None
    with pytest.raises(ValueError, match=">= 0"):
        FirstBlockCache(-1.0)


def test_fresh_model_outputs_exact_zeros():
    torch.manual_seed(0)
    model = DiT(TINY)
    x, t, text = _inputs(2, 2, 4, 6)
    with torch.no_grad():
        assert (model(x, t, text) == 0).all()


def test_golden_values():
    """Seeded tiny model (kino's init, then seeded perturbation) on a seeded input."""
    model = _model(seed=0)
    x, _, text = _inputs(1, 2, 4, 6, seed=123)
    t = torch.tensor([[0.0, 700.0]])
    with torch.no_grad():
        out = model(x, t, text)
    got = [out[0, 0, 0, 0, 0], out[0, 5, 1, 1, 1], out[0, 15, 0, 3, 5], out[0, 8, 1, 2, 4]]
    expected = [-0.36980, -0.39134, 0.35769, -0.61963]
    torch.testing.assert_close(torch.stack(got), torch.tensor(expected), rtol=0, atol=1e-4)


def test_gradients_reach_every_parameter():
    model = _model().train()
    x, _, text = _inputs(2, 2, 4, 6)
    t = torch.tensor([[0.0, 400.0], [900.0, 1000.0]])
    mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3])
    out = model(x, t, text, mask)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not (p.grad.abs().sum() > 0)]
    assert dead == []
