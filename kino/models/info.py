"""`kino info [MODEL]`: what a model folder holds, read from its configs alone (no weights
loaded, so it answers in a second for a 14B model): its layout, each component's size,
parameter count and files, and the settings generation uses by default.

Takes what `--model` takes: a kino folder, a Wan2.1 / Wan2.2 folder in either release layout,
a Hub id, or nothing (the model shipped with kino); and what `--dit` takes, a GGUF DiT file
(its tensor types, size, and which of kino's DiT sizes its shapes are).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch

from kino.errors import KinoUserError


def describe(spec: str | Path | None = None) -> dict:
    """A JSON-ready description of the model folder `spec` names (see the module docstring)."""
    from kino.convert.wan import detect_layout
    from kino.models.folder import default_model_dir
    from kino.models.hub import folder_name, resolve_model

    if spec is not None and str(spec).endswith(".gguf"):
        return _gguf(Path(spec))
    root = resolve_model(spec) if spec is not None else default_model_dir()
    if not root.is_dir():
        raise KinoUserError(f"no model folder at {root}")
    layout = detect_layout(root)
    if layout == "kino":
        info = _kino(root)
    elif layout in ("original", "diffusers"):
        info = _wan(root, layout)
    else:
        raise KinoUserError(f"{root} is neither a kino model folder (kino.json) nor a Wan2.1 / Wan2.2 folder")
    return {"model": folder_name(root), "path": str(root), "layout": layout, **info}


def _params(cls, config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in cls(config).parameters())


def _dit(config) -> dict:
    from kino.models.dit.model import DiT

    c = config
    return {"dim": c.dim, "layers": c.num_layers, "heads": c.num_heads, "patch": list(c.patch_size),
            "in_channels": c.in_channels, "out_channels": c.out_channels, "text_dim": c.text_dim,
            "image_branch": c.img_dim is not None, "vace_blocks": len(c.vace_layers or ()),
            "parameters": _params(DiT, c)}


def _vae(config) -> dict:
    from kino.models.vae.model import VideoVAE

    c = config
    return {"latent_channels": c.z_dim, "time_stride": c.time_stride, "space_stride": c.space_stride,
            "base_dim": c.base_dim, "decoder_dim": c.decoder_dim, "wan22_layout": c.residual,
            "parameters": _params(VideoVAE, c)}


def _kino(root: Path) -> dict:
    from kino.models.dit.model import DiTConfig
    from kino.models.folder import load_component, read_manifest
    from kino.models.vae.model import VAEConfig

    manifest = read_manifest(root)
    components = {}
    for name, entry in manifest.get("components", {}).items():
        comp = load_component(root, name, weights=False)
        desc = {"path": entry.get("path", name), "files": {f: (root / entry.get("path", name) / f).stat().st_size
                                                          for f in entry.get("files", {})
                                                          if (root / entry.get("path", name) / f).is_file()}}
        if name in ("dit", "dit_2"):
            desc |= _dit(DiTConfig.from_dict(comp.config))
        elif name == "vae":
            desc |= _vae(VAEConfig.from_dict(comp.config))
        else:  # text / image encoders: their reference config says what they are
            desc |= {k: v for k, v in comp.config.items() if k in ("kind", "package", "max_length", "dim", "dtype")}
        components[name] = desc
    return {"name": manifest.get("name"), "components": components, "defaults": manifest.get("pipeline", {})}


def _wan(root: Path, layout: str) -> dict:
    """A Wan folder from its config files; the VAE of the original layout (which ships no
    config) as released, named by its file."""
    from kino.convert.files import read_json
    from kino.convert.wan import ORIGINAL_VAE_22, WAN22_HIGH, WAN22_LOW, wan_defaults, wan_model_type
    from kino.models.dit import adapters as dit_adapters
    from kino.models.vae import adapters as vae_adapters
    from kino.models.vae.model import VAE_SIZES

    if layout == "original":
        folders = [root / WAN22_HIGH, root / WAN22_LOW] if (root / WAN22_HIGH).is_dir() else [root]
        dits = [dit_adapters.config_from_wan(read_json(f / "config.json")) for f in folders]
        vae = VAE_SIZES["wan2.2" if (root / ORIGINAL_VAE_22).is_file() else "wan2.1"]
        boundary = None
    else:
        index = read_json(root / "model_index.json")
        names = ["transformer"] + (["transformer_2"] if index.get("transformer_2") not in (None, [None, None]) else [])
        dits = [dit_adapters.config_from_diffusers(read_json(root / n / "config.json")) for n in names]
        vae = vae_adapters.config_from_diffusers({k: v for k, v in read_json(root / "vae" / "config.json").items()
                                                  if not k.startswith("_")})
        boundary = index.get("boundary_ratio")
    c = dits[0]
    if c.img_dim is not None and len(dits) == 2:  # Wan2.2 I2V-A14B says "i2v" but has no CLIP branch
        dits = [replace(d, img_dim=None, img_pos_len=None) for d in dits]
    kind = wan_model_type(c, vae, len(dits) == 2)
    components = {"vae": _vae(vae), **{("dit" if i == 0 else "dit_2"): _dit(d) for i, d in enumerate(dits)}}
    components["text_encoder"] = {"kind": "umt5", "dim": c.text_dim, "max_length": 512}
    if c.img_dim is not None:
        components["image_encoder"] = {"kind": "clip", "dim": c.img_dim}
    return {"name": kind, "components": components, "defaults": asdict(wan_defaults(kind, boundary))}


def _types(state: dict) -> dict[str, int]:
    """How many tensors of each type (GGUF quantization or torch dtype) a state dict holds."""
    from kino.models.gguf import GGUFTensor

    types: dict[str, int] = {}
    for v in state.values():
        name = v.type_name if isinstance(v, GGUFTensor) else str(v.dtype).removeprefix("torch.")
        types[name] = types.get(name, 0) + 1
    return types


def _gguf(path: Path) -> dict:
    """A GGUF file from its header: a DiT's tensor types, parameters and the DiT sizes it fits,
    or a UMT5 text encoder's (llama.cpp's t5encoder layout, for --text-encoder)."""
    from kino.models.dit.model import DIT_SIZES, DiT
    from kino.models.dit.pretrained import adapt_dit_state
    from kino.models.gguf import read_gguf, read_gguf_metadata

    if read_gguf_metadata(path).get("general.architecture") in ("t5encoder", "t5"):
        return _gguf_text(path)
    raw = read_gguf(path)
    layers = len({k.split(".")[1] for k in raw if k.startswith("blocks.")})  # "blocks.N." in every layout
    dim = raw["patch_embedding.weight"].shape[0] if "patch_embedding.weight" in raw else None
    with torch.device("meta"):  # the sizes of that width and depth (building all 20 takes seconds)
        sizes = {size: {k: tuple(v.shape) for k, v in DiT(c).state_dict().items()} for size, c in DIT_SIZES.items()
                 if c.dim == dim and c.num_layers == layers}
    state = adapt_dit_state(raw, path, set().union(*sizes.values()))  # kino's extras pass as named
    types = _types(state)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    fits = [size for size, known in sizes.items() if known == shapes]
    dit = {"tensors": types, "parameters": sum(int(torch.Size(s).numel()) for s in shapes.values()),
           "bytes": path.stat().st_size, "fits": fits,
           "layers": len({k.split(".")[1] for k in shapes if k.startswith("blocks.")}),
           "vace_blocks": len({k.split(".")[1] for k in shapes if k.startswith("vace_blocks.")})}
    return {"model": path.name, "path": str(path), "layout": "gguf", "name": "DiT weights",
            "components": {"dit": dit}, "defaults": {}}


def _gguf_text(path: Path) -> dict:
    from kino.models.gguf import read_gguf
    from kino.models.text.umt5 import umt5_config, umt5_names

    state = umt5_names(read_gguf(path), path)
    try:
        config = umt5_config(state)
    except ValueError as e:
        raise KinoUserError(f"{path}: {e}") from None
    state.pop("encoder.embed_tokens.weight")  # transformers' tied second name of the token table
    text = {"kind": "umt5", "tensors": _types(state), "bytes": path.stat().st_size, "dim": config.d_model,
            "layers": config.num_layers, "heads": config.num_heads, "vocabulary": config.vocab_size,
            "parameters": sum(int(torch.Size(v.shape).numel()) for v in state.values())}
    return {"model": path.name, "path": str(path), "layout": "gguf", "name": "UMT5 text encoder weights",
            "components": {"text_encoder": text}, "defaults": {}}


def _count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.2f}{unit}" if unit == "B" else f"{n / size:.1f}{unit}"
    return str(n)


def format_info(info: dict) -> str:
    """The human-readable summary `kino info` prints."""
    lines = [f"{info['model']}  ({info['layout']} layout{', ' + info['name'] if info.get('name') else ''})",
             f"  path: {info['path']}"]
    for name, c in info["components"].items():
        params = f", {_count(c['parameters'])} parameters" if "parameters" in c else ""
        types = ", ".join(f"{n} {t}" for t, n in sorted(c.get("tensors", {}).items(), key=lambda kv: -kv[1]))
        if "tensors" in c and name == "text_encoder":  # a GGUF UMT5 file
            desc = (f"GGUF UMT5 encoder (for --text-encoder), {c['layers']} layers, {c['dim']} wide, {c['heads']} "
                    f"heads, vocabulary {c['vocabulary']}, {c['bytes'] / 2**20:.1f} MiB; tensors: {types}")
        elif "tensors" in c:  # a GGUF DiT file
            fits = ", ".join(c["fits"]) or "none of kino's named sizes (give --model the folder whose config it fits)"
            desc = (f"GGUF DiT, {c['layers']} blocks{', %d VACE blocks' % c['vace_blocks'] if c['vace_blocks'] else ''}"
                    f", {c['bytes'] / 2**20:.1f} MiB; tensors: {types}; fits: {fits}")
        elif name.startswith("dit"):
            patch = "x".join(map(str, c["patch"]))
            branch = ", image branch" if c["image_branch"] else ""
            branch += f", {c['vace_blocks']} VACE blocks" if c.get("vace_blocks") else ""
            desc = (f"DiT {c['dim']} wide, {c['layers']} layers, {c['heads']} heads, patch {patch}, "
                    f"{c['in_channels']} -> {c['out_channels']} channels{branch}")
        elif name == "vae":
            desc = (f"VAE {c['time_stride']}x{c['space_stride']}x{c['space_stride']} to {c['latent_channels']} channels"
                    f"{' (Wan2.2 layout)' if c['wan22_layout'] else ''}")
        else:
            desc = ", ".join(f"{k} {v}" for k, v in c.items() if k not in ("path", "files"))
        lines.append(f"  {name}: {desc}{params}")
    d = info["defaults"]
    if d:
        shown = ("frames", "height", "width", "fps", "steps", "guidance", "guidance_2", "boundary", "sampler", "shift")
        lines.append("  defaults: " + ", ".join(f"{k} {d[k]}" for k in shown if d.get(k) is not None))
    return "\n".join(lines)
