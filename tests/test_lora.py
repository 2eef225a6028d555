"""LoRA and full fine-tuning: the LoRA layer, training only the LoRA (base weights bitwise
unchanged) with exact resume, full fine-tuning from a model folder, the LoRA file (metadata,
sha256 record, malformed files), fuse/unfuse, and `kino train dit` + `kino generate --lora`
end to end.

Training tests use the tiny DiT on a latent cache made with the hash-based fake text encoder
of test_dit_training.py; the end-to-end test uses a tiny pipeline with the real MiniLM.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_pipeline
from safetensors.torch import save_file
from test_dit_training import FakeTextEncoder, tiny_vae

from kino.cli import main
from kino.data.latent_cache import LatentCache, build_world_cache
from kino.data.video_io import read_metadata, read_video
from kino.errors import KinoUserError
from kino.models.dit import DIT_SIZES, DiT, DiTConfig
from kino.models.dit.pretrained import load_dit
from kino.models.folder import WEIGHTS, WeightsIntegrityError, save_component, sha256_file, write_manifest
from kino.models.lora import (LoRAConfig, LoRALinear, apply_lora, fuse_lora, lora_state_dict, read_lora, save_lora,
                              unfuse_lora, write_record)
from kino.models.vae.pretrained import load_vae
from kino.pipeline import Pipeline
from kino.training.checkpoint import latest_checkpoint, load_checkpoint
from kino.training.config import TrainConfig, load_config
from kino.training.dit import CacheConfig, DiTDataConfig, DiTRunConfig, DiTTask, run_train_dit
from kino.training.trainer import Trainer

PROMPT = "a small red circle moving left on a black background"
TINY24 = DIT_SIZES["tiny"]  # text_dim 24 = FakeTextEncoder.dim
WIDE = DiTConfig.from_dict({**TINY24.to_dict(), "dim": 64, "num_heads": 4})  # no LoRA of it fits TINY24


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    pass


def random_dit(config: DiTConfig = TINY24, seed: int = 0) -> DiT:
    """A DiT whose every weight is perturbed (the zero-initialised head would hide changes)."""
    torch.manual_seed(seed)
    dit = DiT(config)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return dit.eval()


def dit_inputs(config: DiTConfig = TINY24, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 2, 4, 4, generator=g)  # (B, C, T, h, w)
    t = torch.tensor([[300.0, 300.0], [800.0, 0.0]])  # (B, T)
    text = torch.randn(2, 5, config.text_dim, generator=g)  # (B, L, D)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    return x, t, text, mask


def randomize_lora(model: torch.nn.Module, seed: int = 2) -> None:
    """Non-zero up weights, as after training (a fresh LoRA's update is exactly 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_up.weight.copy_(0.1 * torch.randn(m.lora_up.weight.shape, generator=g))


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}


# ---------------------------------------------------------------------------- the layer


def test_apply_lora_starts_equal_and_trains_only_lora():
    base = random_dit()
    model = copy.deepcopy(base)
    names = apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    assert len(names) == TINY24.num_layers * 10  # q k v o (self, cross) + ffn.0, ffn.2 per block
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{n}.lora_{s}.weight" for n in names for s in ("down", "up")}
    # base keys unchanged (LoRALinear keeps the same Parameters under the same names)
    assert set(base.state_dict()) <= set(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(*dit_inputs()), base(*dit_inputs()))  # up = 0: exactly the base
    only_q = copy.deepcopy(base)
    assert apply_lora(only_q, LoRAConfig(rank=2, targets=["blocks.*.self_attn.q"])) == \
        ["blocks.0.self_attn.q", "blocks.1.self_attn.q"]
    with pytest.raises(KinoUserError, match="already has LoRA"):
        apply_lora(only_q, LoRAConfig())
    with pytest.raises(KinoUserError, match="matches no linear layer"):
        apply_lora(copy.deepcopy(base), LoRAConfig(targets=["blocks.*.attn.q"]))
    for bad, needle in [({"rank": 0}, "rank"), ({"alpha": 0.0}, "alpha"), ({"dropout": 1.0}, "dropout"),
                        ({"targets": []}, "targets")]:
        with pytest.raises(KinoUserError, match=needle):
            LoRAConfig(**bad)


