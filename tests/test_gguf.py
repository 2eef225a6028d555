"""GGUF DiT weights (kino/models/gguf.py, `--dit FILE`): quantized Wan DiTs as published for
small GPUs, read with the `gguf` package and kept quantized in `GGUFLinear` layers.

Independent checks: every dequantizer equals the `gguf` package's numpy reference (ggml's
layouts) exactly; a whole DiT read from a GGUF file computes what diffusers'
WanTransformer3DModel computes with the reference-dequantized weights (1e-5), and what
diffusers' own GGUF loader computes from the same file (which dequantizes in float16, so to
float16 rounding of the weights). The DiT is 256 wide so that K-quants (256-element rows)
fit; gguf-py quantizes Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 itself, K-quant tensors are written
as random blocks with small scales (any such bytes are a valid tensor).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from kino.cli import main
from kino.errors import KinoUserError

gguf = pytest.importorskip("gguf")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from test_wan import VAE, _perturb, _tokenizer, dit_to_wan, write_diffusers  # noqa: E402

Q = gguf.GGMLQuantizationType
QUANTIZABLE = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]  # gguf-py writes these
K_QUANTS = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# byte offsets of each type's float16 scale fields (d, m / dmin): set small so values stay sane
HALF_FIELDS = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q2_K: [80, 82],
               Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}
TEXT_DIM = 24
PROMPT = "a cat walks on the grass"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def random_blocks(qtype, n_blocks: int, rng, scale: float) -> np.ndarray:
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    for off in HALF_FIELDS[qtype]:
        raw[:, off:off + 2] = np.float16(rng.uniform(-scale, scale, n_blocks)).view(np.uint8).reshape(-1, 2)
    return raw


def quantized(value: torch.Tensor, qtype, rng) -> np.ndarray:
    """`value` (out, in) as `qtype` bytes (out, row bytes): quantized by gguf-py, or random
    blocks of a K-quant with scales that keep values near the original's size."""
    a = value.float().numpy()
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(a, qtype)
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    scale = float(np.abs(a).max()) / 60
    return random_blocks(qtype, a.size // block, rng, scale).reshape(a.shape[0], -1)


def write_gguf(path, state: dict, *, flatten: bool = True, prefix: str = "", seed: int = 0,
               types=tuple(QUANTIZABLE + K_QUANTS)) -> dict[str, torch.Tensor]:
    """`state` (Wan names) as a GGUF file the way ComfyUI-GGUF's converter lays one out: the
    blocks' matrices quantized (cycling through `types`), one embedding matrix quantized too,
    a modulation table in BF16, vectors in F32, the 5-D patch embedding flattened to rows of
    256 with its real shape in `comfy.gguf.orig_shape.*` (`flatten`). Returns every tensor's
    values as the file holds them, dequantized by gguf-py (the reference)."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "wan")
    values = {}
    i = 0
    for key, value in state.items():
        name = prefix + key
        if (key.startswith("blocks.") and value.ndim == 2) or key == "time_embedding.0.weight":
            qtype = types[i % len(types)] if key.startswith("blocks.") else Q.Q8_0
            i += 1
            data = quantized(value, qtype, rng)
            writer.add_tensor(name, data, raw_dtype=qtype)
            values[key] = torch.from_numpy(gguf.quants.dequantize(data, qtype)).reshape(value.shape)
        elif key == "blocks.0.modulation":
            data = gguf.quants.quantize(value.float().numpy(), Q.BF16)
            writer.add_tensor(name, data, raw_dtype=Q.BF16)
            values[key] = value.to(torch.bfloat16).float()
        elif key == "patch_embedding.weight" and flatten:
            writer.add_tensor(name, value.float().numpy().reshape(-1, 256))
            writer.add_array("comfy.gguf.orig_shape." + name, list(value.shape))
            values[key] = value.float()
        else:
            writer.add_tensor(name, value.float().numpy())
            values[key] = value.float()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return values


def _dit(seed: int = 0):
    torch.manual_seed(seed)
    dit = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=256, ffn_dim=512, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    return _perturb(dit, seed + 1).eval()


def _reference(dit, values: dict) -> torch.nn.Module:
    """A copy of diffusers' DiT holding the GGUF file's (reference-dequantized) values."""
    from kino.models.dit.adapters import to_diffusers

    ref = diffusers.WanTransformer3DModel.from_config(dit.config).eval()
    ref.load_state_dict(to_diffusers(values), strict=True)
    return ref


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, 3, 4, 6, generator=gen), torch.tensor([999.0, 321.5]),
            torch.randn(2, 7, TEXT_DIM, generator=gen))


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """A tiny Wan2.1 folder (diffusers layout) with a 256-wide DiT, and that DiT as GGUF files."""
    root = tmp_path_factory.mktemp("gguf")
    dit = _dit()
    config = transformers.UMT5Config(
        vocab_size=20, d_model=TEXT_DIM, d_kv=8, d_ff=40, num_layers=2, num_heads=2,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)
    torch.manual_seed(3)
    text = _perturb(transformers.UMT5EncoderModel(config), 4).eval()
    vae = _perturb(diffusers.AutoencoderKLWan(**VAE), 2).eval()
    folder = write_diffusers(root / "Wan2.1-T2V-wide-Diffusers", (dit, vae, text, _tokenizer()))
    state = dit_to_wan(dit.state_dict())
    values = write_gguf(root / "dit-mixed.gguf", state, prefix="model.diffusion_model.")
    plain = write_gguf(root / "dit-plain.gguf", state, flatten=False)  # diffusers' loader reads no orig_shape
    return {"root": root, "folder": folder, "dit": dit, "state": state, "file": root / "dit-mixed.gguf",
            "values": values, "plain_file": root / "dit-plain.gguf", "plain_values": plain}


# ---------------------------------------------------------------------------- dequantizers


@pytest.mark.parametrize("qtype", QUANTIZABLE + K_QUANTS, ids=lambda q: q.name)
def test_dequantizers_equal_ggufs_reference(qtype):
    from kino.models.gguf import dequantize

    rng = np.random.default_rng(int(qtype))
    raw = random_blocks(qtype, 9, rng, 0.1)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    expected = gguf.quants.dequantize(raw.reshape(1, -1), qtype).reshape(3, 3 * block)
    got = dequantize(torch.from_numpy(raw), int(qtype), (3, 3 * block))
    assert np.abs(expected).max() > 0.05
    np.testing.assert_array_equal(got.numpy(), expected)
    if qtype in QUANTIZABLE:  # and gguf-py's own quantization of real values reads back close to them
        values = rng.standard_normal((4, 64)).astype(np.float32)
        back = dequantize(torch.from_numpy(gguf.quants.quantize(values, qtype)), int(qtype), (4, 64))
        assert np.abs(back.numpy() - values).max() < 0.35 * np.abs(values).max() / 4


# ---------------------------------------------------------------------------- the DiT


def test_a_gguf_dit_computes_what_diffusers_computes_with_its_values(wan):
    from kino.models.dit.adapters import config_from_diffusers
    from kino.models.dit.pretrained import build_dit, read_dit_file
    from kino.models.gguf import GGUFLinear

    config = config_from_diffusers(wan["dit"].config)
    dit = build_dit(config, read_dit_file(wan["file"], torch.float32, config), wan["file"])
    layers = [m for m in dit.modules() if isinstance(m, GGUFLinear)]
    assert len(layers) == 20 and {m.qtype for m in layers} == {int(q) for q in QUANTIZABLE + K_QUANTS}
    assert all(m.weight.dtype == torch.uint8 for m in layers)
    assert not isinstance(dit.time_embedding[0], GGUFLinear)  # outside the blocks: dequantized once
    assert dit.patch_embedding.weight.shape == (256, 16, 1, 2, 2)  # the flattened tensor's real shape
    x, t, text = _inputs()
    with torch.no_grad():
        expected = _reference(wan["dit"], wan["values"])(x, t, text).sample
        unquantized = wan["dit"](x, t, text).sample
        got = dit(x, t, text)
    assert expected.std() > 0.1 and (expected - unquantized).abs().max() > 1e-2  # the quantization shows
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_the_same_file_read_by_diffusers_gguf_loader(wan, tmp_path):
    """diffusers' from_single_file(GGUFQuantizationConfig) on the same file: the same DiT, up to
    diffusers' float16 dequantization of the weights."""
    from kino.models.dit.adapters import config_from_diffusers
    from kino.models.dit.pretrained import build_dit, read_dit_file

    wan["dit"].save_pretrained(tmp_path / "transformer")
    ref = diffusers.WanTransformer3DModel.from_single_file(
        str(wan["plain_file"]), config=str(tmp_path), subfolder="transformer", torch_dtype=torch.float32,
        quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.float32))
    config = config_from_diffusers(wan["dit"].config)
    dit = build_dit(config, read_dit_file(wan["plain_file"], torch.float32, config), wan["plain_file"])
    x, t, text = _inputs(1)
    with torch.no_grad():
        expected = ref(x, t, text).sample
        got = dit(x, t, text)
        exact = _reference(wan["dit"], wan["plain_values"])(x, t, text).sample
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-5)
    assert (got - expected).abs().max() < 2e-3 * expected.abs().max()


