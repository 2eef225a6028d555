"""Wan2.1 VACE in kino's own classes: a tiny random `WanVACETransformer3DModel` in both release
layouts (diffusers', and Wan's original one written here with its own key table) loads into
kino's DiT, computes what diffusers computes, and samples what diffusers' WanVACEPipeline
samples from the same source video, mask and reference image; kino's tasks (image to video,
extend, connect) run on it through VACE's masks. No downloads."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kino.cli import main

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")

from test_wan import DIT, _components, _perturb, dit_to_wan, write_diffusers, write_original  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
LAYERS, VACE_LAYERS = 3, [0, 2]
SHIFT = 16.0  # Wan's VACE default


def _vace_dit(seed: int = 0):
    torch.manual_seed(seed)
    dit = diffusers.WanVACETransformer3DModel(
        patch_size=DIT.patch_size, num_attention_heads=DIT.num_heads, attention_head_dim=DIT.head_dim,
        in_channels=16, out_channels=16, text_dim=DIT.text_dim, freq_dim=DIT.freq_dim, ffn_dim=DIT.ffn_dim,
        num_layers=LAYERS, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=DIT.eps,
        rope_max_seq_len=DIT.rope_max_len, vace_layers=VACE_LAYERS, vace_in_channels=96)
    return _perturb(dit, seed + 1).eval()


def vace_to_wan(state):
    """diffusers names -> Wan's VaceWanModel names: proj_in / proj_out of a VACE block are Wan's
    before_proj / after_proj; the rest as for WanModel."""
    renamed = {}
    for key, value in state.items():
        if key.startswith("vace_blocks."):
            key = key.replace(".proj_in.", ".before_proj.").replace(".proj_out.", ".after_proj.")
        renamed[key] = value
    return dit_to_wan(renamed)


@pytest.fixture(scope="module")
def components():
    _, vae, text, tokenizer = _components()
    return _vace_dit(), vae, text, tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory, components):
    dit, vae, text, tokenizer = components
    root = tmp_path_factory.mktemp("vace")
    t2v = _components()[0]  # write the folders' other files, then put the VACE DiT in
    diff = write_diffusers(root / "Wan2.1-VACE-tiny-Diffusers", (t2v, vae, text, tokenizer))
    for f in (diff / "transformer").iterdir():
        f.unlink()
    dit.save_pretrained(diff / "transformer")
    index = json.loads((diff / "model_index.json").read_text())
    index.update(_class_name="WanVACEPipeline", transformer=["diffusers", "WanVACETransformer3DModel"])
    (diff / "model_index.json").write_text(json.dumps(index))
    orig = write_original(root / "Wan2.1-VACE-tiny", (t2v, vae, text, tokenizer))
    config = json.loads((orig / "config.json").read_text())
    config.update(_class_name="VaceWanModel", num_layers=LAYERS, vace_layers=VACE_LAYERS, vace_in_dim=96)
    (orig / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in vace_to_wan(dit.state_dict()).items()},
              str(orig / "diffusion_pytorch_model.safetensors"))
    return {"original": orig, "diffusers": diff}


def _frames(n: int, h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _mask(n: int, h: int, w: int) -> np.ndarray:
    """uint8 (n, h, w): frame 0 kept (0), the others generated (255) but for a kept rectangle
    across 8x8 squares (so the folding's order within a square matters)."""
    m = np.full((n, h, w), 255, dtype=np.uint8)
    m[0] = 0
    m[1:, 3:11, 5:14] = 0
    return m


# ---------------------------------------------------------------------------- the DiT


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_vace_dit_matches_diffusers(folders, components, layout):
    from kino.pipeline import Pipeline

    dit = components[0]
    pipe = Pipeline.from_pretrained(folders[layout], text_dtype="float32")
    assert pipe.takes_vace and pipe.dit.config.vace_layers == tuple(VACE_LAYERS)
    assert pipe.dit.config.vace_in_channels == 96 and (pipe.defaults.steps, pipe.defaults.shift) == (50, SHIFT)
    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 16, 3, 4, 6, generator=gen), torch.randn(2, 7, DIT.text_dim, generator=gen)
    t = torch.tensor([999.0, 321.5])
    context = torch.randn(2, 96, 2, 4, 6, generator=gen)  # fewer frames than the latents: zero tokens after
    scale = torch.tensor([0.7, 1.3])
    with torch.no_grad():
        expected = dit(x, t, text, control_hidden_states=context, control_hidden_states_scale=scale).sample
        torch.testing.assert_close(pipe.dit(x, t, text, vace=context, vace_scale=scale), expected, rtol=0, atol=1e-5)
        # the hints matter: without them, or with another scale, the output differs
        assert (pipe.dit(x, t, text) - expected).abs().max() > 0.1
        assert (pipe.dit(x, t, text, vace=context, vace_scale=1.0) - expected).abs().max() > 1e-2
        # skipping a main block skips its hint too, and the VACE blocks still see the tokens before the blocks
        skipped = pipe.dit(x, t, text, vace=context, skip_blocks=[1])
        assert skipped.shape == expected.shape


