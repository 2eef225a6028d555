"""UMT5 text encoder (Wan2.1's UMT5-XXL) through `transformers`, from local files only.

    encoder = UMT5Encoder.from_folder("text_encoder/umt5", "text_encoder/tokenizer")
    tokens, mask = encoder.encode(["a cat walks on the grass"])   # (B, 512, 4096), (B, 512)

Two weight layouts load: a transformers `UMT5EncoderModel` folder (config.json +
*.safetensors; diffusers' `text_encoder/`) and Wan's original `models_t5_umt5-xxl-enc-bf16.pth`
(its own T5 module names, read with `torch.load(weights_only=True)` and renamed by
`umt5_from_wan`). The tokenizer is a local transformers tokenizer folder (Wan's
`google/umt5-xxl/`, diffusers' `tokenizer/`).

What Wan computes, and so what this returns by default (`attend_padding=True`): prompts are
cleaned (HTML unescaped, whitespace collapsed), tokenized to at most 512 tokens with the
end-of-sequence token, encoded with the padding masked inside the encoder, and the features
of the padding positions are set to zero. Wan's DiT then cross-attends to all 512 positions,
zeros included (it was trained that way; diffusers' WanPipeline does the same), so the mask
returned marks every position as attendable. `attend_padding=False` returns the real-token
mask instead (kino's usual contract), for models trained with masked padding.

The encoder may live on another device than the DiT (e.g. CPU beside a GPU DiT): `encode`
returns tensors on the encoder's device in float32, and the pipeline moves them.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import torch
from torch import Tensor

from kino.convert.files import rename_key
from kino.errors import KinoUserError
from kino.models.text.encoder import quiet_loading

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ---------------------------------------------------------------------------- Wan's T5 names


# Wan's T5 encoder (wan/modules/t5.py) -> transformers' UMT5EncoderModel, per block N.
# Wan's feed-forward is fc1(x) * gelu(gate(x)), transformers' wi_1(x) * gelu(wi_0(x)).
_FROM_WAN: list[tuple[str, str]] = [
    (r"^blocks\.(\d+)\.norm1\.weight$", r"encoder.block.\1.layer.0.layer_norm.weight"),
    (r"^blocks\.(\d+)\.attn\.([qkvo])\.weight$", r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
    (r"^blocks\.(\d+)\.pos_embedding\.embedding\.weight$",
     r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight"),
    (r"^blocks\.(\d+)\.norm2\.weight$", r"encoder.block.\1.layer.1.layer_norm.weight"),
    (r"^blocks\.(\d+)\.ffn\.gate\.0\.weight$", r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight"),
    (r"^blocks\.(\d+)\.ffn\.fc1\.weight$", r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
    (r"^blocks\.(\d+)\.ffn\.fc2\.weight$", r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
    (r"^norm\.weight$", "encoder.final_layer_norm.weight"),
]


def umt5_from_wan(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Wan2.1's T5 encoder state dict -> transformers UMT5EncoderModel state dict (same tensors;
    the token embedding goes to both of transformers' tied names)."""
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = out["encoder.embed_tokens.weight"] = value
            continue
        new = rename_key(key, _FROM_WAN)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(f"keys not in the layout of Wan2.1's UMT5 encoder: {unknown[:8]}")
    if "shared.weight" not in out:
        raise ValueError("not a Wan2.1 UMT5 encoder state dict: token_embedding.weight is missing")
    return out


def umt5_config_from_wan(state_dict: dict[str, Tensor]):
    """A transformers UMT5Config for a Wan-layout T5 encoder state dict, read off its shapes
    (Wan's umt5-xxl: vocab 256384, d_model 4096, 64 heads of 64, d_ff 10240, 24 layers)."""
    return umt5_config(umt5_from_wan(state_dict))


def umt5_config(state: dict, eps: float = 1e-6):
    """A transformers UMT5Config for an encoder state dict in transformers' names, read off its
    shapes (tensors or GGUF tensors); UMT5's relative-position distance (128) and gated GELU."""
    from transformers import UMT5Config

    try:
        vocab, d_model = state["shared.weight"].shape
        buckets, heads = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
        inner = state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
        d_ff = state["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a UMT5 encoder: {e.args[0]} is missing") from None
    layers = len({k.split(".")[2] for k in state if k.startswith("encoder.block.")})
    return UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=layers,
                      num_heads=heads, relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu", layer_norm_epsilon=eps, dropout_rate=0.0,
                      is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)


