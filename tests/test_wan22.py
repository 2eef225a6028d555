"""Wan2.2 T2V-A14B: two Wan DiTs (a high-noise and a low-noise expert) in kino's own class,
switched at a boundary DiT time, each with its guidance scale. Tiny random models in both
release layouts, checked against diffusers' WanPipeline with `transformer_2` and
`boundary_ratio` (its Wan2.2 support); no downloads."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from kino.cli import main

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from test_wan import (_components, assert_fsdp_matches_one_process, dit_to_wan, video_run_config,  # noqa: E402
                      write_diffusers, write_original)

BOUNDARY = 0.875
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def components():
    dit, vae, text, tokenizer = _components()
    dit_2 = _components(seed=10)[0]  # another random DiT of the same config: the low-noise expert
    return dit, dit_2, vae, text, tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory, components):
    dit, dit_2, vae, text, tokenizer = components
    root = tmp_path_factory.mktemp("wan22")
    diff = write_diffusers(root / "Wan2.2-T2V-tiny-Diffusers", (dit, vae, text, tokenizer))
    dit_2.save_pretrained(diff / "transformer_2")
    index = json.loads((diff / "model_index.json").read_text())
    index.update(transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=BOUNDARY)
    (diff / "model_index.json").write_text(json.dumps(index))
    orig = write_original(root / "Wan2.2-T2V-tiny", (dit, vae, text, tokenizer))
    (orig / "high_noise_model").mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.move(orig / name, orig / "high_noise_model" / name)
    (orig / "low_noise_model").mkdir()
    shutil.copy(orig / "high_noise_model" / "config.json", orig / "low_noise_model" / "config.json")
    save_file({k: v.contiguous() for k, v in dit_to_wan(dit_2.state_dict()).items()},
              str(orig / "low_noise_model" / "diffusion_pytorch_model.safetensors"))
    return {"original": orig, "diffusers": diff}


def _reference(components, shift: float):
    dit, dit_2, vae, text, tokenizer = components
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  num_train_timesteps=1000, flow_shift=shift)
    pipe = diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=text, transformer=dit, transformer_2=dit_2,
                                 vae=vae, scheduler=scheduler, boundary_ratio=BOUNDARY)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_wan22_folder_loads_both_experts(folders, components, layout):
    from kino.pipeline import Pipeline

    dit, dit_2 = components[:2]
    pipe = Pipeline.from_pretrained(folders[layout], text_dtype="float32")
    d = pipe.defaults
    assert (d.frames, d.height, d.width, d.steps, d.shift) == (81, 720, 1280, 40, 12.0)
    assert (d.guidance, d.guidance_2, d.boundary) == (4.0, 3.0, BOUNDARY)
    gen = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 16, 2, 4, 6, generator=gen), torch.tensor([500.0]), torch.randn(1, 7, 24, generator=gen)
    with torch.no_grad():
        for ours, theirs in ((pipe.dit, dit), (pipe.dit_2, dit_2)):
            torch.testing.assert_close(ours(x, t, ctx), theirs(x, t, ctx).sample, rtol=0, atol=1e-5)


def test_wan22_sampling_matches_diffusers(folders, components):
    """The same noise through kino and diffusers' two-expert WanPipeline: the same latents.
    Shift 3 over 6 steps puts steps on both sides of the boundary (asserted), so both experts
    and both guidance scales are exercised."""
    from kino.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(folders["diffusers"], text_dtype="float32")
    shift, steps = 3.0, 6
    start = (1 - 1e-6) / (shift - (shift - 1) * (1 - 1e-6))  # diffusers' first time (test_wan.py explains)
    pipe.defaults = dataclasses.replace(pipe.defaults, t_max=start, t_min=0.001, shift=shift)
    prompt, negative = "a cat walks on the grass", "dog in snow"
    kw = dict(negative=negative, frames=5, height=16, width=32, steps=steps, seed=3)
    clip = pipe.generate(prompt, **kw)
    noise = torch.randn(clip.latents.shape, generator=torch.Generator().manual_seed(3))
    reference = _reference(components, shift)
    with torch.no_grad():
        latents = reference(prompt=prompt, negative_prompt=negative, height=16, width=32, num_frames=5,
                            num_inference_steps=steps, guidance_scale=4.0, guidance_scale_2=3.0,
                            max_sequence_length=512, latents=noise.clone(), output_type="latent").frames
    sigmas = reference.scheduler.timesteps.tolist()
    assert any(s >= BOUNDARY * 1000 for s in sigmas) and any(s < BOUNDARY * 1000 for s in sigmas)
    assert latents.std() > 0.1
    torch.testing.assert_close(clip.latents, latents, rtol=0, atol=1e-4)
    # not vacuous: one guidance scale for both experts, or the first expert alone, differ
    same_g = pipe.generate(prompt, **kw, guidance_2=4.0)
    assert (same_g.latents - latents).abs().max() > 1e-3
    alone = dataclasses.replace(pipe.defaults, boundary=0.001)
    pipe.defaults, saved = alone, pipe.defaults
    assert (pipe.generate(prompt, **kw).latents - latents).abs().max() > 1e-3
    pipe.defaults = saved


def test_wan22_convert_offload_and_limits(folders, tmp_path, capsys):
    """`kino convert wan` writes both experts (dit/, dit_2/); whole-model offload swaps the
    experts on and off the device as they take over and changes nothing; fp8 block storage
    streams both; the first-block cache keeps one cache per expert."""
    from kino.models.memory import MemoryPlan
    from kino.pipeline import Pipeline

    dst = tmp_path / "kino-wan22"
    assert main(["convert", "wan", str(folders["original"]), str(dst)]) == 0
    manifest = json.loads((dst / "kino.json").read_text())
    assert {"dit", "dit_2"} <= set(manifest["components"]) and manifest["pipeline"]["boundary"] == BOUNDARY
    kw = dict(frames=5, height=16, width=32, steps=4, seed=1)
    base = Pipeline.from_pretrained(folders["original"], text_dtype="float32").generate("a cat", **kw)
    converted = Pipeline.from_pretrained(dst, text_dtype="float32").generate("a cat", **kw)
    torch.testing.assert_close(converted.latents, base.latents, rtol=0, atol=1e-6)
    offloaded = Pipeline.from_pretrained(dst, text_dtype="float32", memory=MemoryPlan(offload="model"))
    torch.testing.assert_close(offloaded.generate("a cat", **kw).latents, base.latents, rtol=0, atol=1e-6)
    fp8 = Pipeline.from_pretrained(dst, text_dtype="float32", memory=MemoryPlan(weights="fp8"))
    assert len(fp8._streamers) == 2
    err = (fp8.generate("a cat", **kw).latents - base.latents).abs().mean() / base.latents.abs().mean()
    assert 0 < err < 0.05
    # the first-block cache: one per expert (an expert never reuses the other's residuals)
    plain = Pipeline.from_pretrained(dst, text_dtype="float32")
    never = plain.generate("a cat", **kw, cache_threshold=1e-30)
    torch.testing.assert_close(never.latents, base.latents, rtol=0, atol=1e-6)
    always = plain.generate("a cat", **kw, cache_threshold=1e30)
    reused, calls = map(int, always.metadata["cache_reused"].split("/"))
    assert calls == 4 and reused == 2  # 4 steps, 2 per expert: each expert's first call runs in full
    assert main(["generate", "a cat", "--model", str(dst), "--frames", "5", "--size", "16x32", "--steps", "2",
                 "--guidance-2", "1.5", "-o", str(tmp_path / "o.mp4"), "-q"]) == 0
    assert os.path.getsize(tmp_path / "o.mp4") > 0


def _lora_file(pipe, path, seed: int):
    """A random kino LoRA file for the pipeline's DiT config (rank 2, every linear layer)."""
    from kino.models.dit import DiT
    from kino.models.lora import LoRAConfig, apply_lora, save_lora

    model = DiT(pipe.dit.config)
    config = LoRAConfig(rank=2)
    torch.manual_seed(seed)
    apply_lora(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_up" in name:
                p.normal_(std=0.2)
    save_lora(path, model.state_dict(), config)
    return path


def test_wan22_lora_pair(folders, tmp_path, capsys):
    """A Wan2.2 LoRA pair: `--lora` fuses into the high-noise expert, `--lora-2` into the
    low-noise one, each changing only its own DiT; unload_loras restores both bit for bit; a
    one-DiT model has no second expert (exit 2)."""
    import numpy as np
    from conftest import save_tiny_pipeline

    from kino.data.video_io import read_video
    from kino.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(folders["diffusers"], text_dtype="float32")
    high, low = _lora_file(pipe, tmp_path / "high.safetensors", 1), _lora_file(pipe, tmp_path / "low.safetensors", 2)
    before = [{k: v.clone() for k, v in dit.state_dict().items()} for dit in pipe.dits]
    pipe.load_lora(low, 0.5, expert=2)
    after = [dit.state_dict() for dit in pipe.dits]
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])  # the high-noise expert untouched
    assert not all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    assert pipe.loras == [{"file": "low.safetensors", "sha256": pipe.loras[0]["sha256"], "scale": 0.5, "expert": 2}]
    pipe.load_lora(high, 1.0)
    pipe.unload_loras()
    for dit, state in zip(pipe.dits, before):
        assert all(torch.equal(v, state[k]) for k, v in dit.state_dict().items())
    args = ["generate", "a cat", "--model", str(folders["diffusers"]), "--frames", "5", "--size", "16x32",
            "--steps", "4", "-q"]
    outs = {}
    for name, extra in (("none", []), ("high", ["--lora", str(high)]), ("low", ["--lora-2", f"{low}:0.5"]),
                        ("both", ["--lora", str(high), "--lora-2", f"{low}:0.5"])):
        assert main([*args, *extra, "-o", str(tmp_path / f"{name}.mp4")]) == 0, capsys.readouterr().err
        outs[name] = read_video(tmp_path / f"{name}.mp4")[0].astype(np.int16)
    for a, b in (("none", "high"), ("none", "low"), ("high", "both"), ("low", "both")):
        assert np.abs(outs[a] - outs[b]).max() > 0, (a, b)
    one = save_tiny_pipeline(tmp_path / "one", "tiny", frames=1, height=32, width=32, steps=2)
    assert main(["generate", "a small red circle moving left on a black background", "--model", str(one),
                 "--lora-2", str(high), "-o", str(tmp_path / "x.png")]) == 2
    assert "no expert 2" in capsys.readouterr().err


