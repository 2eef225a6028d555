"""Processes of a training run: who this process is under `torchrun`, the device meshes,
and `parallelize()`, the one step that applies FSDP2, sequence parallelism, activation
checkpointing and compile to a built model from outside its code (torchtitan's layout).

Under `torchrun --nproc-per-node N` the environment names this process (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT); without it the run is one process and nothing here touches
the model unless the config asks for activation checkpointing or compile.

Ranks form a (dp, sp) grid: `sp = parallel.sequence_parallel` ranks share each clip
(Ulysses, kino/training/sequence_parallel.py), `dp = world / sp` groups see different rows
of the global batch. FSDP2 shards every parameter over all `world` ranks; its reduce-scatter
averages gradients over them. The sp ranks of a group each hold the gradient of their own
tokens, which must be summed, not averaged: so the trainer scales the loss it differentiates
by `sp` (`Processes.grad_scale`), and the average over `world = dp * sp` ranks becomes the sum
over sp and the mean over the dp groups. (FSDP2's own `set_gradient_divide_factor` would do the
same but needs a PREMUL_SUM reduction, which gloo lacks.)
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from kino.errors import KinoUserError


@dataclass
class ParallelConfig:
    """`[train.parallel]`: how a run uses its processes and each device."""

    sequence_parallel: int = 1  # ranks that split each clip's tokens (Ulysses); divides the world size
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    compile: bool = False  # torch.compile each block (needs a working inductor backend: a C++ compiler on CPU)
    reshard_after_forward: bool = True  # FSDP2: free gathered weights after forward (ZeRO-3); False: ZeRO-2
    # Several processes: only rank 0 builds the model in memory (init or init_from); the others
    # build it on the meta device, every rank shards it, and rank 0's weights are broadcast into
    # the shards. For models too big to build once per process (Wan2.1-14B: 56 GB in fp32).
    meta_init: bool = False

    def __post_init__(self):
        if self.sequence_parallel < 1:
            raise KinoUserError(f"parallel.sequence_parallel must be >= 1, got {self.sequence_parallel}")


@dataclass
class Processes:
    """This process's place in the run. One process: rank 0 of 1, no meshes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    sp_size: int = 1
    fsdp_mesh: object | None = None  # 1-D DeviceMesh over every rank (FSDP2)
    sp_group: object | None = None  # the process group of this rank's sequence-parallel peers

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def grad_scale(self) -> float:
        """Factor on the loss before backward (see the module docstring)."""
        return float(self.sp_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any (so that all ranks stop at one step)."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean of a float tensor over all ranks (sp peers hold equal values, so this is the dp mean)."""
        if not self.distributed:
            return values
        t = values.detach().to(_collective_device(), torch.float64).clone()
        dist.all_reduce(t)  # SUM: gloo has no AVG
        return (t / self.world_size).to(values.device)

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a lone process: the one that prints results."""
    return not dist.is_initialized() or dist.get_rank() == 0


_LEFT_GROUP = False


def shutdown_processes(wait: bool = True) -> None:
    """Leave the process group (if any) cleanly at the end of a run: wait for every rank,
    then destroy it. A process that exits with the group alive can abort in gloo's
    teardown ('terminate called without an active exception') when another rank is slower.
    `wait=False` (after an error, when other ranks may never arrive) skips the barrier."""
    global _LEFT_GROUP
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
        _LEFT_GROUP = True


def left_process_group() -> bool:
    """Whether this process was in a process group that shutdown_processes destroyed: such a
    process should end without the interpreter's teardown (see kino.cli.run)."""
    return _LEFT_GROUP


def _collective_device() -> torch.device:
    backend = dist.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def init_processes(parallel: ParallelConfig | None = None, device: torch.device | None = None) -> Processes:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA) and build the
    meshes. Idempotent: a group that already exists is reused. One process: `Processes()`."""
    parallel = parallel or ParallelConfig()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        if parallel.sequence_parallel > 1:
            raise KinoUserError(f"parallel.sequence_parallel = {parallel.sequence_parallel} needs that many "
                                "processes: run under torchrun --nproc-per-node N")
        return Processes()
    cuda = device is not None and device.type == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sp = parallel.sequence_parallel
    if world % sp:
        raise KinoUserError(f"parallel.sequence_parallel = {sp} does not divide the {world} processes")
    from torch.distributed.device_mesh import init_device_mesh

    kind = "cuda" if cuda else "cpu"
    fsdp_mesh = init_device_mesh(kind, (world,), mesh_dim_names=("fsdp",))
    sp_group = None
    if sp > 1:
        grid = init_device_mesh(kind, (world // sp, sp), mesh_dim_names=("dp", "sp"))
        sp_group = grid["sp"].get_group()
    return Processes(rank=rank, world_size=world, local_rank=local_rank, dp_rank=rank // sp, dp_size=world // sp,
                     sp_size=sp, fsdp_mesh=fsdp_mesh, sp_group=sp_group)


def parallelize(model: nn.Module, parallel: ParallelConfig, procs: Processes, *,
                param_dtype: torch.dtype | None = None) -> nn.Module:
    """Apply, in this order: sequence parallelism, activation checkpointing, compile (each
    block) and FSDP2 (each block, then the root) to a model with a `blocks` ModuleList (the
    DiT). Parameter names do not change, so state dicts and checkpoints keep their keys.

    `param_dtype` (e.g. bf16) is FSDP2's compute dtype for parameters; the sharded master
    weights, the optimizer and gradient reductions stay fp32. One process with the default
    config returns the model untouched.
    """
    from kino.models.gguf import GGUFLinear
    from kino.models.lora import LoRALinear

    blocks = getattr(model, "blocks", None)
    if procs.distributed and any(isinstance(m, GGUFLinear) or (isinstance(m, LoRALinear) and m.qtype is not None)
                                 for m in model.modules()):
        raise KinoUserError("FSDP2 shards float weights, not a GGUF-quantized DiT (init_dit_file): train a LoRA "
                            "on it in one process")
    if procs.sp_size > 1:
        apply_sequence_parallel(model, procs.sp_group)
    if parallel.activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for block in _required(blocks, model, "activation checkpointing"):
            checkpoint(block)  # composable: the module and its parameter names stay as they are
    if parallel.compile:
        for block in _required(blocks, model, "compile"):
            block.compile()  # in place: names unchanged; one graph per block shape, reused across blocks
    if procs.distributed:
        shard_modules(model, blocks if blocks is not None else (), procs.fsdp_mesh, param_dtype=param_dtype,
                      reshard_after_forward=parallel.reshard_after_forward)
    return model


def shard_modules(model: nn.Module, units, mesh, *, param_dtype: torch.dtype | None = None,
                  reshard_after_forward: bool = True, cast: torch.dtype | None = None) -> None:
    """FSDP2 over `mesh`: each of `units` (a model's repeated blocks; a list of modules that
    share weights counts as one) becomes one shard group,
    whose weights are gathered for its forward and freed after it (unless
    `reshard_after_forward` is False), then `model` itself, for what is left (embeddings, head:
    kept gathered after the forward). Every rank keeps 1/N of each weight, on the mesh's
    device: parameters elsewhere (e.g. built on the CPU) move there shard by shard.

    `cast`: the floating-point dtype the weights are stored in from now on, each unit cast
    just before it is sharded: weights read straight from a file (memory-mapped, in the
    file's dtype) then take one unit's worth of private memory at a time, not the model's."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Blocks return reshaped views; kino never modifies a block's output in place, which
    # is the only case this warning (emitted once per module and step) is about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

    def converted(t: torch.Tensor) -> torch.Tensor:
        return t.to(cast) if t.is_floating_point() else t

    kwargs = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32))
    inside = set()  # with `cast`: the modules of the units, already cast
    for unit in units:
        if cast is not None:
            members = unit if isinstance(unit, (list, tuple)) else [unit]
            for m in members:
                m._apply(converted)
            inside.update(sub for m in members for sub in m.modules())
        fully_shard(unit, reshard_after_forward=reshard_after_forward, **kwargs)
    if cast is not None:  # what is left: the modules outside every unit, their own weights only
        for m in model.modules():
            if m not in inside:
                m._apply(converted, recurse=False)
    fully_shard(model, **kwargs)


def apply_sequence_parallel(model: nn.Module, group) -> None:
    """Split each clip's tokens over the ranks of `group` (Ulysses): the DiT shards and
    gathers its tokens, and every block's self-attention attends across the ranks."""
    from kino.training.sequence_parallel import UlyssesSequenceParallel

    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "sequence_parallel"):
        raise KinoUserError(f"{type(model).__name__} does not support sequence parallelism")
    sp = UlyssesSequenceParallel(group)
    model.sequence_parallel = sp
    for block in model.all_blocks() if hasattr(model, "all_blocks") else blocks:  # a VACE DiT's too
        block.self_attn.sequence_parallel = sp  # cross-attention keeps its local queries and all the text


def _required(blocks, model: nn.Module, what: str):
    if blocks is None:
        raise KinoUserError(f"{what} wraps a model's `blocks`; {type(model).__name__} has none")
    return blocks
