"""Wan2.1 (and Wan2.2 T2V-A14B) weights -> kino: read either release layout, build kino's
classes, or write a kino model folder (`kino convert wan SRC DST`).

Wan2.2 T2V-A14B is two Wan2.1-architecture DiTs, a high-noise and a low-noise expert: in the
original layout `high_noise_model/` and `low_noise_model/` (each config.json + shards) beside
the same VAE and UMT5 files; in diffusers' `transformer/` and `transformer_2/`, with
`boundary_ratio` in model_index.json.

Layouts read (T2V-1.3B, T2V-14B, I2V-14B, FLF2V-14B, VACE-1.3B / 14B; found by their files,
not by their folder names; a VACE DiT is told by its config: VaceWanModel, WanVACETransformer3DModel):

    original (Wan-AI/Wan2.1-T2V-*)         diffusers (Wan-AI/Wan2.1-T2V-*-Diffusers)
      config.json          (WanModel)         model_index.json     (WanPipeline)
      diffusion_pytorch_model*.safetensors    transformer/ config.json + diffusion_pytorch_model*.safetensors
      Wan2.1_VAE.pth                          vae/         config.json + diffusion_pytorch_model.safetensors
      models_t5_umt5-xxl-enc-bf16.pth         text_encoder/ config.json + model*.safetensors (UMT5EncoderModel)
      google/umt5-xxl/     (tokenizer)        tokenizer/
    I2V / FLF2V also (CLIP ViT-H/14):
      models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth   image_encoder/ image_processor/

The CLIP image encoder keeps each release's preprocessing: Wan's original code squashes the
image to 224 x 224, diffusers' CLIPImageProcessor resizes its short side and center-crops
(kino/models/clip.py).

`.pth` files are read only with `torch.load(weights_only=True)`. The kino folder written
holds vae/ and dit/ in kino's layout, text_encoder/ with a kino reference config.json
beside the UMT5 weights in transformers' layout (umt5/) and the tokenizer (tokenizer/),
for I2V / FLF2V image_encoder/ (a reference config.json beside the CLIP weights in clip/),
and Wan's recommended generation settings (`wan_defaults()`) in kino.json.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from kino.convert.files import load_pth, load_safetensors, one_line, read_json, shards
from kino.errors import KinoUserError
from kino.models.dit import adapters as dit_adapters
from kino.models.dit.model import DiT, DiTConfig
from kino.models.dit.pretrained import build_dit, read_dit_file
from kino.models.folder import MANIFEST
from kino.models.gguf import GGUFTensor, dequantize_modules
from kino.models.hub import folder_name, resolve_model, weights_replaced
from kino.models.vae import adapters as vae_adapters
from kino.models.vae.model import VAEConfig, VideoVAE

# Wan's default negative prompt (wan/configs/shared_config.py, sample_neg_prompt), verbatim:
# the model was tuned with it, so it is the unconditional branch of classifier-free guidance.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


def wan_defaults(model_type: str = "t2v", boundary: float | None = None):
    """Wan2.1's recommended settings: 81 frames of 832x480 at 16 fps, 50 steps of UniPC
    from t = 0.999 with integer DiT times (as Wan's sampler does), guidance 5, flow shift 5
    (Wan's generate.py for t2v at every size; diffusers' docs suggest 3 at 480p), Wan's
    negative prompt. Image-to-video (Wan's generate.py): i2v 40 steps with shift 3 (its
    choice at 832x480; 5 at 720p), flf2v and VACE shift 16. Wan2.2 T2V-A14B (its t2v_A14B
    config and generate.py): 1280x720, 40 steps, shift 12, the low-noise expert from DiT time
    875 down (`boundary`, which a diffusers folder may set), guidance 4 on the high-noise
    expert's steps and 3 on the low-noise one's; two VACE experts (vace-A14B) the same.
    I2V-A14B: shift 5, boundary 0.9, guidance 3.5 on both. TI2V-5B (one DiT on Wan2.2's VAE):
    121 frames of 1280x704 at 24 fps, 50 steps, shift 5, guidance 5."""
    from kino.pipeline import GenerationDefaults

    if model_type == "ti2v-5B":  # Wan2.2's ti2v_5B config and generate.py
        return GenerationDefaults(frames=121, height=704, width=1280, fps=24.0, steps=50, guidance=5.0,
                                  sampler="unipc", shift=5.0, negative=WAN_NEGATIVE_PROMPT, t_max=0.999,
                                  integer_dit_time=True)
    if model_type in ("t2v-A14B", "i2v-A14B", "vace-A14B"):  # Wan2.2's t2v_A14B / i2v_A14B configs
        t2v = model_type != "i2v-A14B"  # two VACE experts take the T2V experts' settings
        return GenerationDefaults(frames=81, height=720, width=1280, fps=16.0, steps=40, guidance=4.0 if t2v else 3.5,
                                  guidance_2=3.0 if t2v else 3.5, boundary=boundary or (0.875 if t2v else 0.9),
                                  sampler="unipc", shift=12.0 if t2v else 5.0, negative=WAN_NEGATIVE_PROMPT,
                                  t_max=0.999, integer_dit_time=True)
    steps, shift = {"t2v": (50, 5.0), "i2v": (40, 3.0), "flf2v": (50, 16.0), "vace": (50, 16.0)}[model_type]
    return GenerationDefaults(frames=81, height=480, width=832, fps=16.0, steps=steps, guidance=5.0,
                              sampler="unipc", shift=shift, negative=WAN_NEGATIVE_PROMPT, t_max=0.999,
                              integer_dit_time=True)


ORIGINAL_VAE = "Wan2.1_VAE.pth"
ORIGINAL_VAE_22 = "Wan2.2_VAE.pth"  # TI2V-5B's
ORIGINAL_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
ORIGINAL_TOKENIZER = "google/umt5-xxl"
ORIGINAL_CLIP = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
WAN22_HIGH, WAN22_LOW = "high_noise_model", "low_noise_model"  # Wan2.2 A14B's experts (original layout)
DIT_STEM = "diffusion_pytorch_model"


@dataclass
class TextSource:
    """Where the UMT5 weights and tokenizer are: `kind` "wan" (a .pth) or "transformers" (a
    folder); `file`, when set, holds the weights instead (`--text-encoder FILE`: GGUF or
    safetensors), and the folder's own are not needed (nor, from the Hub, downloaded)."""

    kind: str
    weights: Path
    tokenizer: Path
    file: Path | None = None

    def load(self, device: str | torch.device = "cpu", dtype: str | None = "bfloat16"):
        from kino.models.text.umt5 import UMT5Encoder

        if self.file is not None:
            return UMT5Encoder.from_file(self.file, self.tokenizer, dtype=dtype, device=device)
        if self.kind == "wan":
            return UMT5Encoder.from_wan(_need(self.weights, f"the text encoder's weights {self.weights.name} "
                                                                 "(or give --text-encoder FILE)"),
                                        self.tokenizer, dtype=dtype, device=device)
        return UMT5Encoder.from_folder(self.weights, self.tokenizer, dtype=dtype, device=device)


def text_source(root: Path, layout: str) -> TextSource:
    """Where a Wan folder of `layout` ("original" or "diffusers") keeps its UMT5 encoder."""
    if layout == "original":  # the .pth is checked when loaded: another file may stand in for it
        return TextSource("wan", root / ORIGINAL_T5,
                          _need(root / ORIGINAL_TOKENIZER, f"the tokenizer folder {ORIGINAL_TOKENIZER}/"))
    return TextSource("transformers", _need(root / "text_encoder", "text_encoder/ (UMT5)"),
                      _need(root / "tokenizer", "tokenizer/"))


@dataclass
class ImageSource:
    """Where the CLIP image encoder is: `kind` "wan" (Wan's open-clip .pth) or "transformers" (a
    folder, with the image_processor/ folder of its preprocessing settings)."""

    kind: str
    weights: Path
    processor: Path | None = None

    def load(self, device: str | torch.device = "cpu"):
        from kino.models.clip import CLIPImageEncoder

        if self.kind == "wan":
            return CLIPImageEncoder.from_wan(self.weights, dtype="float32", device=device)
        return CLIPImageEncoder.from_folder(self.weights, self.processor, dtype="float32", device=device)


@dataclass
class WanSource:
    """A Wan2.1 folder read into kino's configs and state dicts (the text encoder stays on disk)."""

    root: Path
    layout: str  # "original" | "diffusers"
    dit_config: DiTConfig
    dit_state: dict[str, torch.Tensor]
    dit_file: Path
    vae_config: VAEConfig
    vae_state: dict[str, torch.Tensor]
    vae_file: Path
    text: TextSource
    image: ImageSource | None = None  # I2V / FLF2V
    # Wan2.2 A14B: the low-noise expert (the DiT above is the high-noise one) and the boundary
    # between them (None: Wan's default for the model type)
    dit_2_state: dict[str, torch.Tensor] | None = None
    dit_2_file: Path | None = None
    boundary: float | None = None

    @property
    def model_type(self) -> str:
        return wan_model_type(self.dit_config, self.vae_config, self.dit_2_state is not None)


def wan_model_type(dit: DiTConfig, vae: VAEConfig, experts: bool) -> str:
    """The kind of Wan model a DiT config, a VAE config and the presence of a second expert
    make: t2v / i2v / flf2v / vace (Wan2.1), t2v-A14B / i2v-A14B / vace-A14B (two experts), ti2v-5B
    (Wan2.2's VAE)."""
    if vae.residual:
        return "ti2v-5B"
    if experts:
        if dit.vace_layers:
            return "vace-A14B"  # two VACE experts (Wan2.2-VACE-Fun-A14B in diffusers' layout)
        return "t2v-A14B" if dit.in_channels == dit.out_channels else "i2v-A14B"
    if dit.vace_layers:
        return "vace"
    return "t2v" if dit.img_dim is None else "i2v" if dit.img_pos_len is None else "flf2v"


def detect_layout(root: Path) -> str | None:
    """"kino", "original", "diffusers", or None when the folder is none of them."""
    if (root / MANIFEST).is_file():
        return "kino"
    if (root / "model_index.json").is_file():
        return "diffusers"
    if any((root / f).is_file() for f in (ORIGINAL_VAE, ORIGINAL_VAE_22, ORIGINAL_T5)) or shards(root, DIT_STEM):
        return "original"
    return None


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise KinoUserError(f"{path} is missing: a Wan2.1 folder needs {what}")
    return path


def _adapt(adapter, state: dict, source: Path) -> dict:
    try:
        return adapter(state)
    except ValueError as e:
        raise KinoUserError(f"{source}: {e}") from None


def _config(build, data: dict, source: Path):
    try:
        return build(data)
    except (TypeError, ValueError) as e:
        raise KinoUserError(f"{source} is not a supported Wan2.1 config: {e}") from None


def read_wan(root: str | Path, dit_dtype: torch.dtype = torch.float32,
             dit_files: tuple[Path | None, Path | None] = (None, None)) -> WanSource:
    """Read a Wan2.1 T2V folder (original or diffusers layout) into kino's configs and state
    dicts; the DiT's floating-point weights are converted to `dit_dtype` tensor by tensor as
    they are read (the 14B DiT in bf16 needs 28 GB of RAM, not its 57 GB in fp32).
    `dit_files`: the DiT's (and a two-expert model's second DiT's) weights from these files
    instead (GGUF or safetensors, kino/models/dit/pretrained.py `read_dit_file`); the folder
    then needs only that DiT's config.json."""
    root = Path(root)
    if not root.is_dir():
        raise KinoUserError(f"Wan2.1 folder {root} does not exist")
    layout = detect_layout(root)
    if layout == "original":
        return _read_original(root, dit_dtype, dit_files)
    if layout == "diffusers":
        return _read_diffusers(root, dit_dtype, dit_files)
    if layout == "kino":
        raise KinoUserError(f"{root} is already a kino model folder (it has {MANIFEST})")
    raise KinoUserError(f"{root} is not a Wan2.1 folder: it has neither {ORIGINAL_VAE} + {DIT_STEM}*.safetensors "
                        "(Wan's original release) nor model_index.json (diffusers)")


def _dit_weights(folder: Path, dit_dtype: torch.dtype, override: Path | None, adapter) -> tuple[dict, Path]:
    """A DiT's state dict (kino's names) and its file: the folder's shards, or `override`."""
    if override is not None:
        return read_dit_file(override, dit_dtype), Path(override)
    dit_files = shards(folder, DIT_STEM)
    if not dit_files:
        raise KinoUserError(f"{folder / (DIT_STEM + '.safetensors')} is missing (nor are there shards "
                            f"{DIT_STEM}-*-of-*.safetensors): the folder needs the DiT's weights (or give --dit FILE)")
    return _adapt(adapter, load_safetensors(dit_files, dit_dtype), dit_files[0]), dit_files[0]


def _original_dit(folder: Path, dit_dtype: torch.dtype, override: Path | None = None) -> tuple[DiTConfig, dict, Path]:
    config_file = _need(folder / "config.json", "the DiT's config.json (WanModel)")
    dit_config = _config(dit_adapters.config_from_wan, read_json(config_file), config_file)
    state, file = _dit_weights(folder, dit_dtype, override, dit_adapters.from_wan)
    return dit_config, state, file


def _read_original(root: Path, dit_dtype: torch.dtype, dit_files: tuple = (None, None)) -> WanSource:
    experts = {}
    if (root / WAN22_HIGH).is_dir() or (root / WAN22_LOW).is_dir():  # Wan2.2 A14B: two experts
        for name, override in zip((WAN22_HIGH, WAN22_LOW), dit_files):
            config, state, file = _original_dit(_need(root / name, f"{WAN22_HIGH}/ and {WAN22_LOW}/ (Wan2.2's "
                                                                   "experts)"), dit_dtype, override)
            if config.img_dim is not None and not any(k.startswith("img_emb.") for k in state):
                # Wan2.2 I2V-A14B says model_type "i2v" but has no CLIP branch (it reads the image's
                # latents only): what the weights hold decides
                config = dataclasses.replace(config, img_dim=None, img_pos_len=None)
            experts[name] = (config, state, file)
        dit_config, dit_state, dit_file = experts[WAN22_HIGH]
        _check_experts(dit_config, experts[WAN22_LOW][0], root)
    else:
        _one_dit(root, dit_files)
        dit_config, dit_state, dit_file = _original_dit(root, dit_dtype, dit_files[0])
    vae_config, vae_state, vae_file = _original_vae(root)
    text = text_source(root, "original")
    image = None
    if dit_config.img_dim is not None:
        image = ImageSource("wan", _need(root / ORIGINAL_CLIP, f"the CLIP image encoder {ORIGINAL_CLIP} for its "
                                                               "image-to-video DiT"))
    low = experts.get(WAN22_LOW, (None, None, None))
    return WanSource(root, "original", dit_config, dit_state, dit_file, vae_config, vae_state, vae_file, text,
                     image, dit_2_state=low[1], dit_2_file=low[2])


def _original_vae(root: Path) -> tuple[VAEConfig, dict, Path]:
    vae_file = root / ORIGINAL_VAE_22 if (root / ORIGINAL_VAE_22).is_file() else root / ORIGINAL_VAE
    _need(vae_file, f"the VAE's weights {ORIGINAL_VAE} (or Wan2.2's {ORIGINAL_VAE_22})")
    wan_vae = load_pth(vae_file)
    return _config(vae_adapters.config_from_wan, wan_vae, vae_file), _adapt(vae_adapters.from_wan, wan_vae,
                                                                             vae_file), vae_file


def _diffusers_vae(root: Path) -> tuple[VAEConfig, dict, Path]:
    vdir = _need(root / "vae", "vae/")
    vae_files = shards(vdir, DIT_STEM)
    if not vae_files:
        raise KinoUserError(f"{vdir / (DIT_STEM + '.safetensors')} is missing: vae/ needs its weights")
    vae_config = _config(vae_adapters.config_from_diffusers,
                         {k: v for k, v in read_json(vdir / "config.json").items() if not k.startswith("_")},
                         vdir / "config.json")
    return vae_config, _adapt(vae_adapters.from_diffusers, load_safetensors(vae_files), vae_files[0]), vae_files[0]


def load_wan_vae(root: str | Path, device: str | torch.device = "cpu") -> VideoVAE:
    """The VAE of a Wan2.1 / Wan2.2 folder alone (either layout), in kino's class, float32,
    frozen: for `kino vae reconstruct --model WAN_DIR`."""
    root = Path(root)
    layout = detect_layout(root)
    if layout not in ("original", "diffusers"):
        raise KinoUserError(f"{root} is not a Wan folder (original or diffusers layout)")
    config, state, source = (_original_vae if layout == "original" else _diffusers_vae)(root)
    with torch.device("meta"):
        model = VideoVAE(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise KinoUserError(f"{source} holds weights that do not fit its config: {one_line(e)}") from None
    return model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


def _check_experts(high: DiTConfig, low: DiTConfig, root: Path) -> None:
    if high != low:
        raise KinoUserError(f"{root}: Wan2.2's two experts have different configs")
    if high.img_dim is not None:
        raise KinoUserError(f"{root}: Wan2.2 experts with a CLIP image branch (img_dim): not a Wan2.2 release")


def _one_dit(root: Path, dit_files: tuple) -> None:
    if dit_files[1] is not None:
        raise KinoUserError(f"{root} has one DiT: a second DiT file (--dit-2) is for two-expert models (Wan2.2 A14B)")


def _read_diffusers(root: Path, dit_dtype: torch.dtype, dit_files: tuple = (None, None)) -> WanSource:
    index = read_json(root / "model_index.json")
    if index.get("_class_name") not in ("WanPipeline", "WanImageToVideoPipeline", "WanVACEPipeline", None):
        raise KinoUserError(f"{root / 'model_index.json'} describes a {index.get('_class_name')}, not a Wan "
                            "WanPipeline, WanImageToVideoPipeline or WanVACEPipeline")
    # expand_timesteps (Wan2.2 TI2V-5B): a timestep per token, 0 on a given first frame's tokens:
    # what kino's per-frame timesteps and clean frames do, so nothing to record
    tdir = _need(root / "transformer", "transformer/ (the DiT)")
    dit_config = _config(dit_adapters.config_from_diffusers, read_json(tdir / "config.json"), tdir / "config.json")
    image = None
    if dit_config.img_dim is not None:
        processor = root / "image_processor"
        image = ImageSource("transformers", _need(root / "image_encoder", "image_encoder/ (CLIP) for its "
                                                  "image-to-video DiT"), processor if processor.is_dir() else None)
    elif index.get("_class_name") == "WanImageToVideoPipeline" and index.get("transformer_2") in (None, [None, None]):
        raise KinoUserError(f"{tdir / 'config.json'}: a WanImageToVideoPipeline whose DiT has no image branch "
                            "(image_dim): not a Wan2.1 I2V model kino loads")
    dit_state, dit_file = _dit_weights(tdir, dit_dtype, dit_files[0], dit_adapters.from_diffusers)
    low = (None, None)
    boundary = None
    if index.get("transformer_2") not in (None, [None, None]):  # Wan2.2 A14B: the low-noise expert
        t2dir = _need(root / "transformer_2", "transformer_2/ (Wan2.2's low-noise expert)")
        config_2 = _config(dit_adapters.config_from_diffusers, read_json(t2dir / "config.json"), t2dir / "config.json")
        _check_experts(dit_config, config_2, root)
        low = _dit_weights(t2dir, dit_dtype, dit_files[1], dit_adapters.from_diffusers)
        boundary = index.get("boundary_ratio")
    else:
        _one_dit(root, dit_files)
    vae_config, vae_state, vae_file = _diffusers_vae(root)
    text = text_source(root, "diffusers")
    return WanSource(root, "diffusers", dit_config, dit_state, dit_file, vae_config, vae_state, vae_file,
                     text, image, dit_2_state=low[0], dit_2_file=low[1], boundary=boundary)


def build_models(src: WanSource, device: str | torch.device = "cpu") -> tuple[VideoVAE, DiT, DiT | None]:
    """kino's VAE (float32) and DiT (in the dtype its state dict was read in; a GGUF file's
    block weights stay quantized) with the source's weights, frozen, in eval mode; and a
    Wan2.2 A14B's second DiT (None for Wan2.1)."""
    with torch.device("meta"):  # no random init of weights about to be replaced
        vae = VideoVAE(src.vae_config)
    try:
        vae.load_state_dict(src.vae_state, strict=True, assign=True)
    except RuntimeError as e:
        raise KinoUserError(f"{src.vae_file} holds weights that do not fit its config: {one_line(e)}") from None
    vae = vae.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    dit = build_dit(src.dit_config, src.dit_state, src.dit_file, device)
    dit_2 = None if src.dit_2_state is None else build_dit(src.dit_config, src.dit_2_state, src.dit_2_file, device)
    return vae, dit, dit_2


def load_wan_pipeline(root: str | Path, device: str | torch.device = "cpu",
                      text_device: str | torch.device | None = None, text_dtype: str = "bfloat16",
                      dit_dtype: torch.dtype = torch.float32, dit_files: tuple = (None, None),
                      text_file: str | Path | None = None):
    """A kino Pipeline straight from a Wan2.1 folder (original or diffusers), Wan's defaults;
    the DiT's weights are converted to `dit_dtype` as they are read (or come from
    `dit_files`, see `read_wan`); the text encoder's from `text_file` when given."""
    src = read_wan(root, dit_dtype, dit_files)
    if text_file is not None:
        src.text.file = Path(text_file)
    return load_wan_pipeline_from(src, device, text_device, text_dtype)


def load_wan_pipeline_from(src: WanSource, device: str | torch.device = "cpu",
                           text_device: str | torch.device | None = None, text_dtype: str | None = "bfloat16"):
    """load_wan_pipeline from a folder already read; text_dtype None keeps the stored dtype."""
    from kino.pipeline import Pipeline

    vae, dit, dit_2 = build_models(src, device)
    encoder = src.text.load(text_device if text_device is not None else device, text_dtype)
    image = None if src.image is None else src.image.load(text_device if text_device is not None else device)
    try:
        return Pipeline(vae, dit, encoder, wan_defaults(src.model_type, src.boundary), name=folder_name(src.root),
                        image_encoder=image, dit_2=dit_2)
    except KinoUserError as e:
        raise KinoUserError(f"{src.root}: {e}") from None


def convert_wan(src_root: str | Path, dst: str | Path, name: str | None = None,
                dit_files: tuple = (None, None), text_file: str | Path | None = None) -> Path:
    """Write a kino model folder from a Wan2.1 folder; returns the path of its kino.json.

    The DiT and VAE are written in float32, the dtype kino computes them in; the UMT5 encoder
    keeps the dtype it is stored in (bfloat16 in Wan's releases). `dit_files`: the DiT's (and a
    second expert's) weights from these files instead (`read_wan`); a GGUF file's quantized
    tensors are dequantized, so the folder holds plain float32 weights (e.g. to fine-tune).
    `text_file`: the UMT5 encoder's weights from this file (GGUF, stored dequantized in
    bfloat16, or safetensors, `UMT5Encoder.from_file`).
    """
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise KinoUserError(f"{dst} exists and is not an empty folder: convert into a new folder")
    skip = weights_replaced(dit=dit_files[0], dit_2=dit_files[1], text_encoder=text_file)
    src = read_wan(resolve_model(src_root, skip), dit_files=dit_files)
    if text_file is not None:
        src.text.file = Path(text_file)
    for field in ("dit_state", "dit_2_state"):
        state = getattr(src, field)
        if state is not None:
            setattr(src, field, {k: v.dequantize() if isinstance(v, GGUFTensor) else v for k, v in state.items()})
    # every shape is checked before writing; a GGUF text encoder is stored in bfloat16, as Wan's own
    gguf_text = text_file is not None and Path(text_file).suffix == ".gguf"
    pipe = load_wan_pipeline_from(src, "cpu", None, text_dtype="bfloat16" if gguf_text else None)
    if pipe.text_quantized:
        dequantize_modules(pipe.text_encoder.model, torch.bfloat16)
    pipe.name = name or f"{folder_name(src.root)} (kino)"
    return pipe.save_pretrained(dst)