# llama.cpp's T5 encoder names (GGUF files, e.g. umt5-xxl-encoder-Q8_0.gguf): enc.blk.N.SHORT.weight for
# transformers' encoder.block.N.INNER.weight (gguf-py's tensor_mapping: ffn_gate is wi_0, ffn_up wi_1)
_LLAMA_SHORT = {
    "layer.0.layer_norm": "attn_norm", "layer.0.SelfAttention.q": "attn_q", "layer.0.SelfAttention.k": "attn_k",
    "layer.0.SelfAttention.v": "attn_v", "layer.0.SelfAttention.o": "attn_o",
    "layer.0.SelfAttention.relative_attention_bias": "attn_rel_b", "layer.1.layer_norm": "ffn_norm",
    "layer.1.DenseReluDense.wi_0": "ffn_gate", "layer.1.DenseReluDense.wi_1": "ffn_up",
    "layer.1.DenseReluDense.wo": "ffn_down",
}
_FROM_GGUF: list[tuple[str, str]] = [
    *((rf"^enc\.blk\.(\d+)\.{short}\.weight$", rf"encoder.block.\1.{inner}.weight")
      for inner, short in _LLAMA_SHORT.items()),
    (r"^enc\.output_norm\.weight$", "encoder.final_layer_norm.weight"),
    (r"^token_embd\.weight$", "shared.weight"),
]
TOKENIZER_TENSORS = ("spiece_model", "tokenizer")  # a tokenizer some single files carry as bytes: not weights


def umt5_names(state: dict, source: Path) -> dict:
    """A UMT5 encoder's state dict from one file by transformers' names: from llama.cpp's GGUF
    names, Wan's original names or transformers' own (a `text_encoders.`/`t5xxl.` style
    prefix up to `encoder.` or `shared.` dropped); the token embedding under both of
    transformers' tied names."""
    state = {k: v for k, v in state.items() if k not in TOKENIZER_TENSORS}
    try:
        if "token_embedding.weight" in state:
            return umt5_from_wan(state)
        if "token_embd.weight" in state:
            # a whole T5's file also holds its decoder (dec.*) and output head: the encoder needs neither
            state = {k: v for k, v in state.items() if not k.startswith("dec.") and k != "output.weight"}
            renamed = {key: rename_key(key, _FROM_GGUF) for key in state}
            unknown = [key for key, new in renamed.items() if new is None]
            if unknown:
                raise ValueError(f"tensors not in llama.cpp's T5 encoder layout: {unknown[:8]}")
            out = {renamed[key]: value for key, value in state.items()}
        else:
            out = {_from_encoder_or_shared(key): value for key, value in state.items()}
            out = {k: v for k, v in out.items() if not k.startswith(("decoder.", "lm_head."))}
    except ValueError as e:
        raise KinoUserError(f"{source}: {e}") from None
    embedding = out.get("shared.weight", out.get("encoder.embed_tokens.weight"))
    if embedding is None:
        hint = "; a DiT's weights go to --dit FILE" if any(".self_attn." in k or ".attn1." in k for k in state) else ""
        raise KinoUserError(f"{source} is not a UMT5 encoder: it has no token embedding (token_embd, shared or "
                            f"token_embedding){hint}")
    out["shared.weight"] = out["encoder.embed_tokens.weight"] = embedding
    return out


def to_llama_names(state: dict) -> dict:
    """A UMT5 encoder state dict from transformers' names to llama.cpp's (`_FROM_GGUF` inverted;
    the token table once)."""
    out = {}
    for key, value in state.items():
        if key == "encoder.embed_tokens.weight":
            continue
        m = re.match(r"^encoder\.block\.(\d+)\.(.*)\.weight$", key)
        short = None if m is None else _LLAMA_SHORT.get(m.group(2))
        if key == "shared.weight":
            out["token_embd.weight"] = value
        elif key == "encoder.final_layer_norm.weight":
            out["enc.output_norm.weight"] = value
        elif short is not None:
            out[f"enc.blk.{m.group(1)}.{short}.weight"] = value
        else:
            raise KinoUserError(f"{key} is not a UMT5 encoder weight")
    return out


def write_umt5_gguf(model, path: str | Path, type_name: str, name: str = "umt5") -> dict[str, int]:
    """A transformers UMT5 encoder as a GGUF file in llama.cpp's `t5encoder` layout (what
    `--text-encoder FILE`, transformers' GGUF loader, ComfyUI-GGUF and llama.cpp read): every
    matrix (token table included; rows of whole blocks) in `type_name`, the relative-position
    tables and norms in F32; sizes and epsilon in `t5encoder.*` metadata, "umt5" in the name
    (which tells transformers it is UMT5, not T5). The tokenizer is not written: kino takes it
    from the model folder. Returns how many tensors went to each type."""
    from kino.models.gguf import write_gguf

    c = model.config

    def tensor_type(key, a, quant, block):
        if a.ndim == 2 and "attn_rel_b" not in key:
            return quant if a.shape[1] % block == 0 else "F16"
        return "F32"

    def metadata(w):
        w.add_name(name if "umt5" in name.lower() else f"umt5 {name}")
        w.add_context_length(512)
        w.add_embedding_length(c.d_model)
        w.add_feed_forward_length(c.d_ff)
        w.add_block_count(c.num_layers)
        w.add_head_count(c.num_heads)
        w.add_key_length(c.d_kv)
        w.add_value_length(c.d_kv)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
        w.add_relative_attn_buckets_count(c.relative_attention_num_buckets)
        w.add_vocab_size(c.vocab_size)

    return write_gguf(to_llama_names(model.state_dict()), path, type_name, "t5encoder", tensor_type, metadata)


