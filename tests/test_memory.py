"""Small-GPU mode (kino/models/memory.py): storage dtypes, block streaming, model offload,
VAE tiling and sequential guidance, each checked against the plain pipeline it must equal."""

import copy

import pytest
import torch

from conftest import save_tiny_pipeline
from kino.cli import main
from kino.errors import KinoUserError
from kino.models.dit import DIT_SIZES, DiT
from kino.models.memory import FP8, BlockStreamer, MemoryPlan, dequantize_fp8, quantize_fp8
from kino.pipeline import Pipeline


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("model"), "tiny-mem", frames=5, height=32, width=32,
                              steps=3, guidance=3.0)


def tiny_dit(seed=0):
    torch.manual_seed(seed)
    dit = DiT(DIT_SIZES["tiny"])
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return dit.eval().requires_grad_(False)


def dit_inputs(dit, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = dit.config
    x = torch.randn(2, c.in_channels, 3, 4, 6, generator=g)
    text = torch.randn(2, 5, c.text_dim, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    return x, torch.tensor([300.0, 700.0]), text, mask


def rounded_blocks(dit, round_matrix):
    """A copy of `dit` whose blocks' matrices went through `round_matrix` (the storage's rounding)."""
    ref = copy.deepcopy(dit)
    with torch.no_grad():
        for block in ref.blocks:
            for p in block.parameters():
                if p.ndim == 2:
                    p.copy_(round_matrix(p))
    return ref


def test_fp8_quantization_is_per_row_and_close():
    w = torch.randn(16, 40) * torch.logspace(-3, 2, 16)[:, None]  # rows of very different scales
    w[3] = 0.0
    q, scale = quantize_fp8(w)
    assert q.dtype == FP8 and scale.shape == (16, 1)
    back = dequantize_fp8(q, scale, torch.float32)
    assert torch.equal(back[3], torch.zeros(40))
    rel = (back - w).abs().amax(dim=1) / w.abs().amax(dim=1).clamp_min(1e-30)
    assert rel.max() <= 1 / 16 + 1e-6  # e4m3: 3 mantissa bits, relative to the row's largest entry
    assert (back.abs().amax(dim=1) <= w.abs().amax(dim=1) * (1 + 1e-6)).all()


@pytest.mark.parametrize("storage", ["bf16", "fp8"])
def test_stored_blocks_compute_exactly_what_the_rounded_weights_compute(storage):
    dit = tiny_dit()
    rnd = {"bf16": lambda w: w.to(torch.bfloat16).float(),
           "fp8": lambda w: dequantize_fp8(*quantize_fp8(w), torch.float32)}[storage]
    ref = rounded_blocks(dit, rnd)
    plain = copy.deepcopy(dit)
    streamer = BlockStreamer(dit.blocks, torch.device("cpu"), torch.float32, storage, swap=0)
    inputs = dit_inputs(dit)
    out = dit(*inputs)
    assert torch.equal(out, ref(*inputs))
    assert not torch.equal(out, plain(*inputs))  # the rounding is real, so the comparison above can fail
    # between calls no block holds its weights; storage is what the dtype promises
    assert all(p.numel() == 0 for block in dit.blocks for p in block.parameters())
    matrices = sum(p.numel() for b in plain.blocks for p in b.parameters() if p.ndim == 2)
    vectors = sum(p.numel() for b in plain.blocks for p in b.parameters() if p.ndim != 2)
    rows = sum(p.shape[0] for b in plain.blocks for p in b.parameters() if p.ndim == 2)
    expected = {"bf16": 2 * matrices + 4 * vectors, "fp8": matrices + 4 * rows + 4 * vectors}[storage]
    assert streamer.nbytes() == expected
    assert torch.equal(dit(*inputs), out)  # a second call re-materialises the same weights
    streamer.detach()
    assert torch.equal(dit(*inputs), out) and dit.blocks[0].self_attn.q.weight.numel() > 0


def test_swapped_blocks_without_a_storage_dtype_are_bit_identical():
    dit = tiny_dit()
    plain = copy.deepcopy(dit)
    streamer = BlockStreamer(dit.blocks, torch.device("cpu"), torch.float32, None, swap=10)  # more than there are
    inputs = dit_inputs(dit)
    assert torch.equal(dit(*inputs), plain(*inputs))
    assert [s.stored[0][1].device.type for s in streamer.stores] == ["cpu"] * len(dit.blocks)
    assert not streamer.pending  # no prefetch outlives the forward pass


@pytest.mark.parametrize("skip", [(1,), (0, DIT_SIZES["tiny"].num_layers - 1)])
def test_swapped_blocks_follow_skipped_blocks(skip):
    """Skip-layer guidance leaves blocks out; a prefetched block the forward skips must not
    put the next pass's weights out of step."""
    dit = tiny_dit()
    plain = copy.deepcopy(dit)
    BlockStreamer(dit.blocks, torch.device("cpu"), torch.float32, None, swap=10)
    inputs = dit_inputs(dit)
    for blocks in (skip, (), skip):
        assert torch.equal(dit(*inputs, skip_blocks=blocks), plain(*inputs, skip_blocks=blocks))


def test_memory_plan_rejects_bad_values():
    for bad, message in ((dict(dtype="int8"), "unknown dtype 'int8'"), (dict(weights="fp4"), "weight storage 'fp4'"),
                         (dict(swap_blocks=-1), "swap_blocks must be >= 0"), (dict(offload="disk"), "offload 'disk'"),
                         (dict(vae_tile=50), "vae_tile must be"), (dict(vae_tile=32), "vae_tile must be"),
                         (dict(cfg="parallel"), "cfg mode 'parallel'")):
        with pytest.raises(KinoUserError, match=message):
            MemoryPlan(**bad)
    assert MemoryPlan().compute_dtype(torch.device("cpu")) == torch.float32
    assert MemoryPlan().compute_dtype(torch.device("cuda")) == torch.bfloat16
    assert MemoryPlan(dtype="float16").compute_dtype(torch.device("cpu")) == torch.float16


def test_pipeline_memory_plans_match_the_plain_pipeline(model_dir):
    base = Pipeline.from_pretrained(model_dir).generate("a red circle", seed=3)
    # exact: model offload (CPU to CPU here), block swapping without a storage dtype
    for plan in (MemoryPlan(offload="model"), MemoryPlan(swap_blocks=1)):
        clip = Pipeline.from_pretrained(model_dir, memory=plan).generate("a red circle", seed=3)
        assert torch.equal(clip.latents, base.latents), plan
        assert torch.equal(clip.video, base.video), plan
    # sequential guidance: the same arithmetic in two calls, equal up to float rounding
    seq = Pipeline.from_pretrained(model_dir, memory=MemoryPlan(cfg="sequential")).generate("a red circle", seed=3)
    torch.testing.assert_close(seq.latents, base.latents, atol=1e-5, rtol=1e-5)
    # bf16 storage and compute: close, not equal
    for plan in (MemoryPlan(weights="bf16"), MemoryPlan(dtype="bfloat16", weights="fp8", offload="model")):
        clip = Pipeline.from_pretrained(model_dir, memory=plan).generate("a red circle", seed=3)
        assert clip.latents.dtype == torch.float32
        err = (clip.latents - base.latents).abs().mean() / base.latents.abs().mean()
        assert 0 < err < 0.05, (plan, err)


def test_offloaded_text_encoder_and_lora_order(model_dir, tmp_path):
    pipe = Pipeline.from_pretrained(model_dir, memory=MemoryPlan(offload="model", weights="fp8"))
    assert pipe._offloaded == {"dit", "vae", "text_encoder"}
    with pytest.raises(KinoUserError, match="before setting a memory plan"):
        pipe.load_lora(tmp_path / "any.safetensors")
    with pytest.raises(KinoUserError, match="already set"):
        pipe.set_memory(MemoryPlan())
    pinned = Pipeline.from_pretrained(model_dir, memory=MemoryPlan(offload="model"), text_device="cpu")
    assert pinned._offloaded == {"dit", "vae"}  # --text-device keeps the encoder where it was put


def test_vae_tiling_plan_decodes_in_tiles(model_dir):
    pipe = Pipeline.from_pretrained(model_dir, memory=MemoryPlan(vae_tile=64))
    assert pipe.vae.tiling is not None and pipe.vae.tiling.tile_h == 64 and pipe.vae.tiling.overlap == 16
    latents = torch.randn(1, pipe.vae.config.z_dim, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    tiled = pipe.decode(latents, 5)
    pipe.vae.disable_tiling()
    whole = pipe.decode(latents, 5)
    assert tiled.shape == whole.shape == (5, 128, 128, 3)
    assert not torch.equal(tiled, whole)  # the tiles' blend is a different (close) computation
    assert (tiled.float() - whole.float()).abs().mean() < 8


def test_generate_cli_memory_flags(model_dir, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    rc = main(["generate", "a blue square", "--model", str(model_dir), "-o", str(out), "--weights-dtype", "fp8",
               "--swap-blocks", "1", "--offload", "model", "--vae-tile", "64", "--cfg", "sequential", "-q"])
    assert rc == 0 and out.is_file()
    capsys.readouterr()
    rc = main(["generate", "a blue square", "--model", str(model_dir), "-o", str(out), "--vae-tile", "50", "-q"])
    assert rc == 2 and "multiple of 32" in capsys.readouterr().err


def test_weights_are_read_in_the_compute_dtype(model_dir):
    from kino.models.folder import read_safetensors

    stored = read_safetensors(model_dir / "dit" / "model.safetensors")
    pipe = Pipeline.from_pretrained(model_dir, memory=MemoryPlan(dtype="bfloat16"))
    assert pipe.dit.patch_embedding.weight.dtype == torch.bfloat16
    assert torch.equal(pipe.dit.patch_embedding.weight, stored["patch_embedding.weight"].to(torch.bfloat16))
    assert pipe.vae.conv2.weight.dtype == torch.float32  # the VAE keeps float32
    halves = read_safetensors(model_dir / "dit" / "model.safetensors", torch.float16)
    assert halves.keys() == stored.keys() and {t.dtype for t in halves.values()} == {torch.float16}


MAPPED_CHECK = """
import json, sys, torch
from kino.models.dit import DiT, DiTConfig
from kino.models.folder import load_module

def anon_mb():
    line = next(l for l in open("/proc/self/status") if l.startswith("RssAnon:"))
    return int(line.split()[1]) / 1024

config = DiTConfig(dim=512, ffn_dim=2048, num_heads=8, num_layers=8)
with torch.device("meta"):  # torch's first model on the meta device costs ~65 MB once, whatever its size
    DiT(config)
dtype = None if sys.argv[2] == "file" else getattr(torch, sys.argv[2])
before = anon_mb()
model = load_module(sys.argv[1], "dit", DiTConfig, DiT, dtype=dtype)
total = sum(float(p.float().sum()) for p in model.parameters())  # every page read
print(json.dumps({"growth_mb": anon_mb() - before, "dtype": str(model.patch_embedding.weight.dtype)}))
"""


def test_a_dit_read_in_its_file_dtype_stays_memory_mapped(tmp_path):
    """`load_module(dtype=None)` keeps the file's dtype and its tensors map the file (no private
    copy: the page cache is shared by every process that reads it); converting as it reads
    takes private memory for the whole DiT. Measured in fresh processes (a long-lived one
    reuses memory it freed before)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from kino.models.dit import DiTConfig
    from kino.models.folder import save_component

    if not Path("/proc/self/status").is_file():
        pytest.skip("needs /proc (Linux) to read a process's private memory")
    config = DiTConfig(dim=512, ffn_dim=2048, num_heads=8, num_layers=8)
    save_component(tmp_path / "dit", config.to_dict(), DiT(config).state_dict())
    size_mb = (tmp_path / "dit" / "model.safetensors").stat().st_size / 2**20
    assert size_mb > 100

    def growth(dtype: str) -> dict:
        res = subprocess.run([sys.executable, "-c", MAPPED_CHECK, str(tmp_path / "dit"), dtype], capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        return json.loads(res.stdout.strip().splitlines()[-1])

    mapped, converted = growth("file"), growth("bfloat16")
    assert mapped["dtype"] == "torch.float32" and converted["dtype"] == "torch.bfloat16"
    assert mapped["growth_mb"] < 0.15 * size_mb < 0.3 * size_mb < converted["growth_mb"], (mapped, converted)
