"""Wan2.1 weights in kino (kino/convert/wan.py, kino/models/text/umt5.py): tiny random models
written in diffusers' layout and in Wan's original layout load through `kino convert wan` and
`--model` into kino's classes and compute what diffusers / transformers compute.

The original layout is written by this test with its own key table (from the names in Wan's
wan/modules/{model,vae,t5}.py), independent of kino's adapters, so a wrong adapter rule cannot
be mirrored here. No downloads: the tokenizer is a small word-level `tokenizers` model built
here (no sentencepiece UMT5 tokenizer can be made offline), saved as a transformers fast
tokenizer folder with T5's conventions (<pad> = 0, </s> = 1 appended, <unk> = 2).
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from kino.cli import main
from kino.models.dit import DIT_SIZES

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

DIT = DIT_SIZES["tiny"]  # dim 32, 2 heads, 2 layers, text_dim 24
VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
           temperal_downsample=[False, True, True])
WORDS = "a cat walks on the grass red circle moving left dog runs in snow".split()
TEXT_LEN = 12


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb(model: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Seeded noise on every parameter, so zero-initialised layers and unit norms take part."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


# ---------------------------------------------------------------------------- tiny components


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _components(seed: int = 0):
    torch.manual_seed(seed)
    dit = diffusers.WanTransformer3DModel(
        patch_size=DIT.patch_size, num_attention_heads=DIT.num_heads, attention_head_dim=DIT.head_dim,
        in_channels=16, out_channels=16, text_dim=DIT.text_dim, freq_dim=DIT.freq_dim, ffn_dim=DIT.ffn_dim,
        num_layers=DIT.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=DIT.eps,
        rope_max_seq_len=DIT.rope_max_len)
    vae = diffusers.AutoencoderKLWan(**VAE)
    config = transformers.UMT5Config(
        vocab_size=len(WORDS) + 3, d_model=DIT.text_dim, d_kv=8, d_ff=40, num_layers=2, num_heads=2,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)
    text = transformers.UMT5EncoderModel(config)
    return (_perturb(dit, seed + 1).eval(), _perturb(vae, seed + 2).eval(), _perturb(text, seed + 3).eval(),
            _tokenizer())


@pytest.fixture(scope="module")
def components():
    return _components()


# ---------------------------------------------------------------------------- the two layouts on disk


def write_diffusers(root, components):
    dit, vae, text, tokenizer = components
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"]}))
    dit.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    text.save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    return root


# diffusers name -> Wan2.1 original name (wan/modules/model.py), as in diffusers' conversion script.
DIT_TO_WAN = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1.to_out.0", "self_attn.o"), ("attn2.to_out.0", "cross_attn.o"),
    ("attn1.to_", "self_attn."), ("attn2.to_", "cross_attn."),
    ("attn1.norm_", "self_attn.norm_"), ("attn2.norm_", "cross_attn.norm_"),
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
    (".norm2.", ".norm3."),  # diffusers' norm2 is Wan's cross-attention norm3
]


def dit_to_wan(state):
    out = {}
    for key, value in state.items():
        if key == "scale_shift_table":
            out["head.modulation"] = value
            continue
        key = key.replace("proj_out.", "head.head.").replace(".scale_shift_table", ".modulation")
        for old, new in DIT_TO_WAN:
            key = key.replace(old, new)
        out[key] = value
    return out


def vae_to_wan(state, num_res_blocks: int):
    """diffusers AutoencoderKLWan -> Wan2.1_VAE.pth names (wan/modules/vae.py)."""
    per_stage = num_res_blocks + 2  # residual blocks + upsample, in Wan's flat decoder list
    out = {}
    for key, value in state.items():
        m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)", key)
        if m:
            j = int(m.group(3)) if m.group(3) is not None else per_stage - 1
            key = f"decoder.upsamples.{int(m.group(1)) * per_stage + j}.{m.group(4)}"
        for old, new in [("quant_conv.", "conv1."), ("post_conv1.", "conv2."), ("conv_in.", "conv1."),
                         ("norm_out.", "head.0."), ("conv_out.", "head.2."), ("mid_block.resnets.0.", "middle.0."),
                         ("mid_block.attentions.0.", "middle.1."), ("mid_block.resnets.1.", "middle.2."),
                         ("down_blocks.", "downsamples."), ("conv_shortcut.", "shortcut.")]:
            key = key.replace(old, new)
        key = re.sub(r"\.norm1\.gamma$", ".residual.0.gamma", key)
        key = re.sub(r"\.norm2\.gamma$", ".residual.3.gamma", key)
        key = re.sub(r"\.(middle\.[02]|downsamples\.\d+|upsamples\.\d+)\.conv1\.", r".\1.residual.2.", key)
        key = re.sub(r"\.(middle\.[02]|downsamples\.\d+|upsamples\.\d+)\.conv2\.", r".\1.residual.6.", key)
        out[key] = value
    assert "conv2.weight" in out and "decoder.conv1.weight" in out
    return out


def umt5_to_wan(state):
    """transformers UMT5EncoderModel -> Wan's T5Encoder names (wan/modules/t5.py)."""
    out = {"token_embedding.weight": state["shared.weight"]}
    table = {"layer.0.layer_norm": "norm1", "layer.0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
             "layer.1.layer_norm": "norm2", "layer.1.DenseReluDense.wi_0": "ffn.gate.0",
             "layer.1.DenseReluDense.wi_1": "ffn.fc1", "layer.1.DenseReluDense.wo": "ffn.fc2"}
    for key, value in state.items():
        m = re.match(r"encoder\.block\.(\d+)\.(.*)\.weight$", key)
        if m:
            inner = m.group(2)
            name = table.get(inner) or inner.replace("layer.0.SelfAttention.", "attn.")
            out[f"blocks.{m.group(1)}.{name}.weight"] = value
    out["norm.weight"] = state["encoder.final_layer_norm.weight"]
    return out