# ---------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vae")
    vae = tiny_vae()
    save_component(out / "vae", vae.config.to_dict(), vae.state_dict())
    write_manifest(out, "tiny-vae", {"vae": ("vae", "VideoVAE")})
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, vae_dir) -> Path:
    """A model folder with the tiny VAE and a random tiny DiT (24-d text): the base to adapt."""
    out = tmp_path_factory.mktemp("base")
    vae = tiny_vae()
    save_component(out / "vae", vae.config.to_dict(), vae.state_dict())
    dit = random_dit()
    save_component(out / "dit", dit.config.to_dict(), dit.state_dict())
    write_manifest(out, "tiny-base", {"vae": ("vae", "VideoVAE"), "dit": ("dit", "DiT")})
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, vae_dir) -> Path:
    out = tmp_path_factory.mktemp("cache") / "world"
    build_world_cache(out, load_vae(vae_dir), FakeTextEncoder(), clips_per_bucket=4, buckets=[(1, 32, 32), (5, 32, 32)])
    return out


def run_config(out: Path, cache: Path, base: Path | None, lora: LoRAConfig | None, **train) -> DiTRunConfig:
    return DiTRunConfig(
        model="tiny", init_from=None if base is None else str(base), lora=lora,
        cache=CacheConfig(dir=str(cache), clips_per_bucket=4, buckets=["1x32x32", "5x32x32"]),
        data=DiTDataConfig(batch_size=2),
        train=TrainConfig(**{"out_dir": str(out), "max_steps": 4, "lr": 1e-2, "log_every": 1,
                             "checkpoint_every": 0, "progress": False, **train}),
    )


def test_lora_training_changes_only_lora_weights(cache_dir, base_dir, tmp_path):
    cfg = run_config(tmp_path / "run", cache_dir, base_dir, LoRAConfig(rank=2, alpha=4.0, dropout=0.1),
                     ema_decay=0.5)
    trainer = Trainer(DiTTask(cfg, LatentCache(cache_dir)), cfg.train, run_config=cfg)
    trainer.setup()
    on_disk = load_dit(base_dir).state_dict()
    before = base_state(trainer.model)
    assert all(torch.equal(before[k], on_disk[k]) for k in on_disk)  # the base is init_from's DiT
    lora_before = lora_state_dict(trainer.model.state_dict())
    trainer.fit()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a base weight changed"
    lora_after = lora_state_dict(after)
    assert lora_after.keys() == lora_before.keys() and len(lora_after) == 2 * TINY24.num_layers * 10
    assert all(not torch.equal(lora_before[k], lora_after[k]) for k in lora_after if ".lora_up." in k)
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_after if ".lora_down." in k)
    # the checkpoint holds the LoRA alone (and its EMA), not the frozen base
    saved = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert set(saved.model) == set(lora_after) and set(saved.ema) == set(lora_after)


def test_lora_resume_is_exact(cache_dir, base_dir, tmp_path):
    def train(out: Path, steps: list[int]):
        trainer, starts = None, []
        for n in steps:
            cfg = run_config(out, cache_dir, base_dir, LoRAConfig(rank=2, dropout=0.1), max_steps=n, ema_decay=0.9)
            trainer = Trainer(DiTTask(cfg, LatentCache(cache_dir)), cfg.train, run_config=cfg)
            result = trainer.fit()
            starts.append(result.start_step)
        return trainer.export_state_dict(ema=False), trainer.export_state_dict(ema=True), result.losses, starts

    straight = train(tmp_path / "a", [4])
    resumed = train(tmp_path / "b", [2, 4])
    assert straight[3] == [0] and resumed[3] == [0, 2]  # the second fit resumed, it did not start again
    for one, two in zip(straight[:2], resumed[:2]):
        assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert straight[2]["loss"] == resumed[2]["loss"]


