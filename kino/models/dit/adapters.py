"""State-dict adapters between kino's DiT and third-party layouts.

kino keeps the names of Wan2.1's original release, so its checkpoints load as they are.
diffusers' `WanTransformer3DModel` holds the same tensors under other names: its attention
projections are to_q/to_k/to_v/to_out.0 inside attn1 (self) and attn2 (cross), its
cross-attention norm is `norm2` (Wan's `norm3`), its modulation tables are
`scale_shift_table`, and the embeddings sit in `condition_embedder`. Image-to-video DiTs
(I2V, FLF2V) add the CLIP image embedder `condition_embedder.image_embedder.{norm1,
ff.net.0.proj, ff.net.2, norm2, pos_embed}` (Wan: `img_emb.{proj.0, proj.1, proj.3, proj.4,
emb_pos}`) and per block `attn2.{add_k_proj, add_v_proj, norm_added_k}` (Wan:
`cross_attn.{k_img, v_img, norm_k_img}`). VACE DiTs (`WanVACETransformer3DModel`) add
`vace_patch_embedding` (same name) and `vace_blocks.N`, named like blocks, with `proj_in` /
`proj_out` for Wan's `before_proj` / `after_proj`. The renames are regex rules applied in order;
shapes are identical, so no tensor is touched.

Wan2.1's original release (`diffusion_pytorch_model*.safetensors` beside a `WanModel`
config.json) has kino's names already: `from_wan` only checks that every key is one
kino's DiT has.
"""

from __future__ import annotations

import re

import torch

from kino.models.dit.model import DIT_SIZES, INTEGER_ROPE, DiTConfig

_BLOCK = r"^((?:vace_)?blocks\.\d+)"  # a main block, or a VACE one (the same layers)

WAN_MODEL_TYPES = ("t2v", "i2v", "flf2v", "ti2v")  # ti2v: Wan2.2 TI2V-5B, no image branch
WAN_CLIP_DIM = 1280  # width of the CLIP ViT-H/14 features every Wan2.1 I2V / FLF2V DiT takes
WAN_FLF_IMAGE_TOKENS = 2 * 257  # FLF2V's emb_pos: the first and the last frame's CLIP tokens

# Applied in order to every key; each rule sees the output of the ones before it.
_FROM_DIFFUSERS: list[tuple[str, str]] = [
    (r"^condition_embedder\.(text|time)_embedder\.linear_1\.", r"\1_embedding.0."),
    (r"^condition_embedder\.(text|time)_embedder\.linear_2\.", r"\1_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^condition_embedder\.image_embedder\.pos_embed$", "img_emb.emb_pos"),
    (_BLOCK + r"\.attn1\.", r"\1.self_attn."),
    (_BLOCK + r"\.attn2\.", r"\1.cross_attn."),
    (_BLOCK + r"\.(self_attn|cross_attn)\.to_([qkv])\.", r"\1.\2.\3."),
    (_BLOCK + r"\.(self_attn|cross_attn)\.to_out\.0\.", r"\1.\2.o."),
    (_BLOCK + r"\.cross_attn\.add_([kv])_proj\.", r"\1.cross_attn.\2_img."),
    (_BLOCK + r"\.cross_attn\.norm_added_k\.", r"\1.cross_attn.norm_k_img."),
    (_BLOCK + r"\.norm2\.", r"\1.norm3."),  # diffusers' norm2 is the cross-attention norm
    (_BLOCK + r"\.ffn\.net\.0\.proj\.", r"\1.ffn.0."),
    (_BLOCK + r"\.ffn\.net\.2\.", r"\1.ffn.2."),
    (_BLOCK + r"\.scale_shift_table$", r"\1.modulation"),
    (r"^(vace_blocks\.\d+)\.proj_in\.", r"\1.before_proj."),
    (r"^(vace_blocks\.\d+)\.proj_out\.", r"\1.after_proj."),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
]

