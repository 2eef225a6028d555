"""State-dict adapters between kino's VideoVAE and third-party layouts.

Wan2.1's original release (`Wan2.1_VAE.pth`) keeps kino's module tree but indexes the
layers inside its nn.Sequential blocks: a residual block's norm1/conv1/norm2/conv2 are
`residual.{0,2,3,6}`, a head's norm/conv are `head.{0,2}`, a resample's conv is
`resample.1`. `from_wan` / `to_wan` rename those and nothing else.

diffusers' `AutoencoderKLWan` (Wan2.1 VAE, `is_residual=False`) differs from kino only in
names: kino keeps Wan's original release names (encoder.conv1, encoder.downsamples.N,
middle.{0,1,2}, head, conv1/conv2 quant convs). The renames are a few regex rules; the one
structural difference is the decoder, which diffusers nests as up_blocks.i.{resnets.j,
upsamplers.0} and Wan/kino keep as one flat list, decoder.upsamples.N.
"""

from __future__ import annotations

import re

import torch

from kino.models.vae.model import VAE_SIZES, VAEConfig

# Applied in order to every key; each rule sees the output of the ones before it.
_FROM_DIFFUSERS: list[tuple[str, str]] = [
    (r"^quant_conv\.", "conv1."),
    (r"^post_quant_conv\.", "conv2."),
    (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.head.norm."),
    (r"^(encoder|decoder)\.conv_out\.", r"\1.head.conv."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.0."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.2."),
    (r"^encoder\.down_blocks\.", "encoder.downsamples."),
    (r"\.conv_shortcut\.", ".shortcut."),
    (r"\.resample\.1\.", ".conv."),  # resample.0 is the parameter-free pad / upsample
]

_TO_DIFFUSERS: list[tuple[str, str]] = [
    (r"^conv1\.", "quant_conv."),
    (r"^conv2\.", "post_quant_conv."),
    (r"^(encoder|decoder)\.conv1\.", r"\1.conv_in."),
    (r"^(encoder|decoder)\.head\.norm\.", r"\1.norm_out."),
    (r"^(encoder|decoder)\.head\.conv\.", r"\1.conv_out."),
    (r"^(encoder|decoder)\.middle\.0\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.middle\.1\.", r"\1.mid_block.attentions.0."),
    (r"^(encoder|decoder)\.middle\.2\.", r"\1.mid_block.resnets.1."),
    (r"^encoder\.downsamples\.", "encoder.down_blocks."),
    (r"\.shortcut\.", ".conv_shortcut."),
    (r"^((?:encoder|decoder)\.\w+\.\d+)\.conv\.", r"\1.resample.1."),
]

_DIFFUSERS_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.")
# Wan2.2 (is_residual): diffusers nests each stage as down_blocks.i.{resnets.j, downsampler} and
# up_blocks.i.{resnets.j, upsampler}; Wan's release and kino as downsamples.i.downsamples.j
# and upsamples.i.upsamples.j, the resample last.
_DIFFUSERS_STAGE = re.compile(
    r"^(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(resnets\.(\d+)|downsampler|upsampler)\.")
_KINO_UP = re.compile(r"^decoder\.upsamples\.(\d+)\.")


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def _blocks_per_stage(keys: list[str]) -> int:
    """Residual blocks per decoder stage (num_res_blocks + 1), read off diffusers' keys."""
    resnets = {int(m.group(3)) for k in keys if (m := _DIFFUSERS_UP.match(k)) and m.group(1) == "0" and m.group(3)}
    if not resnets:
        raise ValueError("not a diffusers AutoencoderKLWan state dict: no decoder.up_blocks.0.resnets.* keys")
    return max(resnets) + 1


def _from_diffusers_residual(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' Wan2.2 VAE (is_residual) -> kino: the stages' nesting renamed, then the
    names every Wan VAE shares."""
    resnets = {"encoder": set(), "decoder": set()}
    for key in state_dict:
        if (m := _DIFFUSERS_STAGE.match(key)) and m.group(4) is not None:
            resnets[m.group(1).split(".")[0]].add(int(m.group(4)))
    count = {part: max(found) + 1 if found else 0 for part, found in resnets.items()}

    def nested(m: re.Match) -> str:
        part = m.group(1).split(".")[0]
        outer = "downsamples" if part == "encoder" else "upsamples"
        j = m.group(4) if m.group(4) is not None else count[part]  # the resample follows the residual blocks
        return f"{part}.{outer}.{m.group(2)}.{outer}.{j}."

    return _renamed(state_dict, lambda key: _rename(_DIFFUSERS_STAGE.sub(nested, key), _FROM_DIFFUSERS))


def _renamed(state_dict: dict[str, torch.Tensor], name) -> dict[str, torch.Tensor]:
    """The same tensors under `name(key)`; two keys that map to one name are an error."""
    out = {}
    for key, value in state_dict.items():
        new = name(key)
        if new in out:
            raise ValueError(f"two diffusers keys map to {new}")
        out[new] = value
    return out


def from_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKLWan state dict -> kino VideoVAE state dict (same tensors); Wan2.1's
    layout, or Wan2.2's (is_residual: `.downsampler.` / `.upsampler.` stages)."""
    if any(".downsampler." in k or re.match(r"^decoder\.up_blocks\.\d+\.upsampler\.", k) for k in state_dict):
        return _from_diffusers_residual(state_dict)
    per_stage = _blocks_per_stage(list(state_dict))

    def flat_decoder_index(m: re.Match) -> str:
        # Wan's flat decoder list: each stage is its residual blocks, then its upsample.
        stage = int(m.group(1))
        j = int(m.group(3)) if m.group(3) is not None else per_stage
        return f"decoder.upsamples.{stage * (per_stage + 1) + j}."

    return _renamed(state_dict, lambda key: _rename(_DIFFUSERS_UP.sub(flat_decoder_index, key), _FROM_DIFFUSERS))


def to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kino VideoVAE state dict -> diffusers AutoencoderKLWan state dict (same tensors)."""
    keys = list(state_dict)
    if any(k.startswith("decoder.upsamples.") and ".to_qkv." in k for k in keys):
        raise ValueError("diffusers' AutoencoderKLWan has no decoder attention outside the middle block (attn_scales)")
    # The first upsample in the flat list sits right after stage 0's residual blocks.
    upsample_indices = [
        int(m.group(1)) for k in keys if (m := _KINO_UP.match(k)) and k[m.end() :].startswith(("conv.", "time_conv."))
    ]
    if not upsample_indices:
        raise ValueError("not a kino VideoVAE state dict: no decoder.upsamples.*.conv keys")
    per_stage = min(upsample_indices)

    def nested_decoder_index(m: re.Match) -> str:
        stage, j = divmod(int(m.group(1)), per_stage + 1)
        inner = "upsamplers.0" if j == per_stage else f"resnets.{j}"
        return f"decoder.up_blocks.{stage}.{inner}."

    out = {}
    for key, value in state_dict.items():
        new = _rename(key, _TO_DIFFUSERS)
        new = _KINO_UP.sub(nested_decoder_index, new)
        out[new] = value
    return out


_FROM_WAN: list[tuple[str, str]] = [
    (r"\.residual\.0\.gamma$", ".norm1.gamma"),
    (r"\.residual\.2\.", ".conv1."),
    (r"\.residual\.3\.gamma$", ".norm2.gamma"),
    (r"\.residual\.6\.", ".conv2."),
    (r"^(encoder|decoder)\.head\.0\.", r"\1.head.norm."),
    (r"^(encoder|decoder)\.head\.2\.", r"\1.head.conv."),
    (r"\.resample\.1\.", ".conv."),
]

_TO_WAN: list[tuple[str, str]] = [
    (r"\.norm1\.gamma$", ".residual.0.gamma"),
    (r"\.conv1\.(weight|bias)$", r".residual.2.\1"),
    (r"\.norm2\.gamma$", ".residual.3.gamma"),
    (r"\.conv2\.(weight|bias)$", r".residual.6.\1"),
    (r"^(encoder|decoder)\.head\.norm\.", r"\1.head.0."),
    (r"^(encoder|decoder)\.head\.conv\.", r"\1.head.2."),
    # a resample's conv: in Wan2.1's flat stage lists, or inside Wan2.2's stages
    (r"^((?:encoder|decoder)\.\w+\.\d+(?:\.\w+\.\d+)?)\.conv\.", r"\1.resample.1."),
]

# Keys no rule touches in either direction (same name in both layouts).
_WAN_SAME = re.compile(
    r"^(conv[12]\.|(encoder|decoder)\.conv1\.|.*\.shortcut\.|.*\.time_conv\.|"
    r"(encoder|decoder)\.middle\.1\.|.*\.(to_qkv|proj|norm)\.)"
)


def from_wan(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan2.1 original release (Wan2.1_VAE.pth) state dict -> kino VideoVAE state dict (same tensors)."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        new = _rename(key, _FROM_WAN)
        if new == key and not _WAN_SAME.match(key):
            unknown.append(key)
        out[new] = value
    if unknown:
        raise ValueError(f"keys not in the layout of Wan2.1's VAE: {unknown[:8]}")
    return out


def to_wan(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kino VideoVAE state dict -> Wan2.1 original release state dict (same tensors)."""
    # the quant convs conv1/conv2 and encoder/decoder.conv1 sit at the top: no rule matches them
    return {(key if re.match(r"^(conv[12]|(encoder|decoder)\.conv1)\.", key) else _rename(key, _TO_WAN)): value
            for key, value in state_dict.items()}


def config_from_wan(state_dict: dict[str, torch.Tensor]) -> VAEConfig:
    """The VAEConfig a Wan2.1-layout VAE state dict was built with, read off its shapes.

    Wan ships no config for its VAE (the released one is `VAE_SIZES["wan2.1"]`); reading
    the widths, block counts and temporal downsampling from the tensors also takes smaller
    models of the same family. Latent statistics are Wan2.1's (they are fixed in Wan's code).
    """
    wan = VAE_SIZES["wan2.1"]
    try:
        base_dim = state_dict["encoder.conv1.weight"].shape[0]
        z_dim = state_dict["conv1.weight"].shape[0] // 2
    except KeyError as e:
        raise ValueError(f"not a Wan2.1 VAE state dict: {e.args[0]} is missing") from None
    if any(k.startswith("encoder.downsamples.0.downsamples.") for k in state_dict):
        return _config_from_wan22(state_dict, base_dim, z_dim)
    layers = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"^encoder\.downsamples\.(\d+)\.", k))})
    widths, temporal, res_blocks, blocks_in_stage = [], [], set(), 0
    for i in layers:
        prefix = f"encoder.downsamples.{i}."
        if prefix + "resample.1.weight" in state_dict:  # end of a stage
            temporal.append(prefix + "time_conv.weight" in state_dict)
            res_blocks.add(blocks_in_stage)
            blocks_in_stage = 0
        elif prefix + "residual.6.weight" in state_dict:
            if blocks_in_stage == 0:
                widths.append(state_dict[prefix + "residual.6.weight"].shape[0])
            blocks_in_stage += 1
        else:
            raise ValueError(f"Wan2.1 VAE layer encoder.downsamples.{i} is neither a residual block nor a "
                             "resample (attention inside stages, attn_scales, is not supported)")
    res_blocks.add(blocks_in_stage)
    if len(res_blocks) != 1 or not widths or any(w % base_dim for w in widths):
        raise ValueError("the Wan2.1 VAE state dict's encoder stages do not form a VAEConfig")
    if z_dim != len(wan.latents_mean):
        raise ValueError(f"a Wan2.1 VAE has {len(wan.latents_mean)} latent channels; this one has {z_dim}")
    return VAEConfig(
        base_dim=base_dim,
        z_dim=z_dim,
        dim_mult=[w // base_dim for w in widths],
        num_res_blocks=res_blocks.pop(),
        attn_scales=[],
        temporal_downsample=temporal,
        mid_attention=True,
        dropout=0.0,
        latents_mean=list(wan.latents_mean),
        latents_std=list(wan.latents_std),
    )


def _config_from_wan22(state_dict: dict[str, torch.Tensor], base_dim: int, z_dim: int) -> VAEConfig:
    """config_from_wan for Wan2.2's VAE (Wan2.2_VAE.pth): residual stages, 2x2 pixel patches."""
    wan = VAE_SIZES["wan2.2"]
    stages = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"^encoder\.downsamples\.(\d+)\.", k))})
    widths, temporal, res_blocks = [], [], set()
    for i in stages:
        prefix = f"encoder.downsamples.{i}.downsamples."
        inner = sorted({int(m.group(1)) for k in state_dict if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})
        resnets = [j for j in inner if f"{prefix}{j}.residual.6.weight" in state_dict]
        if not resnets:
            raise ValueError(f"Wan2.2 VAE stage encoder.downsamples.{i} has no residual blocks")
        widths.append(state_dict[f"{prefix}{resnets[0]}.residual.6.weight"].shape[0])
        res_blocks.add(len(resnets))
        if i < len(stages) - 1:
            temporal.append(f"{prefix}{len(resnets)}.time_conv.weight" in state_dict)
    patch = round((state_dict["encoder.conv1.weight"].shape[1] // 3) ** 0.5)
    if len(res_blocks) != 1 or any(w % base_dim for w in widths) or 3 * patch**2 != state_dict[
            "encoder.conv1.weight"].shape[1]:
        raise ValueError("the Wan2.2 VAE state dict's encoder stages do not form a VAEConfig")
    dim_mult = [w // base_dim for w in widths]
    stats = (list(wan.latents_mean), list(wan.latents_std)) if z_dim == wan.z_dim else ([0.0] * z_dim, [1.0] * z_dim)
    return VAEConfig(base_dim=base_dim, decoder_base_dim=state_dict["decoder.conv1.weight"].shape[0] // dim_mult[-1],
                     z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=res_blocks.pop(), temporal_downsample=temporal,
                     mid_attention=True, latents_mean=stats[0], latents_std=stats[1], residual=True, patch_size=patch)


def config_from_diffusers(diffusers_config: dict) -> VAEConfig:
    """A diffusers AutoencoderKLWan config.json (as a dict) -> VAEConfig.

    Keys diffusers left out take diffusers' defaults, which are Wan2.1's. A separate decoder
    width (`decoder_base_dim`) is kino's too, and so is Wan2.2's VAE (`is_residual` stages,
    pixels folded `patch_size` x `patch_size` into 3 p^2 input and output channels).
    """
    wan = VAE_SIZES["wan2.1"]
    defaults = {
        "base_dim": wan.base_dim,
        "decoder_base_dim": None,
        "z_dim": wan.z_dim,
        "dim_mult": wan.dim_mult,
        "num_res_blocks": wan.num_res_blocks,
        "attn_scales": wan.attn_scales,
        "temperal_downsample": wan.temporal_downsample,
        "dropout": wan.dropout,
        "latents_mean": wan.latents_mean,
        "latents_std": wan.latents_std,
        "is_residual": False,
        "in_channels": 3,
        "out_channels": 3,
        "patch_size": None,
    }
    c = {**defaults, **diffusers_config}
    patch = c["patch_size"] or 1
    unsupported = {
        "in_channels / out_channels other than 3 x patch_size^2":
            (c["in_channels"], c["out_channels"]) != (3 * patch**2,) * 2,
        # diffusers drops attn_scales in its decoder, Wan does not: the layouts would disagree.
        "attn_scales": bool(c["attn_scales"]),
    }
    bad = [name for name, value in unsupported.items() if value]
    if bad:
        raise ValueError(f"diffusers AutoencoderKLWan config not supported by kino's VideoVAE (Wan2.1 family): {bad}")
    return VAEConfig(
        base_dim=c["base_dim"],
        decoder_base_dim=c["decoder_base_dim"],
        z_dim=c["z_dim"],
        dim_mult=list(c["dim_mult"]),
        num_res_blocks=c["num_res_blocks"],
        attn_scales=[],
        temporal_downsample=list(c["temperal_downsample"]),
        mid_attention=True,
        dropout=c["dropout"],
        latents_mean=list(c["latents_mean"]),
        latents_std=list(c["latents_std"]),
        residual=bool(c["is_residual"]),
        patch_size=patch,
    )
