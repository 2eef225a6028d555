"""Wan2.1 LoRA files from other trainers (wan, musubi and diffusers layouts) fuse into kino's
DiT: the weights change by exactly what each layout means, and the fused model computes what
diffusers + PEFT compute with the same file (an independent reader of these layouts)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from test_dit_model import TINY, _diffusers_wan, _inputs, _model

from kino.cli import main
from kino.convert.lora_formats import dotted
from kino.errors import KinoUserError
from kino.models.dit import DiT, from_diffusers
from kino.models.lora import fuse_lora, read_lora, unfuse_lora


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    pass


D, FFN = TINY.dim, TINY.ffn_dim
# module: (out, in, rank, alpha or None) -- alpha None: the file gives none (alpha = rank)
LOW_RANK = {"blocks.0.self_attn.q": (D, D, 4, 2.0), "blocks.1.cross_attn.o": (D, D, 2, 8.0),
            "blocks.0.ffn.2": (D, FFN, 4, None), "head.head": (None, D, 3, 1.5)}
DIFFUSERS_NAME = {"blocks.0.self_attn.q": "blocks.0.attn1.to_q", "blocks.1.cross_attn.o": "blocks.1.attn2.to_out.0",
                  "blocks.0.ffn.2": "blocks.0.ffn.net.2", "head.head": "proj_out",
                  "blocks.1.ffn.0": "blocks.1.ffn.net.0.proj"}


def _entries(model: DiT, seed: int = 0, diffs: bool = True):
    """Random LoRA entries for `model` and the parameters they should give at scale 1."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    low = {}
    for name, (_, fan_in, rank, alpha) in LOW_RANK.items():
        out = params[f"{name}.weight"].shape[0]
        low[name] = (torch.randn(rank, fan_in, generator=g) * 0.2, torch.randn(out, rank, generator=g) * 0.2, alpha)
    bias = {"blocks.0.self_attn.q": torch.randn(D, generator=g) * 0.1,
            "blocks.1.ffn.0": torch.randn(FFN, generator=g) * 0.1}
    diff = {"blocks.0.norm3": torch.randn(D, generator=g) * 0.1,
            "blocks.1.modulation": torch.randn(1, 6, D, generator=g) * 0.1}
    if not diffs:
        diff = {}
    expected = {k: v.detach().clone() for k, v in params.items()}
    for name, (down, up, alpha) in low.items():
        expected[f"{name}.weight"] += (alpha or down.shape[0]) / down.shape[0] * up @ down
    for name, b in bias.items():
        expected[f"{name}.bias"] += b
    for name, d in diff.items():
        expected[name if name.endswith("modulation") else f"{name}.weight"] += d
    return low, bias, diff, expected


def _wan_file(path, low, bias, diff, names=("lora_A", "lora_B")):
    t = {}
    for name, (down, up, alpha) in low.items():
        t[f"diffusion_model.{name}.{names[0]}.weight"], t[f"diffusion_model.{name}.{names[1]}.weight"] = down, up
        if alpha is not None:
            t[f"diffusion_model.{name}.alpha"] = torch.tensor(alpha)
    t.update({f"diffusion_model.{name}.diff_b": b for name, b in bias.items()})
    t.update({f"diffusion_model.{name}.diff": d for name, d in diff.items()})
    save_file(t, str(path))
    return path


def _musubi_file(path, low):
    t = {}
    for name, (down, up, alpha) in low.items():
        flat = "lora_unet_" + name.replace(".", "_")
        t[f"{flat}.lora_down.weight"], t[f"{flat}.lora_up.weight"] = down, up
        t[f"{flat}.alpha"] = torch.tensor(alpha if alpha is not None else float(down.shape[0]))
    save_file(t, str(path))
    return path


