"""LoRA files for Wan2.1 DiTs from other trainers, read as kino's `LoRAFile`.

kino's DiT keeps Wan2.1's module names, so a LoRA trained elsewhere for a Wan2.1 model fuses
into kino's DiT once its keys are read. Three layouts are in common use (told apart by their
keys; a file mixing them is refused):

  wan        Wan2.1's module names under `diffusion_model.` (ComfyUI, DiffSynth-Studio,
             distillation LoRAs): `<module>.lora_A.weight` + `.lora_B.weight` (or
             `.lora_down.weight` + `.lora_up.weight`), an optional scalar `<module>.alpha`,
             and differences added as they are: `<module>.diff` (the whole weight, e.g. of
             a norm) and `<module>.diff_b` (the bias).
  musubi     kohya-style flat names (musubi-tuner's default): `lora_unet_<module, with "_"
             for ".">.lora_down.weight` / `.lora_up.weight` / `.alpha`.
  diffusers  diffusers / PEFT names under `transformer.` (`blocks.0.attn1.to_q.lora_A.weight`,
             `.lora_B.weight`, `.lora_B.bias`), renamed to Wan's with the DiT adapter's rules.
             The keys carry no alpha: the scale is 1 (alpha = rank), unless the safetensors
             metadata `lora_adapter_metadata` (diffusers' `save_lora_weights`) gives PEFT's
             `r`, `lora_alpha`, `alpha_pattern` and `use_rslora` for the transformer.

A module's update is (alpha / rank) up @ down with rank = down's rows (alpha = rank when the
file gives none), plus its differences; `fuse_lora` multiplies all of it by the user's scale.
DoRA files (`lora_magnitude_vector`) and LyCORIS LoHa/LoKr files are refused by name: their
update is not W + scale * up @ down.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from torch import Tensor

from kino.errors import KinoUserError
from kino.models.dit.adapters import diffusers_param_name

WAN, MUSUBI, DIFFUSERS = "wan", "musubi", "diffusers"
PREFIXES = {WAN: "diffusion_model.", MUSUBI: "lora_unet_", DIFFUSERS: "transformer."}

# what a key holds, by its ending (PEFT may put an adapter name before ".weight")
_KINDS = [
    (re.compile(r"\.(lora_A|lora_down)(\.[A-Za-z0-9_-]+)?\.weight$"), "down"),
    (re.compile(r"\.(lora_B|lora_up)(\.[A-Za-z0-9_-]+)?\.weight$"), "up"),
    (re.compile(r"\.lora_B(\.[A-Za-z0-9_-]+)?\.bias$"), "up_bias"),
    (re.compile(r"\.alpha$"), "alpha"),
    (re.compile(r"\.diff$"), "diff"),
    (re.compile(r"\.diff_b$"), "diff_b"),
]

# the parts of Wan2.1 module names that hold an underscore, longest first (for musubi's flat names)
_WORDS = sorted(["self_attn", "cross_attn", "k_img", "v_img", "norm_q", "norm_k", "norm_k_img", "text_embedding",
                 "time_embedding", "time_projection", "patch_embedding", "img_emb", "emb_pos"],
                key=lambda w: -w.count("_"))


def detect(keys) -> str | None:
    """The layout of a LoRA file's keys, None when no known one, or a clear error for a mix."""
    found = {name for name, prefix in PREFIXES.items() for k in keys if k.startswith(prefix)}
    if len(found) > 1:
        raise KinoUserError(f"LoRA file mixes key layouts ({', '.join(sorted(found))}): one file, one layout")
    if not found:
        return None
    layout = found.pop()
    stray = [k for k in keys if not k.startswith(PREFIXES[layout])]
    if stray:
        raise KinoUserError(f"LoRA file in the {layout} layout has keys outside it: {stray[:3]}")
    return layout


