"""The UMT5 text encoder's weights from one file (`--text-encoder FILE`,
`UMT5Encoder.from_file`): a GGUF file in llama.cpp's `t5encoder` layout (as
umt5-xxl-encoder-Q8_0.gguf and its kin are published), kept quantized, and safetensors files
in transformers' names (ComfyUI's umt5_xxl_fp16 / fp8_e4m3fn_scaled) or Wan's.

Independent checks: transformers' own GGUF loader (`UMT5EncoderModel.from_pretrained(...,
gguf_file=)`, which dequantizes the whole file with the gguf package) reads the same file and
computes the same features; the files are written here with llama.cpp's names from the gguf
package's own tables, not kino's.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kino.cli import main
from kino.errors import KinoUserError

gguf = pytest.importorskip("gguf")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from test_gguf import random_blocks  # noqa: E402
from test_wan import VAE, WORDS, _perturb, _tokenizer, umt5_to_wan, write_diffusers  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

Q = gguf.GGMLQuantizationType
D_MODEL = 256  # rows of whole K-quant super-blocks
PROMPT = "a cat walks on the grass"
KW = dict(frames=5, height=16, width=32, steps=2, seed=3)
# transformers' encoder names -> llama.cpp's (gguf.constants MODEL_TENSOR names for t5encoder)
LLAMA = {"layer.0.layer_norm": "attn_norm", "layer.0.SelfAttention.q": "attn_q", "layer.0.SelfAttention.k": "attn_k",
         "layer.0.SelfAttention.v": "attn_v", "layer.0.SelfAttention.o": "attn_o",
         "layer.0.SelfAttention.relative_attention_bias": "attn_rel_b", "layer.1.layer_norm": "ffn_norm",
         "layer.1.DenseReluDense.wi_0": "ffn_gate", "layer.1.DenseReluDense.wi_1": "ffn_up",
         "layer.1.DenseReluDense.wo": "ffn_down"}
TYPES = [Q.Q8_0, Q.Q4_K, Q.Q5_0, Q.Q6_K, Q.Q4_1, Q.Q8_0, Q.Q5_K]


def _umt5(seed: int = 0):
    config = transformers.UMT5Config(
        vocab_size=len(WORDS) + 3 + 300, d_model=D_MODEL, d_kv=128, d_ff=512, num_layers=2, num_heads=2,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)
    torch.manual_seed(seed)
    return _perturb(transformers.UMT5EncoderModel(config), seed + 1).eval()


def llama_name(key: str) -> str | None:
    if key == "shared.weight":
        return "token_embd.weight"
    if key == "encoder.final_layer_norm.weight":
        return "enc.output_norm.weight"
    m = re.match(r"encoder\.block\.(\d+)\.(.*)\.weight$", key)
    return None if m is None else f"enc.blk.{m.group(1)}.{LLAMA[m.group(2)]}.weight"


def write_umt5_gguf(path, model, arch: str = "t5encoder") -> dict[str, torch.Tensor]:
    """`model` as llama.cpp's converter lays out a T5 encoder: its matrices quantized (cycling
    through TYPES; gguf-py quantizes the 32-element types, K-quant blocks are random with small
    scales), the token embedding Q8_0, norms and relative-position tables F32; the sizes in
    `t5encoder.*` metadata. Returns the values the file holds (transformers' names),
    dequantized by gguf-py."""
    config = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("umt5-tiny")
    w.add_context_length(512)
    w.add_embedding_length(config.d_model)
    w.add_feed_forward_length(config.d_ff)
    w.add_block_count(config.num_layers)
    w.add_head_count(config.num_heads)
    w.add_key_length(config.d_kv)
    w.add_value_length(config.d_kv)
    w.add_layer_norm_eps(config.layer_norm_epsilon)
    w.add_relative_attn_buckets_count(config.relative_attention_num_buckets)
    w.add_vocab_size(config.vocab_size)
    rng = np.random.default_rng(0)
    values, i = {}, 0
    for key, value in model.state_dict().items():
        name = llama_name(key)
        if name is None:
            continue  # encoder.embed_tokens.weight: transformers' tied copy of shared.weight
        a = value.float().numpy()
        if a.ndim == 2 and "rel_b" not in name:
            qtype = Q.Q8_0 if name == "token_embd.weight" else TYPES[i % len(TYPES)]
            i += 1
            if qtype in (Q.Q8_0, Q.Q4_1, Q.Q5_0):
                data = gguf.quants.quantize(a, qtype)
            else:
                block = gguf.GGML_QUANT_SIZES[qtype][0]
                data = random_blocks(qtype, a.size // block, rng, float(np.abs(a).max()) / 60).reshape(a.shape[0], -1)
            w.add_tensor(name, data, raw_dtype=qtype)
            values[key] = torch.from_numpy(gguf.quants.dequantize(data, qtype)).reshape(value.shape)
        else:
            w.add_tensor(name, a)
            values[key] = value.float()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    values["encoder.embed_tokens.weight"] = values["shared.weight"]
    return values


def _ids():
    ids = torch.randint(0, len(WORDS) + 303, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return ids, mask


def _features(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    root = tmp_path_factory.mktemp("umt5")
    model = _umt5()
    values = write_umt5_gguf(root / "umt5-tiny-mixed.gguf", model)
    tokenizer = root / "tokenizer"
    _tokenizer().save_pretrained(tokenizer)
    return {"root": root, "model": model, "file": root / "umt5-tiny-mixed.gguf", "values": values,
            "tokenizer": tokenizer}


# ---------------------------------------------------------------------------- the encoder


def test_a_gguf_umt5_computes_what_transformers_gguf_loader_computes(text, tmp_path):
    from kino.models.gguf import GGUFEmbedding, GGUFLinear
    from kino.models.text.umt5 import UMT5Encoder

    enc = UMT5Encoder.from_file(text["file"], text["tokenizer"], dtype="float32")
    layers = [m for m in enc.model.modules() if isinstance(m, GGUFLinear)]
    assert len(layers) == 14 and {m.qtype for m in layers} == {int(q) for q in TYPES}
    assert all(m.weight.dtype == torch.int8 for m in layers)  # transformers' FFN leaves int8 weights alone
    assert isinstance(enc.model.shared, GGUFEmbedding) and enc.model.encoder.embed_tokens.weight is not None
    assert enc.quantized
    # transformers' own reader: needs the model's config.json beside the file (as from a Hub repository)
    text["model"].config.save_pretrained(tmp_path)
    shutil.copy(text["file"], tmp_path / "model.gguf")
    ref = transformers.UMT5EncoderModel.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32).eval()
    ids, mask = _ids()
    expected = _features(ref, ids, mask)
    assert (expected - _features(text["model"], ids, mask)).abs().max() > 1e-2  # the quantization shows
    torch.testing.assert_close(_features(enc.model, ids, mask), expected, rtol=0, atol=1e-5)
    # in bfloat16 (Wan's text dtype) the layers dequantize into bfloat16 and equal transformers' bf16 model
    enc16 = UMT5Encoder.from_file(text["file"], text["tokenizer"], dtype="bfloat16")
    got = _features(enc16.model, ids, mask)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, _features(ref.to(torch.bfloat16), ids, mask), rtol=0, atol=1e-2)
    tokens, real = enc.encode([PROMPT, "a dog"])
    assert tokens.shape == (2, 512, D_MODEL) and real.all()


def test_the_quantized_token_table_dequantizes_only_the_rows_looked_up(text):
    from kino.models.gguf import GGUFEmbedding
    from kino.models.text.umt5 import UMT5Encoder

    table = UMT5Encoder.from_file(text["file"], text["tokenizer"], dtype="float32").model.shared
    ids = torch.tensor([[3, 0, 300], [5, 5, 1]])
    torch.testing.assert_close(table(ids), text["values"]["shared.weight"][ids], rtol=0, atol=0)
    table.to(torch.bfloat16)  # the output dtype follows the model's
    assert isinstance(table, GGUFEmbedding) and table(ids).dtype == torch.bfloat16


def test_safetensors_files_in_transformers_comfyuis_fp8_and_wans_names(text, tmp_path):
    from kino.models.text.umt5 import UMT5Encoder

    model = text["model"]
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    ids, mask = _ids()
    expected = _features(model, ids, mask)
    # transformers' names under a checkpoint prefix, with a tokenizer carried as bytes
    save_file({**{f"text_encoders.umt5xxl.transformer.{k}": v for k, v in state.items()},
               "spiece_model": torch.zeros(7, dtype=torch.uint8)}, str(tmp_path / "umt5_fp32.safetensors"))
    save_file(umt5_to_wan(model.state_dict()), str(tmp_path / "umt5_wan.safetensors"))
    for name in ("umt5_fp32", "umt5_wan"):
        enc = UMT5Encoder.from_file(tmp_path / f"{name}.safetensors", text["tokenizer"], dtype="float32")
        torch.testing.assert_close(_features(enc.model, ids, mask), expected, rtol=0, atol=1e-6)
    # ComfyUI's fp8_e4m3fn_scaled: float8 matrices times a scale each
    fp8, values = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for key, value in state.items():
        if value.ndim == 2 and "relative_attention_bias" not in key and key != "shared.weight":
            scale = value.abs().max() / 448
            fp8[key] = (value / scale).to(torch.float8_e4m3fn)
            fp8[key.replace(".weight", ".scale_weight")] = scale.reshape(1)
            values[key] = fp8[key].float() * scale
        else:
            fp8[key] = values[key] = value
    save_file(fp8, str(tmp_path / "umt5_fp8_scaled.safetensors"))
    ref = _umt5()
    ref.load_state_dict({**values, "encoder.embed_tokens.weight": values["shared.weight"]})
    enc = UMT5Encoder.from_file(tmp_path / "umt5_fp8_scaled.safetensors", text["tokenizer"], dtype="float32")
    got, want = _features(enc.model, ids, mask), _features(ref, ids, mask)
    assert (want - expected).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_bad_text_encoder_files_are_clear_errors(text, tmp_path):
    from kino.models.text.umt5 import UMT5Encoder

    def load(path):
        return UMT5Encoder.from_file(path, text["tokenizer"], dtype="float32")

    w = gguf.GGUFWriter(str(tmp_path / "dit.gguf"), "wan")
    w.add_tensor("blocks.0.ffn.0.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(KinoUserError, match="holds a wan model, not a T5 encoder .*go to --dit FILE"):
        load(tmp_path / "dit.gguf")
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(4, 4)}, str(tmp_path / "dit.safetensors"))
    with pytest.raises(KinoUserError, match="dit.safetensors is not a UMT5 encoder: it has no token embedding.*--dit"):
        load(tmp_path / "dit.safetensors")
    state = {k: v for k, v in text["model"].state_dict().items()
             if ("block.1." not in k or "wo" not in k) and k != "encoder.embed_tokens.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "cut.safetensors"))
    with pytest.raises(KinoUserError, match=r"cut.safetensors holds weights that do not fit a UMT5 encoder: .*wo"):
        load(tmp_path / "cut.safetensors")
    with pytest.raises(KinoUserError, match="a text encoder weights file is .gguf or .safetensors"):
        load(tmp_path / "umt5.pth")
    with pytest.raises(KinoUserError, match="does not exist"):
        load(tmp_path / "missing.gguf")


# ---------------------------------------------------------------------------- in a Wan pipeline


@pytest.fixture(scope="module")
def wan(tmp_path_factory, text):
    """A tiny Wan2.1 folder (diffusers layout) whose DiT reads 256-wide text features."""
    root = tmp_path_factory.mktemp("wan-text")
    torch.manual_seed(5)
    dit = _perturb(diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=D_MODEL, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024), 6).eval()
    vae = _perturb(diffusers.AutoencoderKLWan(**VAE), 7).eval()
    folder = write_diffusers(root / "Wan2.1-T2V-text", (dit, vae, text["model"], _tokenizer()))
    # the same folder whose text encoder holds the GGUF file's values (the reference pipeline)
    ref = _umt5()
    ref.load_state_dict(text["values"])
    ref_folder = write_diffusers(root / "Wan2.1-T2V-text-ref", (dit, vae, ref, _tokenizer()))
    return {"root": root, "folder": folder, "ref_folder": ref_folder}


def test_generation_with_a_gguf_text_encoder_equals_its_values_in_float(wan, text):
    from kino.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(wan["folder"], text_dtype="float32", text_encoder_file=text["file"])
    assert pipe.text_quantized and not pipe.quantized
    got = pipe.generate(PROMPT, **KW)
    expected = Pipeline.from_pretrained(wan["ref_folder"], text_dtype="float32").generate(PROMPT, **KW)
    plain = Pipeline.from_pretrained(wan["folder"], text_dtype="float32").generate(PROMPT, **KW)
    assert (plain.latents - expected.latents).abs().max() > 1e-3  # the file's values, not the folder's
    torch.testing.assert_close(got.latents, expected.latents, rtol=0, atol=1e-4)
    with pytest.raises(KinoUserError, match="text encoder holds GGUF-quantized layers"):
        pipe.save_pretrained(wan["root"] / "never")


def test_kino_generate_and_convert_with_text_encoder_on_a_folder_without_its_weights(wan, text, tmp_path, capsys,
                                                                                    monkeypatch):
    """The small-memory set-up: a Hub repository's VAE, DiT and tokenizer, the text encoder
    from a GGUF file (its weights in the repository are not downloaded: here they are not even
    in the offline cache); then `kino convert wan --text-encoder` to a kino folder (bfloat16),
    which loads with a text encoder file too, its own UMT5 weights gone."""
    from test_hub import hub_without

    from kino.data.video_io import read_video
    from kino.pipeline import Pipeline

    folder, calls = hub_without(tmp_path, monkeypatch, "Wan-AI/text", wan["folder"], "text_encoder/*.safetensors")
    out = tmp_path / "clip.mp4"
    args = ["--frames", "5", "--size", "16x32", "--steps", "2", "-q"]
    code = main(["generate", PROMPT, "--model", "Wan-AI/text", "--text-encoder", str(text["file"]), "-o", str(out),
                 *args])
    assert code == 0, capsys.readouterr().err
    assert read_video(out)[0].shape == (5, 16, 32, 3)
    assert "text_encoder/model*.safetensors" in calls[0]["ignore_patterns"]
    code = main(["generate", PROMPT, "--model", str(folder), "-o", str(out), *args])
    assert code == 2 and "--text-encoder FILE" in capsys.readouterr().err

    dst = tmp_path / "converted"
    assert main(["convert", "wan", "Wan-AI/text", str(dst), "--text-encoder", str(text["file"]), "-q"]) == 0
    converted = Pipeline.from_pretrained(dst)
    assert not converted.text_quantized
    assert next(converted.text_encoder.model.parameters()).dtype == torch.bfloat16
    from_file = Pipeline.from_pretrained(wan["folder"], text_encoder_file=text["file"])  # bfloat16, Wan's default
    torch.testing.assert_close(converted.generate(PROMPT, **KW).latents, from_file.generate(PROMPT, **KW).latents,
                               rtol=0, atol=0)
    for f in (dst / "text_encoder" / "umt5").glob("*.safetensors"):
        f.unlink()
    again = Pipeline.from_pretrained(dst, text_encoder_file=text["file"])
    assert again.text_quantized
    with pytest.raises(KinoUserError, match="is missing"):
        Pipeline.from_pretrained(dst)


def test_text_encoder_file_on_a_minilm_model_is_an_error(text, capsys):
    code = main(["generate", "a red circle", "--text-encoder", str(text["file"]), "-o", "never.mp4", "-q"])
    assert code == 2 and "stands in for a UMT5 encoder" in capsys.readouterr().err


def test_kino_info_describes_a_umt5_gguf(text, capsys):
    assert main(["info", str(text["file"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["components"]["text_encoder"]
    expected: dict[str, int] = {}
    for t in gguf.GGUFReader(text["file"]).tensors:  # the file's own account of its types
        name = "float32" if t.tensor_type == Q.F32 else t.tensor_type.name
        expected[name] = expected.get(name, 0) + 1
    assert info["tensors"] == expected and sum(expected.values()) == 22
    assert (info["layers"], info["dim"], info["heads"], info["vocabulary"]) == (2, D_MODEL, 2, len(WORDS) + 303)
    assert info["parameters"] == sum(p.numel() for p in text["model"].parameters())
    assert main(["info", str(text["file"])]) == 0
    assert "GGUF UMT5 encoder (for --text-encoder), 2 layers" in capsys.readouterr().out


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_K"])
def test_kino_convert_gguf_text_encoder_writes_what_transformers_and_kino_read(wan, text, tmp_path, capsys,
                                                                             type_name):
    """`kino convert gguf SRC DST --component text_encoder`: the folder's UMT5 in llama.cpp's
    t5encoder layout; transformers' GGUF loader reads it as kino does, close to the original."""
    from test_wan import _components, write_original

    from kino.models.text.umt5 import UMT5Encoder

    out = tmp_path / f"umt5-{type_name}.gguf"
    assert main(["convert", "gguf", str(wan["folder"]), str(out), "--component", "text_encoder",
                 "--type", type_name]) == 0
    printed = capsys.readouterr().out
    assert f"15 {type_name}" in printed and "7 F32" in printed, printed  # 14 matrices + the token table
    enc = UMT5Encoder.from_file(out, text["tokenizer"], dtype="float32")
    text["model"].config.save_pretrained(tmp_path)
    ref = transformers.UMT5EncoderModel.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    ids, mask = _ids()
    got = _features(enc.model, ids, mask)
    torch.testing.assert_close(got, _features(ref, ids, mask), rtol=0, atol=1e-5)
    # every tensor where it belongs: as transformers reads them, each within its type's error of the original
    # (the random encoder's features are too sensitive to compare: its attention logits are unscaled)
    original = text["model"].state_dict()
    for key, value in ref.state_dict().items():
        error = ((value - original[key]).norm() / original[key].norm()).item()
        if value.ndim == 2 and "relative_attention_bias" not in key:
            assert 0 < error < {"Q8_0": 0.01, "Q4_K": 0.1}[type_name], (key, error)
        else:
            assert error == 0, key
    # the same from Wan's original layout (its T5 .pth), and errors
    dit, vae, _, tokenizer = _components()
    original_folder = write_original(tmp_path / "original", (dit, vae, text["model"], tokenizer))
    again = tmp_path / f"umt5-{type_name}-original.gguf"
    assert main(["convert", "gguf", str(original_folder), str(again), "--component", "text_encoder",
                 "--type", type_name, "-q"]) == 0
    assert again.read_bytes() == out.read_bytes() or torch.equal(
        _features(UMT5Encoder.from_file(again, text["tokenizer"], dtype="float32").model, ids, mask), got)
    assert main(["convert", "gguf", str(wan["folder"]), str(tmp_path / "x.gguf"), "--component", "text_encoder",
                 "--expert", "2"]) == 2
    assert "one text encoder" in capsys.readouterr().err
    from kino.models.folder import default_model_dir

    assert main(["convert", "gguf", str(default_model_dir()), str(tmp_path / "x.gguf"), "--component",
                 "text_encoder"]) == 2
    assert "'minilm'" in capsys.readouterr().err


def test_a_whole_t5_file_reads_its_encoder_and_a_text_file_is_no_dit(text, wan, tmp_path, capsys):
    """A GGUF of a whole T5 (its decoder, dec.*, and output head beside the encoder) gives its
    encoder; a text encoder file given as --dit is a clear error that says where it goes."""
    from kino.models.text.umt5 import UMT5Encoder

    reader = gguf.GGUFReader(text["file"])
    w = gguf.GGUFWriter(str(tmp_path / "t5-whole.gguf"), "t5")
    w.add_name("umt5-whole")
    for t in reader.tensors:  # the encoder's tensors as they are
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=None if t.tensor_type == Q.F32 else t.tensor_type)
    w.add_tensor("dec.blk.0.attn_q.weight", np.zeros((D_MODEL, D_MODEL), np.float32))
    w.add_tensor("output.weight", np.zeros((len(WORDS) + 303, D_MODEL), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    ids, mask = _ids()
    whole = UMT5Encoder.from_file(tmp_path / "t5-whole.gguf", text["tokenizer"], dtype="float32")
    encoder = UMT5Encoder.from_file(text["file"], text["tokenizer"], dtype="float32")
    torch.testing.assert_close(_features(whole.model, ids, mask), _features(encoder.model, ids, mask), rtol=0, atol=0)
    code = main(["generate", PROMPT, "--model", str(wan["folder"]), "--dit", str(text["file"]), "--frames", "1",
                 "-o", str(tmp_path / "x.png"), "-q"])
    assert code == 2 and "holds a text encoder (it has a token table), not a DiT: give it as --text-encoder" in \
        capsys.readouterr().err


def test_fine_tuning_with_init_text_encoder_file(wan, text, tmp_path, capsys):
    """`init_text_encoder_file`: `kino preprocess` encodes the captions with the GGUF UMT5 (the
    converted folder's own UMT5 weights are gone), the cache records which file, and a LoRA
    trains on that cache."""
    from test_wan import video_run_config

    from kino.data.latent_cache import LatentCache
    from kino.models.text.umt5 import UMT5Encoder
    from kino.training.dit import DiTRunConfig

    kino_folder = tmp_path / "wan-kino"
    assert main(["convert", "wan", str(wan["folder"]), str(kino_folder), "-q"]) == 0
    for f in (kino_folder / "text_encoder" / "umt5").glob("*.safetensors"):
        f.unlink()
    config = tmp_path / "run.toml"
    body = video_run_config(tmp_path, kino_folder)
    config.write_text(body.replace(f'init_from = "{kino_folder}"\n', f'init_from = "{kino_folder}"\n'
                                   f'init_text_encoder_file = "{text["file"]}"\n') + "[lora]\nrank = 2\n")
    assert main(["preprocess", "--config", str(config), "-q"]) == 0, capsys.readouterr().err
    cache = LatentCache(tmp_path / "cache")
    assert cache.meta["text_encoder"]["name"] == f"UMT5Encoder from {text['file'].name}"
    enc = UMT5Encoder.from_file(text["file"], kino_folder / "text_encoder" / "tokenizer", dtype="float32")
    bucket = cache.buckets[0]
    expected, _ = enc.encode(cache.captions(bucket)[:1])
    got = cache.get(bucket, [0])["text"][0].float()  # stored in float16
    torch.testing.assert_close(got, expected[0], rtol=2e-3, atol=2e-3)
    assert expected.abs().max() > 0.1
    assert main(["train", "dit", "--config", str(config), "-q"]) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "lora.safetensors").is_file()
    with pytest.raises(KinoUserError, match="init_text_encoder_file needs init_from"):
        DiTRunConfig(init_text_encoder_file=str(text["file"]))


def test_text_dtype_auto_computes_a_gguf_text_encoder_in_float32_on_a_cpu(wan, text, tmp_path, capsys):
    from types import SimpleNamespace

    from kino.cli import text_dtype

    def rule(file, device, asked="auto"):
        return text_dtype(SimpleNamespace(text_dtype=asked, text_encoder=file), torch.device(device))

    assert rule("umt5-Q8_0.gguf", "cpu") == "float32" and rule("umt5-Q8_0.gguf", "cuda") is None
    assert rule("umt5_xxl_fp16.safetensors", "cpu") is None and rule(None, "cpu") is None
    assert rule("umt5-Q8_0.gguf", "cpu", "bfloat16") == "bfloat16"
    for dtype in ("auto", "bfloat16"):
        out = tmp_path / f"{dtype}.mp4"
        assert main(["generate", PROMPT, "--model", str(wan["folder"]), "--text-encoder", str(text["file"]),
                     "--text-dtype", dtype, "--frames", "5", "--size", "16x32", "--steps", "2", "-o", str(out),
                     "-q"]) == 0, capsys.readouterr().err
    assert (tmp_path / "auto.mp4").read_bytes() != (tmp_path / "bfloat16.mp4").read_bytes()