def test_lora_run_refuses_to_resume_onto_changed_base_weights(cache_dir, base_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    cfg = run_config(tmp_path / "run", cache_dir, base, LoRAConfig(rank=2), max_steps=2)
    assert run_train_dit(cfg, text_encoder=FakeTextEncoder()) == tmp_path / "run" / "lora.safetensors"
    dit = random_dit(seed=9)  # same size, other weights
    save_component(base / "dit", dit.config.to_dict(), dit.state_dict())
    write_manifest(base, "tiny-base", {"vae": ("vae", "VideoVAE"), "dit": ("dit", "DiT")})
    cfg.train.max_steps = 4
    with pytest.raises(KinoUserError, match="resuming would adapt other weights"):
        run_train_dit(cfg, text_encoder=FakeTextEncoder())
    cfg.train.out_dir = str(tmp_path / "fresh")  # a new run folder on the new base is fine
    assert run_train_dit(cfg, text_encoder=FakeTextEncoder()).is_file()


def test_a_lora_trains_on_a_gguf_quantized_base(cache_dir, base_dir, tmp_path):
    """init_dit_file = a GGUF of the base: the blocks stay quantized under the LoRA layers, only
    the LoRA trains, the file records the GGUF's sha256, and the LoRA fused (unfused, on the
    quantized layers) into the GGUF DiT at generation computes what the trained model computes."""
    gguf = pytest.importorskip("gguf")
    from kino.models.dit.pretrained import load_folder_dit
    from kino.models.gguf import GGUFLinear

    q8 = gguf.GGMLQuantizationType.Q8_0
    writer = gguf.GGUFWriter(str(tmp_path / "base.gguf"), "wan")
    for key, value in load_dit(base_dir).state_dict().items():
        if key.startswith("blocks.") and value.ndim == 2:
            writer.add_tensor(key, gguf.quants.quantize(value.float().numpy(), q8), raw_dtype=q8)
        else:
            writer.add_tensor(key, value.float().numpy())
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    cfg = run_config(tmp_path / "run", cache_dir, base_dir, LoRAConfig(rank=2, alpha=4.0), max_steps=3)
    cfg.init_dit_file = str(tmp_path / "base.gguf")
    trainer = Trainer(DiTTask(cfg, LatentCache(cache_dir)), cfg.train, run_config=cfg)
    trainer.setup()
    layers = [m for m in trainer.model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 10 * TINY24.num_layers and all(m.qtype == int(q8) for m in layers)
    before = base_state(trainer.model)
    trainer.fit()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the quantized bytes did not move
    assert any(not torch.equal(torch.zeros_like(v), v) for k, v in after.items() if ".lora_up." in k)
    path = run_train_dit(cfg, text_encoder=FakeTextEncoder())  # the finished run's export
    assert read_lora(path).base_sha256 == sha256_file(tmp_path / "base.gguf")
    served = load_folder_dit(base_dir, "dit", tmp_path / "base.gguf")
    fuse_lora(served, read_lora(path), 1.0, {})
    assert isinstance(served.blocks[0].self_attn.q, GGUFLinear) and served.blocks[0].self_attn.q.lora_down is not None
    trained = Trainer(DiTTask(cfg, LatentCache(cache_dir)), cfg.train, run_config=cfg)
    trained.setup()  # resumes the finished run: the trained LoRA on the quantized base
    model = trained.model.eval()
    x, t, text, mask = dit_inputs()
    with torch.no_grad():
        expected = model(x, t, text, mask)
        torch.testing.assert_close(served(x, t, text, mask), expected, rtol=0, atol=1e-5)
        plain = load_folder_dit(base_dir, "dit", tmp_path / "base.gguf")(x, t, text, mask)
        assert (plain - expected).abs().max() > 1e-3  # the LoRA shows
    with pytest.raises(KinoUserError, match="add a \\[lora\\] section"):
        DiTRunConfig(model="tiny", init_from=str(base_dir), init_dit_file=str(tmp_path / "base.gguf"))


def test_full_finetuning_starts_from_init_from(cache_dir, base_dir, tmp_path):
    cfg = run_config(tmp_path / "run", cache_dir, base_dir, None, max_steps=2)
    task = DiTTask(cfg, LatentCache(cache_dir))
    torch.manual_seed(123)  # the seed must not matter: the weights come from the folder
    model = task.build_model()
    on_disk = load_dit(base_dir).state_dict()
    assert model.state_dict().keys() == on_disk.keys()
    assert all(torch.equal(model.state_dict()[k], on_disk[k]) for k in on_disk)
    assert all(p.requires_grad for p in model.parameters()) and model.training
    # a fresh run (no init_from) starts elsewhere
    fresh = DiTTask(run_config(tmp_path / "x", cache_dir, None, None), LatentCache(cache_dir)).build_model()
    assert not torch.equal(fresh.blocks[0].self_attn.q.weight, model.blocks[0].self_attn.q.weight)

    # the whole run (its VAE: init_from's): a model folder, every weight trained, starting
    # from init_from's loss
    out = run_train_dit(cfg, text_encoder=FakeTextEncoder())
    trained = load_dit(out).state_dict()
    assert trained.keys() == on_disk.keys()
    assert not torch.equal(trained["blocks.0.self_attn.q.weight"], on_disk["blocks.0.self_attn.q.weight"])
    assert not torch.equal(trained["patch_embedding.weight"], on_disk["patch_embedding.weight"])
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    batch = task.batch(0)
    with torch.no_grad():
        assert first["loss"] == pytest.approx(task.loss(load_dit(base_dir).train(), batch)[0].item(), rel=1e-5)


def test_a_rope_only_dit_grows_the_absolute_position_embedding(cache_dir, base_dir, tmp_path):
    cfg = run_config(tmp_path / "run", cache_dir, base_dir, None, max_steps=2)
    cfg.model = "tiny-abspos"
    task = DiTTask(cfg, LatentCache(cache_dir))
    model = task.build_model()
    on_disk = load_dit(base_dir)
    assert model.config.abs_pos_embed and not on_disk.config.abs_pos_embed
    state = model.state_dict()
    assert set(state) - set(on_disk.state_dict()) == {"pos_embedding.weight", "pos_embedding.bias"}
    assert all(torch.equal(state[k], v) for k, v in on_disk.state_dict().items())
    assert not state["pos_embedding.weight"].any() and all(p.requires_grad for p in model.parameters())
    batch = task.batch(0)
    with torch.no_grad():  # step 0 computes what the base computes
        assert task.loss(model, batch)[0].item() == task.loss(on_disk.train(), batch)[0].item()
    trained = load_dit(run_train_dit(cfg, text_encoder=FakeTextEncoder()))
    assert trained.config == DIT_SIZES["tiny-abspos"] and trained.pos_embedding.weight.abs().sum() > 0
    # a LoRA adapts its base as it is: growing a layer under it is refused
    cfg.lora, cfg.train.out_dir = LoRAConfig(rank=2), str(tmp_path / "lora")
    with pytest.raises(KinoUserError, match="no absolute-position embedding"):
        DiTTask(cfg, LatentCache(cache_dir)).build_model()


def test_a_dit_grows_deeper_from_init_from_and_trains_the_new_blocks(cache_dir, base_dir, tmp_path):
    cfg = run_config(tmp_path / "run", cache_dir, base_dir, None, max_steps=3)
    cfg.model = "tiny-abspos-3"  # the base's 2 blocks, a new one after them, and the position layer
    task = DiTTask(cfg, LatentCache(cache_dir))
    model = task.build_model()
    on_disk = load_dit(base_dir)
    state, base = model.state_dict(), on_disk.state_dict()
    assert model.config.num_layers == 3 and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(state[k], v) for k, v in base.items())  # blocks 0, 1 and the rest: the base's
    assert not state["blocks.2.ffn.2.weight"].any() and not state["blocks.2.self_attn.o.weight"].any()
    batch = task.batch(0)
    with torch.no_grad():  # step 0 computes what the base computes
        assert task.loss(model, batch)[0].item() == task.loss(on_disk.train(), batch)[0].item()
    grown_dir = run_train_dit(cfg, text_encoder=FakeTextEncoder())
    trained = load_dit(grown_dir)
    assert trained.config == DIT_SIZES["tiny-abspos-3"]
    assert trained.blocks[2].ffn[2].weight.abs().sum() > 0 and trained.blocks[2].cross_attn.o.weight.abs().sum() > 0
    # a LoRA adapts its base as it is; a shallower size than the base cannot be grown into
    cfg.lora, cfg.train.out_dir = LoRAConfig(rank=2), str(tmp_path / "lora")
    with pytest.raises(KinoUserError, match="has 2 blocks"):
        DiTTask(cfg, LatentCache(cache_dir)).build_model()
    cfg.lora, cfg.init_from, cfg.model = None, str(grown_dir), "tiny-abspos"
    with pytest.raises(KinoUserError, match="differs from model = 'tiny-abspos'.*num_layers"):
        DiTTask(cfg, LatentCache(cache_dir)).build_model()


def test_a_dit_regrows_finer_patches_from_init_from_and_trains(cache_dir, base_dir, tmp_path):
    cfg = run_config(tmp_path / "run", cache_dir, base_dir, None, max_steps=2)
    cfg.model = "tiny-abspos-p1"  # the base's 1x2x2 patches halved to 1x1x1, RoPE positions halved
    task = DiTTask(cfg, LatentCache(cache_dir))
    model = task.build_model()
    base = load_dit(base_dir)
    assert model.config == DIT_SIZES["tiny-abspos-p1"] and all(p.requires_grad for p in model.parameters())
    state = model.state_dict()
    torch.testing.assert_close(state["patch_embedding.weight"][..., 0, 0, 0],
                               base.state_dict()["patch_embedding.weight"].sum(dim=(2, 3, 4)))
    assert all(torch.equal(state[k], v) for k, v in base.state_dict().items() if k.startswith("blocks."))
    batch = task.batch(0)
    assert task.batch_tokens(batch) == 4 * DiTTask(run_config(tmp_path / "b", cache_dir, base_dir, None),
                                                   LatentCache(cache_dir)).batch_tokens(batch)
    regrown_dir = run_train_dit(cfg, text_encoder=FakeTextEncoder())
    trained = load_dit(regrown_dir)
    assert trained.config == DIT_SIZES["tiny-abspos-p1"]
    assert not torch.equal(trained.state_dict()["head.head.weight"], state["head.head.weight"])
    # a LoRA adapts its base as it is: regrowing the patches under it is refused, naming them
    cfg.lora, cfg.train.out_dir = LoRAConfig(rank=2), str(tmp_path / "lora")
    with pytest.raises(KinoUserError, match="1x2x2 patches"):
        DiTTask(cfg, LatentCache(cache_dir)).build_model()
    # with model unset the run takes init_from's DiT as it is: a LoRA on the regrown model
    cfg.model, cfg.init_from = None, str(regrown_dir)
    task = DiTTask(cfg, LatentCache(cache_dir))
    assert task.dit_config == trained.config
    adapted = task.build_model()
    frozen = base_state(adapted)
    assert lora_state_dict(adapted.state_dict()) and all(torch.equal(v, frozen[k])
                                                         for k, v in trained.state_dict().items())
    trainer = Trainer(task, cfg.train, run_config=cfg)
    trainer.fit()
    ups = [v for k, v in lora_state_dict(trainer.model.state_dict()).items() if ".lora_up." in k]
    assert ups and all(v.abs().sum() > 0 for v in ups)  # zero at first: the LoRA trained
    # unset without init_from: a fresh "small" DiT
    assert DiTTask(DiTRunConfig(cache=cfg.cache), LatentCache(cache_dir)).dit_config == \
        dataclasses.replace(DIT_SIZES["small"], text_dim=TINY24.text_dim)


def test_init_from_is_checked_before_the_cache(cache_dir, base_dir, tmp_path):
    wrong_size = run_config(tmp_path / "r", tmp_path / "never-built", base_dir, None)
    wrong_size.model = "small"
    with pytest.raises(KinoUserError, match="differs from model = 'small'"):
        run_train_dit(wrong_size, text_encoder=FakeTextEncoder())
    missing = run_config(tmp_path / "r", tmp_path / "never-built", tmp_path / "nowhere", None)
    with pytest.raises(KinoUserError, match="not a model folder with a DiT"):
        run_train_dit(missing, text_encoder=FakeTextEncoder())
    assert not (tmp_path / "never-built").exists()


def test_lora_section_in_a_config_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "tiny"\ninit_from = "some/model"\n[lora]\nrank = 8\nalpha = 4\n'
                    'targets = ["blocks.*.self_attn.[qkv]"]\n')
    cfg = load_config(path, DiTRunConfig)
    assert cfg.lora == LoRAConfig(rank=8, alpha=4.0, targets=["blocks.*.self_attn.[qkv]"], dropout=0.0)
    assert load_config(_write(tmp_path, 'model = "tiny"\n'), DiTRunConfig).lora is None
    for text, needle in [('model = "tiny"\n[lora]\nrank = 4\n', "needs init_from"),
                         ('init_from = "m"\n[lora]\nrank = 0\n', "lora.rank"),
                         ('init_from = "m"\n[lora]\nrnk = 4\n', "lora.rnk")]:
        with pytest.raises(KinoUserError, match=needle):
            load_config(_write(tmp_path, text), DiTRunConfig)
    shipped = load_config(Path(__file__).resolve().parents[1] / "configs" / "lora_example.toml", DiTRunConfig)
    assert shipped.lora is not None and shipped.init_from is not None


