"""The `kino` command: parse, build, run. Options shared by subcommands are defined once here.

User errors (KinoUserError, bad arguments) print one line and exit 2; anything else is an
internal failure and exits 1 with its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import warnings
from pathlib import Path

from kino import __version__
from kino.errors import KinoUserError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, exit 2, no usage dump
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# ---- shared option types and options -------------------------------------------------

def size_type(text: str) -> tuple[int, int]:
    """'HxW' -> (H, W)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use HxW, e.g. 64x96") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: height and width must be positive")
    return h, w


def int_at_least(low: int):
    """An argparse type: an integer >= low."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{v} must be at least {low}")
        return v
    return parse


def unit_interval(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    v = _number(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{v} must be in [0, 1]")
    return v


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def finite_float(text: str) -> float:
    """An argparse type: a finite number (not nan, not inf)."""
    v = _number(text)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{v} must be a finite number")
    return v


def _finite_float(text: str, zero_ok: bool) -> float:
    v = _number(text)
    if not (math.isfinite(v) and (v > 0 or zero_ok and v == 0)):
        raise argparse.ArgumentTypeError(f"{v} must be a {'number >= 0' if zero_ok else 'positive number'}")
    return v


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    return _finite_float(text, zero_ok=False)


def nonneg_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    return _finite_float(text, zero_ok=True)


def lora_spec(text: str) -> tuple[Path, float]:
    """An argparse type: 'FILE' or 'FILE:SCALE' -> (path, scale); scale 1 when not given."""
    path, sep, scale = text.rpartition(":")
    if not sep:
        return Path(text), 1.0
    try:
        value = float(scale)
    except ValueError:
        if Path(text).is_file():  # a file name with a colon in it, and no scale
            return Path(text), 1.0
        raise argparse.ArgumentTypeError(f"invalid LoRA {text!r}: the scale after ':' must be a number, "
                                         f"e.g. {path or 'lora.safetensors'}:0.8") from None
    if not math.isfinite(value) or not path:
        raise argparse.ArgumentTypeError(f"invalid LoRA {text!r}: use FILE or FILE:SCALE with a finite SCALE")
    return Path(path), value


# kino.models.vae.refine's METHODS and DEFAULT_METHOD, here so that parsing imports no torch (a test keeps them equal)
REFINE_METHODS = ("adam", "lbfgs")
DEFAULT_REFINE_METHOD = "lbfgs"
# kino.models.gguf.WRITE_TYPES (which imports torch; the parser does not)
GGUF_WRITE_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K", "BF16", "F16")
positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def add_out(p, help="output file or folder"):
    p.add_argument("-o", "--out", type=Path, required=True, help=help)


def add_size(p, help="frame size, e.g. 64x96"):
    p.add_argument("--size", type=size_type, default=None, metavar="HxW", help=help)


def add_frames(p, help="frames per clip"):
    p.add_argument("--frames", type=positive_int, default=None, metavar="N", help=help)


def add_seed(p, default=0):
    p.add_argument("--seed", type=nonneg_int, default=default, help=f"random seed (default {default})")


def add_device(p):
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")


def add_model(p):
    p.add_argument("--model", type=Path, default=None, metavar="DIR|ORG/NAME",
                   help="model folder, or a Hugging Face Hub repository id (ORG/NAME[@REVISION], downloaded "
                        "once into the Hub cache and hash-checked; default: the model shipped with kino)")


def _device(name: str):
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError:
        raise KinoUserError(f"invalid --device {name!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KinoUserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


def add_common(p):
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def add_sampling(p):
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=finite_float, default=None, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--guidance-2", type=finite_float, default=None, metavar="G",
                   help="a two-expert model's (Wan2.2 A14B) guidance on its low-noise expert's steps "
                        "(--guidance is the high-noise one's; default: the model's)")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--sampler", choices=("euler", "dpm++2m", "unipc", "ddim-eta"), default=None,
                   help="default: the model's; ddim-eta adds fresh noise at each step (--eta)")
    p.add_argument("--eta", type=unit_interval, default=None, metavar="E",
                   help="ddim-eta's share of fresh noise: 0 = Euler, 1 = DDPM's ancestral sampler (default: the "
                        "model's, 1)")
    p.add_argument("--shift", type=positive_float, default=None, metavar="S",
                   help="timestep shift of the sampling schedule (> 1 spends more steps at high noise; Wan2.1 "
                        "uses 3 at 480p, 5 at 720p; default: the model's, else one that grows with the token count)")
    p.add_argument("--fps", type=positive_float, default=None,
                   help="frame rate of the written file (default: the model's)")
    p.add_argument("--vace-scale", type=finite_float, default=None, metavar="S",
                   help="a Wan2.1 VACE model's weight of its context (given frames, source video, references; "
                        "default 1)")
    add_guidance_options(p)


def add_references(p):
    p.add_argument("--reference", dest="references", type=Path, action="append", default=[], metavar="IMAGE",
                   help="a reference image for a Wan2.1 VACE model (a subject or style to show; repeatable)")


def add_guidance_options(p):
    """The guidance and speed options the generation commands and the quality benchmarks share
    (read back, checked, by `guidance_options`)."""
    p.add_argument("--cache-threshold", type=finite_float, default=None, metavar="T",
                   help="first-block cache (an approximation, faster): skip the DiT's other blocks on steps where "
                        "its first block changes by less than T (relative; 0 = off, the default; ~0.1-0.2)")
    p.add_argument("--guidance-interval", type=finite_float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only the steps at solver times LO <= t <= HI (1 = noise, 0 = clean); the others "
                        "run the DiT once, unguided (default: the model's)")
    p.add_argument("--skip-guidance", type=finite_float, default=None, metavar="S",
                   help="skip-layer guidance scale (0 = off): also run the DiT without --skip-blocks and move away "
                        "from that prediction (default: the model's)")
    p.add_argument("--skip-blocks", type=int, nargs="+", default=None, metavar="I",
                   help="DiT block indices (from 0) the skip-layer pass leaves out (default: the model's)")
    p.add_argument("--skip-interval", type=finite_float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="solver times where skip-layer guidance applies (default: the guidance interval)")
    p.add_argument("--cfg-star", action=argparse.BooleanOptionalAction, default=None,
                   help="CFG-Zero*: scale the unguided velocity to its best fit to the guided one before guidance "
                        "(default: the model's)")
    p.add_argument("--zero-steps", type=int, default=None, metavar="K",
                   help="CFG-Zero*'s zero-init: the first K steps take zero velocity (default: the model's)")


def add_lora(p):
    p.add_argument("--lora", type=lora_spec, action="append", default=[], metavar="FILE[:SCALE]",
                   help="fuse this LoRA (.safetensors from `kino train dit` with [lora], or a Wan2.1 LoRA in the "
                        "wan/ComfyUI, musubi-tuner or diffusers layout) into the model's DiT, scaled by SCALE "
                        "(default 1); repeat to add several. FILE may be ORG/NAME/PATH, a file of a Hugging Face "
                        "Hub repository (downloaded once, hash-checked). On a two-expert model (Wan2.2 A14B): into "
                        "the high-noise expert")
    p.add_argument("--lora-2", type=lora_spec, action="append", default=[], metavar="FILE[:SCALE]",
                   help="a two-expert model's (Wan2.2 A14B) LoRA for its low-noise expert (the other file of a "
                        "Wan2.2 LoRA pair); repeat to add several")


def add_refine(p):
    p.add_argument("--refine", type=unit_interval, default=0.5, metavar="R",
                   help="share of the steps the second pass re-runs after the input is re-encoded in place "
                        "(0..1, default 0.5; see kino/tasks/conditioning.py)")


def add_given(p):
    p.add_argument("--given", choices=("exact", "decoded"), default="exact",
                   help="how the given frames come back: exact (default: as given, pasted over the decoded "
                        "video) or decoded (from the final latents, like the new frames; see kino/tasks/video_tasks.py)")


def add_task_options(p, task: str, batch_help: str,
                     out_help: str = "output file (.mp4 or .gif; default out.mp4), or folder with --batch"):
    """What every generation command shares: output, batch mode, size, sampling, seed, model."""
    p.add_argument("-o", "--out", type=Path, default=None, help=out_help)
    p.add_argument("--batch", type=Path, default=None, metavar="FILE.jsonl", help=batch_help)
    add_size(p, help="frame size, e.g. 64x96 (default: the input's, rounded down to the model's stride; "
                     "the model's without an input); inputs are resized and center-cropped to it")
    add_sampling(p)
    add_seed(p)
    add_model(p)
    p.add_argument("--dit", default=None, metavar="FILE",
                   help="the DiT's weights from this file instead of the model's (whose folder then needs only "
                        "the DiT's config.json): a GGUF file (e.g. a Q4_K_M / Q8_0 Wan DiT; its blocks stay "
                        "quantized and are dequantized one layer at a time as they run) or a safetensors file, "
                        "in Wan's, diffusers' or kino's names; may be ORG/NAME/PATH, a Hub repository's file")
    p.add_argument("--dit-2", default=None, metavar="FILE",
                   help="the same for a two-expert model's (Wan2.2 A14B) low-noise DiT")
    p.add_argument("--text-encoder", default=None, metavar="FILE",
                   help="the UMT5 text encoder's weights from this file instead of the model's (whose folder then "
                        "gives the tokenizer): a GGUF file (e.g. umt5-xxl-encoder-Q8_0.gguf; its layers and token "
                        "table stay quantized) or a safetensors file (e.g. ComfyUI's umt5_xxl_fp16 or fp8_scaled); "
                        "may be ORG/NAME/PATH")
    add_lora(p)
    add_device(p)
    p.add_argument("--text-device", default=None, metavar="DEVICE",
                   help="run the text encoder here instead (e.g. cpu beside a cuda --device)")
    p.add_argument("--text-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="a UMT5 text encoder's compute dtype; auto (default): the model's (bfloat16 for Wan), "
                        "but float32 for a GGUF --text-encoder on a CPU (its weights stay quantized either way, "
                        "and CPUs without bf16 instructions multiply bf16 far slower)")
    add_memory(p)
    add_common(p)
    p.set_defaults(func=cmd_task, task=task)


def add_memory(p):
    g = p.add_argument_group("memory (small-GPU mode; see kino/models/memory.py)")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="the DiT's compute dtype (default auto: bfloat16 on cuda, float32 on cpu)")
    g.add_argument("--weights-dtype", choices=("bf16", "fp8"), default=None,
                   help="store the DiT's block weights in bf16 or fp8 (per-row scaled float8 e4m3), "
                        "converted one block at a time as it runs")
    g.add_argument("--swap-blocks", type=nonneg_int, default=0, metavar="N",
                   help="keep the last N DiT blocks in CPU memory, copied to the device one at a time")
    g.add_argument("--offload", choices=("none", "model"), default="none",
                   help="model: text encoder, DiT and VAE wait in CPU memory, each on the device only while it runs")
    g.add_argument("--vae-tile", type=positive_int, default=None, metavar="PIXELS",
                   help="encode/decode frames larger than PIXELSxPIXELS in blended tiles (multiple of 32, >= 64)")
    g.add_argument("--cfg", choices=("batch", "sequential"), default="batch",
                   help="guided and unguided DiT calls as one batch (default) or one after the other "
                        "(half the activations)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the DiT's blocks (faster on a GPU after a slow first step; minutes on a CPU)")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: the processes share the DiT's weights (and the text encoder's on "
                        "--device) instead of a whole copy each (FSDP2); every clip, batch rows included, is "
                        "then generated by all of them together, sequence-parallel")


def text_dtype(args, device) -> str | None:
    """The UMT5 compute dtype `--text-dtype` asks for (None: the model's own)."""
    if args.text_dtype != "auto":
        return args.text_dtype
    gguf = args.text_encoder is not None and str(args.text_encoder).endswith(".gguf")
    return "float32" if gguf and device.type == "cpu" else None


def memory_plan(args):
    from kino.models.memory import MemoryPlan

    return MemoryPlan(dtype=args.dtype, weights=args.weights_dtype, swap_blocks=args.swap_blocks,
                      offload=args.offload, vae_tile=args.vae_tile, cfg=args.cfg)


def _progress(args, desc: str):
    from tqdm import tqdm

    return lambda it: tqdm(it, desc=desc, disable=args.quiet, file=sys.stderr, leave=False,
                           total=len(it) if hasattr(it, "__len__") else getattr(args, "n", None))


# ---- kino world ----------------------------------------------------------------------

def cmd_world_sample(args) -> int:
    from kino.world.captions import check_frames, check_size
    from kino.world.dataset import write_samples

    if args.frames is not None:
        check_frames(args.frames)
    if args.size is not None:
        check_size(*args.size)
    if args.out.exists() and not args.out.is_dir():
        raise KinoUserError(f"--out {args.out} exists and is not a folder")
    rows = write_samples(args.out, args.n, args.split, args.seed, progress=_progress(args, "sample"),
                         frames=args.frames, size=args.size, objects=args.objects)
    print(f"wrote {len(rows)} clips and captions.jsonl to {args.out}")
    return 0


def format_summary(report: dict) -> str:
    def pct(r):
        return "n/a" if r["pass_rate"] is None else f"{100 * r['pass_rate']:.1f}%"

    lines = [f"pass rate {pct(report)} ({report['passed']}/{report['clips']} clips)"]
    lines += [f"  {name:<11} {pct(r):>7} ({r['passed']}/{r['clips']})"
              for name, r in report["checks"].items() if r["clips"]]
    lines += [f"  kind {name:<6} {pct(r):>7} ({r['passed']}/{r['clips']})" for name, r in report["kinds"].items()]
    return "\n".join(lines)


def cmd_world_eval(args) -> int:
    from kino.world.dataset import REPORT, evaluate_folder

    report = evaluate_folder(args.folder, progress=_progress(args, "eval"))
    short = {k: v for k, v in report.items() if k not in ("failures", "failures_omitted")}
    if not args.json:
        print(format_summary(report))
        print(f"report: {args.folder / REPORT}")
    print(json.dumps(short, indent=None if args.json else 2))
    return 0


# ---- kino generate / extend / connect / edit -----------------------------------------
# Every generation task is one function of kino/tasks/video_tasks.py; these commands parse,
# load the model, run it once (or over --batch rows) and write the result.

VIDEO_SUFFIXES = (".mp4", ".gif", ".mov", ".mkv")
POSITIONALS = {"generate": ("prompt",), "extend": ("input", "prompt"), "connect": ("first", "second", "prompt"),
               "edit": ("input", "prompt")}
METAVARS = {"first": "A", "second": "B"}


def guidance_options(args) -> dict:
    """`add_guidance_options`' values, checked (a clear error before any model loads); None: unset."""
    from kino.pipeline import check_guidance_interval

    interval = None if args.guidance_interval is None else check_guidance_interval(args.guidance_interval)
    skip_interval = None if args.skip_interval is None else check_guidance_interval(args.skip_interval,
                                                                                     "skip-layer guidance interval")
    if args.cache_threshold is not None and not args.cache_threshold >= 0:
        raise KinoUserError(f"--cache-threshold must be >= 0 (0 = off), got {args.cache_threshold}")
    if args.skip_guidance is not None and args.skip_guidance < 0:
        raise KinoUserError(f"--skip-guidance must be >= 0, got {args.skip_guidance}")
    if args.skip_blocks is not None and min(args.skip_blocks) < 0:
        raise KinoUserError(f"--skip-blocks are DiT block indices from 0, got {args.skip_blocks}")
    if args.zero_steps is not None and args.zero_steps < 0:
        raise KinoUserError(f"--zero-steps must be >= 0, got {args.zero_steps}")
    return dict(guidance_interval=interval, skip_guidance=args.skip_guidance,
                skip_blocks=None if args.skip_blocks is None else tuple(args.skip_blocks), skip_interval=skip_interval,
                cache_threshold=args.cache_threshold, cfg_star=args.cfg_star, zero_steps=args.zero_steps)


def _sampling_kwargs(args) -> dict:
    vace = {} if args.vace_scale is None else {"vace_scale": args.vace_scale}  # only VACE models take it
    return dict(steps=args.steps, guidance=args.guidance, guidance_2=args.guidance_2, negative=args.negative,
                sampler=args.sampler, eta=args.eta, shift=args.shift, fps=args.fps, **vace, **guidance_options(args))


def _size_kwargs(args) -> dict:
    size = args.size or (None, None)
    return dict(height=size[0], width=size[1])


def _task_kwargs(args) -> dict:
    """The task function's options for this command (shared ones, then its own)."""
    own = {"generate": ("frames", "loop", "given"), "extend": ("frames", "backward", "refine", "given"),
           "connect": ("frames", "refine", "given"), "edit": ("frames", "strength", "source_prompt")}[args.task]
    vace = {k: getattr(args, k) for k in ("references", "vace_video", "vace_mask")
            if getattr(args, k, None)}  # Wan2.1 VACE's inputs, when given
    return {**_sampling_kwargs(args), **_size_kwargs(args), **{k: getattr(args, k) for k in own}, **vace}


def _task_inputs(args) -> dict:
    """The task function's input arguments, from the command's positionals / --image."""
    names = {"generate": {"image": "image", "last_image": "last_image"}, "extend": {"input": "video"},
             "connect": {"first": "first", "second": "second"}, "edit": {"input": "video"}}[args.task]
    return {keyword: getattr(args, arg) for arg, keyword in names.items()}


def _step_bar(args, desc: str, total: int | None):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=args.quiet, file=sys.stderr, leave=False)