_TO_DIFFUSERS: list[tuple[str, str]] = [
    (r"^(text|time)_embedding\.0\.", r"condition_embedder.\1_embedder.linear_1."),
    (r"^(text|time)_embedding\.2\.", r"condition_embedder.\1_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^img_emb\.proj\.0\.", "condition_embedder.image_embedder.norm1."),
    (r"^img_emb\.proj\.1\.", "condition_embedder.image_embedder.ff.net.0.proj."),
    (r"^img_emb\.proj\.3\.", "condition_embedder.image_embedder.ff.net.2."),
    (r"^img_emb\.proj\.4\.", "condition_embedder.image_embedder.norm2."),
    (r"^img_emb\.emb_pos$", "condition_embedder.image_embedder.pos_embed"),
    (_BLOCK + r"\.cross_attn\.([kv])_img\.", r"\1.cross_attn.add_\2_proj."),
    (_BLOCK + r"\.cross_attn\.norm_k_img\.", r"\1.cross_attn.norm_added_k."),
    (_BLOCK + r"\.self_attn\.", r"\1.attn1."),
    (_BLOCK + r"\.cross_attn\.", r"\1.attn2."),
    (_BLOCK + r"\.(attn[12])\.([qkv])\.", r"\1.\2.to_\3."),
    (_BLOCK + r"\.(attn[12])\.o\.", r"\1.\2.to_out.0."),
    (_BLOCK + r"\.norm3\.", r"\1.norm2."),
    (_BLOCK + r"\.ffn\.0\.", r"\1.ffn.net.0.proj."),
    (_BLOCK + r"\.ffn\.2\.", r"\1.ffn.net.2."),
    (_BLOCK + r"\.modulation$", r"\1.scale_shift_table"),
    (r"^(vace_blocks\.\d+)\.before_proj\.", r"\1.proj_in."),
    (r"^(vace_blocks\.\d+)\.after_proj\.", r"\1.proj_out."),
    (r"^head\.head\.", "proj_out."),
    (r"^head\.modulation$", "scale_shift_table"),
]

# Keys that are the same in both layouts.
_SHARED = re.compile(r"^(vace_)?patch_embedding\.(weight|bias)$")
# diffusers' I2V checkpoints may hold a `norm_added_q` per block that no computation uses
# (diffusers' own loader ignores it: `_keys_to_ignore_on_load_unexpected`); so does kino.
_DIFFUSERS_UNUSED = re.compile(r"^blocks\.\d+\.attn2\.norm_added_q\.(weight|bias)$")
# Every key of a kino (= Wan2.1 original) DiT: T2V, and I2V / FLF2V's image branch.
_WAN_KEY = re.compile(
    r"^((vace_)?patch_embedding\.(weight|bias)|(text|time)_embedding\.[02]\.(weight|bias)"
    r"|time_projection\.1\.(weight|bias)|img_emb\.(proj\.[0134]\.(weight|bias)|emb_pos)"
    r"|vace_blocks\.\d+\.(before|after)_proj\.(weight|bias)"
    r"|(vace_)?blocks\.\d+\.((self|cross)_attn\.([qkvo]|norm_[qk])\.(weight|bias)"
    r"|cross_attn\.([kv]_img|norm_k_img)\.(weight|bias)"
    r"|norm3\.(weight|bias)|ffn\.[02]\.(weight|bias)|modulation)|head\.(head\.(weight|bias)|modulation))$"
)


def _rename(key: str, rules: list[tuple[str, str]]) -> tuple[str, bool]:
    """The key after every rule, and whether any rule changed it."""
    new = key
    for pattern, replacement in rules:
        new = re.sub(pattern, replacement, new)
    return new, new != key