def _diffusers_file(path, low, bias, metadata_alpha=None):
    """diffusers / PEFT keys; no alpha in them: folded into up, or given as PEFT's lora_alpha
    in the metadata (`metadata_alpha`, for every module)."""
    t, metadata = {}, None
    for name, (down, up, alpha) in low.items():
        key = f"transformer.{DIFFUSERS_NAME[name]}"
        scale = (alpha or down.shape[0]) / down.shape[0]
        t[f"{key}.lora_A.weight"] = down
        t[f"{key}.lora_B.weight"] = up if metadata_alpha else up * scale
    for name, b in bias.items():
        t[f"transformer.{DIFFUSERS_NAME[name]}.lora_B.bias"] = b
    if metadata_alpha:
        import json

        metadata = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": metadata_alpha})}
    save_file(t, str(path), metadata=metadata)
    return path


def _fused(model, path, scale=1.0):
    fused = copy.deepcopy(model)
    fuse_lora(fused, read_lora(path), scale, {})
    return dict(fused.named_parameters())


def _assert_params(got, expected):
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)


def test_wan_layout_adds_scaled_updates_and_differences(tmp_path):
    model = _model()
    low, bias, diff, expected = _entries(model)
    for names in (("lora_A", "lora_B"), ("lora_down", "lora_up")):
        path = _wan_file(tmp_path / f"wan_{names[0]}.safetensors", low, bias, diff, names)
        lora = read_lora(path)
        assert lora.format == "wan" and set(lora.modules) == {*low, *bias, *diff}
        _assert_params(_fused(model, path), expected)
    # the user's scale multiplies every part; unfusing restores the model bit for bit
    fused, originals = copy.deepcopy(model), {}
    fuse_lora(fused, read_lora(path), 0.5, originals)
    half = dict(fused.named_parameters())
    for k, v in dict(model.named_parameters()).items():
        torch.testing.assert_close(half[k], v + 0.5 * (expected[k] - v), rtol=0, atol=1e-6, msg=k)
    unfuse_lora(fused, originals)
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), model.state_dict().values()))


def test_musubi_and_diffusers_layouts_give_the_same_weights(tmp_path):
    model = _model()
    low, bias, _, expected = _entries(model, diffs=False)
    no_bias = _entries(model, diffs=False)[3]
    for name in bias:  # musubi files hold no bias differences
        no_bias[f"{name}.bias"] = dict(model.named_parameters())[f"{name}.bias"]
    lora = read_lora(_musubi_file(tmp_path / "m.safetensors", low))
    assert lora.format == "musubi" and set(lora.modules) == set(low)
    _assert_params(_fused(model, tmp_path / "m.safetensors"), no_bias)
    assert read_lora(_diffusers_file(tmp_path / "d.safetensors", low, bias)).format == "diffusers"
    _assert_params(_fused(model, tmp_path / "d.safetensors"), expected)
    # PEFT's lora_alpha from diffusers' metadata scales the update and lora_B's bias alike
    same_alpha = {k: (down, up, 6.0) for k, (down, up, _) in low.items()}
    path = _diffusers_file(tmp_path / "meta.safetensors", same_alpha, bias, metadata_alpha=6.0)
    got = _fused(model, path)
    params = dict(model.named_parameters())
    for name, (down, up, _) in low.items():
        torch.testing.assert_close(got[f"{name}.weight"], params[f"{name}.weight"] + 6.0 / down.shape[0] * up @ down,
                                   rtol=0, atol=1e-6)
    torch.testing.assert_close(got["blocks.1.ffn.0.bias"],
                               params["blocks.1.ffn.0.bias"] + 6.0 / 4 * bias["blocks.1.ffn.0"], rtol=0, atol=1e-6)


def test_musubi_flat_names_read_back_as_wan_names():
    assert dotted("blocks_12_cross_attn_norm_k_img") == "blocks.12.cross_attn.norm_k_img"
    assert dotted("blocks_0_self_attn_norm_q") == "blocks.0.self_attn.norm_q"
    assert dotted("blocks_3_cross_attn_v_img") == "blocks.3.cross_attn.v_img"
    assert dotted("time_projection_1") == "time_projection.1" and dotted("head_head") == "head.head"
    assert dotted("img_emb_proj_1") == "img_emb.proj.1" and dotted("blocks_4_ffn_0") == "blocks.4.ffn.0"