def _join_torchrun(args):
    """Under `torchrun --nproc-per-node N` (WORLD_SIZE > 1): join the process group and return
    this process's place (kino.training.distributed.Processes); None for a lone process. One
    clip is split across the N processes by sequence parallelism (each holds 1/N of every
    latent frame's tokens; the DiT's attention exchanges them), a --batch is shared out by
    rows. With --fsdp the processes also share the weights (each holds 1/N), so they run
    everything together: a batch row after row, each row sequence-parallel. Every process
    must be given the same command."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if args.fsdp:
            raise KinoUserError("--fsdp shares the weights over the processes of a torchrun job: run it under "
                                "torchrun --nproc-per-node N (N > 1)")
        return None
    from kino.training.distributed import ParallelConfig, init_processes

    sp = 1 if args.batch is not None and not args.fsdp else world
    return init_processes(ParallelConfig(sequence_parallel=sp), _device(args.device))


def _pipeline(args, procs=None):
    """The --model pipeline on --device, with every --lora fused in; under torchrun (`procs`)
    on this process's own GPU (cuda:LOCAL_RANK), its DiT sequence-parallel for one clip."""
    import torch

    from kino.pipeline import Pipeline

    text_device = _device(args.text_device) if args.text_device is not None else None
    plan = memory_plan(args)  # checked before anything loads
    device = _device(args.device)
    if procs is not None and device.type == "cuda":
        device = torch.device("cuda", procs.local_rank)
        if text_device is not None and text_device.type == "cuda":
            text_device = device

    def load():
        # --fsdp: the DiT stays in the file's dtype, memory-mapped, until each block is cast as it is
        # sharded: a process then holds its share of the DiT and one block, not the whole DiT
        pipe = Pipeline.from_pretrained(args.model, "cpu", dit_dtype=None if args.fsdp else plan.compute_dtype(device),
                                        dit_file=args.dit, dit_2_file=args.dit_2, text_encoder_file=args.text_encoder,
                                        text_dtype=text_dtype(args, text_device or device))
        for expert, loras in ((1, args.lora), (2, args.lora_2)):
            for path, scale in loras:
                pipe.load_lora(path, scale, expert)
        pipe.set_memory(plan, device, text_device, shard=procs.fsdp_mesh if args.fsdp else None)
        return pipe

    pipe = load() if procs is None else _in_waves(args, procs, load)
    if procs is not None and procs.sp_group is not None:
        from kino.training.distributed import apply_sequence_parallel

        for dit in pipe.dits:
            apply_sequence_parallel(dit, procs.sp_group)
    if args.compile:  # last: the blocks as they will run (sequence-parallel, sharded, streamed)
        pipe.compile()
    return pipe