def test_rows_that_are_not_whole_blocks_are_dequantized_once(tmp_path):
    """A 32-wide DiT's matrices in Q4_K (256-element blocks) fit only flattened into rows of 256
    with their real shape in the metadata, as ComfyUI-GGUF's converter writes such tensors:
    they load as float layers holding the reference values."""
    from test_wan import _components

    from kino.models.dit.adapters import config_from_diffusers
    from kino.models.dit.pretrained import build_dit, read_dit_file
    from kino.models.gguf import GGUFLinear

    dit = _components()[0]
    rng = np.random.default_rng(5)
    writer = gguf.GGUFWriter(str(tmp_path / "narrow.gguf"), "wan")
    values = {}
    for key, value in dit_to_wan(dit.state_dict()).items():
        if key.startswith("blocks.") and value.ndim == 2:
            raw = random_blocks(Q.Q4_K, value.numel() // 256, rng, 1e-3)
            writer.add_tensor(key, raw, raw_dtype=Q.Q4_K)
            writer.add_array("comfy.gguf.orig_shape." + key, list(value.shape))
            values[key] = torch.from_numpy(gguf.quants.dequantize(raw, Q.Q4_K)).reshape(value.shape)
        else:
            writer.add_tensor(key, value.float().numpy())
            values[key] = value.float()
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    config = config_from_diffusers(dit.config)
    mine = build_dit(config, read_dit_file(tmp_path / "narrow.gguf", torch.float32, config), tmp_path / "narrow.gguf")
    assert not any(isinstance(m, GGUFLinear) for m in mine.modules())
    from kino.models.info import describe  # `kino info FILE.gguf`: which DiT sizes it fits

    info = describe(tmp_path / "narrow.gguf")["components"]["dit"]
    assert "tiny" in info["fits"] and info["tensors"]["Q4_K"] == 20 and info["layers"] == 2
    x, t, _ = _inputs()
    text = torch.randn(2, 7, dit.config.text_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(mine(x, t, text), _reference(dit, values)(x, t, text).sample, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- generation


def _float_pipeline(wan):
    """The Wan folder's pipeline with its DiT holding the GGUF file's values as float32."""
    from kino.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(wan["folder"], text_dtype="float32")
    pipe.dit.load_state_dict(wan["values"])
    return pipe


KW = dict(frames=5, height=16, width=32, steps=3, seed=2)


def test_generation_with_a_gguf_dit_equals_the_dequantized_dits(wan):
    from kino.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(wan["folder"], text_dtype="float32", dit_file=wan["file"])
    assert pipe.quantized and pipe.dit_sha256 is None
    got = pipe.generate(PROMPT, **KW)
    expected = _float_pipeline(wan).generate(PROMPT, **KW)
    torch.testing.assert_close(got.latents, expected.latents, rtol=0, atol=1e-4)
    with pytest.raises(KinoUserError, match="GGUF-quantized"):
        pipe.save_pretrained(wan["root"] / "never")


def test_memory_plans_move_the_quantized_bytes(wan):
    """Block swapping and model offload carry the GGUF layers' bytes; fp8 storage touches only
    float matrices (here none in the blocks): the video is the plain GGUF pipeline's."""
    from kino.models.memory import MemoryPlan
    from kino.pipeline import Pipeline

    base = Pipeline.from_pretrained(wan["folder"], text_dtype="float32", dit_file=wan["file"]).generate(PROMPT, **KW)
    for plan in (MemoryPlan(dtype="float32", swap_blocks=1, offload="model"),
                 MemoryPlan(dtype="float32", weights="fp8", cfg="sequential")):
        pipe = Pipeline.from_pretrained(wan["folder"], text_dtype="float32", dit_file=wan["file"], memory=plan)
        assert pipe.dit.blocks[0].self_attn.q.weight.numel() == 0  # streamed: a placeholder between calls
        torch.testing.assert_close(pipe.generate(PROMPT, **KW).latents, base.latents, rtol=0, atol=1e-4)
    with pytest.raises(KinoUserError, match="GGUF-quantized DiT"):
        Pipeline.from_pretrained(wan["folder"], text_dtype="float32", dit_file=wan["file"]).set_memory(
            MemoryPlan(dtype="float32"), shard=object())


def test_a_lora_on_a_gguf_dit_is_the_fused_lora_unfused(wan, tmp_path):
    from safetensors.torch import save_file

    from kino.pipeline import Pipeline

    gen = torch.Generator().manual_seed(7)
    lora = {}
    for name in ("blocks.0.self_attn.q", "blocks.1.ffn.0", "head.head"):  # two quantized layers, one float
        module = dict(_float_pipeline(wan).dit.named_modules())[name]
        lora[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=gen) * 0.1
        lora[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=gen) * 0.1
    save_file(lora, str(tmp_path / "lora.safetensors"))
    pipe = Pipeline.from_pretrained(wan["folder"], text_dtype="float32", dit_file=wan["file"])
    before = pipe.generate(PROMPT, **KW).latents
    pipe.load_lora(tmp_path / "lora.safetensors", 0.7)
    assert pipe.dit.blocks[0].self_attn.q.lora_down.shape == (4, 256)
    fused = _float_pipeline(wan)
    fused.load_lora(tmp_path / "lora.safetensors", 0.7)
    got, expected = pipe.generate(PROMPT, **KW).latents, fused.generate(PROMPT, **KW).latents
    assert (expected - before).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    pipe.unload_loras()
    assert pipe.dit.blocks[0].self_attn.q.lora_down is None
    torch.testing.assert_close(pipe.generate(PROMPT, **KW).latents, before, rtol=0, atol=0)


def test_kino_generate_with_dit_on_a_hub_folder_without_its_dit_weights(wan, tmp_path, capsys, monkeypatch):
    """The GGUF users' set-up: a Hub repository's VAE, text encoder and the DiT's config.json
    (its DiT weights are not downloaded: here they are not even in the offline cache)."""
    from test_hub import hub_without

    from kino.data.video_io import read_video

    folder, calls = hub_without(tmp_path, monkeypatch, "Wan-AI/wide", wan["folder"], "transformer/*.safetensors")
    out = tmp_path / "clip.mp4"
    code = main(["generate", PROMPT, "--model", "Wan-AI/wide", "--dit", str(wan["file"]), "--frames", "5",
                 "--size", "16x32", "--steps", "2", "--swap-blocks", "1", "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    assert read_video(out)[0].shape == (5, 16, 32, 3)
    assert "transformer/diffusion_pytorch_model*" in calls[0]["ignore_patterns"]
    code = main(["generate", PROMPT, "--model", str(folder), "--frames", "5", "-o", str(out), "-q"])
    assert code == 2 and "--dit FILE" in capsys.readouterr().err


def test_kino_convert_wan_with_a_gguf_dit_writes_float_weights(wan, tmp_path, capsys):
    """`kino convert wan SRC DST --dit FILE.gguf`: a kino folder (e.g. to fine-tune) whose DiT
    holds the file's values dequantized, as plain float32 weights."""
    from kino.models.gguf import GGUFLinear
    from kino.pipeline import Pipeline

    folder = tmp_path / "no-dit-weights"
    shutil.copytree(wan["folder"], folder)
    for f in (folder / "transformer").glob("*.safetensors"):
        f.unlink()
    assert main(["convert", "wan", str(folder), str(tmp_path / "kino"), "--dit", str(wan["file"])]) == 0, \
        capsys.readouterr().err
    pipe = Pipeline.from_pretrained(tmp_path / "kino")
    assert not pipe.quantized and not any(isinstance(m, GGUFLinear) for m in pipe.dit.modules())
    state = pipe.dit.state_dict()
    assert all(torch.equal(state[k], v) for k, v in wan["values"].items())


def test_dit_safetensors_file_in_kinos_names(tmp_path):
    """`--dit` with a safetensors file: the shipped model's own DiT, saved alone (kino's names,
    its absolute-position embedding included), generates the shipped model's video."""
    from safetensors.torch import save_file

    from kino.pipeline import Pipeline

    from kino.models.folder import default_model_dir

    shipped = Pipeline.from_pretrained()
    save_file({k: v.contiguous() for k, v in shipped.dit.state_dict().items()}, str(tmp_path / "dit.safetensors"))
    folder = tmp_path / "default-without-dit-weights"
    shutil.copytree(default_model_dir(), folder)
    (folder / "dit" / "model.safetensors").unlink()
    pipe = Pipeline.from_pretrained(folder, dit_file=tmp_path / "dit.safetensors")
    kw = dict(frames=5, height=64, width=64, steps=2, seed=3)
    assert torch.equal(pipe.generate("a large red circle moving left on a black background", **kw).latents,
                       shipped.generate("a large red circle moving left on a black background", **kw).latents)
    with pytest.raises(KinoUserError, match="two-expert"):
        Pipeline.from_pretrained(dit_2_file=tmp_path / "dit.safetensors")


def test_dit_safetensors_file_in_comfyuis_fp8_scaled_form(wan, tmp_path):
    """ComfyUI's "fp8 scaled" DiT files: float8 block weights, each with a scale (a scalar
    `scale_weight`, or `weight_scale` per output row), a `scaled_fp8` marker and activation
    scales; read back as weight x scale, the DiT computes what diffusers' does with them."""
    from safetensors.torch import save_file

    from kino.models.dit.adapters import config_from_diffusers
    from kino.models.dit.pretrained import build_dit, read_dit_file

    fp8 = torch.float8_e4m3fn
    out, values = {"scaled_fp8": torch.empty(0, dtype=fp8)}, {}
    for i, (key, value) in enumerate(wan["state"].items()):
        name = "model.diffusion_model." + key
        if key.startswith("blocks.") and value.ndim == 2:
            layer = name[:-len(".weight")]
            if i % 2:  # one scale for the tensor
                scale = value.abs().max() / 448
                q = (value / scale).to(fp8)
                out[layer + ".scale_weight"] = scale.reshape(())
                values[key] = q.float() * scale
            else:  # one per output row
                scale = value.abs().amax(dim=1) / 448
                q = (value / scale[:, None]).to(fp8)
                out[layer + ".weight_scale"] = scale
                values[key] = q.float() * scale[:, None]
            out[name] = q
            out[layer + ".scale_input"] = torch.ones(())
        else:
            out[name] = value.to(torch.bfloat16)
            values[key] = value.to(torch.bfloat16).float()
    save_file(out, str(tmp_path / "dit_fp8_scaled.safetensors"))
    config = config_from_diffusers(wan["dit"].config)
    state = read_dit_file(tmp_path / "dit_fp8_scaled.safetensors", torch.float32, config)
    assert set(state) == set(values) and all(torch.equal(state[k], values[k]) for k in values)
    dit = build_dit(config, state, tmp_path / "dit_fp8_scaled.safetensors")
    x, t, text = _inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(dit(x, t, text), _reference(wan["dit"], values)(x, t, text).sample,
                                   rtol=0, atol=1e-5)
    del out["model.diffusion_model.blocks.0.ffn.0.weight"]  # a scale without its weight
    save_file(out, str(tmp_path / "broken.safetensors"))
    with pytest.raises(KinoUserError, match="broken.safetensors: a scale for blocks.0.ffn.0.weight"):
        read_dit_file(tmp_path / "broken.safetensors", torch.float32, config)


def test_bad_gguf_files_are_clear_errors(wan, tmp_path, capsys, monkeypatch):
    from kino.models.dit.pretrained import read_dit_file

    writer = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "wan")
    writer.add_tensor("blocks.0.ffn.0.weight", np.zeros((4, 2 * 136), np.uint8), raw_dtype=Q.IQ4_XS)
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    with pytest.raises(KinoUserError, match=r"blocks\.0\.ffn\.0\.weight is of type IQ4_XS.*allowed: F32"):
        read_dit_file(tmp_path / "iq.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 40)
    with pytest.raises(KinoUserError, match="junk.gguf is not a valid GGUF file"):
        read_dit_file(tmp_path / "junk.gguf")
    data = wan["file"].read_bytes()  # a download cut short
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) // 2])
    with pytest.raises(KinoUserError, match="cut.gguf is not a valid GGUF file"):
        read_dit_file(tmp_path / "cut.gguf")
    other = tmp_path / "other.gguf"  # a DiT of another width: the mismatch names the file and tensor
    state = dict(wan["state"])
    state["blocks.0.ffn.0.weight"] = state["blocks.0.ffn.0.weight"][:256]
    write_gguf(other, state, types=[Q.Q8_0])
    code = main(["generate", PROMPT, "--model", str(wan["folder"]), "--dit", str(other), "--frames", "1",
                 "--size", "16x16", "-o", str(tmp_path / "x.png"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "other.gguf: blocks.0.ffn.0.weight is (256, 256), the model's (512, 256)" in err, err
    code = main(["generate", PROMPT, "--model", str(wan["folder"]), "--dit", str(tmp_path / "dit.bin"),
                 "--frames", "1", "-o", str(tmp_path / "x.png"), "-q"])
    assert code == 2 and "is .gguf or .safetensors" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # the package not installed
    with pytest.raises(KinoUserError, match=r"needs the gguf package \(pip install 'kino-video\[gguf\]'"):
        read_dit_file(wan["file"])


# ---------------------------------------------------------------------------- writing


def _file_values(path) -> dict[str, torch.Tensor]:
    """A GGUF file's tensors as the gguf package itself reads and dequantizes them."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        out[t.name] = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(shape).float()
    return out


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q6_K", "Q4_K"])
def test_kino_convert_gguf_writes_a_file_kino_and_diffusers_read(wan, tmp_path, capsys, type_name):
    from kino.models.dit.adapters import config_from_diffusers
    from kino.models.dit.pretrained import build_dit, read_dit_file

    out = tmp_path / f"dit-{type_name}.gguf"
    assert main(["convert", "gguf", str(wan["folder"]), str(out), "--type", type_name]) == 0
    # the blocks' 20 matrices in the type; the embeddings' five and the head in F16; the rest F32
    printed = capsys.readouterr().out
    assert f"20 {type_name}" in printed and "6 F16" in printed and "43 F32" in printed, printed
    values = _file_values(out)
    assert values["patch_embedding.weight"].shape == (256, 16, 1, 2, 2)  # 5-D, as diffusers reads it
    config = config_from_diffusers(wan["dit"].config)
    dit = build_dit(config, read_dit_file(out, torch.float32, config), out)
    wan["dit"].save_pretrained(tmp_path / "ref" / "transformer")
    theirs = diffusers.WanTransformer3DModel.from_single_file(
        str(out), config=str(tmp_path / "ref"), subfolder="transformer", torch_dtype=torch.float32,
        quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.float32))
    x, t, text = _inputs(2)
    with torch.no_grad():
        expected = _reference(wan["dit"], values)(x, t, text).sample
        unquantized = wan["dit"](x, t, text).sample
        got = dit(x, t, text)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert (got - theirs(x, t, text).sample).abs().max() < 2e-3 * expected.abs().max()
    error = ((got - unquantized).norm() / unquantized.norm()).item()
    # 4 bits: 0.13 on these random weights
    assert 0 < error < {"Q8_0": 0.01, "Q6_K": 0.05, "Q4_K": 0.2, "Q4_0": 0.25}[type_name], error


@pytest.mark.parametrize("type_name", ["Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"])
def test_k_quant_writer(type_name):
    """kino's K-quant bytes read back through the gguf package's reference dequantizer (ggml's
    layout) exactly as through kino's, and err less than gguf-py's own quantization to the
    32-value type of about the same size (K-quants are meant to beat those)."""
    from kino.models.gguf import dequantize
    from kino.models.gguf_quant import quantize_k

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1024, generator=gen) * torch.linspace(0.2, 3, 1024)  # columns of uneven size
    x[3, 5] = 40.0  # an outlier
    x[7] = 0.0  # a zero row
    x[8] = 1.5  # a constant row
    raw = quantize_k(x, type_name)
    qtype = Q[type_name]
    assert raw.dtype == torch.uint8 and raw.shape == (48, 4 * gguf.GGML_QUANT_SIZES[qtype][1])
    reference = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), qtype)).reshape(x.shape)
    torch.testing.assert_close(dequantize(raw, int(qtype), tuple(x.shape)), reference, rtol=0, atol=0)
    assert torch.isfinite(reference).all() and reference[7].abs().max() == 0

    def error(y):
        return (((y - x) ** 2).mean() / (x ** 2).mean()).sqrt().item()

    peer = {"Q6_K": Q.Q5_1, "Q5_K": Q.Q5_0, "Q4_K": Q.Q4_0, "Q3_K": None, "Q2_K": None}[type_name]
    bound = {"Q6_K": 0.02, "Q5_K": 0.04, "Q4_K": 0.08, "Q3_K": 0.18, "Q2_K": 0.3}[type_name]
    assert error(reference) < bound, error(reference)
    if peer is not None:
        theirs = gguf.quants.dequantize(gguf.quants.quantize(x.numpy(), peer), peer)
        assert error(reference) < error(torch.from_numpy(theirs).reshape(x.shape))
    assert (reference[8] - 1.5).abs().max() < 0.1  # a constant row stays (nearly) constant


def test_kino_convert_gguf_errors(wan, tmp_path, capsys):
    from kino.cli import GGUF_WRITE_TYPES
    from kino.models.gguf import WRITE_TYPES

    assert GGUF_WRITE_TYPES == WRITE_TYPES
    assert main(["info", str(wan["file"])]) == 0
    out = capsys.readouterr().out
    assert "GGUF DiT, 2 blocks" in out and "fits: none of kino's named sizes" in out and "2 Q6_K" in out, out
    out = tmp_path / "dit.gguf"
    out.write_bytes(b"")
    assert main(["convert", "gguf", str(wan["folder"]), str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["convert", "gguf", str(wan["folder"]), str(tmp_path / "b.gguf"), "--expert", "2"]) == 2
    assert "no second expert" in capsys.readouterr().err
    assert main(["convert", "gguf", str(wan["folder"]), str(tmp_path / "c.gguf"), "--type", "IQ4_XS"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "b.gguf").exists() and not (tmp_path / "c.gguf").exists()