def _write(tmp: Path, text: str) -> Path:
    path = tmp / "x.toml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------- files, fuse, unfuse


def adapted(base: DiT, seed: int, rank: int = 3, alpha: float = 6.0, targets=None) -> tuple[DiT, LoRAConfig]:
    config = LoRAConfig(rank=rank, alpha=alpha, **({"targets": targets} if targets else {}))
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    apply_lora(model, config)
    randomize_lora(model, seed)
    return model.eval(), config


def test_save_read_and_record(tmp_path):
    model, config = adapted(random_dit(), seed=3)
    path = tmp_path / "a.safetensors"
    digest = save_lora(path, model.state_dict(), config, base="tiny-base", base_sha256="ab" * 32)
    write_record(path, digest, steps=7)
    assert digest == sha256_file(path)
    assert json.loads((tmp_path / "a.json").read_text()) == {"file": "a.safetensors", "sha256": digest, "steps": 7}
    lora = read_lora(path)
    assert (lora.rank, lora.alpha, lora.targets) == (3, 6.0, list(config.targets))
    assert (lora.base, lora.base_sha256, lora.sha256) == ("tiny-base", "ab" * 32, digest)
    state = model.state_dict()
    assert sorted(lora.modules) == sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert all(torch.equal(lora.down[n], state[n + ".lora_down.weight"]) for n in lora.modules)
    # only LoRA weights in the file
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert all(".lora_" in k for k in f.keys()) and f.metadata()["format"] == "kino-lora"
    # a file altered after its record was written is refused
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match="integrity"):
        read_lora(path)