# ---------------------------------------------------------------------------- I2V-A14B


def _i2v_expert(seed: int):
    """A tiny Wan2.2 I2V expert: 36 input channels (noise, mask, image latents), no CLIP branch."""
    from test_wan import _perturb

    torch.manual_seed(seed)
    dit = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=36, out_channels=16,
        text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=1024)
    return _perturb(dit, seed + 1).eval()


@pytest.fixture(scope="module")
def i2v(tmp_path_factory, components):
    vae, text, tokenizer = components[2:]
    high, low = _i2v_expert(20), _i2v_expert(30)
    root = tmp_path_factory.mktemp("wan22i2v")
    diff = root / "Wan2.2-I2V-tiny-Diffusers"
    diff.mkdir()
    (diff / "model_index.json").write_text(json.dumps({
        "_class_name": "WanImageToVideoPipeline", "_diffusers_version": diffusers.__version__,
        "image_encoder": [None, None], "image_processor": [None, None], "boundary_ratio": 0.9,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}))
    high.save_pretrained(diff / "transformer")
    low.save_pretrained(diff / "transformer_2")
    vae.save_pretrained(diff / "vae")
    text.save_pretrained(diff / "text_encoder")
    tokenizer.save_pretrained(diff / "tokenizer")
    orig = write_original(root / "Wan2.2-I2V-tiny", (components[0], vae, text, tokenizer))
    (orig / "config.json").unlink()
    (orig / "diffusion_pytorch_model.safetensors").unlink()
    for name, dit in (("high_noise_model", high), ("low_noise_model", low)):
        (orig / name).mkdir()
        (orig / name / "config.json").write_text(json.dumps({  # as released: model_type i2v, in_dim 36
            "_class_name": "WanModel", "model_type": "i2v", "dim": 32, "ffn_dim": 64, "freq_dim": 32, "in_dim": 36,
            "out_dim": 16, "num_heads": 2, "num_layers": 2, "eps": 1e-6, "text_len": 512, "text_dim": 24}))
        save_file({k: v.contiguous() for k, v in dit_to_wan(dit.state_dict()).items()},
                  str(orig / name / "diffusion_pytorch_model.safetensors"))
    return (high, low), {"diffusers": diff, "original": orig}


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_wan22_i2v_matches_diffusers(i2v, components, layout, monkeypatch):
    """Wan2.2 I2V-A14B (two 36-channel experts, no CLIP): kino's image conditioning and expert
    switch == diffusers' WanImageToVideoPipeline with transformer_2 and boundary_ratio 0.9."""
    import importlib.util
    import types

    import numpy as np
    from PIL import Image

    from kino.pipeline import Pipeline

    if importlib.util.find_spec("ftfy") is None:  # as in test_wan_i2v.py
        from diffusers.pipelines.wan import pipeline_wan_i2v

        monkeypatch.setattr(pipeline_wan_i2v, "ftfy", types.SimpleNamespace(fix_text=lambda t: t), raising=False)
    (high, low), folders = i2v
    vae, text, tokenizer = components[2:]
    pipe = Pipeline.from_pretrained(folders[layout], text_dtype="float32")
    d = pipe.defaults
    assert pipe.takes_image and pipe.image_encoder is None and pipe.dit.config.img_dim is None
    assert (d.steps, d.shift, d.guidance, d.guidance_2, d.boundary) == (40, 5.0, 3.5, 3.5, 0.9)
    shift, steps = 3.0, 6
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  num_train_timesteps=1000, flow_shift=shift)
    reference = diffusers.WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text, vae=vae, scheduler=scheduler,
                                                  transformer=high, transformer_2=low, boundary_ratio=0.9)
    reference.set_progress_bar_config(disable=True)
    start = (1 - 1e-6) / (shift - (shift - 1) * (1 - 1e-6))
    pipe.defaults = dataclasses.replace(d, t_max=start, t_min=0.001, shift=shift, guidance=4.0, guidance_2=2.0)
    pixels = np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
    prompt, negative = "a cat walks on the grass", "dog in snow"
    clip = pipe.generate(prompt, negative=negative, frames=9, height=32, width=48, steps=steps, seed=3, image=image)
    noise = torch.randn(clip.latents.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        latents = reference(image=Image.fromarray(pixels), prompt=prompt, negative_prompt=negative, height=32,
                            width=48, num_frames=9, num_inference_steps=steps, guidance_scale=4.0,
                            guidance_scale_2=2.0, max_sequence_length=512, latents=noise.clone(),
                            output_type="latent").frames
    assert any(t < 900 for t in reference.scheduler.timesteps.tolist())
    assert latents.std() > 0.1
    torch.testing.assert_close(clip.latents, latents, rtol=0, atol=1e-4)
    other = pipe.generate(prompt, negative=negative, frames=9, height=32, width=48, steps=steps, seed=3,
                          image=image.flip(-1))
    assert (other.latents - latents).abs().max() > 1e-2  # the image conditions the clip


def test_wan22_i2v_cli(i2v, tmp_path, capsys):
    """`kino generate PROMPT --image I --model WAN22_I2V` (and its convert); without --image: exit 2."""
    import numpy as np
    from PIL import Image

    from kino.data.video_io import read_video

    folders = i2v[1]
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    dst = tmp_path / "kino"
    assert main(["convert", "wan", str(folders["original"]), str(dst)]) == 0
    args = ["a cat", "--model", str(dst), "--frames", "5", "--size", "32x48", "--steps", "2", "-q"]
    assert main(["generate", *args, "--image", str(tmp_path / "i.png"), "-o", str(tmp_path / "o.mp4")]) == 0
    assert read_video(tmp_path / "o.mp4")[0].shape == (5, 32, 48, 3)
    assert main(["generate", *args, "-o", str(tmp_path / "p.mp4")]) == 2
    assert "give the first frame (--image)" in capsys.readouterr().err


# ---------------------------------------------------------------------------- TI2V-5B


TI2V_Z = 8  # latent channels of the tiny Wan2.2 VAE (the release has 48)


def _ti2v_components():
    from test_wan import _perturb

    vae_kw = dict(base_dim=8, decoder_base_dim=12, z_dim=TI2V_Z, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                  temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
                  out_channels=12, scale_factor_spatial=16,
                  latents_mean=[0.1 * i - 0.3 for i in range(TI2V_Z)],
                  latents_std=[0.5 + 0.1 * i for i in range(TI2V_Z)])
    torch.manual_seed(40)
    vae = _perturb(diffusers.AutoencoderKLWan(**vae_kw), 41).eval()
    torch.manual_seed(42)
    dit = _perturb(diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=TI2V_Z,
        out_channels=TI2V_Z, text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024), 43).eval()
    return dit, vae


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory, components):
    text, tokenizer = components[3:]
    dit, vae = _ti2v_components()
    root = tmp_path_factory.mktemp("ti2v")
    diff = write_diffusers(root / "Wan2.2-TI2V-tiny-Diffusers", (dit, vae, text, tokenizer))
    index = json.loads((diff / "model_index.json").read_text())
    index.update(expand_timesteps=True, boundary_ratio=None, transformer_2=[None, None])
    (diff / "model_index.json").write_text(json.dumps(index))
    orig = write_original(root / "Wan2.2-TI2V-tiny", (dit, _components()[1], text, tokenizer))
    (orig / "Wan2.1_VAE.pth").unlink()
    from kino.models.vae import from_diffusers as vae_from_diffusers
    from kino.models.vae import to_wan as vae_to_wan

    torch.save(vae_to_wan(vae_from_diffusers(vae.state_dict())), orig / "Wan2.2_VAE.pth")
    config = json.loads((orig / "config.json").read_text())
    config.update(model_type="ti2v", in_dim=TI2V_Z, out_dim=TI2V_Z)
    (orig / "config.json").write_text(json.dumps(config))
    return (dit, vae), {"diffusers": diff, "original": orig}