def _convert(state_dict: dict[str, torch.Tensor], rules: list[tuple[str, str]], source: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unknown = []
    to_kino = source == "diffusers"
    for key, value in state_dict.items():
        new, renamed = _rename(key, rules)
        # a block-level rule renames any key under a block: the kino-side name must also be one of kino's
        if (not renamed and not _SHARED.match(key)) or not _WAN_KEY.match(new if to_kino else key):
            unknown.append(key)
        out[new] = value
    if unknown:
        raise ValueError(f"keys not in the {source} layout of a Wan2.1 DiT: {unknown[:8]}")
    return out


def _reject_abs_pos(state_dict: dict[str, torch.Tensor], target: str) -> None:
    if any(k.startswith("pos_embedding.") for k in state_dict):
        raise ValueError(f"this DiT has kino's absolute-position embedding (abs_pos_embed), which {target} "
                         "does not have: it cannot be converted")


def diffusers_param_name(key: str) -> str:
    """kino's (= Wan's) name of one parameter named the diffusers way (unchanged if shared)."""
    return _rename(key, _FROM_DIFFUSERS)[0]


def diffusers_name(key: str) -> str:
    """diffusers' name of one kino (= Wan) parameter (unchanged if shared)."""
    return _rename(key, _TO_DIFFUSERS)[0]


def from_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers WanTransformer3DModel (Wan2.1 T2V, I2V, FLF2V) state dict -> kino DiT state dict
    (same tensors; unused `norm_added_q` weights are dropped, as diffusers does)."""
    used = {k: v for k, v in state_dict.items() if not _DIFFUSERS_UNUSED.match(k)}
    return _convert(used, _FROM_DIFFUSERS, "diffusers")


def to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kino DiT state dict -> diffusers WanTransformer3DModel state dict (same tensors)."""
    _reject_abs_pos(state_dict, "diffusers' WanTransformer3DModel")
    if not any(".self_attn.norm_q." in k for k in state_dict):
        # diffusers builds the q/k RMSNorms whatever its qk_norm says: no layout without them.
        raise ValueError(
            "diffusers' WanTransformer3DModel always has q/k norms; a qk_norm=False DiT cannot be converted"
        )
    return _convert(state_dict, _TO_DIFFUSERS, "kino")


def from_wan(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan2.1 original release (WanModel: T2V, I2V, FLF2V) state dict -> kino DiT state dict: the
    same dict, checked. Unknown keys raise ValueError."""
    unknown = [k for k in state_dict if not _WAN_KEY.match(k)]
    if unknown:
        raise ValueError(f"keys not in the Wan2.1 layout of a DiT (WanModel t2v/i2v/flf2v): {unknown[:8]}")
    return dict(state_dict)


def to_wan(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kino DiT state dict -> Wan2.1 original release state dict (the same names)."""
    _reject_abs_pos(state_dict, "Wan2.1's WanModel")
    return from_wan(state_dict)


def config_from_wan(wan_config: dict) -> DiTConfig:
    """A Wan2.1 original `WanModel` config.json (as a dict) -> DiTConfig.

    WanModel leaves patch_size, text_dim, qk_norm, cross_attn_norm and window_size out of
    its config.json (they take the class defaults, listed here); keys starting with "_"
    are ignored. Model types t2v, i2v and flf2v: the image branch of i2v/flf2v is Wan's
    `MLPProj(1280, dim)` (CLIP ViT-H/14 features, a width WanModel does not make a
    parameter), flf2v's with a position over 2 x 257 image tokens.
    """
    defaults = {
        "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 512, "in_dim": 16, "dim": 2048,
        "ffn_dim": 8192, "freq_dim": 256, "text_dim": 4096, "out_dim": 16, "num_heads": 16,
        "num_layers": 32, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
    }  # WanModel's signature defaults
    config = {k: v for k, v in wan_config.items() if not k.startswith("_")}
    # VACE (VaceWanModel: its class name, model_type "vace" or its own keys): a T2V DiT plus the
    # VACE branch; its defaults are every other block and the DiT's own input width
    vace = wan_config.get("_class_name") == "VaceWanModel" or config.get("model_type") == "vace" \
        or "vace_layers" in config or "vace_in_dim" in config
    if vace:
        defaults.update(vace_layers=None, vace_in_dim=None)
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise ValueError(f"keys not in a Wan2.1 WanModel config: {unknown}")
    c = {**defaults, **config}
    if vace:
        if c["model_type"] not in ("t2v", "vace"):
            raise ValueError(f"a VACE DiT is a text-to-video one; got model_type {c['model_type']!r}")
        c["model_type"] = "t2v"
        layers = c["vace_layers"] if c["vace_layers"] is not None else range(0, c["num_layers"], 2)
        vace_fields = dict(vace_layers=tuple(layers),
                           vace_in_channels=c["vace_in_dim"] if c["vace_in_dim"] is not None else c["in_dim"])
    else:
        vace_fields = {}
    if c["model_type"] not in WAN_MODEL_TYPES:
        raise ValueError(f"Wan2.1 model_type {c['model_type']!r} is not supported by kino's DiT "
                         f"(only {', '.join(map(repr, WAN_MODEL_TYPES))})")
    if tuple(c["window_size"]) != (-1, -1):
        raise ValueError(f"Wan2.1 local attention (window_size {c['window_size']}) is not supported by kino's DiT")
    if not c["qk_norm"]:
        raise ValueError("Wan2.1 DiTs without q/k norms are not supported")
    return DiTConfig(
        patch_size=tuple(c["patch_size"]),
        in_channels=c["in_dim"],
        out_channels=c["out_dim"],
        dim=c["dim"],
        ffn_dim=c["ffn_dim"],
        freq_dim=c["freq_dim"],
        text_dim=c["text_dim"],
        num_heads=c["num_heads"],
        num_layers=c["num_layers"],
        qk_norm=True,
        cross_attn_norm=c["cross_attn_norm"],
        eps=c["eps"],
        rope_max_len=1024,  # Wan's rope_params(1024, ...)
        img_dim=None if c["model_type"] in ("t2v", "ti2v") else WAN_CLIP_DIM,
        img_pos_len=WAN_FLF_IMAGE_TOKENS if c["model_type"] == "flf2v" else None,
        **vace_fields,
    )


def config_to_wan(config: DiTConfig) -> dict:
    """DiTConfig -> a Wan2.1 original `WanModel` config.json dict (raises ValueError for a DiT
    WanModel cannot build: kino's absolute positions, no q/k norms, another rope length, or
    an image branch other than Wan's)."""
    if config.abs_pos_embed:
        raise ValueError("a DiT with kino's absolute-position embedding has no WanModel config")
    if not config.qk_norm or config.rope_max_len != 1024 or config.rope_theta != 10000.0 \
            or config.rope_scale != INTEGER_ROPE:
        raise ValueError("WanModel always has q/k norms and RoPE over 1024 integer positions with theta 10000")
    if config.img_dim is None:
        model_type = "t2v"
    elif config.img_dim == WAN_CLIP_DIM and config.img_pos_len in (None, WAN_FLF_IMAGE_TOKENS):
        model_type = "i2v" if config.img_pos_len is None else "flf2v"
    else:
        raise ValueError(f"WanModel's image branch takes {WAN_CLIP_DIM}-wide features (and {WAN_FLF_IMAGE_TOKENS} "
                         f"positions for flf2v); got img_dim {config.img_dim}, img_pos_len {config.img_pos_len}")
    vace = {}
    if config.vace_layers:
        if model_type != "t2v":
            raise ValueError("a VACE DiT is a text-to-video one: it has no image branch")
        model_type = "vace"
        vace = {"vace_layers": list(config.vace_layers), "vace_in_dim": config.vace_in_channels}
    return {
        "_class_name": "VaceWanModel" if vace else "WanModel", "model_type": model_type,
        "patch_size": list(config.patch_size),
        "text_len": 512, "in_dim": config.in_channels, "dim": config.dim, "ffn_dim": config.ffn_dim,
        "freq_dim": config.freq_dim, "text_dim": config.text_dim, "out_dim": config.out_channels,
        "num_heads": config.num_heads, "num_layers": config.num_layers, "qk_norm": True,
        "cross_attn_norm": config.cross_attn_norm, "eps": config.eps, **vace,
    }


def config_from_diffusers(diffusers_config: dict) -> DiTConfig:
    """A diffusers WanTransformer3DModel config.json (as a dict) -> DiTConfig.

    Keys diffusers left out take its defaults (Wan2.1 14B's); keys starting with "_"
    (class name, version) are ignored. Image-to-video variants: `image_dim` is kino's
    `img_dim`, `pos_embed_seq_len` its `img_pos_len` (FLF2V), and `added_kv_proj_dim` must
    be the model width (Wan's k_img / v_img take the embedded image tokens).
    """
    wan = DIT_SIZES["wan2.1-14b"]
    defaults = {
        "patch_size": wan.patch_size,
        "num_attention_heads": wan.num_heads,
        "attention_head_dim": wan.head_dim,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": wan.text_dim,
        "freq_dim": wan.freq_dim,
        "ffn_dim": wan.ffn_dim,
        "num_layers": wan.num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": wan.eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": wan.rope_max_len,
        "pos_embed_seq_len": None,
    }
    # WanVACETransformer3DModel: its class name or its own keys (its defaults are VACE-14B's)
    vace = diffusers_config.get("_class_name") == "WanVACETransformer3DModel" or "vace_layers" in diffusers_config
    if vace:
        defaults.update(vace_layers=[0, 5, 10, 15, 20, 25, 30, 35], vace_in_channels=96)
    c = {**defaults, **{k: v for k, v in diffusers_config.items() if not k.startswith("_")}}
    dim = c["num_attention_heads"] * c["attention_head_dim"]
    image = c["image_dim"] is not None
    unsupported = {
        # Wan's I2V cross-attention: both or neither, the added keys/values as wide as the model
        "image_dim without added_kv_proj_dim": image and c["added_kv_proj_dim"] is None,
        f"added_kv_proj_dim other than the width {dim}": c["added_kv_proj_dim"] not in (None, dim),
        "added_kv_proj_dim without image_dim": not image and c["added_kv_proj_dim"] is not None,
        # diffusers builds q/k RMSNorms across heads for None too; any other kind would be new.
        "qk_norm": c["qk_norm"] not in ("rms_norm_across_heads", None),
    }
    bad = [name for name, value in unsupported.items() if value]
    if bad:
        raise ValueError(
            f"diffusers WanTransformer3DModel config not supported by kino's DiT (Wan2.1 family): {bad}"
        )
    return DiTConfig(
        patch_size=tuple(c["patch_size"]),
        in_channels=c["in_channels"],
        out_channels=c["out_channels"] or c["in_channels"],
        dim=dim,
        ffn_dim=c["ffn_dim"],
        freq_dim=c["freq_dim"],
        text_dim=c["text_dim"],
        num_heads=c["num_attention_heads"],
        num_layers=c["num_layers"],
        qk_norm=True,
        cross_attn_norm=c["cross_attn_norm"],
        eps=c["eps"],
        rope_max_len=c["rope_max_seq_len"],
        img_dim=c["image_dim"],
        # without an image embedder diffusers builds no position either: nothing to carry
        img_pos_len=c["pos_embed_seq_len"] if image else None,
        **({"vace_layers": tuple(c["vace_layers"]), "vace_in_channels": c["vace_in_channels"]} if vace else {}),
    )


def config_to_diffusers(config: DiTConfig) -> dict:
    """DiTConfig -> a diffusers WanTransformer3DModel config.json dict (no "_" keys); raises
    ValueError for a DiT diffusers cannot build (kino's absolute positions, no q/k norms)."""
    if config.abs_pos_embed:
        raise ValueError("a DiT with kino's absolute-position embedding has no WanTransformer3DModel config")
    if not config.qk_norm or config.rope_theta != 10000.0 or config.rope_scale != INTEGER_ROPE:
        raise ValueError("WanTransformer3DModel always has q/k norms and RoPE theta 10000 over integer positions")
    return {
        "patch_size": list(config.patch_size), "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim, "in_channels": config.in_channels,
        "out_channels": config.out_channels, "text_dim": config.text_dim, "freq_dim": config.freq_dim,
        "ffn_dim": config.ffn_dim, "num_layers": config.num_layers, "cross_attn_norm": config.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads", "eps": config.eps, "image_dim": config.img_dim,
        "added_kv_proj_dim": None if config.img_dim is None else config.dim,
        "rope_max_seq_len": config.rope_max_len, "pos_embed_seq_len": config.img_pos_len,
        **({"vace_layers": list(config.vace_layers), "vace_in_channels": config.vace_in_channels}
           if config.vace_layers else {}),
    }