def test_fused_equals_adapted_unfuse_restores_scale_zero_is_base_and_loras_add(tmp_path):
    base = random_dit()
    inputs = dit_inputs()
    with torch.no_grad():
        y_base = base(*inputs)
    one, config1 = adapted(base, seed=4)
    two, config2 = adapted(base, seed=5, rank=2, alpha=1.0, targets=["blocks.*.ffn.[02]", "blocks.1.cross_attn.v"])
    save_lora(tmp_path / "one.safetensors", one.state_dict(), config1)
    save_lora(tmp_path / "two.safetensors", two.state_dict(), config2)
    lora1, lora2 = read_lora(tmp_path / "one.safetensors"), read_lora(tmp_path / "two.safetensors")

    model, originals = copy.deepcopy(base), {}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fuse_lora(model, lora1, 1.0, originals)
    with torch.no_grad():
        y_fused, y_adapted = model(*inputs), one(*inputs)
    assert not torch.allclose(y_fused, y_base, atol=1e-3)  # the LoRA does something
    torch.testing.assert_close(y_fused, y_adapted, rtol=1e-5, atol=1e-5)  # fp32: same function
    unfuse_lora(model, originals)
    assert not originals and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    fuse_lora(model, lora1, 0.0, originals)  # scale 0: the base, bit for bit
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    unfuse_lora(model, originals)

    # two LoRAs add: W + d1 + 0.5 d2 on every module either touches
    fuse_lora(model, lora1, 1.0, originals)
    fuse_lora(model, lora2, 0.5, originals)
    modules = dict(model.named_modules())
    for name in set(lora1.modules) | set(lora2.modules):
        want = before[name + ".weight"].clone()
        want += lora1.delta(name) if name in lora1.modules else 0
        want += lora2.delta(name, 0.5) if name in lora2.modules else 0
        torch.testing.assert_close(modules[name].weight, want, rtol=0, atol=1e-6)
    unfuse_lora(model, originals)  # restores what was there before the first fusion
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_malformed_and_misfit_files_are_refused_and_change_nothing(tmp_path):
    base = random_dit()
    model, originals = copy.deepcopy(base), {}
    other, config = adapted(random_dit(WIDE), seed=6)
    save_lora(tmp_path / "other.safetensors", other.state_dict(), config)
    with pytest.raises(KinoUserError, match="does not fit this model"):
        fuse_lora(model, read_lora(tmp_path / "other.safetensors"), 1.0, originals)
    assert not originals and all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())
    # a layer that the model lacks
    ghost, config = adapted(random_dit(), seed=7, targets=["blocks.1.ffn.0"])
    sd = {k.replace("blocks.1.", "blocks.9."): v for k, v in ghost.state_dict().items()}
    save_lora(tmp_path / "ghost.safetensors", sd, config)
    with pytest.raises(KinoUserError, match="blocks.9.ffn.0 does not exist"):
        fuse_lora(model, read_lora(tmp_path / "ghost.safetensors"), 1.0, originals)
    with pytest.raises(KinoUserError, match="finite"):
        fuse_lora(model, read_lora(tmp_path / "ghost.safetensors"), float("nan"), originals)

    save_file({"w": torch.zeros(2, 2)}, str(tmp_path / "plain.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    save_file({"a.lora_down.weight": torch.zeros(2, 4)}, str(tmp_path / "half.safetensors"),
              metadata={"format": "kino-lora", "rank": "2", "alpha": "2.0"})
    save_file({"a.lora_down.weight": torch.zeros(3, 4), "a.lora_up.weight": torch.zeros(4, 3)},
              str(tmp_path / "rank.safetensors"), metadata={"format": "kino-lora", "rank": "2", "alpha": "2.0"})
    for name, needle in [("plain", "not a kino LoRA"), ("junk", "not a safetensors file"),
                         ("half", "without both down and up"), ("rank", "expected (rank, in)"),
                         ("missing", "does not exist")]:
        with pytest.raises(KinoUserError, match=re.escape(needle)):
            read_lora(tmp_path / f"{name}.safetensors")


# ---------------------------------------------------------------------------- the commands, end to end


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory) -> tuple[Path, Path]:
    """`kino train dit --config` with init_from a tiny MiniLM pipeline and a [lora] section."""
    root = tmp_path_factory.mktemp("e2e")
    model = save_tiny_pipeline(root / "model", "tiny-test", frames=5, height=32, width=32, steps=2, guidance=3.0)
    config = root / "lora.toml"
    config.write_text(f'''model = "tiny"
init_from = "{model}"
[lora]
rank = 4
alpha = 4.0
targets = ["blocks.*.self_attn.[qkvo]", "blocks.*.cross_attn.[qkvo]"]
[cache]
dir = "{root / 'cache'}"
clips_per_bucket = 2
buckets = ["1x32x32", "5x32x32"]
text_max_length = 16
[data]
batch_size = 2
[train]
out_dir = "{root / 'run'}"
max_steps = 4
lr = 0.01
checkpoint_every = 2
keep_last = 1
''')
    assert main(["train", "dit", "--config", str(config), "-q"]) == 0
    return model, root / "run" / "lora.safetensors"