def _diffusers_grid(pipe, shift: float):
    start = (1 - 1e-6) / (shift - (shift - 1) * (1 - 1e-6))  # diffusers' first time (test_wan.py explains)
    pipe.defaults = dataclasses.replace(pipe.defaults, t_max=start, t_min=0.001, shift=shift)


def test_ti2v_text_and_image_to_video_match_diffusers(ti2v, components, monkeypatch):
    """Wan2.2 TI2V-5B: one DiT on Wan2.2's VAE (4 x 16 x 16, here 8 latent channels). Text to
    video equals diffusers' WanPipeline with expand_timesteps; image to video, which kino runs
    with its own conditioning (the image's latent frame given clean, at DiT time 0), equals
    diffusers' WanImageToVideoPipeline with expand_timesteps (the first frame's tokens at
    timestep 0, their latents the image's), in both layouts."""
    import copy
    import importlib.util
    import types

    import numpy as np
    from PIL import Image

    from kino.pipeline import Pipeline
    from kino.tasks.video_tasks import generate

    if importlib.util.find_spec("ftfy") is None:  # as in test_wan_i2v.py
        from diffusers.pipelines.wan import pipeline_wan_i2v

        monkeypatch.setattr(pipeline_wan_i2v, "ftfy", types.SimpleNamespace(fix_text=lambda t: t), raising=False)
    (dit, vae), folders = ti2v
    text, tokenizer = components[3:]
    shift, steps, prompt, negative = 3.0, 5, "a cat walks on the grass", "dog in snow"
    kw = dict(negative_prompt=negative, height=32, width=64, num_frames=9, num_inference_steps=steps,
              guidance_scale=5.0, max_sequence_length=512, output_type="latent")

    def scheduler():
        return diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                 num_train_timesteps=1000, flow_shift=shift)

    t2v = diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=text, vae=vae, scheduler=scheduler(),
                                transformer=dit, expand_timesteps=True)
    # Wan2.2_VAE.pth carries no latent statistics (Wan's code holds the release's 48): the tiny
    # original-layout VAE loads with none (0 and 1), so its reference is told the same
    plain = copy.deepcopy(vae)
    plain.register_to_config(latents_mean=[0.0] * TI2V_Z, latents_std=[1.0] * TI2V_Z)
    i2v = {layout: diffusers.WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text, vae=v,
                                                     scheduler=scheduler(), transformer=dit, expand_timesteps=True)
           for layout, v in (("diffusers", vae), ("original", plain))}
    for ref in (t2v, *i2v.values()):
        ref.set_progress_bar_config(disable=True)
    pixels = np.random.default_rng(3).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    for layout in ("diffusers", "original"):
        pipe = Pipeline.from_pretrained(folders[layout], text_dtype="float32")
        d = pipe.defaults
        assert pipe.vae.config.residual and pipe.vae.config.space_stride == 16 and not pipe.takes_image
        assert (d.frames, d.height, d.width, d.fps, d.steps, d.guidance, d.shift) == (121, 704, 1280, 24, 50, 5.0, 5.0)
        _diffusers_grid(pipe, shift)
        clip = pipe.generate(prompt, negative=negative, frames=9, height=32, width=64, steps=steps, seed=3)
        noise = torch.randn(clip.latents.shape, generator=torch.Generator().manual_seed(3))
        assert clip.latents.shape == (1, TI2V_Z, 3, 2, 4)
        with torch.no_grad():
            expected = t2v(prompt=prompt, latents=noise.clone(), **kw).frames
        assert expected.std() > 0.1
        torch.testing.assert_close(clip.latents, expected, rtol=0, atol=1e-4)

        clip = generate(pipe, prompt, image=torch.from_numpy(pixels), negative=negative, frames=9, height=32, width=64,
                        steps=steps, seed=3)
        with torch.no_grad():
            expected = i2v[layout](image=Image.fromarray(pixels), prompt=prompt, latents=noise.clone(), **kw).frames
        torch.testing.assert_close(clip.latents, expected, rtol=0, atol=1e-4)
        assert (clip.latents - clip.latents[:, :, :1]).abs().max() > 0.1  # not a still of the image


