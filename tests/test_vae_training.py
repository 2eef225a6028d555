"""VAE training on Shapes World, export to a model folder, sha256-checked loading, reconstruct CLI."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kino.cli import main
from kino.errors import KinoUserError
from kino.models.folder import MANIFEST, WeightsIntegrityError, sha256_file
from kino.models.vae.pretrained import load_vae
from kino.training.checkpoint import latest_checkpoint
from kino.training.vae import VAEDataConfig, VAELossConfig, VAERunConfig, VAETask, to_model_range, world_crops
from kino.world.dataset import write_samples
from kino.world.generator import render, scene_at
from kino.world.palette import WORLD_PALETTE, palette_loss

TINY_RUN = """
model = "tiny"
stats_clips = 4
[data]
batch_size = 2
crop_frames = [1, 5]
crop_size = 16
[train]
out_dir = "{out}"
max_steps = 3
lr = 1e-3
ema_decay = 0.9
checkpoint_every = 2
log_every = 1
progress = false
"""


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("run")
    cfg = run / "vae.toml"
    cfg.write_text(TINY_RUN.format(out=(run / "out").as_posix()))
    assert main(["train", "vae", "--config", str(cfg), "--quiet"]) == 0
    return run / "out" / "model"


def test_world_crops_are_deterministic_and_shaped():
    data = VAEDataConfig(batch_size=3, crop_frames=[5], crop_size=32)
    a, b = world_crops(7, data), world_crops(7, data)
    assert a.shape == (3, 3, 5, 32, 32) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a, world_crops(8, data))


def test_run_config_rejects_bad_values():
    with pytest.raises(KinoUserError, match="4k\\+1"):
        VAERunConfig(data=VAEDataConfig(crop_frames=[4]))
    with pytest.raises(KinoUserError, match="allowed"):
        VAERunConfig(model="huge")


def test_palette_loss_charges_pixels_that_change_world_colour():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, len(WORLD_PALETTE), (2, 3, 8, 8), generator=g)
    x = WORLD_PALETTE[labels].permute(0, 4, 1, 2, 3)  # (B, 3, T, H, W): flat world colours
    exact = palette_loss(x, x, 0.05)
    assert exact < 0.01
    # a small error that keeps every pixel nearest its colour costs little; moving a few
    # pixels onto another colour (a rounded corner) costs much more, though its MSE is the same order
    nudged = x + 0.05 * torch.randn(x.shape, generator=g)
    flipped = x.clone()
    flipped[:, :, :, :2, :2] = WORLD_PALETTE[(labels[:, :, :2, :2] + 1) % len(WORLD_PALETTE)].permute(0, 4, 1, 2, 3)
    assert palette_loss(nudged, x, 0.05) < 0.05 < palette_loss(flipped, x, 0.05)
    # gradients reach the reconstruction
    rec = nudged.clone().requires_grad_(True)
    palette_loss(rec, x, 0.05).backward()
    assert rec.grad.abs().sum() > 0
    # in the VAE task's loss, with its own log entry; off by default
    task = VAETask(VAERunConfig(model="tiny", loss=VAELossConfig(palette=0.5)))
    model = task.build_model()
    batch = {"video": world_crops(0, VAEDataConfig(batch_size=1, crop_frames=[1], crop_size=16))}
    torch.manual_seed(0)
    loss, logs = task.loss(model, batch)
    torch.manual_seed(0)
    plain, plain_logs = VAETask(VAERunConfig(model="tiny")).loss(model, batch)
    assert "palette" in logs and "palette" not in plain_logs
    assert loss.item() == pytest.approx(plain.item() + 0.5 * logs["palette"].item(), rel=1e-4)
    with pytest.raises(KinoUserError, match="palette_temperature"):
        VAELossConfig(palette_temperature=0.0)


def test_temporal_loss_charges_the_error_changing_between_frames():
    """Zero for an error that is the same in every frame, however large; charged for one that
    changes (a decoder's chunk flicker); added to the VAE task's loss with its own log entry,
    and not for a one-frame crop."""
    from kino.training.vae import temporal_loss

    g = torch.Generator().manual_seed(0)
    x = torch.rand((2, 3, 9, 8, 8), generator=g) * 2 - 1
    steady = x + 0.3 * torch.randn((2, 3, 1, 8, 8), generator=g)  # one error, repeated in time
    assert temporal_loss(steady, x) < 1e-12
    flicker = x.clone()
    flicker[:, :, 5:] += 0.1  # the error jumps once, at the second chunk boundary
    assert temporal_loss(flicker, x).item() == pytest.approx(0.01 / 8)  # 1 of 8 steps off by 0.1
    # that step (frame 4 to 5) crosses a chunk boundary: a boundary weight multiplies it; a step
    # inside a chunk (frame 5 to 6) keeps weight 1
    assert temporal_loss(flicker, x, 4, boundary=3.0).item() == pytest.approx(3 * 0.01 / 8)
    inside = x.clone()
    inside[:, :, 6:] += 0.1
    assert temporal_loss(inside, x, 4, boundary=3.0).item() == pytest.approx(0.01 / 8)
    task = VAETask(VAERunConfig(model="tiny", loss=VAELossConfig(temporal=2.0)))
    model = task.build_model()
    for frames in (5, 1):
        batch = {"video": world_crops(0, VAEDataConfig(batch_size=1, crop_frames=[frames], crop_size=16))}
        torch.manual_seed(0)
        loss, logs = task.loss(model, batch)
        torch.manual_seed(0)
        plain, plain_logs = VAETask(VAERunConfig(model="tiny")).loss(model, batch)
        if frames == 1:
            assert "temporal" not in logs and loss.item() == plain.item()
            continue
        assert logs["temporal"] > 0 and "temporal" not in plain_logs
        assert loss.item() == pytest.approx(plain.item() + 2.0 * logs["temporal"].item(), rel=1e-4)
    with pytest.raises(KinoUserError, match="loss weights"):
        VAELossConfig(temporal=-1.0)


def test_trained_model_folder_loads_with_latent_stats(tiny_model_dir):
    manifest = json.loads((tiny_model_dir / MANIFEST).read_text())
    files = manifest["components"]["vae"]["files"]
    assert files["model.safetensors"] == sha256_file(tiny_model_dir / "vae" / "model.safetensors")
    vae = load_vae(tiny_model_dir)
    cfg = json.loads((tiny_model_dir / "vae" / "config.json").read_text())
    assert cfg["latents_std"] != [1.0] * 16  # measured on world clips, not the defaults
    x = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    assert vae.reconstruct(x).shape == x.shape
    load_vae(tiny_model_dir / "vae")  # a bare component folder loads too


def test_tampered_weights_are_refused(tiny_model_dir, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(tiny_model_dir, bad)
    w = bad / "vae" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match="sha256"):
        load_vae(bad)
    (bad / "vae" / "model.safetensors").unlink()
    with pytest.raises(KinoUserError, match="missing"):
        load_vae(bad)


def test_reconstruct_cli_on_a_world_folder(tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "w"
    write_samples(src, 3, "eval", seed=2, frames=9, size=(64, 64))
    out = tmp_path / "r"
    code = main(["vae", "reconstruct", str(src), "--out", str(out), "--model", str(tiny_model_dir), "--quiet"])
    stdout = capsys.readouterr().out
    assert code == 0 and "mean PSNR" in stdout and stdout.count("PSNR") == 4
    rows = [json.loads(x) for x in (out / "captions.jsonl").read_text().splitlines()]
    src_rows = [json.loads(x) for x in (src / "captions.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in rows] == [r["caption"] for r in src_rows]
    assert all((out / r["file"]).is_file() for r in rows)
    # the report runs on the result (a barely trained model fails it, but it must run)
    assert main(["world", "eval", str(out), "--quiet"]) == 0


def test_reconstruct_cli_on_files_keeps_frame_count(tiny_model_dir, tmp_path, capsys):
    from kino.data.video_io import read_video, write_video

    rng = np.random.default_rng(0)
    write_video(tmp_path / "a.mp4", rng.integers(0, 255, (6, 40, 48, 3), dtype=np.uint8), 8, lossless=True)
    write_video(tmp_path / "b.png", rng.integers(0, 255, (1, 16, 16, 3), dtype=np.uint8), 8)
    out = tmp_path / "r"
    code = main(["vae", "reconstruct", str(tmp_path / "a.mp4"), str(tmp_path / "b.png"), "--out", str(out),
                 "--model", str(tiny_model_dir), "--quiet"])
    assert code == 0
    assert read_video(out / "a.mp4")[0].shape == (6, 40, 48, 3)  # 6 frames, 40 px: padded and trimmed back
    assert read_video(out / "b.png")[0].shape == (1, 16, 16, 3)
    plain = _printed_psnr(capsys.readouterr().out)
    # latent refinement: the same files, closer
    code = main(["vae", "reconstruct", str(tmp_path / "a.mp4"), str(tmp_path / "b.png"), "--out", str(out),
                 "--model", str(tiny_model_dir), "--quiet", "--refine-latents", "8"])
    refined = _printed_psnr(capsys.readouterr().out)
    assert code == 0 and read_video(out / "a.mp4")[0].shape == (6, 40, 48, 3)
    assert all(refined[name] > plain[name] for name in ("a.mp4", "b.png")), (plain, refined)
    # the palette term changes the fit (these random pixels are far from world colours)
    code = main(["vae", "reconstruct", str(tmp_path / "a.mp4"), "--out", str(out), "--model", str(tiny_model_dir),
                 "--quiet", "--refine-latents", "8", "--refine-palette", "0.5"])
    by_palette = _printed_psnr(capsys.readouterr().out)["a.mp4"]
    assert code == 0 and by_palette != refined["a.mp4"]
    # ... and it is the fit the flags name: the same refinement run here gives the printed PSNR
    from kino.models.vae.refine import Refinement
    from kino.tasks.reconstruct import psnr_uint8, reconstruct_video

    clip, vae = read_video(tmp_path / "a.mp4")[0], load_vae(tiny_model_dir)
    assert abs(psnr_uint8(clip, reconstruct_video(vae, clip, Refinement(8, 0.5))) - by_palette) < 0.006
    # and so does the optimizer; the CLI's list of methods (kept without torch) is refine.py's
    from kino.cli import DEFAULT_REFINE_METHOD, REFINE_METHODS
    from kino.models.vae.refine import DEFAULT_METHOD, METHODS

    assert REFINE_METHODS == tuple(METHODS) and DEFAULT_REFINE_METHOD == DEFAULT_METHOD
    other = next(m for m in REFINE_METHODS if m != DEFAULT_REFINE_METHOD)
    code = main(["vae", "reconstruct", str(tmp_path / "a.mp4"), "--out", str(out), "--model", str(tiny_model_dir),
                 "--quiet", "--refine-latents", "8", "--refine-method", other])
    by_other = _printed_psnr(capsys.readouterr().out)["a.mp4"]
    assert code == 0 and by_other != refined["a.mp4"] and by_other > plain["a.mp4"]
    assert abs(psnr_uint8(clip, reconstruct_video(vae, clip, Refinement(8, method=other))) - by_other) < 0.006


def _printed_psnr(stdout: str) -> dict[str, float]:
    """`kino vae reconstruct`'s per-clip lines: NAME<TAB>PSNR x dB."""
    return {line.split("\t")[0]: float(line.split()[-2]) for line in stdout.splitlines() if "\tPSNR" in line}


def test_vae_training_resume_is_bitwise_exact(tmp_path):
    """4 steps straight == 2 steps + a fresh process + 2 more (model, EMA and optimizer)."""
    import subprocess
    import sys

    from safetensors.torch import load_file


    def train(out, steps):
        cfg = tmp_path / f"{out}.toml"
        cfg.write_text(TINY_RUN.format(out=(tmp_path / out).as_posix()).replace("max_steps = 3", "max_steps = 4"))
        cmd = [sys.executable, "-m", "kino", "train", "vae", "--config", str(cfg), "--max-steps", str(steps), "-q"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                           env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr
        return r.stderr

    assert "resuming" not in train("straight", 4)
    assert "resuming" not in train("split", 2)
    assert latest_checkpoint(tmp_path / "split").name == "step-00000002"  # --max-steps 2 stopped it there
    assert "from its checkpoint at step 2" in train("split", 4)  # the fresh process resumed
    a, b = latest_checkpoint(tmp_path / "straight"), latest_checkpoint(tmp_path / "split")
    assert a.name == b.name == "step-00000004"
    for f in ("model.safetensors", "ema.safetensors"):
        ta, tb = load_file(a / f), load_file(b / f)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    for f in ("optimizer.pt", "rng.pt"):  # Adam's moments and steps for every parameter, the LR schedule, the RNGs
        assert _same(*(torch.load(c / f, weights_only=True) for c in (a, b))), f


def _same(a, b) -> bool:
    """Nested dicts / lists / tensors equal, element by element."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def test_init_from_a_model_folder_fine_tunes_it(tiny_model_dir, tmp_path):
    from kino.training.vae import VAETask

    task = VAETask(VAERunConfig(model="tiny", init_from=str(tiny_model_dir)))
    model = task.build_model()
    ref = load_vae(tiny_model_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(KinoUserError, match="another size"):
        VAETask(VAERunConfig(model="small", init_from=str(tiny_model_dir))).build_model()


def decoder_round(tmp_path, init_from, extra: str = "", **train) -> Path:
    """A tiny decoder-only round's config file (`extra`: more top-level lines; `train`: [train] values)."""
    train = {"max_steps": 3, "lr": 1e-2, "checkpoint_every": 2, "ema_decay": 0.5, **train}
    cfg = tmp_path / "dec.toml"
    cfg.write_text(f'model = "tiny"\ninit_from = "{init_from}"\ntrain_only = "decoder"\nstats_clips = 2\n{extra}'
                   '[data]\nbatch_size = 2\ncrop_frames = [1, 5]\ncrop_size = 16\n'
                   f'[train]\nout_dir = "{tmp_path / "run"}"\nwarmup_steps = 0\nsample_every = 0\nlog_every = 1\n'
                   'progress = false\n' + "".join(f"{k} = {v}\n" for k, v in train.items()))
    return cfg


def assert_half_trained(parent: Path, run: Path, frozen: tuple[str, ...], trained: tuple[str, ...]) -> None:
    """The run's exported VAE: the `frozen` parts and the latent normalisation are the parent's,
    some of the `trained` parts changed (together they are every tensor), and the last
    checkpoint holds the trained parts alone (the frozen ones come back from init_from)."""
    from safetensors.torch import load_file

    before, after = load_vae(parent), load_vae(run / "model")
    b, a = before.state_dict(), after.state_dict()
    fixed, learnt = [k for k in b if k.startswith(frozen)], [k for k in b if k.startswith(trained)]
    assert fixed and learnt and len(fixed) + len(learnt) == len(b)
    assert all(torch.equal(a[k], b[k]) for k in fixed)
    assert any(not torch.equal(a[k], b[k]) for k in learnt)
    assert after.config.latents_mean == before.config.latents_mean
    assert after.config.latents_std == before.config.latents_std
    saved = load_file(latest_checkpoint(run) / "model.safetensors")
    assert saved and all(k.startswith(trained) for k in saved)


def test_decoder_only_fine_tune_keeps_the_encoder_and_latent_stats(tiny_model_dir, tmp_path):
    assert main(["train", "vae", "--config", str(decoder_round(tmp_path, tiny_model_dir))]) == 0
    assert_half_trained(tiny_model_dir, tmp_path / "run", ("encoder.", "conv1."), ("decoder.", "conv2."))


def test_encoder_only_fine_tune_keeps_the_decoder_and_latent_stats(tiny_model_dir, tmp_path):
    """train_only = "encoder": the decoder and the exported latent normalisation stay the
    parent's, the encoder learns; the anchor is charged (and logged) from the first step, zero
    there since the encoder starts as the parent's; a checkpoint holds the encoder alone."""
    cfg = decoder_round(tmp_path, tiny_model_dir, "[loss]\nkl = 0.0\nanchor = 0.5\n")
    cfg.write_text(cfg.read_text().replace('train_only = "decoder"', 'train_only = "encoder"'))
    assert main(["train", "vae", "--config", str(cfg)]) == 0
    assert_half_trained(tiny_model_dir, tmp_path / "run", ("decoder.", "conv2."), ("encoder.", "conv1."))
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    anchors = [r["anchor"] for r in logs if "anchor" in r]
    assert len(anchors) == 3 and anchors[0] == 0.0 and anchors[-1] > 0.0


def test_encoder_only_fine_tune_decodes_the_means_it_trains_on(tiny_model_dir):
    """The encoder round decodes the posterior means (what a DiT's latents are), not samples:
    its loss is the same for any noise, and lower when the reconstruction is."""
    from kino.training.vae import VAETask

    task = VAETask(VAERunConfig(model="tiny", init_from=str(tiny_model_dir), train_only="encoder",
                                loss=VAELossConfig(kl=0.0)))
    model = task.build_model()
    video = to_model_range(render(scene_at("eval", 3, 0, frames=5, size=(32, 32))))[None]
    losses = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        losses.append(task.loss(model, {"video": video})[0].item())
    assert losses[0] == losses[1]
    with torch.no_grad():
        rec = model.reconstruct(video)
    assert abs(losses[0] - (rec - video).pow(2).mean().item()) < 1e-3


def test_widened_decoder_trains_and_exports_its_width(tiny_model_dir, tmp_path, capsys):
    cfg = decoder_round(tmp_path, tiny_model_dir, "widen_decoder = 2\n", max_steps=2, lr=1e-6, checkpoint_every=1,
                        ema_decay=0.999)
    assert main(["train", "vae", "--config", str(cfg)]) == 0
    before, after = load_vae(tiny_model_dir), load_vae(tmp_path / "run" / "model")
    assert after.config.decoder_dim == 2 * before.config.decoder_dim
    assert after.config.base_dim == before.config.base_dim
    b, a = before.state_dict(), after.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b if k.startswith(("encoder.", "conv1.")))
    video = to_model_range(render(scene_at("eval", 3, 0, frames=5, size=(32, 32))))[None]
    with torch.no_grad():
        ref, out = before.reconstruct(video), after.reconstruct(video)
    # two tiny steps from the narrow decoder's function (it came through the widening intact)
    assert out.shape == ref.shape and (out - ref).abs().mean() < 0.01
    # a resumed run rebuilds the same widened model under the checkpoint
    capsys.readouterr()
    assert main(["train", "vae", "--config", str(cfg), "--max-steps", "3"]) == 0
    assert "from its checkpoint at step 2" in capsys.readouterr().err
    assert latest_checkpoint(tmp_path / "run").name == "step-00000003"
    assert load_vae(tmp_path / "run" / "model").config.decoder_dim == 2 * before.config.decoder_dim


def test_decoder_only_needs_init_from():
    with pytest.raises(KinoUserError, match="init_from"):
        VAERunConfig(model="tiny", train_only="decoder")
    with pytest.raises(KinoUserError, match="train_only must be"):
        VAERunConfig(model="tiny", train_only="middle")
    with pytest.raises(KinoUserError, match="init_from"):
        VAERunConfig(model="tiny", train_only="encoder")
    with pytest.raises(KinoUserError, match="anchor"):
        VAERunConfig(model="tiny", init_from="m", train_only="decoder", loss=VAELossConfig(anchor=1.0))
    with pytest.raises(KinoUserError, match="widen_decoder"):
        VAERunConfig(model="tiny", init_from="m", train_only="encoder", widen_decoder=2)
    with pytest.raises(KinoUserError, match="init_from"):
        VAERunConfig(model="tiny", widen_decoder=2)
    with pytest.raises(KinoUserError, match="widen_decoder"):
        VAERunConfig(model="tiny", init_from="m", widen_decoder=0)


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    from conftest import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("pipe"), "tiny-regen", steps=4, guidance=2.0)


