"""`kino convert gguf SRC DST.gguf --type T [--component text_encoder]`: a model's DiT (or its
UMT5 text encoder) as a quantized GGUF file.

SRC is a kino model folder, a Wan2.1 / Wan2.2 folder in either layout, or a Hub id; the DiT
(or, with `expert=2`, a two-expert model's low-noise DiT) is written in Wan's parameter
names (kino's own; a kino DiT's extras such as its absolute-position embedding keep their
names) in ComfyUI-GGUF's layout (kino/models/gguf.py `write_gguf`), so that kino
(`--dit FILE`), ComfyUI-GGUF and diffusers' GGUF loader read it. The text encoder is written
in llama.cpp's t5encoder layout, which kino (`--text-encoder FILE`), transformers' GGUF
loader, ComfyUI-GGUF and llama.cpp read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kino.errors import KinoUserError
from kino.models.folder import load_component, read_manifest
from kino.models.gguf import write_gguf
from kino.models.hub import resolve_model, weights_skipped


def dit_state(src: str | Path, expert: int = 1) -> dict[str, torch.Tensor]:
    """The DiT's state dict (kino's names) of a model folder or Hub id, in its file's dtype."""
    from kino.convert.wan import detect_layout, read_wan

    if expert not in (1, 2):
        raise KinoUserError(f"expert must be 1 or 2, got {expert}")
    root = resolve_model(src, weights_skipped("dit_2" if expert == 1 else "dit", "text_encoder"))
    manifest = read_manifest(root)
    if manifest is not None:
        component = "dit" if expert == 1 else "dit_2"
        if component not in manifest.get("components", {}):
            raise KinoUserError(f"{root} has no {component} (a second DiT belongs to two-expert models)")
        return load_component(root, component).state_dict
    if not root.is_dir() or detect_layout(root) not in ("original", "diffusers"):
        raise KinoUserError(f"{root} is not a kino model folder nor a Wan folder")
    source = read_wan(root, dit_dtype=None)
    state = source.dit_state if expert == 1 else source.dit_2_state
    if state is None:
        raise KinoUserError(f"{root} has one DiT: there is no second expert to write")
    return state


def text_encoder(src: str | Path):
    """The UMT5 encoder (UMT5Encoder) of a kino model folder, a Wan folder or a Hub id, in its
    file's dtype."""
    from kino.convert.wan import detect_layout, text_source
    from kino.models.text.encoder import load_text_encoder

    root = resolve_model(src, weights_skipped("dit", "dit_2"))
    manifest = read_manifest(root)
    if manifest is not None:
        text = load_component(root, "text_encoder", weights=False)
        if text.config.get("kind") != "umt5":
            raise KinoUserError(f"{root}'s text encoder is {text.config.get('kind')!r}: a GGUF text encoder file is "
                                "written from a UMT5 encoder (Wan models)")
        return load_text_encoder(text.config, "cpu", text.folder, dtype=None)
    layout = detect_layout(root) if root.is_dir() else None
    if layout not in ("original", "diffusers"):
        raise KinoUserError(f"{root} is not a kino model folder nor a Wan folder")
    return text_source(root, layout).load("cpu", None)


def convert_gguf(src: str | Path, dst: str | Path, type_name: str = "Q8_0", expert: int = 1,
                 component: str = "dit") -> dict[str, int]:
    """Write `src`'s DiT (or second expert), or with component "text_encoder" its UMT5 encoder
    (llama.cpp's t5encoder layout, for `--text-encoder FILE`), to the new file `dst` (.gguf);
    returns how many tensors went to each type."""
    dst = Path(dst)
    if dst.exists():
        raise KinoUserError(f"{dst} exists: name a new .gguf file")
    if dst.suffix != ".gguf":
        raise KinoUserError(f"{dst}: the file to write must end in .gguf")
    if component == "text_encoder":
        from kino.models.text.umt5 import write_umt5_gguf

        if expert != 1:
            raise KinoUserError("--expert picks one of a two-expert model's DiTs; a model has one text encoder")
        return write_umt5_gguf(text_encoder(src).model, dst, type_name, f"umt5 ({Path(str(src)).name})")
    if component != "dit":
        raise KinoUserError(f"component {component!r}: dit or text_encoder")
    return write_gguf(dit_state(src, expert), dst, type_name)
