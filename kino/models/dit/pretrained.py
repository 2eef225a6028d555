"""Loading a DiT: from a model folder (the shipped default when no path is given), or its
weights alone from one file (`--dit FILE`: GGUF or safetensors) over a folder's config."""

from __future__ import annotations

from pathlib import Path

import torch

from kino.errors import KinoUserError
from kino.models.dit import adapters
from kino.models.dit.model import DiT, DiTConfig
from kino.models.folder import CONFIG, load_component, load_module
from kino.models.gguf import GGUFTensor, build_with_gguf, read_gguf, strip_prefix

DIT_FILE_SUFFIXES = (".gguf", ".safetensors")
TEXT_TABLES = ("token_embd.weight", "shared.weight", "token_embedding.weight", "encoder.embed_tokens.weight")


def load_dit(path: str | Path | None = None, device: str | torch.device = "cpu", component: str = "dit") -> DiT:
    """A frozen DiT from a model folder or a bare dit folder (sha256-checked via kino.json);
    `component` "dit_2": a two-expert model's second DiT."""
    return load_module(path, component, DiTConfig, DiT, device)


def read_dit_file(path: str | Path, dtype: torch.dtype | None = None, config: DiTConfig | None = None) -> dict:
    """A DiT's weights from one file, by kino's (= Wan's original) parameter names: a GGUF file
    (quantized tensors stay `GGUFTensor`s; kino/models/gguf.py) or a safetensors file, with
    Wan's original names, diffusers' (WanTransformer3DModel) or kino's own, with or without
    ComfyUI's `model.diffusion_model.` prefix, plain or "fp8 scaled" (`scaled_fp8`: float8
    weights beside a `scale_weight` / `weight_scale` each, multiplied back in: `fp8_weights`).
    Floating-point tensors are converted to `dtype` as they are read (a GGUF file's to float32
    when None). `path` may be a Hub file, ORG/NAME/PATH. With `config`, names that are that
    DiT's own (kino's extras included) pass."""
    from kino.convert.files import fp8_weights, load_safetensors
    from kino.models.hub import resolve_file

    path = resolve_file(path)
    if path.suffix == ".gguf":
        state = read_gguf(path, dtype or torch.float32)
    elif path.suffix == ".safetensors":
        if not path.is_file():
            raise KinoUserError(f"DiT weights file {path} does not exist")
        state = fp8_weights({strip_prefix(key): value for key, value in load_safetensors([path]).items()}, dtype,
                            path)
    else:
        raise KinoUserError(f"{path}: a DiT weights file is {' or '.join(DIT_FILE_SUFFIXES)}")
    if any(k in state for k in TEXT_TABLES):
        raise KinoUserError(f"{path} holds a text encoder (it has a token table), not a DiT: give it as "
                            "--text-encoder FILE")
    keys = None
    if config is not None:
        with torch.device("meta"):
            keys = set(DiT(config).state_dict())
    return adapt_dit_state(state, path, keys)


def load_folder_dit(root: Path, component: str, file: str | Path | None, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = torch.float32) -> DiT:
    """A kino model folder's DiT (`component`: "dit" or "dit_2"), or, given `file`, its config
    with that file's weights (`read_dit_file`)."""
    if file is None:
        return load_module(root, component, DiTConfig, DiT, device, dtype)
    comp = load_component(root, component, weights=False)
    try:
        config = DiTConfig.from_dict(comp.config)
    except (TypeError, ValueError) as e:
        raise KinoUserError(f"{comp.folder / CONFIG} is not a valid {component} config: {e}") from None
    return build_dit(config, read_dit_file(file, dtype, config), Path(file), device, dtype)


def adapt_dit_state(state: dict, source: Path, model_keys: set[str] | None = None) -> dict:
    """`state` by kino's names: as it is when its keys are the model's (`model_keys`), from
    diffusers' names when it has diffusers' embedder, else checked as Wan's original names."""
    if model_keys is not None and set(state) <= model_keys:
        return state
    diffusers = any(k.startswith("condition_embedder.") or ".attn1." in k for k in state)
    try:
        return (adapters.from_diffusers if diffusers else adapters.from_wan)(state)
    except ValueError as e:
        raise KinoUserError(f"{source}: {e}") from None


def build_dit(config: DiTConfig, state: dict, source: Path, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> DiT:
    """A frozen DiT of `config` holding `state` (kino's names; GGUF tensors allowed: the blocks'
    linear layers stay quantized, kino/models/gguf.py), in `dtype` (None: the state's first
    floating-point dtype), built on the meta device (no random init, no second copy)."""
    from kino.convert.files import one_line

    with torch.device("meta"):
        model = DiT(config)
    if dtype is None:
        dtype = next((v.dtype for v in state.values() if not isinstance(v, GGUFTensor) and v.is_floating_point()),
                     torch.float32)
    if any(isinstance(v, GGUFTensor) for v in state.values()):
        state = build_with_gguf(model, state, model.all_blocks(), source, dtype)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise KinoUserError(f"{source} holds weights that do not fit its config: {one_line(e)}") from None
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