def regen_config(pipe_dir, strength, frames=(9,), share=0.5, **data) -> VAERunConfig:
    from kino.training.vae import VAEDenoiseConfig

    return VAERunConfig(model="tiny", init_from=str(pipe_dir), train_only="decoder",
                        data=VAEDataConfig(**{"batch_size": 4, "crop_frames": [5], "crop_size": 16, **data}),
                        denoise=VAEDenoiseConfig(model=str(pipe_dir), share=share, strength=list(strength),
                                                 frames=list(frames)))


def crops_at(target: torch.Tensor, video: torch.Tensor, stride: int) -> list[tuple[int, int]]:
    """The latent-aligned (y, x) where `target` (3, t, S, S) is a crop of `video` (3, F, H, W)
    (several where the crop holds background only)."""
    S, t = target.shape[-1], target.shape[1]
    return [(y, x) for y in range(0, video.shape[2] - S + 1, stride) for x in range(0, video.shape[3] - S + 1, stride)
            if torch.equal(video[:, :t, y:y + S, x:x + S], target)]


def test_regenerated_crops_are_the_dits_latents_of_the_clips_they_target(one_thread, tiny_pipeline_dir):
    from kino.world.captions import SIZES

    step = 3
    # strength 0.1 of a 4-step schedule runs no step: the latents are the encoder's own
    task = VAETask(regen_config(tiny_pipeline_dir, (0.1, 0.1)))
    task.build_model()
    batch = task.batch(step)
    assert batch["video"].shape == (2, 3, 5, 16, 16)  # the plain half
    z, x = batch["latents"], batch["target"]
    stride = task.pipe.vae.config.space_stride
    assert z.shape == (2, task.pipe.vae.config.z_dim, 2, 16 // stride, 16 // stride) and x.shape == (2, 3, 5, 16, 16)
    for j in range(2):
        # the clip behind item j: scene 2**40 + step * 2 + j of the data stream, at one of the world's sizes
        clips = [to_model_range(render(scene_at("train", 0, 2**40 + step * 2 + j, frames=9, size=s))) for s in SIZES]
        errors = []
        for clip in clips:
            with torch.no_grad():
                mean, _ = task.pipe.vae.encode(clip[None])
            s = 16 // stride
            errors += [(z[j] - mean[0, :, :2, y // stride:y // stride + s, x0 // stride:x0 // stride + s]).abs().max()
                       for y, x0 in crops_at(x[j], clip, stride)]
        assert errors and min(errors) < 1e-5
    again = task.batch(step)
    assert all(torch.equal(again[k], batch[k]) for k in batch)  # a pure function of step (exact resume)
    # a real SDEdit moves the latents away from the encoder's; the targets stay the clips
    strong = VAETask(regen_config(tiny_pipeline_dir, (0.9, 0.9)))
    strong.build_model()
    moved = strong.batch(step)
    assert torch.equal(moved["target"], x) and (moved["latents"] - z).abs().mean() > 1e-3


def test_regenerated_round_trains_the_decoder_only(one_thread, tiny_pipeline_dir, tmp_path, capsys):
    extra = (f'[denoise]\nmodel = "{tiny_pipeline_dir}"\nshare = 1.0\nstrength = [0.3, 0.8]\nframes = [1, 9]\n')
    cfg = decoder_round(tmp_path, tiny_pipeline_dir, max_steps=2, checkpoint_every=1)
    cfg.write_text(cfg.read_text().replace("[data]", extra + "[data]"))
    assert main(["train", "vae", "--config", str(cfg)]) == 0
    before, after = load_vae(tiny_pipeline_dir), load_vae(tmp_path / "run" / "model")
    b, a = before.state_dict(), after.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b if k.startswith(("encoder.", "conv1.")))
    assert any(not torch.equal(a[k], b[k]) for k in b if k.startswith(("decoder.", "conv2.")))
    capsys.readouterr()
    assert main(["train", "vae", "--config", str(cfg), "--max-steps", "3"]) == 0
    assert "from its checkpoint at step 2" in capsys.readouterr().err  # resumed under the [denoise] section
    assert latest_checkpoint(tmp_path / "run").name == "step-00000003"


def test_regenerated_round_needs_the_dits_own_encoder(one_thread, tiny_pipeline_dir, tiny_model_dir):
    from kino.training.vae import VAEDenoiseConfig

    with pytest.raises(KinoUserError, match="differs"):  # another VAE's latents are not what the DiT learned
        VAETask(VAERunConfig(model="tiny", init_from=str(tiny_model_dir), train_only="decoder",
                             denoise=VAEDenoiseConfig(model=str(tiny_pipeline_dir)))).build_model()
    with pytest.raises(KinoUserError, match="train_only"):
        VAERunConfig(model="tiny", denoise=VAEDenoiseConfig(model=str(tiny_pipeline_dir)))
    with pytest.raises(KinoUserError, match="strength"):
        VAEDenoiseConfig(strength=[0.5, 0.2])
    with pytest.raises(KinoUserError, match="share"):
        VAEDenoiseConfig(share=0.0)
    with pytest.raises(KinoUserError, match="world frame counts"):
        VAEDenoiseConfig(frames=[5])
    with pytest.raises(KinoUserError, match="longest crop"):
        regen_config(tiny_pipeline_dir, (0.1, 0.2), frames=(1,))


def test_validation_reconstructs_whole_eval_clips(tmp_path):
    from kino.training.vae import psnr
    from kino.world.captions import SIZES

    cfg = tmp_path / "vae.toml"
    cfg.write_text(TINY_RUN.format(out=(tmp_path / "out").as_posix()).replace("max_steps = 3", "max_steps = 2")
                   .replace("[train]", "[validation]\nclips = 2\nframes = [1, 5]\n[train]\nvalidate_every = 2"))
    assert main(["train", "vae", "--config", str(cfg), "--quiet"]) == 0
    (row,) = [json.loads(x) for x in (tmp_path / "out" / "validation.jsonl").read_text().splitlines()]
    assert row["step"] == 2 and set(row) == {"step", "val_mse", "val_psnr", "ema_val_mse", "ema_val_psnr"}
    # the EMA figures are the exported model's own reconstructions of those clips
    model = load_vae(tmp_path / "out" / "model")
    scores = []
    for frames in (1, 5):
        for i in range(2):
            x = to_model_range(render(scene_at("eval", 0, i, frames=frames, size=SIZES[i % len(SIZES)])))[None]
            scores.append(float(psnr(model.reconstruct(x), x)))
    assert row["ema_val_psnr"] == pytest.approx(sum(scores) / len(scores), abs=1e-3)