def test_ti2v_convert_and_cli(ti2v, tmp_path, capsys):
    """`kino convert wan` on a TI2V folder keeps Wan2.2's VAE (residual, patches) and the
    clip; `kino generate --image` runs image to video on it."""
    import numpy as np
    from PIL import Image

    from kino.data.video_io import read_video
    from kino.pipeline import Pipeline

    folders = ti2v[1]
    dst = tmp_path / "kino-ti2v"
    assert main(["convert", "wan", str(folders["original"]), str(dst)]) == 0
    vae = json.loads((dst / "vae" / "config.json").read_text())
    assert vae["residual"] and vae["patch_size"] == 2
    kw = dict(frames=5, height=32, width=64, steps=2, seed=4)
    a = Pipeline.from_pretrained(folders["original"], text_dtype="float32").generate("a cat", **kw)
    b = Pipeline.from_pretrained(dst, text_dtype="float32").generate("a cat", **kw)
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=1e-6)
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (32, 64, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    assert main(["generate", "a cat", "--model", str(dst), "--image", str(tmp_path / "i.png"), "--frames", "5",
                 "--steps", "2", "-o", str(tmp_path / "o.mp4"), "-q"]) == 0, capsys.readouterr().err
    video = read_video(tmp_path / "o.mp4")[0]
    assert video.shape == (5, 32, 64, 3)  # the image's size (a multiple of 32: the DiT's 2x2 patches on 16x)


def test_wan22_expert_lora_on_videos(folders, tmp_path, capsys):
    """Training one expert of Wan2.2 A14B: `expert` picks the DiT (2: low-noise), whose LoRA
    trains on flow times below the boundary only, records that expert's weights as its base,
    and loads with --lora-2; a run without `expert` is refused with a clear message."""
    import warnings

    from kino.data.latent_cache import LatentCache
    from kino.models.folder import sha256_file
    from kino.models.lora import read_lora
    from kino.pipeline import Pipeline
    from kino.training.config import load_config
    from kino.training.dit import DiTRunConfig, DiTTask

    wan = tmp_path / "wan22-kino"
    assert main(["convert", "wan", str(folders["diffusers"]), str(wan)]) == 0
    config = tmp_path / "run.toml"
    body = video_run_config(tmp_path, wan) + "[lora]\nrank = 2\n"
    config.write_text(body)
    assert main(["preprocess", "--config", str(config), "-q"]) == 0, capsys.readouterr().err
    assert main(["train", "dit", "--config", str(config), "-q"]) == 2
    assert "set expert = 1 (high-noise) or 2 (low-noise)" in capsys.readouterr().err
    config.write_text("expert = 2\n" + body)
    task = DiTTask(load_config(config, DiTRunConfig), LatentCache(tmp_path / "cache"))
    assert task.component == "dit_2" and task.t_range == (0.0, BOUNDARY)
    times = torch.cat([task.batch(step)["t"].flatten() for step in range(20)])
    assert times.max() < BOUNDARY and times.min() >= 0
    assert main(["train", "dit", "--config", str(config), "-q"]) == 0, capsys.readouterr().err
    lora = tmp_path / "run" / "lora.safetensors"
    assert read_lora(lora).base_sha256 == sha256_file(wan / "dit_2" / "model.safetensors")
    args = ["generate", "a cat walks", "--model", str(wan), "--frames", "5", "--size", "16x32", "--steps", "4", "-q"]
    assert main([*args, "-o", str(tmp_path / "plain.mp4")]) == 0
    assert main([*args, "--lora-2", str(lora), "-o", str(tmp_path / "low.mp4")]) == 0, capsys.readouterr().err
    assert (tmp_path / "plain.mp4").read_bytes() != (tmp_path / "low.mp4").read_bytes()
    with warnings.catch_warnings(record=True) as caught:  # the high-noise slot: another base, a warning
        warnings.simplefilter("always")
        Pipeline.from_pretrained(wan, text_dtype="float32").load_lora(lora)
    assert any("was trained on a DiT with weights sha256" in str(w.message) for w in caught)


def test_wan_vae_alone_from_a_wan_folder(ti2v, tmp_path, capsys):
    """`load_vae` / `kino vae reconstruct --model WAN_DIR`: a Wan folder's VAE alone (here
    Wan2.2's, both layouts) reconstructs as diffusers' AutoencoderKLWan does."""
    from kino.models.vae.pretrained import load_vae

    (_, reference), folders = ti2v
    video = torch.rand(1, 3, 5, 32, 48, generator=torch.Generator().manual_seed(6)) * 2 - 1
    with torch.no_grad():
        expected = reference.decode(reference.encode(video).latent_dist.mean).sample
        for layout in ("diffusers", "original"):
            vae = load_vae(folders[layout])
            assert vae.config.residual and vae.config.z_dim == TI2V_Z
            torch.testing.assert_close(vae.reconstruct(video), expected, rtol=0, atol=1e-4)
    assert main(["world", "sample", "--out", str(tmp_path / "w"), "--n", "1", "--frames", "9", "--size", "64x64",
                 "-q"]) == 0
    clip = next((tmp_path / "w").glob("*.mp4"))
    assert main(["vae", "reconstruct", str(clip), "--out", str(tmp_path / "r"), "--model",
                 str(folders["original"]), "-q"]) == 0, capsys.readouterr().err
    assert "PSNR" in capsys.readouterr().out and (tmp_path / "r" / clip.name).is_file()


def test_wan22_experts_sharded_in_two_processes(folders, tmp_path):
    """`torchrun --nproc-per-node 2 -m kino generate --fsdp` on a two-expert folder: both
    experts sharded (and sequence-parallel), the image equals the one-process image (shift 3,
    4 steps: DiT times 999, 899 | 750, 500, both experts)."""
    assert_fsdp_matches_one_process(folders["diffusers"], tmp_path, "--steps", "4", "--shift", "3")


def test_wan22_i2v_expert_lora_on_videos(i2v, tmp_path, capsys):
    """Wan2.2 I2V-A14B fine-tuning: the cache holds the image latents (no CLIP features: the
    model has no CLIP), expert 1 trains above the boundary 0.9, and its LoRA loads."""
    import numpy as np
    from PIL import Image

    from kino.data.latent_cache import LatentCache

    wan = tmp_path / "wan22-i2v"
    assert main(["convert", "wan", str(i2v[1]["diffusers"]), str(wan)]) == 0
    config = tmp_path / "run.toml"
    config.write_text("expert = 1\n" + video_run_config(tmp_path, wan) + "[lora]\nrank = 2\n")
    assert main(["preprocess", "--config", str(config), "-q"]) == 0, capsys.readouterr().err
    cache = LatentCache(tmp_path / "cache")
    data = cache.get(cache.buckets[0], [0])
    assert "image_latents" in data and "image_features" not in data
    assert main(["train", "dit", "--config", str(config), "-q"]) == 0, capsys.readouterr().err
    image = tmp_path / "i.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(image)
    assert main(["generate", "a cat", "--model", str(wan), "--image", str(image), "--frames", "5", "--steps", "2",
                 "--lora", str(tmp_path / "run" / "lora.safetensors"), "-o", str(tmp_path / "o.mp4"), "-q"]) == 0


def test_kino_info_names_every_kind(folders, i2v, ti2v, tmp_path, capsys):
    """`kino info`: the kind, components and defaults of a folder from its configs alone, for
    the shipped model, each Wan2.2 kind in both layouts, and a converted folder."""
    from kino.models.info import describe

    shipped = describe(None)
    assert shipped["layout"] == "kino" and shipped["components"]["dit"]["parameters"] == 9_145_872
    for layout in ("diffusers", "original"):
        t2v, i2v_info, ti2v_info = (describe(f[layout]) for f in (folders, i2v[1], ti2v[1]))
        assert (t2v["name"], i2v_info["name"], ti2v_info["name"]) == ("t2v-A14B", "i2v-A14B", "ti2v-5B")
        assert {"dit", "dit_2"} <= set(t2v["components"]) and t2v["defaults"]["boundary"] == BOUNDARY
        assert not i2v_info["components"]["dit"]["image_branch"] and i2v_info["components"]["dit"]["in_channels"] == 36
        assert ti2v_info["components"]["vae"]["wan22_layout"] and ti2v_info["components"]["vae"]["space_stride"] == 16
    assert main(["convert", "wan", str(folders["original"]), str(tmp_path / "k")]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "k")]) == 0
    out = capsys.readouterr().out
    assert "kino layout" in out and "dit_2: DiT 32 wide" in out and "boundary 0.875" in out
    assert main(["info", str(tmp_path / "k"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["components"]["dit_2"]["layers"] == 2
    assert main(["info", str(tmp_path)]) == 2
    assert "neither a kino model folder" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_wan22_experts_from_gguf_files(folders, tmp_path, capsys, layout):
    """`kino convert gguf --expert 1|2` writes each expert; `--dit` / `--dit-2` read them back
    over a folder that holds neither expert's weights: each expert computes what the float DiT
    holding the file's (gguf-py dequantized) values computes."""
    pytest.importorskip("gguf")
    from test_gguf import _file_values

    from kino.models.dit.adapters import from_wan
    from kino.pipeline import Pipeline

    files = [tmp_path / f"expert-{i}.gguf" for i in (1, 2)]
    for i, f in enumerate(files, 1):
        assert main(["convert", "gguf", str(folders[layout]), str(f), "--expert", str(i)]) == 0, capsys.readouterr()
    bare = shutil.copytree(folders[layout], tmp_path / "bare")
    for f in bare.rglob("diffusion_pytorch_model*.safetensors"):
        if f.parent.name in ("high_noise_model", "low_noise_model", "transformer", "transformer_2"):
            f.unlink()
    pipe = Pipeline.from_pretrained(bare, text_dtype="float32", dit_file=files[0], dit_2_file=files[1])
    assert pipe.quantized
    ref = Pipeline.from_pretrained(folders[layout], text_dtype="float32")
    gen = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 16, 2, 4, 6, generator=gen), torch.tensor([500.0]), torch.randn(1, 7, 24, generator=gen)
    with torch.no_grad():
        for ours, theirs, f in ((pipe.dit, ref.dit, files[0]), (pipe.dit_2, ref.dit_2, files[1])):
            before = theirs(x, t, ctx)
            theirs.load_state_dict(from_wan(_file_values(f)))
            expected = theirs(x, t, ctx)
            assert (expected - before).abs().max() > 1e-6  # Q8_0 changed the weights a little
            torch.testing.assert_close(ours(x, t, ctx), expected, rtol=0, atol=1e-5)