def write_original(root, components):
    dit, vae, text, tokenizer = components
    root.mkdir(parents=True)
    # WanModel's config.json; text_dim and patch_size are left out of the released ones (class
    # defaults 4096 and 1x2x2) but the tiny model needs text_dim 24.
    (root / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v", "dim": DIT.dim,
        "ffn_dim": DIT.ffn_dim, "freq_dim": DIT.freq_dim, "in_dim": 16, "out_dim": 16, "num_heads": DIT.num_heads,
        "num_layers": DIT.num_layers, "eps": DIT.eps, "text_len": 512, "text_dim": DIT.text_dim}))
    save_file({k: v.contiguous() for k, v in dit_to_wan(dit.state_dict()).items()},
              str(root / "diffusion_pytorch_model.safetensors"))
    torch.save(vae_to_wan(vae.state_dict(), VAE["num_res_blocks"]), root / "Wan2.1_VAE.pth")
    torch.save(umt5_to_wan(text.state_dict()), root / "models_t5_umt5-xxl-enc-bf16.pth")
    tokenizer.save_pretrained(root / "google" / "umt5-xxl")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory, components):
    root = tmp_path_factory.mktemp("wan")
    return {"original": write_original(root / "Wan2.1-T2V-tiny", components),
            "diffusers": write_diffusers(root / "Wan2.1-T2V-tiny-Diffusers", components)}


# ---------------------------------------------------------------------------- reference computations


def _dit_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 3, 4, 6, generator=gen)  # (B, C, T, H, W)
    t = torch.tensor([999.0, 321.5])
    text = torch.randn(2, 7, DIT.text_dim, generator=gen)
    return x, t, text