def test_train_dit_with_lora_writes_the_lora_alone(trained_lora, capsys):
    model, lora_path = trained_lora
    assert lora_path.is_file()
    record = json.loads(lora_path.with_suffix(".json").read_text())
    dit_sha = sha256_file(model / "dit" / WEIGHTS)
    assert record["sha256"] == sha256_file(lora_path) and record["base_sha256"] == dit_sha
    assert record["rank"] == 4 and record["steps"] == 4
    lora = read_lora(lora_path)
    assert lora.base_sha256 == dit_sha and len(lora.modules) == 16
    assert all(lora.up[n].abs().sum() > 0 for n in lora.modules)  # trained
    # a rerun is already done: it resumes at step 4, trains nothing and exports the same LoRA
    # (same tensors; the safetensors header's key order, and so the sha256, may change)
    config = lora_path.parents[1] / "lora.toml"
    assert main(["train", "dit", "--config", str(config), "-q"]) == 0
    again = read_lora(lora_path)
    assert all(torch.equal(again.up[n], lora.up[n]) and torch.equal(again.down[n], lora.down[n])
               for n in lora.modules)
    assert capsys.readouterr().out.strip() == f"LoRA file {lora_path}"


def test_generate_with_lora_single_scale_zero_and_batch(trained_lora, tmp_path, capsys):
    model, lora_path = trained_lora
    args = ["--model", str(model), "--seed", "3", "--steps", "2", "-q"]
    assert main(["generate", PROMPT, "-o", str(tmp_path / "base.mp4"), *args]) == 0
    assert main(["generate", PROMPT, "-o", str(tmp_path / "zero.mp4"), "--lora", f"{lora_path}:0", *args]) == 0
    assert main(["generate", PROMPT, "-o", str(tmp_path / "lora.mp4"), "--lora", f"{lora_path}:2.5", *args]) == 0
    base, zero, lora = (read_video(tmp_path / f"{n}.mp4")[0] for n in ("base", "zero", "lora"))
    assert np.array_equal(base, zero) and not np.array_equal(base, lora)
    meta = read_metadata(tmp_path / "lora.mp4")
    assert json.loads(meta["lora"]) == [{"file": "lora.safetensors", "sha256": sha256_file(lora_path), "scale": 2.5}]
    assert "lora" not in read_metadata(tmp_path / "base.mp4")

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"caption": PROMPT, "frames": 5, "seed": 3}) + "\n")
    assert main(["generate", "--batch", str(rows), "--out", str(tmp_path / "b"), "--lora", str(lora_path),
                 "--lora", f"{lora_path}:1.5", *args]) == 0
    (row,) = [json.loads(x) for x in (tmp_path / "b" / "captions.jsonl").read_text().splitlines()]
    assert [x["scale"] for x in json.loads(read_metadata(tmp_path / "b" / row["file"])["lora"])] == [1.0, 1.5]
    # the Python API: two LoRAs at 1 + 1.5 equal one at 2.5 (fp32), unload restores the base bit for bit
    pipe = Pipeline.from_pretrained(model)
    base_weights = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    pipe.load_lora(lora_path, 1.0)
    pipe.load_lora(lora_path, 1.5)
    two = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    pipe.unload_loras()
    assert pipe.loras == [] and all(torch.equal(v, base_weights[k]) for k, v in pipe.dit.state_dict().items())
    pipe.load_lora(lora_path, 2.5)
    for k, v in pipe.dit.state_dict().items():
        torch.testing.assert_close(v, two[k], rtol=0, atol=1e-6)