def _in_waves(args, procs, load):
    """Run `load` on every process of a torchrun job, as many of a machine's processes at
    once as its host memory holds the model (each reads the whole model into host memory
    before it goes to its device or is sharded): N processes of a 28 GB model would otherwise
    need N x 28 GB at once."""
    import os

    from kino.models.hub import resolve_file, resolve_model
    from kino.models.memory import dit_weights_bytes, host_memory_bytes, load_waves, weights_bytes

    def together(step, *, main_only: bool = False):
        """`step()` (on rank 0 alone with main_only); a user error on any rank stops every rank
        with it, instead of leaving the others waiting for a process that has left."""
        result, error = None, None
        if procs.is_main or not main_only:
            try:
                result = step()
            except KinoUserError as e:
                error = str(e)
        if procs.any(error is not None):
            raise KinoUserError(error or "another process could not load the model (its message is above)")
        return result

    if args.model is not None:  # a Hub id downloads once, on rank 0, before the others look
        together(lambda: resolve_model(args.model), main_only=True)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", procs.world_size))
    folder = resolve_model(args.model) if args.model is not None else None
    size = weights_bytes(folder) if folder is not None else 0
    dit = dit_weights_bytes(folder) if folder is not None else 0
    files = [f for f in (args.dit, args.dit_2) if f is not None]
    if files:  # the DiT comes from these files, not the folder
        size -= dit
        dit = sum(resolve_file(f).stat().st_size for f in files)
        size += dit
    if args.fsdp:  # a process's own memory holds its share of the DiT (see _pipeline)
        size -= dit - dit // procs.world_size
    at_once = procs.broadcast(load_waves(local, size, host_memory_bytes()))
    waves = -(-local // at_once)
    if waves > 1 and procs.is_main:
        print(f"kino: loading the model {at_once} process(es) of each machine at a time ({size / 2**30:.1f} GiB of "
              f"weights each, {waves} waves; set KINO_LOAD_MEMORY to the bytes to use)", file=sys.stderr)
    pipe = None
    for wave in range(waves):
        result = together(load if wave == procs.local_rank // at_once else lambda: None)
        pipe = pipe if result is None else result
    return pipe


def _check_out(out: Path, frames: int | None) -> None:
    suffix = out.suffix.lower()
    if suffix not in (*VIDEO_SUFFIXES, ".png"):
        raise KinoUserError(f"--out {out}: use a .mp4, .gif or (for --frames 1) .png file")
    if suffix == ".png" and frames not in (1, None):
        raise KinoUserError(f"--out {out}: a .png holds one frame; use .mp4 or .gif for {frames} frames")


def cmd_task(args) -> int:
    """generate, extend, connect, edit: one clip, or --batch FILE.jsonl into --out DIR."""
    from kino.data.video_io import write_video
    from kino.tasks.batch import RUNNERS

    if args.batch is not None and getattr(args, "image", None) is not None:
        raise KinoUserError("with --batch, name each row's image in the row ('image': PATH), not with --image")
    if args.batch is not None and getattr(args, "last_image", None) is not None:
        raise KinoUserError("with --batch, name each row's last image in the row ('last_image': PATH), "
                            "not with --last-image")
    if args.batch is not None and (getattr(args, "vace_video", None) or getattr(args, "vace_mask", None)):
        raise KinoUserError("with --batch, name each row's VACE source and mask in the row ('vace_video', "
                            "'vace_mask': PATH), not with --vace-video / --vace-mask")
    names = POSITIONALS[args.task]
    values = [getattr(args, name) for name in names]
    if any(v is not None for v in values) == (args.batch is not None):
        usage = " ".join(METAVARS.get(name, name.upper()) for name in names)
        raise KinoUserError(f"give {usage}, or --batch FILE.jsonl with --out DIR (not both)")
    if args.batch is not None:
        return _task_batch(args)
    missing = [METAVARS.get(name, name.upper()) for name, v in zip(names, values) if v is None]
    if missing:
        raise KinoUserError(f"`kino {args.task}` needs {' and '.join(missing)}")
    frames = args.frames if args.task == "generate" else None  # elsewhere --frames counts new/used frames
    out = args.out or Path("out.png" if frames == 1 else "out.mp4")
    _check_out(out, frames)
    kwargs = _task_kwargs(args)  # checked before the model loads
    from kino.pipeline import require_prompt

    for prompt in (args.prompt, kwargs.get("source_prompt")):
        if prompt is not None:
            require_prompt(prompt)
    with _torchrun(args) as procs:
        pipe = _pipeline(args, procs)
        steps = args.steps or pipe.defaults.steps
        # extend backward and connect may take two passes: no total there
        total = (steps if args.task == "generate" else round((args.strength or 0) * steps) if args.task == "edit"
                 else None)
        with _step_bar(args, args.task, total) as bar:
            clip = RUNNERS[args.task](pipe, args.prompt, seed=args.seed, callback=lambda i: bar.update(1),
                                      **_task_inputs(args), **kwargs)
        if procs is None or procs.is_main:  # every rank holds the same clip
            _check_out(out, len(clip.video))
            write_video(out, clip.video, clip.fps, metadata=clip.metadata)
            print(out)
    return 0


def _task_batch(args) -> int:
    from kino.tasks.batch import generate_batch

    if args.out is None:
        raise KinoUserError("--batch needs --out DIR (the folder for the clips and captions.jsonl)")
    kwargs = _task_kwargs(args)
    with _torchrun(args) as procs:
        pipe = _pipeline(args, procs)
        shard, merge, joint = (0, 1), None, None
        if procs is not None and args.fsdp:  # all processes run every row: one model shared by them
            joint = procs
        elif procs is not None:
            shard, merge = (procs.rank, procs.world_size), _gather_rows
        rows = generate_batch(pipe, args.batch, args.out, defaults=kwargs, seed=args.seed,
                              progress=_progress(args, "batch"), task=args.task, shard=shard, merge=merge,
                              joint=joint)
        if procs is None or procs.is_main:
            print(f"wrote {len(rows)} clips and captions.jsonl to {args.out}")
    return 0


def _gather_rows(rows: list) -> list | None:
    """Every process's (index, row) pairs on rank 0 (None elsewhere)."""
    import torch.distributed as dist

    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(rows, parts, dst=0)
    return None if parts is None else [pair for part in parts for pair in part]


@contextlib.contextmanager
def _torchrun(args):
    """`_join_torchrun`'s processes for the body, and a clean exit from the group after it
    (on an error, without waiting for ranks that may never arrive)."""
    from kino.training.distributed import shutdown_processes

    procs = _join_torchrun(args)
    if procs is not None and not procs.is_main:
        args.quiet = True  # one progress bar, rank 0's
    try:
        yield procs
    except BaseException:
        shutdown_processes(wait=False)
        raise
    shutdown_processes()


# ---- kino vae ------------------------------------------------------------------------

def cmd_vae_reconstruct(args) -> int:
    from kino.models.vae.pretrained import load_vae
    from kino.models.vae.refine import Refinement
    from kino.tasks.reconstruct import reconstruct_inputs

    if (args.refine_palette or args.refine_method) and not args.refine_latents:
        raise KinoUserError("--refine-palette and --refine-method set latent refinement: give --refine-latents N "
                            "(N > 0) too")
    refine = Refinement(args.refine_latents, args.refine_palette, args.refine_method or DEFAULT_REFINE_METHOD)
    model = load_vae(args.model, _device(args.device))
    results = reconstruct_inputs(model, args.inputs, args.out, progress=_progress(args, "reconstruct"), refine=refine)
    for name, value in results:
        print(f"{name}\tPSNR {value:.2f} dB")
    mean = sum(v for _, v in results) / len(results)
    print(f"mean PSNR {mean:.2f} dB over {len(results)} clips; wrote {args.out}")
    return 0


# ---- kino convert ---------------------------------------------------------------------

def cmd_info(args) -> int:
    from kino.models.info import describe, format_info

    info = describe(args.model)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_convert_wan(args) -> int:
    from kino.convert.wan import convert_wan

    manifest = convert_wan(args.src, args.dst, dit_files=(args.dit, args.dit_2), text_file=args.text_encoder)
    print(f"wrote kino model folder {manifest.parent}")
    return 0


def cmd_convert_gguf(args) -> int:
    from kino.convert.quantize import convert_gguf

    counts = convert_gguf(args.src, args.dst, args.type, args.expert, args.component)
    print(f"wrote {args.dst} ({', '.join(f'{n} {t}' for t, n in counts.items())} tensors, "
          f"{args.dst.stat().st_size / 2**20:.1f} MiB)")
    return 0


def cmd_convert_lora(args) -> int:
    from kino.convert.lora_formats import write_foreign
    from kino.models.lora import read_lora

    if args.dst.resolve() == args.src.resolve():
        raise KinoUserError("DST must be another file than SRC")
    lora = read_lora(args.src)
    write_foreign(lora, args.dst, args.layout)
    print(f"wrote {args.dst} ({args.layout} layout, {len(lora.modules)} modules)")
    return 0


# ---- kino train -----------------------------------------------------------------------

def _run_config(args, cls):
    """Load a run config and apply the overrides every `kino train` command shares."""
    from kino.training.config import load_config

    cfg = load_config(args.config, cls)
    if args.out is not None:
        cfg.train.out_dir = str(args.out)
    if args.max_steps is not None:
        cfg.train.max_steps = args.max_steps
    if args.max_minutes is not None:
        cfg.train.max_minutes = args.max_minutes
    if args.quiet:
        cfg.train.progress = False
    return cfg


def cmd_train_vae(args) -> int:
    from kino.training.trainer import Trainer
    from kino.training.vae import VAERunConfig, VAETask, export_vae

    cfg = _run_config(args, VAERunConfig)
    task = VAETask(cfg)
    trainer = Trainer(task, cfg.train, run_config=cfg)
    result = trainer.fit()
    if result.interrupted:
        print(f"interrupted at step {result.step}; checkpoint {result.checkpoint}; run again to resume")
        return 0
    model = trainer.ema_model() if cfg.train.ema_decay is not None else trainer.model.eval()
    out = export_vae(model, task.vae_config, Path(cfg.train.out_dir) / "model", stats_clips=cfg.stats_clips,
                     keep_stats=cfg.train_only != "all")
    print(f"trained {result.step} steps; model folder {out}")
    return 0


def cmd_train_dit(args) -> int:
    from kino.training.dit import DiTRunConfig, run_train_dit

    from kino.training.distributed import is_main_process, shutdown_processes

    cfg = _run_config(args, DiTRunConfig)
    try:  # under torchrun every process runs this; rank 0 reports
        out = run_train_dit(cfg)
        main = is_main_process()
    except BaseException:
        shutdown_processes(wait=False)  # other ranks may never reach a barrier now
        raise
    shutdown_processes()
    if not main:
        return 0
    if out is None:
        print(f"interrupted; checkpoint saved in {cfg.train.out_dir}; run again to resume")
    else:
        print(f"{'LoRA file' if cfg.lora is not None else 'model folder'} {out}")
    return 0


def cmd_preprocess(args) -> int:
    from kino.data.preprocess import run_preprocess
    from kino.training.config import load_config
    from kino.training.dit import DiTRunConfig

    report = run_preprocess(load_config(args.config, DiTRunConfig), progress=not args.quiet)
    for s in report.skipped:
        print(f"skipped {s.key}: {s.reason}", file=sys.stderr)
    state = "complete" if report.complete else "this rank's parts done; other ranks' parts still missing"
    print(f"cache {report.root} ({state}): {report.clips} clips, {len(report.skipped)} skipped")
    return 0


def add_train_options(p):
    p.add_argument("--config", type=Path, required=True, help="TOML or JSON run config (see configs/)")
    p.add_argument("-o", "--out", type=Path, default=None, help="run folder (overrides train.out_dir)")
    p.add_argument("--max-steps", type=positive_int, default=None, help="override train.max_steps")
    p.add_argument("--max-minutes", type=positive_float, default=None, metavar="M",
                   help="train at most M minutes in this run, then finish as at max_steps (checkpoint, export); "
                        "overrides train.max_minutes")
    add_common(p)


# ---- parser --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kino", description="kino: text-to-video generation on the machine you have")
    parser.add_argument("--version", action="version", version=f"kino {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    world = sub.add_parser("world", help="Shapes World: sample clips, evaluate clips")
    world.set_defaults(group_help=world.format_help)
    wsub = world.add_subparsers(dest="world_command", metavar="COMMAND", parser_class=_Parser)

    p = wsub.add_parser("sample", help="write N Shapes World clips (lossless) + captions.jsonl")
    add_out(p, help="output folder")
    p.add_argument("--n", type=positive_int, required=True, help="number of clips")
    p.add_argument("--split", choices=("train", "eval"), default="train")
    add_seed(p)
    add_frames(p)
    add_size(p)
    p.add_argument("--objects", type=int, choices=(1, 2), default=None, help="objects per clip (default: 1 or 2)")
    add_common(p)
    p.set_defaults(func=cmd_world_sample)

    p = wsub.add_parser("eval", help="score the clips of a folder against their captions")
    p.add_argument("folder", type=Path, help="folder with clips and captions.jsonl")
    p.add_argument("--json", action="store_true", help="print only the JSON report")
    add_common(p)
    p.set_defaults(func=cmd_world_eval)

    p = sub.add_parser("generate", help="text to video (or image with --frames 1), image to video, loops")
    p.add_argument("prompt", nargs="?", default=None, help="what to generate")
    p.add_argument("--image", type=Path, default=None, metavar="IMAGE",
                   help="start from this image (frame 0; resized and center-cropped to --size)")
    p.add_argument("--last-image", type=Path, default=None, metavar="IMAGE",
                   help="end at this image (Wan2.1 FLF2V models only)")
    p.add_argument("--loop", action="store_true",
                   help="a seamless loop: frame N would be frame 0 again (--frames 4k; default: the most "
                        "whole latent frames the default length holds, 16 for kino's default)")
    p.add_argument("--vace-video", type=Path, default=None, metavar="VIDEO",
                   help="a Wan2.1 VACE model's source video (to inpaint, outpaint, or a control video such as "
                        "depth or pose); --frames defaults to its length")
    p.add_argument("--vace-mask", type=Path, default=None, metavar="VIDEO|IMAGE",
                   help="which pixels of --vace-video to generate (white) and keep (black); an image applies to "
                        "every frame (default: generate all, i.e. follow the video as a control)")
    add_references(p)
    add_given(p)
    add_task_options(p, "generate", batch_help="rows with 'caption' and optional 'image', 'last_image', "
                     "'vace_video', 'vace_mask', 'reference' (paths relative to the file), 'loop', 'frames', "
                     "'given', 'height', 'width', 'seed'", out_help="output file (.mp4, .gif, .png for one frame; default "
                     "out.mp4), or folder with --batch")
    add_frames(p)

    p = sub.add_parser("extend", help="continue a video forwards (or backwards) with new frames")
    p.add_argument("input", nargs="?", type=Path, default=None, metavar="INPUT", help="video (or image) to extend")
    p.add_argument("prompt", nargs="?", default=None, help="what happens in the whole clip")
    p.add_argument("--backward", action="store_true", help="add the new frames before the input")
    add_references(p)
    add_refine(p)
    add_given(p)
    add_task_options(p, "extend", batch_help="rows with 'caption', 'video' (a path relative to the file) and "
                     "optional 'reference', 'frames', 'backward', 'refine', 'given', 'height', 'width', 'seed'")
    add_frames(p, help="new frames: a multiple of 4 forwards, 4m+1 backwards (any count with a Wan2.1 VACE model); "
                       "the output holds the input too")

    p = sub.add_parser("connect", help="generate a transition from the end of one video to the start of another")
    p.add_argument("first", nargs="?", type=Path, default=None, metavar="A", help="the video to start from")
    p.add_argument("second", nargs="?", type=Path, default=None, metavar="B", help="the video to end with")
    p.add_argument("prompt", nargs="?", default=None, help="what happens in the whole clip")
    add_references(p)
    add_refine(p)
    add_given(p)
    add_task_options(p, "connect", batch_help="rows with 'caption', 'first', 'second' (paths relative to the "
                     "file) and optional 'reference', 'frames', 'refine', 'given', 'height', 'width', 'seed'")
    add_frames(p, help="new frames between A and B (a multiple of 4; any count with a Wan2.1 VACE model); the "
                       "output holds A, them and B")

    p = sub.add_parser("edit", help="re-generate a video with a prompt, keeping more or less of it (SDEdit)")
    p.add_argument("input", nargs="?", type=Path, default=None, metavar="INPUT", help="video (or image) to edit")
    p.add_argument("prompt", nargs="?", default=None, help="what the result shows")
    p.add_argument("--strength", type=unit_interval, default=None, metavar="S",
                   help="0 returns the input, 1 ignores it (required)")
    p.add_argument("--source-prompt", default=None, metavar="TEXT",
                   help="what the input shows: edit with FlowEdit from it to PROMPT instead of SDEdit (keeps "
                        "more of the input; twice the model calls)")
    add_task_options(p, "edit", batch_help="rows with 'caption', 'video' (a path relative to the file) and "
                     "optional 'strength', 'source_prompt', 'frames', 'height', 'width', 'seed'")
    add_frames(p, help="edit the input's first N frames (default: all)")

    vae = sub.add_parser("vae", help="the video VAE: reconstruct clips")
    vae.set_defaults(group_help=vae.format_help)
    vsub = vae.add_subparsers(dest="vae_command", metavar="COMMAND", parser_class=_Parser)
    p = vsub.add_parser("reconstruct", help="encode + decode videos/images (or a folder with captions.jsonl)")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="videos, images, or a clip folder")
    add_out(p, help="output folder")
    p.add_argument("--refine-latents", type=nonneg_int, default=0, metavar="N",
                   help="N loss evaluations (per window of 4 latent frames) that fit the encoder's latents to the "
                        "clip through the frozen decoder (latent refinement: a closer reconstruction at ~3N "
                        "decodes' cost; default 0, off)")
    p.add_argument("--refine-method", choices=REFINE_METHODS, default=None,
                   help=f"the optimizer of --refine-latents (default {DEFAULT_REFINE_METHOD}; BENCHMARKS.md)")
    p.add_argument("--refine-palette", type=nonneg_float, default=0.0, metavar="W",
                   help="with --refine-latents, add Shapes World's palette term with weight W to the fit (each pixel "
                        "keeps its nearest world colour, what the world evaluator reads; 0.2 measured in "
                        "BENCHMARKS.md; for world clips only; default 0, MSE alone)")
    add_model(p)
    add_device(p)
    add_common(p)
    p.set_defaults(func=cmd_vae_reconstruct)

    p = sub.add_parser("info", help="what a model folder holds (layout, component sizes, defaults), from its "
                                    "configs alone")
    p.add_argument("model", nargs="?", default=None, metavar="DIR|ORG/NAME",
                   help="a kino or Wan2.1 / Wan2.2 folder, or a Hub id (default: the model shipped with kino)")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    add_common(p)
    p.set_defaults(func=cmd_info)

    convert = sub.add_parser("convert", help="third-party weights into a kino model folder; LoRAs between layouts")
    convert.set_defaults(group_help=convert.format_help)
    csub = convert.add_subparsers(dest="convert_command", metavar="COMMAND", parser_class=_Parser)
    p = csub.add_parser("wan", help="a Wan2.1 / Wan2.2 folder (T2V, I2V, FLF2V, VACE; original or diffusers "
                                    "layout) -> kino")
    p.add_argument("src", type=Path, metavar="SRC",
                   help="Wan2.1 / Wan2.2 folder (e.g. Wan2.1-T2V-1.3B or its -Diffusers), or its Hub id "
                        "(e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers)")
    p.add_argument("dst", type=Path, metavar="DST", help="new kino model folder (must not exist or be empty)")
    p.add_argument("--dit", default=None, metavar="FILE",
                   help="the DiT's weights from this file instead of SRC's (GGUF, dequantized to float32, or "
                        "safetensors, as `kino generate --dit` reads them)")
    p.add_argument("--dit-2", default=None, metavar="FILE", help="the same for a two-expert model's low-noise DiT")
    p.add_argument("--text-encoder", default=None, metavar="FILE",
                   help="the UMT5 text encoder's weights from this file instead of SRC's (GGUF, dequantized to "
                        "bfloat16, or safetensors, as `kino generate --text-encoder` reads them)")
    add_common(p)
    p.set_defaults(func=cmd_convert_wan)

    p = csub.add_parser("gguf", help="a model's DiT or text encoder -> a quantized GGUF file (for `--dit FILE` / "
                        "`--text-encoder FILE`, ComfyUI-GGUF, diffusers, transformers)")
    p.add_argument("src", type=Path, metavar="SRC", help="kino model folder, Wan2.1 / Wan2.2 folder, or a Hub id")
    p.add_argument("dst", type=Path, metavar="DST", help="the .gguf file to write (must not exist)")
    p.add_argument("--type", choices=GGUF_WRITE_TYPES, default="Q8_0",
                   help="quantization of the blocks' matrices (default Q8_0; the K-quants are written by kino, "
                        "the others by the gguf package); the other matrices are written in F16, vectors and small "
                        "tensors in F32")
    p.add_argument("--expert", type=int, choices=(1, 2), default=1,
                   help="a two-expert model's (Wan2.2 A14B) DiT to write: 1 high-noise (default), 2 low-noise")
    p.add_argument("--component", choices=("dit", "text_encoder"), default="dit",
                   help="what to write: the DiT (default) or the UMT5 text encoder (every matrix in --type, in "
                        "llama.cpp's t5encoder layout, for `--text-encoder FILE`)")
    add_common(p)
    p.set_defaults(func=cmd_convert_gguf)

    p = csub.add_parser("lora", help="a LoRA file (kino's or a Wan2.1 one kino reads) -> another trainer's layout")
    p.add_argument("src", type=Path, metavar="SRC", help="LoRA .safetensors (kino, wan, musubi or diffusers layout)")
    p.add_argument("dst", type=Path, metavar="DST", help="the .safetensors to write")
    p.add_argument("--layout", choices=("wan", "musubi", "diffusers"), default="wan",
                   help="wan: ComfyUI / Wan names (default); musubi: musubi-tuner; diffusers: diffusers / PEFT")
    add_common(p)
    p.set_defaults(func=cmd_convert_lora)

    p = sub.add_parser("preprocess", help="encode the config's [dataset] once into its latent cache (resumable; "
                       "under torchrun each rank takes its parts)")
    p.add_argument("--config", type=Path, required=True, help="the DiT run config (TOML/JSON) with a [dataset]")
    add_common(p)
    p.set_defaults(func=cmd_preprocess)

    train = sub.add_parser("train", help="train a model (resumes automatically from --out)")
    train.set_defaults(group_help=train.format_help)
    tsub = train.add_subparsers(dest="train_command", metavar="COMMAND", parser_class=_Parser)
    p = tsub.add_parser("vae", help="train the video VAE on Shapes World")
    add_train_options(p)
    p.set_defaults(func=cmd_train_vae)
    p = tsub.add_parser("dit", help="train the diffusion transformer on cached latents (Shapes World or your videos)")
    add_train_options(p)
    p.set_defaults(func=cmd_train_dit)

    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"kino: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (already printed)
        return int(e.code or 0)
    if not hasattr(args, "func"):  # a command group without its subcommand: show what there is
        sys.stderr.write(getattr(args, "group_help", parser.format_help)())
        return EXIT_USER_ERROR
    try:
        with warnings.catch_warnings():  # warnings as one line, like errors (no file and line)
            warnings.showwarning = _show_warning
            return args.func(args)
    except KinoUserError as e:
        print(f"kino: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("kino: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading: not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def run() -> None:
    """The `kino` command (console script and `python -m kino`): main(), then exit.

    A process that was part of a torch.distributed group (torchrun) ends with os._exit once
    the group is destroyed and every output is flushed: in the interpreter's teardown gloo's
    threads can still abort it ('terminate called without an active exception', an upstream
    torch issue, pytorch/pytorch#190489), which turns a finished run into a failed exit code.
    Everything of value is on disk by then (checkpoints are fsynced before they are published).
    """
    rc = main()
    distributed = sys.modules.get("kino.training.distributed")
    if distributed is not None and distributed.left_process_group():
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    run()
