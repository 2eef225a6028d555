"""CLIP image encoder (Wan2.1 I2V / FLF2V's ViT-H/14) through `transformers`, from local files only.

    encoder = CLIPImageEncoder.from_folder("image_encoder", "image_processor")
    features = encoder.encode(images)   # images (B, 3, H, W) in [-1, 1] -> (B, 257, 1280) float32

What Wan's image-to-video DiTs take is the penultimate layer's hidden states of the vision
transformer (all 257 tokens: class token + 16 x 16 patches, before the last block and the
post-layernorm): Wan's `clip.visual(..., use_31_block=True)`, diffusers'
`image_encoder(...).hidden_states[-2]`.

Preprocessing is done here in torch, the way diffusers' WanImageToVideoPipeline does it with
transformers' `CLIPImageProcessor` (preprocessor_config.json of `image_processor/`): pixels
to 0..255, the shortest edge resized to `size` (bicubic, antialiased; the other edge
truncated to int as transformers does) in PIL's way (two 1-D passes, width first, each
rounded to 8 bits), the center `crop` x `crop` cut out, then scaled to [0, 1] and normalised
with CLIP's mean and std. torch's antialiased bicubic is PIL's kernel but not PIL's
fixed-point arithmetic: where a resize happens, under 1% of the pixels land one 8-bit level
(rarely two) from PIL's. An image already `size` on its short side is not resampled at all,
so it is exact.

Wan's original code instead squashes any image to 224 x 224 (bicubic without antialiasing, no
crop): `resize="squash"` does that, and is what `from_wan` uses.

Two weight layouts load: a transformers `CLIPVisionModel` folder (diffusers' `image_encoder/`)
and Wan's original `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` (Wan's own CLIP
module names; only its vision tower is read, `textual.*` is skipped), whose keys
`clip_from_wan` maps onto transformers' CLIPVisionModel (the fused q/k/v projection split in
three; the class and position embeddings reshaped), read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from kino.convert.files import load_pth, rename_key
from kino.errors import KinoUserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's, as in every Wan2.1 image_processor/
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("crop", "squash")
WAN_CLIP_HEADS = 16  # ViT-H/14: 1280 wide, 16 heads of 80


class CLIPImageEncoder:
    """Frozen CLIP vision tower: images (B, 3, H, W) in [-1, 1] -> (B, N, hidden) float32."""

    def __init__(self, model, size: int, crop: int | None, mean=CLIP_MEAN, std=CLIP_STD, resize: str = "crop"):
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}; got {resize!r}")
        self.model = model.eval().requires_grad_(False)
        self.size, self.crop, self.resize = int(size), None if crop is None else int(crop), resize
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.dim = model.config.hidden_size

    @classmethod
    def from_folder(cls, weights: str | Path, processor: str | Path | None = None, *, dtype: str | None = "float32",
                    device: str | torch.device = "cpu", resize: str = "crop") -> CLIPImageEncoder:
        """A transformers `CLIPVisionModel` (or `CLIPVisionModelWithProjection`) folder and,
        optionally, a `CLIPImageProcessor` folder (preprocessor_config.json); without one,
        CLIP's 224 / 224 and mean / std. dtype None keeps the stored dtype."""
        from transformers import CLIPVisionModel

        weights = Path(weights)
        if not (weights / "config.json").is_file():
            raise KinoUserError(f"{weights / 'config.json'} is missing: the CLIP image encoder folder holds "
                                "transformers' config.json and model*.safetensors")
        if dtype is not None and dtype not in DTYPES:
            raise KinoUserError(f"unknown image encoder dtype {dtype!r}: allowed {', '.join(DTYPES)}")
        try:
            model = CLIPVisionModel.from_pretrained(weights, dtype="auto" if dtype is None else DTYPES[dtype],
                                                    local_files_only=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise KinoUserError(f"cannot load the CLIP image encoder from {weights}: {e}") from None
        size, crop, mean, std = read_processor(processor, model.config.image_size)
        return cls(model.to(device), size, crop, mean, std, resize)

    @classmethod
    def from_wan(cls, pth: str | Path, *, num_heads: int = WAN_CLIP_HEADS, dtype: str | None = "float32",
                 device: str | torch.device = "cpu") -> CLIPImageEncoder:
        """Wan's original open-clip checkpoint (its vision tower), with Wan's preprocessing
        (`resize="squash"` to the model's image size). `num_heads` is not in the weights'
        shapes: ViT-H/14 has 16."""
        from transformers import CLIPVisionModel

        wan_state = load_pth(pth)
        try:
            config, state = clip_from_wan(wan_state, num_heads)
        except ValueError as e:
            raise KinoUserError(f"{pth}: {e}") from None
        with torch.device("meta"):
            model = CLIPVisionModel(config)
        if not any(k.startswith("vision_model.") for k in model.state_dict()):  # transformers >= 5 drops it
            state = {k.removeprefix("vision_model."): v for k, v in state.items()}
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise KinoUserError(f"{pth} holds weights that do not fit a CLIP vision tower: {e}") from None
        for name, buffer in list(model.named_buffers()):  # not in state dicts: built on the meta device
            if buffer.is_meta:
                if not name.endswith("position_ids"):
                    raise KinoUserError(f"transformers' CLIPVisionModel has a buffer {name} kino cannot rebuild")
                owner = model.get_submodule(name.rpartition(".")[0])
                owner.register_buffer("position_ids", torch.arange(buffer.shape[-1]).expand(buffer.shape),
                                      persistent=False)
        if dtype is not None and dtype not in DTYPES:
            raise KinoUserError(f"unknown image encoder dtype {dtype!r}: allowed {', '.join(DTYPES)}")
        model = model.to(device) if dtype is None else model.to(device=device, dtype=DTYPES[dtype])
        return cls(model, config.image_size, None, CLIP_MEAN, CLIP_STD, resize="squash")

    def reference(self) -> dict:
        """image_encoder/config.json of a kino folder whose CLIP weights live in clip/."""
        dtype = {v: k for k, v in DTYPES.items()}[next(self.model.parameters()).dtype]
        return {"kind": "clip", "weights": "clip", "size": self.size, "crop": self.crop, "mean": list(self.mean),
                "std": list(self.std), "resize": self.resize, "dtype": dtype, "dim": self.dim}

    @classmethod
    def from_reference(cls, reference: dict, folder: str | Path, *, device: str | torch.device = "cpu",
                       dtype: str | None = None) -> CLIPImageEncoder:
        known = {"kind", "weights", "size", "crop", "mean", "std", "resize", "dtype", "dim"}
        unknown = sorted(set(reference) - known)
        if reference.get("kind") != "clip" or unknown:
            raise KinoUserError(f"{Path(folder) / 'config.json'} is not a kino CLIP image encoder reference "
                                f"(kind {reference.get('kind')!r}, unknown keys {unknown})")
        encoder = cls.from_folder(Path(folder) / reference["weights"], None, device=device,
                                  dtype=dtype or reference.get("dtype"), resize=reference.get("resize", "crop"))
        encoder.size, encoder.crop = reference["size"], reference["crop"]
        encoder.mean, encoder.std = tuple(reference["mean"]), tuple(reference["std"])
        return encoder

    def save(self, folder: str | Path) -> None:
        """Weights (transformers layout, safetensors) into folder/clip."""
        self.model.save_pretrained(Path(folder) / "clip")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> CLIP's pixel_values (B, 3, S, S), float32 (module doc)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise KinoUserError(f"images must be (B, 3, H, W) in [-1, 1]; got shape {tuple(images.shape)}")
        x = images.float()
        if self.resize == "squash":  # Wan's clip.visual: straight to size x size
            if x.shape[-2:] != (self.size, self.size):
                x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
            x = x.mul(0.5).add(0.5)
        else:
            x = ((x + 1) * 127.5).round().clamp(0, 255)  # the 8-bit image CLIPImageProcessor starts from
            h, w = x.shape[-2:]
            short, long = min(h, w), max(h, w)
            new_long = int(self.size * long / short)
            new_h, new_w = (self.size, new_long) if h <= w else (new_long, self.size)
            # PIL resamples in two passes, width first, each back to 8 bits (clipping the bicubic
            # overshoot in between); so does this, or sharp edges would differ by many levels.
            if new_w != w:
                x = _bicubic(x, (h, new_w))
            if new_h != h:
                x = _bicubic(x, (new_h, new_w))
            if self.crop is not None:
                h, w = x.shape[-2:]
                if self.crop > min(h, w):
                    raise KinoUserError(f"CLIP crop {self.crop} is larger than the resized image {h}x{w}")
                top, left = int((h - self.crop) / 2.0), int((w - self.crop) / 2.0)
                x = x[..., top : top + self.crop, left : left + self.crop]
            x = x / 255.0
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> penultimate hidden states (B, N, hidden), float32, on the
        encoder's device."""
        weight = next(self.model.parameters())
        pixels = self.preprocess(images.to(self.device)).to(weight.dtype)
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[-2].float()


# Wan's CLIP vision tower (wan/modules/clip.py, VisionTransformer under `visual.`) -> transformers'
# CLIPVisionModel, per block N (to_qkv is split separately).
_CLIP_FROM_WAN: list[tuple[str, str]] = [
    (r"^visual\.patch_embedding\.weight$", "vision_model.embeddings.patch_embedding.weight"),
    (r"^visual\.pre_norm\.(weight|bias)$", r"vision_model.pre_layrnorm.\1"),
    (r"^visual\.post_norm\.(weight|bias)$", r"vision_model.post_layernorm.\1"),
    (r"^visual\.transformer\.(\d+)\.norm1\.(weight|bias)$", r"vision_model.encoder.layers.\1.layer_norm1.\2"),
    (r"^visual\.transformer\.(\d+)\.norm2\.(weight|bias)$", r"vision_model.encoder.layers.\1.layer_norm2.\2"),
    (r"^visual\.transformer\.(\d+)\.attn\.proj\.(weight|bias)$",
     r"vision_model.encoder.layers.\1.self_attn.out_proj.\2"),
    (r"^visual\.transformer\.(\d+)\.mlp\.0\.(weight|bias)$", r"vision_model.encoder.layers.\1.mlp.fc1.\2"),
    (r"^visual\.transformer\.(\d+)\.mlp\.2\.(weight|bias)$", r"vision_model.encoder.layers.\1.mlp.fc2.\2"),
]
_QKV = re.compile(r"^visual\.transformer\.(\d+)\.attn\.to_qkv\.(weight|bias)$")


def clip_from_wan(state_dict: dict[str, Tensor], num_heads: int = WAN_CLIP_HEADS):
    """Wan's open-clip XLM-RoBERTa ViT-H/14 state dict -> (transformers CLIPVisionConfig, a
    CLIPVisionModel state dict). The text tower (`textual.*`), `log_scale` and the projection
    `visual.head` are left out (the image features are taken before them). Sizes are read off
    the shapes; GELU (exact) and LayerNorm eps 1e-5 are Wan's."""
    from transformers import CLIPVisionConfig

    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key.startswith("textual.") or key in ("log_scale", "visual.head"):
            continue
        if key == "visual.cls_embedding":
            out["vision_model.embeddings.class_embedding"] = value.reshape(-1)
            continue
        if key == "visual.pos_embedding":
            out["vision_model.embeddings.position_embedding.weight"] = value.reshape(value.shape[-2], value.shape[-1])
            continue
        m = _QKV.match(key)
        if m:
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"vision_model.encoder.layers.{m.group(1)}.self_attn.{name}_proj.{m.group(2)}"] = part
            continue
        new = rename_key(key, _CLIP_FROM_WAN)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(f"keys not in the layout of Wan2.1's CLIP vision tower: {unknown[:8]}")
    try:
        patch = out["vision_model.embeddings.patch_embedding.weight"]
        positions = out["vision_model.embeddings.position_embedding.weight"].shape[0]
        fc1 = out["vision_model.encoder.layers.0.mlp.fc1.weight"]
    except KeyError as e:
        raise ValueError(f"not a Wan2.1 CLIP checkpoint: the vision tower lacks {e.args[0]}") from None
    hidden, patch_size = patch.shape[0], patch.shape[-1]
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1 or hidden % num_heads:
        raise ValueError(f"a CLIP vision tower with {positions} positions, {hidden} wide, {num_heads} heads "
                         "is not a square ViT")
    layers = 1 + max(int(k.split(".")[3]) for k in out if k.startswith("vision_model.encoder.layers."))
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=fc1.shape[0], num_hidden_layers=layers,
                              num_attention_heads=num_heads, image_size=grid * patch_size, patch_size=patch_size,
                              hidden_act="gelu", layer_norm_eps=1e-5, num_channels=3)
    return config, out