def _from_encoder_or_shared(key: str) -> str:
    """`key` from its first `encoder` or `shared` component on (a checkpoint's prefix dropped)."""
    parts = key.split(".")
    start = next((i for i, part in enumerate(parts) if part in ("encoder", "shared")), 0)
    return ".".join(parts[start:])


def read_umt5_file(path: str | Path, dtype: torch.dtype | None = None) -> tuple[dict, float]:
    """A UMT5 encoder's weights from one file, by transformers' names, and its norm epsilon: a
    GGUF file (llama.cpp's `t5encoder` layout; quantized tensors stay `GGUFTensor`s) or a
    safetensors file (transformers' names, as ComfyUI's `umt5_xxl_fp16.safetensors`, or
    Wan's; "fp8 scaled" weights multiplied back). Floating-point tensors go to `dtype` (None:
    as stored; float8 to bfloat16)."""
    from kino.convert.files import fp8_weights, load_safetensors
    from kino.models.gguf import read_gguf, read_gguf_metadata
    from kino.models.hub import resolve_file

    path = resolve_file(path)
    eps = 1e-6
    if path.suffix == ".gguf":
        state = read_gguf(path, dtype)
        meta = read_gguf_metadata(path)
        arch = meta.get("general.architecture", "")
        if arch not in ("t5encoder", "t5"):
            hint = "; a DiT's weights go to --dit FILE" if arch == "wan" else ""
            raise KinoUserError(f"{path} holds a {arch or 'unnamed'} model, not a T5 encoder (general.architecture "
                                f"t5encoder){hint}")
        eps = float(f"{meta.get(f'{arch}.attention.layer_norm_epsilon', eps):.7g}")  # stored as float32
    elif path.suffix == ".safetensors":
        if not path.is_file():
            raise KinoUserError(f"text encoder weights file {path} does not exist")
        state = fp8_weights(load_safetensors([path]), dtype, path)
    else:
        raise KinoUserError(f"{path}: a text encoder weights file is .gguf or .safetensors")
    return umt5_names(state, path), eps


# ---------------------------------------------------------------------------- the encoder


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ftfy's fix_text when ftfy is installed (Wan requires it, kino does
    not), HTML entities unescaped twice, whitespace collapsed."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