def _every_block_layer(model: DiT, seed: int):
    """Low-rank entries for every attention and FFN layer of every block (musubi's files have
    them all, and diffusers' musubi reader wants them all), with alphas of several kinds."""
    g = torch.Generator().manual_seed(seed)
    low = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("blocks.") and ("attn." in name or ".ffn." in name):
            rank = 2 + len(low) % 3
            low[name] = (torch.randn(rank, m.in_features, generator=g) * 0.2,
                         torch.randn(m.out_features, rank, generator=g) * 0.2, float(1 + len(low) % 4))
    return low


@pytest.mark.parametrize("layout", ["wan", "musubi", "diffusers"])
def test_fused_model_matches_diffusers_with_peft(tmp_path, layout):
    """Independent check: diffusers reads the same file (its Wan LoRA conversions) into a
    `WanTransformer3DModel` through PEFT and fuses it; kino's fused DiT computes the same."""
    from diffusers import WanPipeline

    reference = _diffusers_wan(TINY, seed=3)
    model = DiT(TINY).eval()
    model.load_state_dict(from_diffusers(reference.state_dict()), strict=True)
    low = _every_block_layer(model, seed=5)
    bias = {"blocks.0.self_attn.q": torch.randn(D) * 0.1, "blocks.1.ffn.0": torch.randn(FFN) * 0.1}
    if layout == "wan":
        # no norm diffs: diffusers drops them
        path = _wan_file(tmp_path / "w.safetensors", low, bias, {}, ("lora_down", "lora_up"))
    elif layout == "musubi":
        path = _musubi_file(tmp_path / "m.safetensors", low)
    else:  # what diffusers itself makes of the wan file is the diffusers layout
        state = WanPipeline.lora_state_dict(str(_wan_file(tmp_path / "w.safetensors", low, bias, {})))
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "d.safetensors"))
        path = tmp_path / "d.safetensors"
    assert read_lora(path).format == layout
    reference.load_lora_adapter(WanPipeline.lora_state_dict(str(path)), prefix="transformer", adapter_name="t")
    reference.fuse_lora(lora_scale=0.7)
    fuse_lora(model, read_lora(path), 0.7, {})
    x, t, text = _inputs(2, 3, 4, 6, seed=2)
    with torch.no_grad():
        expected = reference(x, t, text).sample
        assert expected.std() > 0.1
        torch.testing.assert_close(model(x, t, text), expected, rtol=0, atol=1e-5)