def _bicubic(x: Tensor, size: tuple[int, int]) -> Tensor:
    """PIL's antialiased bicubic resize of 0..255 pixels (one pass), back to 8-bit values."""
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).round().clamp(0, 255)


def read_processor(folder: str | Path | None, image_size: int) -> tuple[int, int | None, tuple, tuple]:
    """(size, crop, mean, std) from a CLIPImageProcessor folder's preprocessor_config.json;
    None: CLIP's defaults at the model's image size."""
    if folder is None:
        return image_size, image_size, CLIP_MEAN, CLIP_STD
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        raise KinoUserError(f"{path} is missing: the CLIP image processor folder holds preprocessor_config.json")
    try:
        c = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise KinoUserError(f"{path} is not readable JSON: {e}") from None
    size = c.get("size", {"shortest_edge": image_size})
    size = size.get("shortest_edge") if isinstance(size, dict) else size
    crop = c.get("crop_size", size)
    crop = crop.get("height") if isinstance(crop, dict) else crop
    if isinstance(c.get("crop_size"), dict) and c["crop_size"].get("height") != c["crop_size"].get("width"):
        raise KinoUserError(f"{path}: only square CLIP crops are supported; got {c['crop_size']}")
    unsupported = {
        "size other than a shortest edge": not isinstance(size, int),
        "resample other than bicubic (3)": c.get("resample", 3) != 3,
        "do_resize false": not c.get("do_resize", True),
        "do_rescale false": not c.get("do_rescale", True),
        "rescale_factor other than 1/255": abs(c.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12,
        "do_normalize false": not c.get("do_normalize", True),
    }
    bad = [name for name, value in unsupported.items() if value]
    if bad:
        raise KinoUserError(f"{path}: CLIP preprocessing kino does not reproduce: {bad}")
    mean = tuple(c.get("image_mean", CLIP_MEAN))
    std = tuple(c.get("image_std", CLIP_STD))
    return size, crop if c.get("do_center_crop", True) else None, mean, std