class UMT5Encoder:
    """Frozen UMT5 encoder: prompts -> (tokens (B, max_length, dim) float32, mask (B, max_length))."""

    def __init__(self, model, tokenizer, max_length: int = 512, attend_padding: bool = True):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.attend_padding = attend_padding
        self.dim = model.config.d_model

    @classmethod
    def from_folder(cls, weights: str | Path, tokenizer: str | Path, *, max_length: int = 512,
                    dtype: str | None = "bfloat16", device: str | torch.device = "cpu",
                    attend_padding: bool = True) -> UMT5Encoder:
        """A transformers UMT5EncoderModel folder (config.json + safetensors) and a tokenizer folder.
        dtype None keeps the dtype the weights are stored in."""
        from transformers import UMT5EncoderModel

        weights = Path(weights)
        if not (weights / "config.json").is_file():
            raise KinoUserError(f"{weights / 'config.json'} is missing: the UMT5 text encoder folder holds "
                                "transformers' config.json and model*.safetensors")
        try:
            with quiet_loading():
                model = UMT5EncoderModel.from_pretrained(weights, dtype="auto" if dtype is None else _dtype(dtype),
                                                         local_files_only=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise KinoUserError(f"cannot load the UMT5 text encoder from {weights} (its weights may come from one "
                                f"file instead: --text-encoder FILE): {e}") from None
        return cls(model.to(device), _tokenizer(tokenizer), max_length, attend_padding)

    @classmethod
    def from_wan(cls, pth: str | Path, tokenizer: str | Path, *, max_length: int = 512,
                 dtype: str | None = "bfloat16", device: str | torch.device = "cpu",
                 attend_padding: bool = True) -> UMT5Encoder:
        """Wan's original `models_t5_umt5-xxl-enc-bf16.pth` and its tokenizer folder. dtype None
        keeps the dtype the weights are stored in (bfloat16 in Wan's release)."""
        from transformers import UMT5EncoderModel

        from kino.convert.files import load_pth

        wan_state = load_pth(pth)
        try:
            config = umt5_config_from_wan(wan_state)
            state = umt5_from_wan(wan_state)
        except ValueError as e:
            raise KinoUserError(f"{pth}: {e}") from None
        with torch.device("meta"):  # no 22 GB fp32 init of weights about to be replaced
            model = UMT5EncoderModel(config)
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise KinoUserError(f"{pth} holds weights that do not fit a UMT5 encoder: {e}") from None
        model = model.to(device) if dtype is None else model.to(device=device, dtype=_dtype(dtype))
        return cls(model, _tokenizer(tokenizer), max_length, attend_padding)

    @classmethod
    def from_file(cls, path: str | Path, tokenizer: str | Path, *, max_length: int = 512,
                  dtype: str | None = "bfloat16", device: str | torch.device = "cpu",
                  attend_padding: bool = True) -> UMT5Encoder:
        """The encoder's weights from one file (`read_umt5_file`: GGUF or safetensors), its
        sizes read off their shapes, and a tokenizer folder. A GGUF file's quantized linear
        layers and token embedding stay quantized (dequantized as they run, in `dtype`:
        kino/models/gguf.py); dtype None: the file's dtype (a GGUF file: float32)."""
        from transformers import UMT5EncoderModel

        from kino.convert.files import one_line
        from kino.models.gguf import GGUFTensor, build_with_gguf

        compute = None if dtype is None else _dtype(dtype)
        if compute is None and str(path).endswith(".gguf"):
            compute = torch.float32  # the dtype ggml dequantizes in
        state, eps = read_umt5_file(path, compute)
        try:
            config = umt5_config(state, eps)
        except ValueError as e:
            raise KinoUserError(f"{path}: {e}") from None
        with torch.device("meta"):
            model = UMT5EncoderModel(config)
        if any(isinstance(v, GGUFTensor) for v in state.values()):
            state = build_with_gguf(model, state, [model], Path(path), compute, byte_dtype=torch.int8)
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise KinoUserError(f"{path} holds weights that do not fit a UMT5 encoder: {one_line(e)}") from None
        model = model.to(device) if compute is None else model.to(device=device, dtype=compute)
        encoder = cls(model, _tokenizer(tokenizer), max_length, attend_padding)
        encoder.name = f"UMT5Encoder from {Path(path).name}"  # a latent cache's record of what encoded it
        return encoder

    @property
    def quantized(self) -> bool:
        """Whether layers hold GGUF-quantized weights (read from a .gguf file)."""
        from kino.models.gguf import GGUFEmbedding, GGUFLinear

        return any(isinstance(m, (GGUFLinear, GGUFEmbedding)) for m in self.model.modules())

    def reference(self) -> dict:
        """text_encoder/config.json of a kino folder whose UMT5 lives in umt5/ and tokenizer/."""
        first = next(p for p in self.model.parameters() if p.is_floating_point())
        dtype = {v: k for k, v in DTYPES.items()}[first.dtype]
        return {"kind": "umt5", "weights": "umt5", "tokenizer": "tokenizer", "max_length": self.max_length,
                "attend_padding": self.attend_padding, "dtype": dtype, "dim": self.dim}

    def save(self, folder: str | Path) -> None:
        """Weights (transformers layout, safetensors) into folder/umt5, tokenizer into folder/tokenizer."""
        folder = Path(folder)
        self.model.save_pretrained(folder / "umt5")
        self.tokenizer.save_pretrained(folder / "tokenizer")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts")
        # Padded to the longest prompt of the batch only, not to max_length: a real token's features
        # do not depend on padding it cannot attend to (masked keys; T5's position bias is relative),
        # so this equals encoding the 512-token padded sequence up to float rounding, at the cost of
        # the prompt's own ~20-60 tokens (a UMT5-XXL on a CPU: seconds, not a minute).
        tok = self.tokenizer([clean_prompt(p) for p in prompts], padding="longest", truncation=True,
                             max_length=self.max_length, add_special_tokens=True, return_attention_mask=True,
                             return_tensors="pt").to(self.device)
        hidden = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
        b, n = tok["input_ids"].shape
        real = torch.zeros(b, self.max_length, dtype=torch.bool, device=hidden.device)
        real[:, :n] = tok["attention_mask"].bool()
        tokens = hidden.new_zeros(b, self.max_length, hidden.shape[-1], dtype=torch.float32)
        tokens[:, :n] = hidden.float() * real[:, :n, None]  # padding features are zeros, as in Wan
        mask = torch.ones_like(real) if self.attend_padding else real
        return tokens, mask


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise KinoUserError(f"unknown text encoder dtype {name!r}: allowed {', '.join(DTYPES)}")
    return DTYPES[name]


def _tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise KinoUserError(f"tokenizer folder {folder} does not exist")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise KinoUserError(f"cannot load a tokenizer from {folder}: {e}") from None