def test_vace_configs_and_round_trips(components):
    from kino.models.dit import DIT_SIZES, DiT, DiTConfig
    from kino.models.dit.adapters import (config_from_diffusers, config_from_wan, config_to_diffusers,
                                          config_to_wan, from_diffusers, from_wan, to_diffusers, to_wan)

    dit = components[0]
    config = config_from_diffusers({**dit.config, "_class_name": "WanVACETransformer3DModel"})
    assert config_from_diffusers(config_to_diffusers(config)) == config
    wan = config_to_wan(config)
    assert wan["_class_name"] == "VaceWanModel" and wan["vace_layers"] == VACE_LAYERS
    assert config_from_wan(wan) == config
    assert DiTConfig.from_dict(config.to_dict()) == config
    state = from_diffusers(dit.state_dict())
    assert to_diffusers(state).keys() == dit.state_dict().keys()
    assert from_wan(to_wan(state)).keys() == state.keys()
    assert set(vace_to_wan(dit.state_dict())) == set(state)  # kino's names are Wan's
    # the releases: VACE-1.3B takes every other block of 30 (VaceWanModel's default), VACE-14B every fifth of 40
    small = config_from_wan({"_class_name": "VaceWanModel", "dim": 1536, "ffn_dim": 8960, "num_heads": 12,
                             "num_layers": 30, "model_type": "vace", "vace_in_dim": 96})
    assert small == DIT_SIZES["wan2.1-vace-1.3b"] and small.vace_layers == tuple(range(0, 30, 2))
    large = config_from_diffusers({"_class_name": "WanVACETransformer3DModel"})
    assert large == DIT_SIZES["wan2.1-vace-14b"] and large.vace_layers == tuple(range(0, 40, 5))
    with torch.device("meta"):
        params = sum(p.numel() for p in DiT(DIT_SIZES["wan2.1-vace-1.3b"]).parameters())
    assert 2.0e9 < params < 2.3e9  # 1.42B of Wan2.1's T2V DiT and 15 more blocks
    for bad in ([1, 2], [0, 0], [0, 3]):
        with pytest.raises(ValueError, match="vace_layers"):
            dataclasses.replace(config, vace_layers=bad)


def test_vace_context_is_checked(folders):
    from kino.models.dit.model import DiTInputError
    from kino.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(folders["diffusers"], text_dtype="float32")
    x, text = torch.zeros(1, 16, 3, 4, 6), torch.zeros(1, 7, DIT.text_dim)
    for context, scale, match in [(torch.zeros(1, 95, 3, 4, 6), 1.0, "96"), (torch.zeros(1, 96, 4, 4, 6), 1.0, "T'"),
                                  (torch.zeros(1, 96, 3, 4, 4), 1.0, "96"), (torch.zeros(1, 96, 3, 4, 6), [1, 2, 3],
                                                                             "one per VACE block")]:
        with pytest.raises(DiTInputError, match=match):
            pipe.dit(x, 500.0, text, vace=context, vace_scale=scale)
    from test_wan import _components as t2v

    from kino.models.dit.adapters import config_from_diffusers, from_diffusers
    from kino.models.dit import DiT

    plain = t2v()[0]
    model = DiT(config_from_diffusers(dict(plain.config)))
    model.load_state_dict(from_diffusers(plain.state_dict()))
    with pytest.raises(DiTInputError, match="no VACE branch"):
        model(x, 500.0, text, vace=torch.zeros(1, 96, 3, 4, 6))