def test_bad_foreign_files_are_refused_clearly(tmp_path):
    model = _model()
    low, bias, diff, _ = _entries(model)
    down, up, _ = low["blocks.0.self_attn.q"]

    def refused(tensors, match, metadata=None):
        path = tmp_path / "bad.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        with pytest.raises(KinoUserError, match=match):
            read_lora(path)

    refused({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": down,
             "lora_unet_blocks_0_self_attn_q.lora_up.weight": up}, "mixes key layouts")
    refused({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": down}, "lacks its up weight")
    q = "diffusion_model.blocks.0.self_attn.q"
    refused({f"{q}.lora_A.weight": down, f"{q}.lora_B.weight": up, f"{q}.lora_magnitude_vector": up[:, 0].clone()},
            "DoRA")
    refused({"diffusion_model.blocks.0.self_attn.q.hada_w1_a": down}, "LoHa/LoKr")
    refused({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": down, "diffusion_model.blocks.0.self_attn.q"
             ".lora_B.weight": up, "diffusion_model.blocks.0.self_attn.q.scale": up[:1, 0].clone()}, "cannot place")
    refused({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": down,
             "diffusion_model.blocks.0.self_attn.q.lora_B.weight": up.T.contiguous()}, "malformed")
    refused({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": down, "other.weight": up}, "keys outside it")
    refused({"some.weight": down}, "nor a Wan2.1 LoRA")
    # a file for another model size: refused at fusing, and the model is left as it was
    path = _wan_file(tmp_path / "big.safetensors", {"blocks.0.self_attn.q": (torch.zeros(4, 2 * D), up, None)},
                     {"blocks.0.ffn.2": torch.zeros(D + 1)}, {"blocks.0.norm3": torch.zeros(2)})
    fused, before = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    with pytest.raises(KinoUserError, match="does not fit this model.*blocks.0.self_attn.q is"):
        fuse_lora(fused, read_lora(path), 1.0, {})
    assert all(torch.equal(v, before[k]) for k, v in fused.state_dict().items())
    path = _wan_file(tmp_path / "ghost.safetensors", {}, {"blocks.99.ffn.2": torch.zeros(D)}, {})
    with pytest.raises(KinoUserError, match="blocks.99.ffn.2.bias does not exist"):
        fuse_lora(fused, read_lora(path), 1.0, {})


def test_generate_cli_fuses_a_musubi_lora(tmp_path, capsys):
    from conftest import save_tiny_pipeline

    from kino.data.video_io import read_metadata, read_video
    from kino.pipeline import Pipeline

    folder = save_tiny_pipeline(tmp_path / "model", "tiny-lora", frames=5, height=32, width=32, steps=2, guidance=3.0)
    pipe = Pipeline.from_pretrained(folder)
    path = _musubi_file(tmp_path / "style.safetensors", _every_block_layer(pipe.dit, seed=1))
    args = ["generate", "a small red circle moving left on a black background", "--model", str(folder), "-q"]
    assert main([*args, "-o", str(tmp_path / "base.mp4")]) == 0
    assert main([*args, "-o", str(tmp_path / "lora.mp4"), "--lora", f"{path}:0.8"]) == 0
    assert not (read_video(tmp_path / "base.mp4")[0] == read_video(tmp_path / "lora.mp4")[0]).all()
    assert '"scale": 0.8' in read_metadata(tmp_path / "lora.mp4")["lora"]
    save_file({"x.weight": torch.zeros(2, 2)}, str(tmp_path / "junk.safetensors"))
    capsys.readouterr()
    assert main([*args, "-o", str(tmp_path / "junk.mp4"), "--lora", str(tmp_path / "junk.safetensors")]) == 2
    assert "nor a Wan2.1 LoRA" in capsys.readouterr().err


def test_convert_lora_writes_every_layout_and_diffusers_reads_it(tmp_path, capsys):
    """A kino LoRA (per-file alpha) written in each layout reads back to the same fused
    weights; the diffusers file also matches diffusers + PEFT's own reading of it."""
    from diffusers import WanPipeline

    from kino.models.lora import LoRAConfig, apply_lora, save_lora

    reference = _diffusers_wan(TINY, seed=4)
    base = DiT(TINY).eval()
    base.load_state_dict(from_diffusers(reference.state_dict()), strict=True)
    trained = copy.deepcopy(base)
    apply_lora(trained, LoRAConfig(rank=3, alpha=5.0))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_up" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    src = tmp_path / "kino.safetensors"
    save_lora(src, trained.state_dict(), LoRAConfig(rank=3, alpha=5.0))
    want = _fused(base, src)
    for layout in ("wan", "musubi", "diffusers"):
        dst = tmp_path / f"{layout}.safetensors"
        assert main(["convert", "lora", str(src), str(dst), "--layout", layout]) == 0
        assert f"{layout} layout" in capsys.readouterr().out
        assert read_lora(dst).format == layout
        _assert_params(_fused(base, dst), want)
    reference.load_lora_adapter(WanPipeline.lora_state_dict(str(tmp_path / "diffusers.safetensors")),
                                prefix="transformer", adapter_name="k")
    reference.fuse_lora(lora_scale=1.0)
    fused = copy.deepcopy(base)
    fuse_lora(fused, read_lora(src), 1.0, {})
    x, t, text = _inputs(2, 3, 4, 6, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, t, text), reference(x, t, text).sample, rtol=0, atol=1e-5)
    # what a layout cannot hold is refused by name
    low, bias, diff, _ = _entries(base)
    wan = _wan_file(tmp_path / "diffs.safetensors", low, bias, diff)
    assert main(["convert", "lora", str(wan), str(tmp_path / "d.safetensors"), "--layout", "diffusers"]) == 2
    assert "whole-weight differences" in capsys.readouterr().err
    assert main(["convert", "lora", str(wan), str(wan)]) == 2