def dotted(flat: str) -> str:
    """A musubi flat module name back to Wan's dotted one: blocks_0_cross_attn_k_img ->
    blocks.0.cross_attn.k_img (Wan's names hold no part that is ambiguous this way)."""
    parts, out, i = flat.split("_"), [], 0
    while i < len(parts):
        for word in _WORDS:
            n = word.count("_") + 1
            if "_".join(parts[i:i + n]) == word:
                out.append(word)
                i += n
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def _module_name(layout: str, module: str) -> str:
    if layout == MUSUBI:
        return dotted(module)
    if layout == DIFFUSERS:
        # the adapter renames parameter keys: rename the module's weight and strip it again
        return diffusers_param_name(module + ".weight")[: -len(".weight")]
    return module


def _peft_scales(metadata: dict) -> tuple[float | None, float | None, dict[str, float], bool]:
    """(lora_alpha, r, alpha per diffusers module, use_rslora) from diffusers' LoRA metadata."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, None, {}, False
    try:
        meta = json.loads(raw)
        alpha, r = meta.get("transformer.lora_alpha"), meta.get("transformer.r")
        pattern = {k: float(v) for k, v in (meta.get("transformer.alpha_pattern") or {}).items()}
        return (None if alpha is None else float(alpha), None if r is None else float(r), pattern,
                bool(meta.get("transformer.use_rslora", False)))
    except (ValueError, TypeError, AttributeError) as e:
        raise KinoUserError(f"LoRA file has unreadable lora_adapter_metadata: {e}") from None


def read_foreign(path: Path, tensors: dict[str, Tensor], metadata: dict) -> dict | None:
    """The modules of a Wan2.1 LoRA in one of the layouts above, or None when the keys are in
    none of them. Returns {"format", "down", "up", "scales", "bias", "diff"} with kino's
    (= Wan's) module names; `scales` holds alpha / rank per low-rank module."""
    layout = detect(tensors)
    if layout is None:
        return None
    if any("lora_magnitude_vector" in k for k in tensors):
        raise KinoUserError(f"LoRA file {path} is a DoRA (lora_magnitude_vector): kino fuses plain LoRAs only")
    if any(".hada_" in k or ".lokr_" in k for k in tensors):
        raise KinoUserError(f"LoRA file {path} is a LyCORIS LoHa/LoKr (hada_/lokr_ keys): kino fuses plain LoRAs only")
    parts: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        body = key[len(PREFIXES[layout]):]
        for pattern, kind in _KINDS:
            m = pattern.search(body)
            if m:
                parts.setdefault(body[: m.start()], {})[kind] = value
                break
        else:
            raise KinoUserError(f"LoRA file {path} has a key kino cannot place: {key!r} (a LoRA holds "
                                "lora_A/lora_B or lora_down/lora_up weights, alpha, diff and diff_b)")
    peft_alpha, peft_r, peft_pattern, rslora = (_peft_scales(metadata) if layout == DIFFUSERS
                                                else (None, None, {}, False))
    out = {"format": layout, "down": {}, "up": {}, "scales": {}, "bias": {}, "diff": {}}
    for module, kinds in parts.items():
        name = _module_name(layout, module)
        if name in out["scales"] or name in out["bias"] or name in out["diff"]:
            raise KinoUserError(f"LoRA file {path} names the module {name} twice")
        if ("down" in kinds) != ("up" in kinds):
            raise KinoUserError(f"LoRA file {path} is malformed: {module} lacks its "
                                f"{'up' if 'down' in kinds else 'down'} weight")
        # PEFT's factor, for a lora_B bias that comes without low-rank weights
        scale = 1.0 if peft_alpha is None or not peft_r else peft_alpha / (math.sqrt(peft_r) if rslora else peft_r)
        if "down" in kinds:
            down, up = kinds["down"], kinds["up"]
            if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
                raise KinoUserError(f"LoRA file {path} is malformed: {module} has down {tuple(down.shape)} and up "
                                    f"{tuple(up.shape)}, expected (rank, in) and (out, rank)")
            rank = down.shape[0]
            if "alpha" in kinds:
                alpha = float(kinds["alpha"].float().reshape(-1)[0])
            else:
                alpha = peft_pattern.get(module, peft_alpha if peft_alpha is not None else rank)
            scale = alpha / (math.sqrt(rank) if rslora else rank)
            if not math.isfinite(scale):
                raise KinoUserError(f"LoRA file {path} has a non-finite alpha for {module}")
            out["down"][name], out["up"][name], out["scales"][name] = down, up, scale
        elif "alpha" in kinds:
            raise KinoUserError(f"LoRA file {path} is malformed: {module} has an alpha but no weights")
        bias = kinds.get("diff_b", kinds.get("up_bias"))
        if "diff_b" in kinds and "up_bias" in kinds:
            raise KinoUserError(f"LoRA file {path} gives {module} two bias updates (diff_b and lora_B.bias)")
        if bias is not None:  # PEFT's lora_B bias is scaled with the update; Wan's diff_b is added as it is
            out["bias"][name] = bias * scale if "up_bias" in kinds else bias
        if "diff" in kinds:
            out["diff"][name] = kinds["diff"]
    return out


def write_foreign(lora, path: str | Path, layout: str) -> Path:
    """Write a LoRA (`LoRAFile`, any layout kino reads) in another trainer's `layout`, so a
    LoRA trained with kino runs in ComfyUI (wan), musubi-tuner's tools (musubi) or diffusers
    (diffusers). Each module's alpha is written so that the update stays alpha / rank x
    up @ down (diffusers: folded into up, its keys carry no alpha); bias differences go along
    (wan: diff_b, diffusers: lora_B.bias) and whole-weight differences as wan `diff` keys.
    A layout that cannot hold a part of the file is a clear error."""
    import torch
    from safetensors.torch import save_file

    from kino.models.dit.adapters import diffusers_name

    if layout not in PREFIXES:
        raise KinoUserError(f"unknown LoRA layout {layout!r}: allowed {', '.join(PREFIXES)}")
    if layout != WAN and lora.diff:
        raise KinoUserError(f"the {layout} layout has no place for whole-weight differences "
                            f"({', '.join(list(lora.diff)[:3])}): write the wan layout")
    if layout == MUSUBI and lora.bias:
        raise KinoUserError("the musubi layout has no place for bias differences: write the wan or diffusers layout")
    out: dict[str, Tensor] = {}
    for name in lora.down:
        down, up = lora.down[name].contiguous(), lora.up[name].contiguous()
        factor = lora.scales.get(name, lora.alpha / lora.rank)
        alpha = torch.tensor(factor * down.shape[0], dtype=torch.float32)
        if layout == WAN:
            out[f"diffusion_model.{name}.lora_down.weight"], out[f"diffusion_model.{name}.lora_up.weight"] = down, up
            out[f"diffusion_model.{name}.alpha"] = alpha
        elif layout == MUSUBI:
            flat = "lora_unet_" + name.replace(".", "_")
            out[f"{flat}.lora_down.weight"], out[f"{flat}.lora_up.weight"], out[f"{flat}.alpha"] = down, up, alpha
        else:
            key = "transformer." + diffusers_name(name + ".weight")[: -len(".weight")]
            out[f"{key}.lora_A.weight"] = down
            out[f"{key}.lora_B.weight"] = (up.float() * factor).to(up.dtype).contiguous()
    for name, value in lora.bias.items():
        if layout == WAN:
            out[f"diffusion_model.{name}.diff_b"] = value.contiguous()
        else:
            out["transformer." + diffusers_name(name + ".bias")[: -len(".bias")] + ".lora_B.bias"] = value.contiguous()
    for name, value in lora.diff.items():
        out[f"diffusion_model.{name}.diff"] = value.contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, str(tmp), metadata={"format": f"{layout} (written by kino)"})
    tmp.replace(path)
    return path