# ---------------------------------------------------------------------------- sampling parity


def _reference(components, monkeypatch):
    import importlib.util
    import types

    from diffusers.pipelines.wan import pipeline_wan_vace

    if importlib.util.find_spec("ftfy") is None:  # as in test_wan_i2v.py: its prompt cleaning needs ftfy
        monkeypatch.setattr(pipeline_wan_vace, "ftfy", types.SimpleNamespace(fix_text=lambda t: t), raising=False)
    dit, vae, text, tokenizer = components
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  num_train_timesteps=1000, flow_shift=SHIFT)
    pipe = diffusers.WanVACEPipeline(tokenizer=tokenizer, text_encoder=text, transformer=dit, vae=vae,
                                     scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _wan_start(pipe):
    """diffusers' grid starts at 1 - 1e-6 after the shift (see test_wan.py)."""
    start = (1 - 1e-6) / (SHIFT - (SHIFT - 1) * (1 - 1e-6))
    pipe.defaults = dataclasses.replace(pipe.defaults, t_max=start, t_min=0.001)


@pytest.mark.parametrize("references", [0, 1])
def test_vace_sampling_matches_diffusers(folders, components, references, monkeypatch):
    """Source video + mask (+ a reference image), scale 0.8: kino's clip == diffusers' WanVACEPipeline."""
    from kino.pipeline import Pipeline
    from kino.tasks.conditioning import to_model_range

    pipe = Pipeline.from_pretrained(folders["diffusers"], text_dtype="float32")
    _wan_start(pipe)
    frames, h, w, steps = 5, 16, 32, 5
    video, mask = _frames(frames, h, w, 1), _mask(frames, h, w)
    ref = _frames(1, 16, 24, 2)[0]  # fits the 16x32 frame as it is, centred on white
    vace = pipe.vace_condition(frames, h, w, to_model_range(video), torch.from_numpy(mask).float() / 255,
                               [to_model_range(ref)[:, 0]] if references else [])
    assert vace.context.shape == (1, 96, 2 + references, h // 8, w // 8)
    prompt, negative = "a cat walks on the grass", "dog in snow"
    clip = pipe.generate(prompt, negative=negative, frames=frames, height=h, width=w, steps=steps, seed=3, vace=vace,
                         vace_scale=0.8)
    assert clip.latents.shape[2] == 2  # the reference's frame is dropped
    assert clip.metadata["vace_references"] == str(references)
    noise = torch.randn((1, 16, 2 + references, h // 8, w // 8), generator=torch.Generator().manual_seed(3))
    kw = dict(prompt=prompt, negative_prompt=negative, height=h, width=w, num_frames=frames,
              num_inference_steps=steps, guidance_scale=5.0, conditioning_scale=0.8,
              video=[PIL.fromarray(f) for f in video], mask=[PIL.fromarray(m, mode="L") for m in mask])
    if references:
        kw["reference_images"] = [PIL.fromarray(ref)]
    with torch.no_grad():
        expected = _reference(components, monkeypatch)(latents=noise.clone(), output_type="latent", **kw).frames
    assert expected.std() > 0.1
    torch.testing.assert_close(clip.latents, expected[:, :, references:], rtol=0, atol=1e-4)
    # the context matters: without the source (Wan's text-to-video context) the clip differs
    plain = pipe.generate(prompt, negative=negative, frames=frames, height=h, width=w, steps=steps, seed=3)
    assert (plain.latents - clip.latents).abs().max() > 1e-2


# ---------------------------------------------------------------------------- kino's tasks through VACE


def _manual(pipe, prompt, frames, given, seed=3, **kw):
    """The clip of a source video holding `given` {at: uint8 frames} (kept: mask 0), the rest generated."""
    from kino.tasks.conditioning import to_model_range

    video, mask = torch.zeros(3, frames, 16, 32), torch.ones(frames, 16, 32)
    for at, pixels in given.items():
        video[:, at:at + len(pixels)] = to_model_range(pixels)
        mask[at:at + len(pixels)] = 0
    return pipe.generate(prompt, frames=frames, height=16, width=32, steps=2, seed=seed,
                         vace=pipe.vace_condition(frames, 16, 32, video, mask), **kw)


def test_kino_tasks_run_through_vace_masks(folders):
    from kino.pipeline import Pipeline
    from kino.tasks import video_tasks as tasks

    pipe = Pipeline.from_pretrained(folders["original"], text_dtype="float32")
    prompt, a, b = "a cat walks on the grass", _frames(3, 16, 32, 4), _frames(2, 16, 32, 5)
    cases = [
        (tasks.generate(pipe, prompt, image=a[0], frames=5, steps=2, seed=3), 5, {0: a[:1]}, "image-to-video"),
        (tasks.extend(pipe, prompt, a, frames=2, steps=2, seed=3), 5, {0: a}, "extend forward"),
        (tasks.extend(pipe, prompt, a, frames=3, backward=True, steps=2, seed=3), 6, {3: a}, "extend backward"),
        (tasks.connect(pipe, prompt, a, b, frames=4, steps=2, seed=3), 9, {0: a, 7: b}, "connect"),
    ]
    for clip, frames, given, task in cases:
        assert clip.metadata["task"] == f"{task} (Wan2.1 VACE)" and clip.video.shape == (frames, 16, 32, 3)
        expected = _manual(pipe, prompt, frames, given)
        torch.testing.assert_close(clip.latents, expected.latents, rtol=0, atol=0)
        for at, pixels in given.items():  # given frames come back as given (--given exact)
            assert torch.equal(clip.video[at:at + len(pixels)], torch.from_numpy(pixels))
    # the given frames matter: another first frame gives another clip
    other = tasks.generate(pipe, prompt, image=b[0], frames=5, steps=2, seed=3)
    assert (other.latents - cases[0][0].latents).abs().max() > 1e-3
    decoded = tasks.extend(pipe, prompt, a, frames=2, steps=2, seed=3, given="decoded")
    assert not torch.equal(decoded.video[:3], torch.from_numpy(a))
    # an edit runs on VACE's text-to-video context
    edited = tasks.edit(pipe, prompt, a, strength=0.5, steps=4, seed=3)
    assert edited.video.shape == (3, 16, 32, 3)


def test_vace_cli_source_mask_and_references(folders, tmp_path, capsys):
    from kino.data.video_io import read_metadata, read_video, write_video

    src, refimg, mask = tmp_path / "src.mp4", tmp_path / "ref.png", tmp_path / "mask.png"
    write_video(src, torch.from_numpy(_frames(5, 16, 32, 6)), 16.0, lossless=True)
    write_video(refimg, torch.from_numpy(_frames(1, 24, 24, 7)), 16.0)
    m = np.zeros((16, 32, 3), dtype=np.uint8)
    m[:, 16:] = 255  # regenerate the right half of every frame
    write_video(mask, torch.from_numpy(m[None]), 16.0)
    model, out = str(folders["diffusers"]), tmp_path / "out.mp4"
    args = ["generate", "a cat walks on the grass", "--model", model, "--steps", "2", "--quiet", "--vace-video",
            str(src), "--vace-mask", str(mask), "--reference", str(refimg), "--vace-scale", "0.5", "-o", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    video, meta = read_video(out)[0], read_metadata(out)
    assert video.shape == (5, 16, 32, 3)
    assert meta["task"] == "video-to-video (Wan2.1 VACE)" and meta["vace_references"] == "1"
    assert meta["vace_scale"] == "0.5"
    capsys.readouterr()
    # kino extend / connect on a VACE model, with the first-block cache and skip-layer guidance on
    args = ["--model", model, "--steps", "3", "--quiet", "--frames", "3", "--cache-threshold", "0.1",
            "--skip-guidance", "1", "--skip-blocks", "1", "--reference", str(refimg)]
    assert main(["extend", str(src), "a cat", *args, "-o", str(tmp_path / "ext.mp4")]) == 0
    assert main(["connect", str(src), str(src), "a cat", *args, "-o", str(tmp_path / "con.mp4")]) == 0
    assert read_video(tmp_path / "ext.mp4")[0].shape[0] == 8 and read_video(tmp_path / "con.mp4")[0].shape[0] == 13
    meta = read_metadata(tmp_path / "con.mp4")
    assert meta["task"] == "connect (Wan2.1 VACE)" and meta["cache_reused"].endswith("/6")
    capsys.readouterr()
    for bad, message in [
        (["--last-image", str(refimg)], "not available with a Wan VACE model"),
        (["--loop", "--frames", "6"], "a multiple of 4"),
        (["--vace-mask", str(mask)], "give --vace-video too"),
        (["--image", str(refimg), "--vace-video", str(src)], "not both"),
        (["--vace-video", str(src), "--frames", "9"], "needs as many"),
    ]:
        assert main(["generate", "a cat", "--model", model, "--steps", "1", "--quiet", *bad]) == 2
        assert message in capsys.readouterr().err
    assert main(["extend", str(src), "a cat", "--model", model, "--quiet"]) == 2  # how many new frames?
    assert "--frames N is required" in capsys.readouterr().err
    assert main(["connect", str(src), str(src), "a cat", "--model", model, "--frames", "0", "--quiet"]) == 2
    assert "at least 1" in capsys.readouterr().err
    # kino's own models take none of it
    for bad in (["--reference", str(refimg)], ["--vace-scale", "0.5"]):
        assert main(["generate", "a small red circle moving left on a black background", "--steps", "1",
                     "--quiet", "-o", str(tmp_path / "x.mp4"), *bad]) == 2
        assert "no Wan VACE model" in capsys.readouterr().err


# ---------------------------------------------------------------------------- memory, processes, conversion


def test_vace_small_gpu_mode_streams_the_vace_blocks_too(folders):
    """fp8 block storage with model offload: the VACE blocks are streamed like the main ones
    (none stays resident), and the clip stays close to the float32 one."""
    from kino.models.memory import MemoryPlan
    from kino.pipeline import Pipeline
    from kino.tasks import video_tasks as tasks

    a = _frames(3, 16, 32, 4)
    base = tasks.extend(Pipeline.from_pretrained(folders["original"], text_dtype="float32"), "a cat", a, frames=2,
                        steps=2, seed=1)
    pipe = Pipeline.from_pretrained(folders["original"], text_dtype="float32",
                                    memory=MemoryPlan(dtype="bfloat16", weights="fp8", offload="model"))
    streamed = pipe._streamers[0]
    assert len(streamed.stores) == LAYERS + len(VACE_LAYERS)
    assert all(p.numel() == 0 for p in pipe.dit.vace_blocks.parameters())  # held by the streamer
    small = tasks.extend(pipe, "a cat", a, frames=2, steps=2, seed=1)
    err = (small.latents - base.latents).abs().mean() / base.latents.abs().mean()
    assert 0 < err < 0.05, err


def test_vace_with_fsdp_in_two_processes(folders, tmp_path):
    """Under torchrun with --fsdp the VACE blocks are sharded too, and the context tokens are
    split over the processes with the latents' (sequence parallel): the image equals the
    one-process image."""
    from test_wan import assert_fsdp_matches_one_process

    image = tmp_path / "first.png"
    from kino.data.video_io import write_video

    write_video(image, torch.from_numpy(_frames(1, 16, 32, 8)), 16.0)
    assert_fsdp_matches_one_process(folders["diffusers"], tmp_path, "--steps", "2", "--reference", str(image))


def test_convert_and_info_of_a_vace_folder(folders, components, tmp_path, capsys):
    from kino.pipeline import Pipeline

    assert main(["convert", "wan", str(folders["original"]), str(tmp_path / "kino")]) == 0
    pipe = Pipeline.from_pretrained(tmp_path / "kino", text_dtype="float32")
    assert pipe.takes_vace and pipe.dit.config.vace_layers == tuple(VACE_LAYERS)
    gen = torch.Generator().manual_seed(0)
    x, text, context = (torch.randn(1, 16, 2, 4, 6, generator=gen), torch.randn(1, 7, DIT.text_dim, generator=gen),
                        torch.randn(1, 96, 2, 4, 6, generator=gen))
    with torch.no_grad():
        expected = components[0](x, torch.tensor([500.0]), text, control_hidden_states=context).sample
        torch.testing.assert_close(pipe.dit(x, 500.0, text, vace=context), expected, rtol=0, atol=1e-5)
    capsys.readouterr()
    assert main(["info", str(folders["diffusers"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "vace" and info["components"]["dit"]["vace_blocks"] == len(VACE_LAYERS)
    assert info["defaults"]["shift"] == SHIFT
    assert main(["info", str(tmp_path / "kino")]) == 0
    assert f"{len(VACE_LAYERS)} VACE blocks" in capsys.readouterr().out


def test_vace_batch_rows(folders, tmp_path, capsys):
    """--batch rows name their own VACE source, mask and reference (paths relative to the file);
    a row's clip equals the same request made alone."""
    from kino.data.video_io import read_video, write_video

    write_video(tmp_path / "src.mp4", torch.from_numpy(_frames(5, 16, 32, 6)), 16.0, lossless=True)
    write_video(tmp_path / "mask.png", torch.from_numpy(np.full((1, 16, 32, 3), 255, dtype=np.uint8)), 16.0)
    write_video(tmp_path / "ref.png", torch.from_numpy(_frames(1, 16, 32, 7)), 16.0)
    rows = [{"caption": "a cat", "vace_video": "src.mp4", "vace_mask": "mask.png", "reference": "ref.png",
             "seed": 5},
            {"caption": "a dog", "frames": 1}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", str(folders["diffusers"]), "--steps", "2", "--quiet"]
    assert main(["generate", "--batch", str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "out"), *common]) == 0
    written = sorted((tmp_path / "out").glob("*.mp4"))
    assert len(written) == 1 and len(list((tmp_path / "out").glob("*.png"))) == 1
    from kino.pipeline import Pipeline
    from kino.tasks import video_tasks as tasks

    pipe = Pipeline.from_pretrained(folders["diffusers"])
    alone = tasks.generate(pipe, "a cat", vace_video=tmp_path / "src.mp4", vace_mask=tmp_path / "mask.png",
                           references=[tmp_path / "ref.png"], seed=5, steps=2)
    batch = read_video(written[0])[0].astype(np.int16)
    assert np.abs(batch - alone.video.numpy()).max() <= 2  # lossless yuv444 H.264: RGB round trip within 2
    plain = tasks.generate(pipe, "a cat", vace_video=tmp_path / "src.mp4", vace_mask=tmp_path / "mask.png", seed=5,
                           steps=2)  # the row's reference was used: without it the clip differs
    assert np.abs(batch - plain.video.numpy()).max() > 10
    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"caption": "a cat", "vace_video": "missing.mp4"}) + "\n")
    assert main(["generate", "--batch", str(bad), "--out", str(tmp_path / "o2"), *common]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_two_vace_experts_match_diffusers(components, tmp_path, monkeypatch):
    """Two VACE experts (Wan2.2's VACE-Fun A14B in diffusers' layout: `transformer_2` and
    `boundary_ratio`) sample what diffusers' WanVACEPipeline samples with both, each expert
    given the same context, steps on both sides of the boundary."""
    from kino.pipeline import Pipeline
    from kino.tasks.conditioning import to_model_range

    dit, vae, text, tokenizer = components
    dit_2 = _vace_dit(seed=10)
    root = write_diffusers(tmp_path / "vace-a14b", (_components()[0], vae, text, tokenizer))
    for f in (root / "transformer").iterdir():
        f.unlink()
    dit.save_pretrained(root / "transformer")
    dit_2.save_pretrained(root / "transformer_2")
    index = json.loads((root / "model_index.json").read_text())
    index.update(_class_name="WanVACEPipeline", transformer=["diffusers", "WanVACETransformer3DModel"],
                 transformer_2=["diffusers", "WanVACETransformer3DModel"], boundary_ratio=0.9)
    (root / "model_index.json").write_text(json.dumps(index))
    pipe = Pipeline.from_pretrained(root, text_dtype="float32")
    assert pipe.dit_2 is not None and pipe.takes_vace and pipe.defaults.boundary == 0.9
    shift = pipe.defaults.shift  # T2V-A14B's
    pipe.defaults = dataclasses.replace(pipe.defaults, t_max=(1 - 1e-6) / (shift - (shift - 1) * (1 - 1e-6)),
                                        t_min=0.001)
    frames, h, w, steps = 5, 16, 32, 4
    video, mask = _frames(frames, h, w, 1), _mask(frames, h, w)
    vace = pipe.vace_condition(frames, h, w, to_model_range(video), torch.from_numpy(mask).float() / 255)
    clip = pipe.generate("a cat walks", negative="dog", frames=frames, height=h, width=w, steps=steps, seed=3,
                         vace=vace, guidance=4.0, guidance_2=3.0)
    reference = _reference(components, monkeypatch)
    reference = diffusers.WanVACEPipeline(tokenizer=tokenizer, text_encoder=text, transformer=dit,
                                          transformer_2=dit_2, vae=vae, boundary_ratio=0.9,
                                          scheduler=reference.scheduler.__class__.from_config(
                                              reference.scheduler.config, flow_shift=shift))
    reference.set_progress_bar_config(disable=True)
    noise = torch.randn((1, 16, 2, h // 8, w // 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(latents=noise, output_type="latent", prompt="a cat walks", negative_prompt="dog",
                             height=h, width=w, num_frames=frames, num_inference_steps=steps, guidance_scale=4.0,
                             guidance_scale_2=3.0, video=[PIL.fromarray(f) for f in video],
                             mask=[PIL.fromarray(m, mode="L") for m in mask]).frames
    torch.testing.assert_close(clip.latents, expected, rtol=0, atol=1e-4)
    one = Pipeline.from_pretrained(root, text_dtype="float32")
    one.dit_2, one.defaults = None, dataclasses.replace(pipe.defaults, boundary=None)  # the first expert alone
    alone = one.generate("a cat walks", negative="dog", frames=frames, height=h, width=w, steps=steps, seed=3,
                         vace=vace, guidance=4.0)
    assert (alone.latents - expected).abs().max() > 1e-3


# ---------------------------------------------------------------------------- fine-tuning


def test_vace_fine_tune_on_videos(folders, tmp_path, capsys):
    """`kino preprocess` stores each clip's VACE context for one of kino's frame tasks (chosen
    by its key), the trainer folds the mask as generation does and feeds the context to the
    DiT, a LoRA trains, and `kino extend --lora` uses it."""
    from test_wan import video_run_config

    from kino.data.latent_cache import LatentCache
    from kino.data.preprocess import VACE_TASKS, WanVaceContext, vace_kept_frames
    from kino.pipeline import Pipeline, fold_vace_mask
    from kino.training.dit import DiTTask

    vace = tmp_path / "vace-kino"
    assert main(["convert", "wan", str(folders["original"]), str(vace)]) == 0
    config = tmp_path / "run.toml"
    config.write_text(video_run_config(tmp_path, vace) + "[lora]\nrank = 2\n")
    assert main(["preprocess", "--config", str(config), "-q"]) == 0, capsys.readouterr().err
    cache = LatentCache(tmp_path / "cache")
    assert cache.meta["image_condition"] == {"kind": "wan-vace", "tasks": list(VACE_TASKS)}
    bucket = cache.buckets[0]
    data = cache.get(bucket, list(range(cache.num_clips(bucket))))
    assert data["vace_latents"].shape[1] == 32 and data["vace_kept"].shape[1] == bucket[0]
    # a clip's stored context is the one generation builds for the same video and kept frames
    pipe = Pipeline.from_pretrained(vace, text_dtype="float32")
    key = json.loads((tmp_path / "cache" / f"{cache.meta['buckets'][0]['shards'][0]}.json").read_text())["keys"][0]
    task = WanVaceContext.task(key)
    assert torch.equal(data["vace_kept"][0], vace_kept_frames(task, bucket[0]))
    video = pipe.vae.decode(pipe.vae.denormalize(data["latents"][:1]))[0]  # any video of the bucket's shape
    kept = vace_kept_frames(task, bucket[0])
    expected = pipe.vace_condition(bucket[0], bucket[1], bucket[2], video,
                                   (1 - kept)[:, None, None].expand(-1, bucket[1], bucket[2]))
    stored = WanVaceContext(pipe.vae)([video], [key])
    torch.testing.assert_close(stored["vace_latents"].float(), expected.context[:, :32], rtol=0, atol=0.02)
    task_obj = DiTTask.__new__(DiTTask)
    task_obj.dit_config = pipe.dit.config
    x = torch.zeros(1, 16, *expected.context.shape[2:])
    _, extra = task_obj.dit_input(x, {"vace_latents": expected.context[:, :32], "vace_kept": kept[None]})
    torch.testing.assert_close(extra["vace"], expected.context)
    assert torch.equal(fold_vace_mask(torch.ones(5, 16, 16), 8, 2), torch.ones(64, 2, 2, 2))
    # train a LoRA, then extend with it
    assert main(["train", "dit", "--config", str(config), "-q"]) == 0, capsys.readouterr().err
    lora = tmp_path / "run" / "lora.safetensors"
    src = tmp_path / "src.mp4"
    from kino.data.video_io import write_video

    write_video(src, torch.from_numpy(_frames(3, 16, 32, 9)), 16.0, lossless=True)
    args = ["extend", str(src), "a cat walks", "--model", str(vace), "--frames", "2", "--steps", "2", "-q"]
    assert main([*args, "-o", str(tmp_path / "plain.mp4")]) == 0
    assert main([*args, "--lora", str(lora), "-o", str(tmp_path / "lora.mp4")]) == 0, capsys.readouterr().err
    assert (tmp_path / "plain.mp4").read_bytes() != (tmp_path / "lora.mp4").read_bytes()
    # a cache made for a plain T2V model (the same VAE and UMT5) does not train the VACE DiT
    t2v = tmp_path / "t2v-kino"
    from test_wan import write_original as write_t2v

    _, vae, text, tokenizer = _components()
    assert main(["convert", "wan", str(write_t2v(tmp_path / "t2v", (_components()[0], vae, text, tokenizer))),
                 str(t2v)]) == 0
    other = tmp_path / "other.toml"
    other.write_text(video_run_config(tmp_path / "o", t2v).replace(str(tmp_path / "o" / "run"), str(tmp_path / "o2")))
    assert main(["preprocess", "--config", str(other), "-q"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    other.write_text(other.read_text().replace(f'init_from = "{t2v}"', f'init_from = "{vace}"'))
    assert main(["train", "dit", "--config", str(other), "-q"]) == 2
    assert "holds no VACE contexts" in capsys.readouterr().err


def test_vace_output_size_keeps_the_area_of_the_default(folders):
    """A large input is brought down to the default size's area (aspect kept, Wan's rule), a
    small one keeps its size."""
    from kino.pipeline import Pipeline
    from kino.tasks.video_tasks import output_size

    pipe = Pipeline.from_pretrained(folders["diffusers"])
    big = torch.zeros(3, 1, 1080, 1920)
    h, w = output_size(pipe, big, None, None)
    assert h * w <= 480 * 832 and abs(w / h - 1920 / 1080) < 0.05 and h % 16 == 0 and w % 16 == 0
    assert output_size(pipe, torch.zeros(3, 1, 16, 32), None, None) == (16, 32)


def test_vace_loop_keeps_its_first_frame_after_its_last(folders):
    """A loop of F frames: F + 1 generated with the image kept first and last, the last dropped;
    without an image its first frame is the prompt's text-to-image, same seed."""
    from kino.pipeline import Pipeline
    from kino.tasks import video_tasks as tasks

    pipe = Pipeline.from_pretrained(folders["original"], text_dtype="float32")
    prompt, image = "a cat walks on the grass", _frames(1, 16, 32, 11)
    clip = tasks.generate(pipe, prompt, image=image[0], loop=True, frames=4, steps=2, seed=3)
    assert clip.video.shape == (4, 16, 32, 3) and clip.metadata["loop"] == "true"
    assert torch.equal(clip.video[0], torch.from_numpy(image[0]))
    expected = _manual(pipe, prompt, 5, {0: image, 4: image})
    torch.testing.assert_close(clip.latents, expected.latents, rtol=0, atol=0)
    still = tasks.generate(pipe, prompt, frames=1, steps=2, seed=3)
    free = tasks.generate(pipe, prompt, loop=True, frames=4, steps=2, seed=3)
    assert torch.equal(free.video[0], still.video[0])
    assert free.metadata["task"] == "image-to-video loop (Wan2.1 VACE)"