def check_pipeline_matches(pipe, components):
    """kino's DiT, VAE and text encoder against diffusers / transformers on the same inputs."""
    dit, vae, text, tokenizer = components
    x, t, ctx = _dit_inputs()
    video = torch.rand(1, 3, 5, 32, 48, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        expected = dit(x, t, ctx).sample
        assert expected.std() > 0.1
        torch.testing.assert_close(pipe.dit(x, t, ctx), expected, rtol=0, atol=1e-5)

        posterior = vae.encode(video).latent_dist
        mean, logvar = pipe.vae.encode(video)
        torch.testing.assert_close(mean, posterior.mean, rtol=0, atol=1e-4)
        torch.testing.assert_close(logvar, posterior.logvar, rtol=0, atol=1e-4)
        torch.testing.assert_close(pipe.vae.decode(mean), vae.decode(posterior.mean).sample, rtol=0, atol=1e-4)
    assert pipe.vae.config.latents_mean == list(vae.config.latents_mean)
    check_text_matches(pipe.text_encoder, text, tokenizer)


def check_text_matches(encoder, text, tokenizer, prompts=("a cat walks on the  grass", "red circle moving left")):
    """kino's (tokens, mask) == transformers' last hidden state on the real tokens, zeros after."""
    tokens, mask = encoder.encode(list(prompts))
    assert tokens.shape == (2, encoder.max_length, text.config.d_model) and tokens.dtype == torch.float32
    for i, prompt in enumerate(prompts):
        ids = tokenizer(" ".join(prompt.split()), return_tensors="pt")["input_ids"]  # cleaned, + </s>
        n = ids.shape[1]
        with torch.no_grad():
            expected = text(input_ids=ids).last_hidden_state[0]
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(tokens[i, :n], expected, rtol=0, atol=1e-5)
        assert (tokens[i, n:] == 0).all()
    assert mask.all()  # Wan attends to the zero padding too: the DiT sees all max_length positions
    # kino encodes the prompts padded to the longest only; Wan (and diffusers) encode all max_length
    # positions with the padding masked: the same features
    batch = tokenizer([" ".join(p.split()) for p in prompts], padding="max_length", max_length=encoder.max_length,
                      return_tensors="pt")
    with torch.no_grad():
        padded = text(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(tokens, padded * batch["attention_mask"][..., None], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_wan_folder_loads_as_is_and_matches_diffusers(folders, components, layout):
    from kino.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(folders[layout], text_dtype="float32")
    assert pipe.dit.config == DIT
    assert (pipe.defaults.frames, pipe.defaults.height, pipe.defaults.width, pipe.defaults.fps) == (81, 480, 832, 16)
    assert (pipe.defaults.steps, pipe.defaults.guidance, pipe.defaults.shift) == (50, 5.0, 5.0)
    assert pipe.defaults.negative.startswith("色调艳丽")
    check_pipeline_matches(pipe, components)


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_kino_convert_wan_writes_a_kino_folder_that_matches_diffusers(folders, components, layout, tmp_path,
                                                                      capsys):
    from kino.pipeline import Pipeline

    dst = tmp_path / "kino-wan"
    assert main(["convert", "wan", str(folders[layout]), str(dst)]) == 0
    assert str(dst) in capsys.readouterr().out
    manifest = json.loads((dst / "kino.json").read_text())
    assert set(manifest["components"]) == {"vae", "dit", "text_encoder"}
    text_files = manifest["components"]["text_encoder"]["files"]
    assert "umt5/model.safetensors" in text_files and any(f.startswith("tokenizer/") for f in text_files)
    pipe = Pipeline.from_pretrained(dst)  # sha256-checked; the text encoder keeps its stored dtype
    assert next(pipe.text_encoder.model.parameters()).dtype == torch.float32
    check_pipeline_matches(pipe, components)

    # an altered file of the text encoder is refused like any other component's
    weights = dst / "text_encoder" / "umt5" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    code = main(["generate", "x", "--model", str(dst), "-o", str(tmp_path / "o.mp4"), "-q"])
    assert code == 2 and "integrity" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_wan_folder_from_the_hub(folders, components, layout, tmp_path, monkeypatch):
    """`--model Wan-AI/...` and `kino convert wan Wan-AI/... DST`: a Wan2.1 repository in the
    huggingface_hub cache (here written by the test, offline) loads by its id, hash-checked,
    and carries the repository's name."""
    from huggingface_hub import constants
    from test_hub import hub_cache

    from kino.pipeline import Pipeline

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_cache(tmp_path / "hf", f"Wan-AI/tiny-{layout}", folders[layout])
    pipe = Pipeline.from_pretrained(f"Wan-AI/tiny-{layout}", text_dtype="float32")
    assert pipe.name == f"Wan-AI/tiny-{layout}"
    check_pipeline_matches(pipe, components)
    assert main(["convert", "wan", f"Wan-AI/tiny-{layout}", str(tmp_path / "kino-wan")]) == 0
    assert json.loads((tmp_path / "kino-wan" / "kino.json").read_text())["name"] == f"Wan-AI/tiny-{layout} (kino)"


def test_umt5_encoder_matches_transformers(tmp_path, components):
    from kino.models.text.umt5 import UMT5Encoder

    _, _, text, tokenizer = components
    text.save_pretrained(tmp_path / "umt5")
    tokenizer.save_pretrained(tmp_path / "tok")
    encoder = UMT5Encoder.from_folder(tmp_path / "umt5", tmp_path / "tok", max_length=TEXT_LEN, dtype="float32")
    check_text_matches(encoder, text, tokenizer)
    # kino's usual contract instead of Wan's: the mask marks the real tokens only
    encoder.attend_padding = False
    _, mask = encoder.encode(["a cat", "dog runs in snow"])
    assert mask.sum(1).tolist() == [3, 5]
    # bf16 (Wan's choice) stays close to fp32
    bf16 = UMT5Encoder.from_folder(tmp_path / "umt5", tmp_path / "tok", max_length=TEXT_LEN)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    a, _ = encoder.encode(["a cat walks"])
    b, _ = bf16.encode(["a cat walks"])
    assert b.dtype == torch.float32 and (a - b).abs().max() < 0.05 * a.abs().max()


def test_generate_on_a_wan_folder(folders, tmp_path, capsys):
    from kino.data.video_io import read_metadata, read_video

    out = tmp_path / "clip.mp4"
    code = main(["generate", "a cat walks on the grass", "--model", str(folders["original"]), "--frames", "5",
                 "--size", "16x32", "--steps", "2", "--text-device", "cpu", "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    video, fps = read_video(out)
    assert video.shape == (5, 16, 32, 3) and fps == 16
    meta = read_metadata(out)
    assert meta["negative"].startswith("色调艳丽") and meta["guidance"] == "5.0" and meta["shift"] == "5.0"


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_wan_folder_in_small_gpu_mode(folders, layout):
    """A memory plan reads the DiT straight into its compute dtype (here bf16, tensor by tensor)
    and streams fp8 blocks; the result stays close to the float32 pipeline's."""
    from kino.models.memory import MemoryPlan
    from kino.pipeline import Pipeline

    kw = dict(frames=5, height=16, width=32, steps=2, seed=1)
    base = Pipeline.from_pretrained(folders[layout], text_dtype="float32").generate("a cat", **kw)
    pipe = Pipeline.from_pretrained(folders[layout], text_dtype="float32",
                                    memory=MemoryPlan(dtype="bfloat16", weights="fp8", offload="model"))
    assert pipe.dit.patch_embedding.weight.dtype == torch.bfloat16 and pipe.vae.conv2.weight.dtype == torch.float32
    small = pipe.generate("a cat", **kw)
    err = (small.latents - base.latents).abs().mean() / base.latents.abs().mean()
    assert 0 < err < 0.05, err


def assert_fsdp_matches_one_process(folder, tmp_path, *extra):
    """`kino generate --fsdp` in 2 torchrun-style processes on `folder` gives the one-process
    image (within 2 grey levels: attention sums in another order)."""
    import sys

    import numpy as np
    from test_distributed import TIMEOUT, launch

    from kino.data.video_io import read_video

    args = ["a cat walks on the grass", "--model", str(folder), "--frames", "1", "--size", "16x32", *extra, "-q"]
    assert main(["generate", *args, "-o", str(tmp_path / "one.png")]) == 0
    procs = launch(2, command=[sys.executable, "-m", "kino", "generate", *args, "-o", str(tmp_path / "two.png"),
                               "--fsdp"])
    for p in procs:
        out = p.communicate(timeout=TIMEOUT)[0]
        assert p.returncode == 0, out
    one, two = (read_video(tmp_path / f"{n}.png")[0].astype(np.int16) for n in ("one", "two"))
    assert np.abs(one - two).max() <= 2


def test_wan_folder_with_fsdp_in_two_processes(folders, tmp_path):
    """`torchrun --nproc-per-node 2 -m kino generate --fsdp` on a Wan folder: the DiT and the
    UMT5 encoder are sharded over both processes (its tied `shared` / `encoder.embed_tokens`
    table as one group) and the image equals the one-process image."""
    assert_fsdp_matches_one_process(folders["diffusers"], tmp_path, "--steps", "2")


# ---------------------------------------------------------------------------- bad input


class NotATensor:
    pass


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case", ["no-vae", "no-t5", "no-tokenizer", "no-dit", "diffusers-no-vae", "shapes",
                                  "pickle", "i2v"])
def test_bad_wan_folders_exit_2_naming_the_file(folders, tmp_path, capsys, case):
    layout = "diffusers" if case.startswith("diffusers") else "original"
    root = _copy(folders[layout], tmp_path / "wan")
    if case == "no-vae":
        (root / "Wan2.1_VAE.pth").unlink()
        named = "Wan2.1_VAE.pth is missing"
    elif case == "no-t5":
        (root / "models_t5_umt5-xxl-enc-bf16.pth").unlink()
        named = "models_t5_umt5-xxl-enc-bf16.pth is missing"
    elif case == "no-tokenizer":
        import shutil

        shutil.rmtree(root / "google")
        named = "umt5-xxl is missing"
    elif case == "no-dit":
        (root / "diffusion_pytorch_model.safetensors").unlink()
        named = "diffusion_pytorch_model.safetensors is missing"
    elif case == "diffusers-no-vae":
        (root / "vae" / "diffusion_pytorch_model.safetensors").unlink()
        named = "vae/diffusion_pytorch_model.safetensors is missing"
    elif case == "shapes":
        config = json.loads((root / "config.json").read_text())
        (root / "config.json").write_text(json.dumps({**config, "ffn_dim": 48}))
        named = "diffusion_pytorch_model.safetensors holds weights that do not fit its config"
    elif case == "pickle":
        torch.save({"encoder.conv1.weight": torch.zeros(1), "note": NotATensor()}, root / "Wan2.1_VAE.pth")
        named = "Wan2.1_VAE.pth is not a weights-only checkpoint"
    else:  # an image-to-video config (tests/test_wan_i2v.py): its CLIP image encoder is missing here
        config = json.loads((root / "config.json").read_text())
        (root / "config.json").write_text(json.dumps({**config, "model_type": "i2v"}))
        named = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth is missing"
    for argv in (["convert", "wan", str(root), str(tmp_path / "out")],
                 ["generate", "x", "--model", str(root), "-o", str(tmp_path / "x.mp4"), "-q"]):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, err
        assert named in err and "Traceback" not in err
        assert err.startswith("kino: error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_non_empty_destination_and_non_wan_folders(folders, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["convert", "wan", str(folders["original"]), str(dst)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["convert", "wan", str(tmp_path / "nowhere"), str(tmp_path / "d2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["convert", "wan", str(empty), str(tmp_path / "d3")]) == 2
    assert "is not a Wan2.1 folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------- sampling parity


def test_sampling_matches_diffusers_wan_pipeline(folders, components):
    """Same tiny components, same initial noise: kino's UniPC + flow shift + CFG + Wan's prompt
    handling == diffusers' WanPipeline with UniPCMultistepScheduler (flow sigmas, shift 5)."""
    from kino.pipeline import Pipeline

    dit, vae, text, tokenizer = components
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  num_train_timesteps=1000, flow_shift=5.0)
    reference = diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=text, transformer=dit, vae=vae,
                                      scheduler=scheduler)
    reference.set_progress_bar_config(disable=True)
    pipe = Pipeline.from_pretrained(folders["diffusers"], text_dtype="float32")
    assert (pipe.defaults.sampler, pipe.defaults.t_max, pipe.defaults.t_min) == ("unipc", 0.999, 0.0)  # Wan's own
    # diffusers' grid (see sampling_timesteps): from 1 to 0.001, then its first time moved from 1
    # to 1 - 1e-6 after the shift; kino starts at the unshifted time that shifts to 1 - 1e-6
    start = (1 - 1e-6) / (5.0 - 4.0 * (1 - 1e-6))
    pipe.defaults = dataclasses.replace(pipe.defaults, t_max=start, t_min=0.001)
    prompt, negative, steps = "a cat walks on the grass", "dog in snow", 6
    clip = pipe.generate(prompt, negative=negative, frames=5, height=16, width=32, steps=steps, seed=3)
    noise = torch.randn(clip.latents.shape, generator=torch.Generator().manual_seed(3))  # kino's noise
    kw = dict(prompt=prompt, negative_prompt=negative, height=16, width=32, num_frames=5, num_inference_steps=steps,
              guidance_scale=5.0, max_sequence_length=512)
    with torch.no_grad():
        latents = reference(latents=noise.clone(), output_type="latent", **kw).frames
        frames = reference(latents=noise.clone(), output_type="np", **kw).frames[0]  # (F, H, W, 3) in [0, 1]
    assert latents.std() > 0.1
    torch.testing.assert_close(clip.latents, latents, rtol=0, atol=1e-4)  # seen: < 1e-5
    assert abs(clip.video.float() / 255 - torch.from_numpy(frames)).max() <= 1 / 255 + 1e-3
    # a kino sampler other than Wan's gives a different clip: the comparison above is not vacuous
    other = pipe.generate(prompt, negative=negative, frames=5, height=16, width=32, steps=steps, seed=3,
                          sampler="euler")
    assert (other.latents - latents).abs().max() > 1e-2


def video_run_config(tmp_path, init_from) -> str:
    """A `kino preprocess` + `kino train dit` config (TOML, no [lora]) fine-tuning `init_from`
    for 2 steps on 4 Shapes World clips written as a video folder under tmp_path."""
    videos = tmp_path / "videos"
    assert main(["world", "sample", "--out", str(videos), "--n", "4", "--frames", "9", "--size", "64x64", "-q"]) == 0
    return f"""init_from = "{init_from}"
[dataset]
captions = "{videos / 'captions.jsonl'}"
fps = 8.0
buckets = ["9x32x32"]
part_size = 2
[cache]
dir = "{tmp_path / 'cache'}"
[data]
batch_size = 2
[train]
out_dir = "{tmp_path / 'run'}"
max_steps = 2
lr = 1e-2
log_every = 1
checkpoint_every = 0
progress = false
device = "cpu"
"""


def test_lora_fine_tune_of_a_wan_folder_on_videos(folders, tmp_path, capsys):
    """The workflow of a Wan user: convert, `kino preprocess` a video folder (its captions go
    through the model's own UMT5, 512 tokens, not MiniLM), `kino train dit` a LoRA, then
    `kino generate --lora` with it; and a full fine-tune exports a whole Wan pipeline."""
    from kino.data.latent_cache import LatentCache
    from kino.pipeline import Pipeline

    wan = tmp_path / "wan-kino"
    assert main(["convert", "wan", str(folders["diffusers"]), str(wan)]) == 0
    config = tmp_path / "run.toml"
    body = video_run_config(tmp_path, wan)
    config.write_text(body + "[lora]\nrank = 2\n")
    assert main(["preprocess", "--config", str(config), "-q"]) == 0, capsys.readouterr().err
    cache = LatentCache(tmp_path / "cache")
    assert cache.meta["text_encoder"]["name"].endswith("UMT5Encoder") and cache.text_dim == DIT.text_dim
    assert cache.get(cache.buckets[0], [0])["text"].shape[1] == 512  # Wan's token count, padding included
    assert main(["train", "dit", "--config", str(config), "-q"]) == 0, capsys.readouterr().err
    lora = tmp_path / "run" / "lora.safetensors"
    assert lora.is_file()
    args = ["generate", "a cat walks", "--model", str(wan), "--frames", "5", "--size", "16x32", "--steps", "2", "-q"]
    assert main([*args, "-o", str(tmp_path / "plain.mp4")]) == 0
    assert main([*args, "--lora", str(lora), "-o", str(tmp_path / "lora.mp4")]) == 0, capsys.readouterr().err
    assert (tmp_path / "plain.mp4").read_bytes() != (tmp_path / "lora.mp4").read_bytes()
    # a full fine-tune (no [lora]) exports the parent's pipeline around the new DiT
    config.write_text(body.replace(str(tmp_path / "run"), str(tmp_path / "full")))
    assert main(["train", "dit", "--config", str(config), "-q"]) == 0, capsys.readouterr().err
    tuned = Pipeline.from_pretrained(tmp_path / "full" / "model", text_dtype="float32")
    assert type(tuned.text_encoder).__name__ == "UMT5Encoder" and tuned.defaults.steps == 50


def test_a_one_dit_model_grows_into_two_experts(folders, tmp_path, capsys):
    """`boundary` with `expert` splits a one-DiT init_from into two experts (Wan2.2's layout):
    the run trains one side's DiT from init_from's, on that side's flow times only, and the
    export holds it beside the parent's DiT, untouched, with the boundary in its settings; an
    expert without a boundary, or a boundary without an expert, is refused with a clear message."""
    from kino.data.latent_cache import LatentCache
    from kino.pipeline import Pipeline
    from kino.training.config import load_config
    from kino.training.dit import DiTRunConfig, DiTTask

    wan = tmp_path / "wan-kino"
    assert main(["convert", "wan", str(folders["diffusers"]), str(wan)]) == 0
    config = tmp_path / "run.toml"
    body = video_run_config(tmp_path, wan)
    config.write_text(body)
    assert main(["preprocess", "--config", str(config), "-q"]) == 0, capsys.readouterr().err
    config.write_text("expert = 2\n" + body)
    assert main(["train", "dit", "--config", str(config), "-q"]) == 2
    assert "has one DiT: set boundary" in capsys.readouterr().err
    config.write_text("boundary = 0.6\n" + body)
    assert main(["train", "dit", "--config", str(config), "-q"]) == 2
    assert "needs `expert`" in capsys.readouterr().err
    config.write_text("expert = 2\nboundary = 0.6\n" + body + "[lora]\nrank = 2\n")
    assert main(["train", "dit", "--config", str(config), "-q"]) == 2
    assert "remove one of them" in capsys.readouterr().err
    parent = Pipeline.from_pretrained(wan, text_dtype="float32")
    for expert, span in ((2, (0.0, 0.6)), (1, (0.6, 1.0))):
        config.write_text(f"expert = {expert}\nboundary = 0.6\n" + body.replace(str(tmp_path / "run"),
                                                                                 str(tmp_path / f"run{expert}")))
        task = DiTTask(load_config(config, DiTRunConfig), LatentCache(tmp_path / "cache"))
        assert task.component == "dit" and task.t_range == span
        times = torch.cat([task.batch(step)["t"].flatten() for step in range(20)])
        noisy = times[times > 0]  # frames given clean (the conditioning mix) are at t = 0
        assert span[0] <= noisy.min() and noisy.max() < span[1]
        assert main(["train", "dit", "--config", str(config), "-q"]) == 0, capsys.readouterr().err
        grown = Pipeline.from_pretrained(tmp_path / f"run{expert}" / "model", text_dtype="float32")
        assert parent.dit_2 is None and grown.defaults.boundary == 0.6 and grown.defaults.steps == 50
        kept, trained = (grown.dit_2, grown.dit) if expert == 1 else (grown.dit, grown.dit_2)
        assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), parent.dit.state_dict().values()))
        assert not all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(),
                                                         parent.dit.state_dict().values()))
    args = ["generate", "a cat walks", "--frames", "5", "--size", "16x32", "--steps", "4", "--shift", "1", "-q"]
    assert main([*args, "--model", str(tmp_path / "run2" / "model"), "-o", str(tmp_path / "grown.mp4")]) == 0
    assert main([*args, "--model", str(wan), "-o", str(tmp_path / "parent.mp4")]) == 0
    assert (tmp_path / "grown.mp4").read_bytes() != (tmp_path / "parent.mp4").read_bytes()