def test_generate_warns_when_the_lora_was_trained_on_another_base(trained_lora, tmp_path):
    model, lora_path = trained_lora
    pipe = Pipeline.from_pretrained(model)
    pipe.dit_sha256 = "0" * 64
    with pytest.warns(UserWarning, match="was trained on a DiT"):
        pipe.load_lora(lora_path)


@pytest.mark.parametrize("lora,needle", [
    ("{tmp}/missing.safetensors", "does not exist"),
    ("{tmp}/plain.safetensors", "not a kino LoRA"),
    ("{tmp}/junk.safetensors", "not a safetensors file"),
    ("{tmp}/wide.safetensors", "does not fit this model"),
    ("{lora}:abc", "must be a number"),
    ("{lora}:nan", "finite SCALE"),
    ("{lora}:inf", "finite SCALE"),
    (":0.5", "FILE:SCALE"),
])
def test_generate_bad_lora_exits_2(trained_lora, tmp_path, capsys, lora, needle):
    model, lora_path = trained_lora
    save_file({"w": torch.zeros(2, 2)}, str(tmp_path / "plain.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    wide, config = adapted(random_dit(WIDE), seed=8)  # 64 wide: the pipeline's DiT is 32
    save_lora(tmp_path / "wide.safetensors", wide.state_dict(), config)
    spec = lora.replace("{tmp}", str(tmp_path)).replace("{lora}", str(lora_path))
    argv = ["generate", PROMPT, "-o", str(tmp_path / "x.mp4"), "--model", str(model), "--lora", spec, "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "x.mp4").exists()
