"""Wan2.1 image-to-video (I2V, FLF2V) in kino: the DiT's image branch against diffusers'
WanTransformer3DModel with `image_dim` (and `pos_embed_seq_len` for FLF2V), through both
adapters, on tiny random models (CPU, fp32).

Wan's original layout is written here with this file's own key table (names from Wan's
wan/modules/model.py: MLPProj `img_emb.proj.{0,1,3,4}` and `emb_pos`, WanI2VCrossAttention
`k_img`, `v_img`, `norm_k_img`), independent of kino's adapters.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from test_wan import _perturb
from test_wan import dit_to_wan as t2v_dit_to_wan

from kino.models.dit import (DIT_SIZES, DiT, DiTConfig, DiTInputError, config_from_diffusers, config_from_wan,
                             config_to_diffusers, config_to_wan, from_diffusers, from_wan, to_diffusers, to_wan)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

IMG_DIM = 20  # CLIP feature width of the tiny models (Wan's is 1280)
IMG_TOKENS = 5  # CLIP tokens per image (Wan's is 257)
TEXT_LEN = 512  # diffusers' I2V attention takes everything before the last 512 context tokens as image tokens


def diffusers_i2v(kind: str, seed: int = 0, img_dim: int = IMG_DIM):
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=36, out_channels=16,
        text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=1024, image_dim=img_dim, added_kv_proj_dim=32,
        pos_embed_seq_len=2 * IMG_TOKENS if kind == "flf2v" else None)
    return _perturb(model, seed + 1).eval()


# diffusers name -> Wan2.1 original name (wan/modules/model.py). The image parts first: the
# T2V table's ".norm2." -> ".norm3." would otherwise catch the image embedder's norm2.
IMAGE_TO_WAN = [
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),
    (".attn2.add_k_proj.", ".cross_attn.k_img."),
    (".attn2.add_v_proj.", ".cross_attn.v_img."),
    (".attn2.norm_added_k.", ".cross_attn.norm_k_img."),
]
def dit_to_wan(state):
    """diffusers -> Wan's original names: the image branch's keys here, the rest as test_wan's."""
    image, rest = {}, {}
    for key, value in state.items():
        for old, new in IMAGE_TO_WAN:
            if old in key:
                image[key.replace(old, new)] = value
                break
        else:
            rest[key] = value
    return {**t2v_dit_to_wan(rest), **image}


def _inputs(kind: str, batch: int = 2, seed: int = 0):
    """Latents (36 channels), timesteps, 512 text tokens; image features in diffusers' form
    ((B or 2B, N, img_dim): FLF2V's first and last frame as separate rows) and in kino's
    ((B, N or 2N, img_dim): one row per clip, the first frame's tokens then the last's)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 36, 3, 4, 6, generator=gen)
    t = torch.tensor([999.0, 321.5])[:batch]
    text = torch.randn(batch, TEXT_LEN, 24, generator=gen)
    images = 2 if kind == "flf2v" else 1
    image = torch.randn(batch * images, IMG_TOKENS, IMG_DIM, generator=gen)
    return x, t, text, image, image.reshape(batch, images * IMG_TOKENS, IMG_DIM)


def _kino(config: DiTConfig, state: dict) -> DiT:
    model = DiT(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------- parity


@pytest.mark.parametrize("kind", ["i2v", "flf2v"])
def test_i2v_dit_matches_diffusers_through_both_layouts(kind):
    reference = diffusers_i2v(kind)
    state = reference.state_dict()
    config = config_from_diffusers(dict(reference.config))
    assert (config.in_channels, config.img_dim, config.img_pos_len) == (
        36, IMG_DIM, 2 * IMG_TOKENS if kind == "flf2v" else None)
    via_diffusers = _kino(config, from_diffusers(state))
    wan_state = dit_to_wan(state)
    assert any(k.startswith("img_emb.proj.4.") for k in wan_state) and "blocks.1.cross_attn.k_img.weight" in wan_state
    via_wan = _kino(config, from_wan(wan_state))

    x, t, text, image_d, image_k = _inputs(kind)
    with torch.no_grad():
        expected = reference(x, t, text, encoder_hidden_states_image=image_d).sample
        assert expected.std() > 0.1
        for model in (via_diffusers, via_wan):
            torch.testing.assert_close(model(x, t, text, image=image_k), expected, rtol=0, atol=1e-5)
        # the image branch is not idle: other image features give another velocity
        other = via_diffusers(x, t, text, image=torch.randn_like(image_k))
        assert (other - expected).abs().max() > 1e-2
        if kind == "flf2v":  # and FLF2V's position tells the first frame from the last
            swapped = image_k.unflatten(1, (2, IMG_TOKENS)).flip(1).flatten(1, 2)
            reference_swapped = reference(x, t, text, encoder_hidden_states_image=swapped.reshape(4, IMG_TOKENS,
                                                                                                    IMG_DIM)).sample
            torch.testing.assert_close(via_wan(x, t, text, image=swapped), reference_swapped, rtol=0, atol=1e-5)
            assert (reference_swapped - expected).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["i2v", "flf2v"])
def test_i2v_dit_round_trips_to_diffusers_and_wan(kind):
    reference = diffusers_i2v(kind, seed=4)
    config = config_from_diffusers(dict(reference.config))
    model = _kino(config, from_diffusers(reference.state_dict()))
    # kino -> diffusers: a WanTransformer3DModel built from the translated config takes the state strictly
    rebuilt = diffusers.WanTransformer3DModel(**config_to_diffusers(config)).eval()
    rebuilt.load_state_dict(to_diffusers(model.state_dict()), strict=True)
    assert config_from_diffusers(dict(rebuilt.config)) == config
    x, t, text, image_d, image_k = _inputs(kind, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, t, text, encoder_hidden_states_image=image_d).sample,
                                   model(x, t, text, image=image_k), rtol=0, atol=1e-5)
    # kino -> Wan: the names are Wan's; the table of this file agrees key by key
    assert to_wan(model.state_dict()).keys() == dit_to_wan(reference.state_dict()).keys()
    back = from_diffusers(to_diffusers(model.state_dict()))
    assert back.keys() == model.state_dict().keys()


def test_i2v_dit_drops_diffusers_unused_norm_added_q():
    """Older diffusers conversions hold a norm_added_q per block that nothing uses (diffusers'
    loader ignores it); kino drops it too, and any other unknown key still raises."""
    state = diffusers_i2v("i2v").state_dict()
    extra = {**state, "blocks.0.attn2.norm_added_q.weight": torch.ones(32)}
    assert from_diffusers(extra).keys() == from_diffusers(state).keys()
    with pytest.raises(ValueError, match="not in the diffusers layout"):
        from_diffusers({**state, "blocks.0.attn2.add_q_proj.weight": torch.ones(32)})
    with pytest.raises(ValueError, match="not in the Wan2.1 layout"):
        from_wan({**dit_to_wan(state), "img_emb.proj.2.weight": torch.ones(3)})


def test_image_features_are_checked():
    model = DiT(DiTConfig(in_channels=36, dim=32, ffn_dim=64, freq_dim=32, text_dim=24, num_heads=2, num_layers=1,
                          img_dim=IMG_DIM, img_pos_len=2 * IMG_TOKENS)).eval()
    x, t, text, _, image = _inputs("flf2v")
    with torch.no_grad():
        assert model(x, t, text, image=image).shape == (2, 16, 3, 4, 6)
        with pytest.raises(DiTInputError, match=r"image features must be a \(2, 10, 20\) tensor.*got none"):
            model(x, t, text)
        with pytest.raises(DiTInputError, match="got shape"):
            model(x, t, text, image=image[:, :IMG_TOKENS])  # FLF2V needs both frames' tokens
        with pytest.raises(DiTInputError, match="no image branch"):
            DiT(DIT_SIZES["tiny"]).eval()(torch.randn(2, 16, 1, 2, 2), t, text, image=image)
    with pytest.raises(ValueError, match="img_pos_len"):
        DiTConfig(img_pos_len=514)


# ---------------------------------------------------------------------------- configs


I2V_14B_WAN = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 5120, "eps": 1e-06,
               "ffn_dim": 13824, "freq_dim": 256, "in_dim": 36, "model_type": "i2v", "num_heads": 40,
               "num_layers": 40, "out_dim": 16, "text_len": 512}  # Wan-AI/Wan2.1-I2V-14B-480P config.json
I2V_14B_DIFFUSERS = {"_class_name": "WanTransformer3DModel", "added_kv_proj_dim": 5120, "attention_head_dim": 128,
                     "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 13824, "freq_dim": 256, "image_dim": 1280,
                     "in_channels": 36, "num_attention_heads": 40, "num_layers": 40, "out_channels": 16,
                     "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024,
                     "text_dim": 4096}  # Wan-AI/Wan2.1-I2V-14B-480P-Diffusers transformer/config.json


def test_i2v_configs_of_the_releases():
    i2v, flf2v = DIT_SIZES["wan2.1-i2v-14b"], DIT_SIZES["wan2.1-flf2v-14b"]
    assert config_from_wan(I2V_14B_WAN) == i2v
    assert config_from_wan({**I2V_14B_WAN, "model_type": "flf2v"}) == flf2v
    assert config_from_diffusers(I2V_14B_DIFFUSERS) == i2v
    assert config_from_diffusers({**I2V_14B_DIFFUSERS, "pos_embed_seq_len": 514}) == flf2v
    for config in (i2v, flf2v, DIT_SIZES["wan2.1-14b"]):
        assert config_from_wan(config_to_wan(config)) == config
        assert config_from_diffusers(config_to_diffusers(config)) == config
        assert DiTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    # T2V configs are written as before: no image fields
    assert "img_dim" not in DIT_SIZES["wan2.1-14b"].to_dict() and i2v.to_dict()["img_dim"] == 1280
    # diffusers' pos_embed_seq_len means nothing without an image embedder (the T2V configs)
    assert config_from_diffusers({**I2V_14B_DIFFUSERS, "image_dim": None, "added_kv_proj_dim": None,
                                  "in_channels": 16, "pos_embed_seq_len": 514}) == DIT_SIZES["wan2.1-14b"]
    for bad, needle in [({"added_kv_proj_dim": None}, "image_dim without added_kv_proj_dim"),
                        ({"added_kv_proj_dim": 1280}, "added_kv_proj_dim other than the width 5120"),
                        ({"image_dim": None}, "added_kv_proj_dim without image_dim")]:
        with pytest.raises(ValueError, match=needle):
            config_from_diffusers({**I2V_14B_DIFFUSERS, **bad})
    with pytest.raises(ValueError, match="model_type 's2v' is not supported"):  # Wan2.2's speech-to-video
        config_from_wan({**I2V_14B_WAN, "model_type": "s2v"})
    with pytest.raises(ValueError, match="1280-wide"):
        config_to_wan(DiTConfig(img_dim=IMG_DIM))


# ---------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def t2v_folders(tmp_path_factory):
    """test_wan.py's tiny T2V folders, in both layouts."""
    from test_wan import _components, write_diffusers, write_original

    components = _components()
    root = tmp_path_factory.mktemp("wan")
    return {"original": write_original(root / "Wan2.1-T2V-tiny", components),
            "diffusers": write_diffusers(root / "Wan2.1-T2V-tiny-Diffusers", components)}


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_i2v_weights_with_a_t2v_config_exit_2_naming_the_file(t2v_folders, tmp_path, capsys, layout):
    """An I2V checkpoint in a folder whose config says T2V: a KinoUserError naming the file."""
    import shutil

    from safetensors.torch import save_file

    from kino.cli import main

    root = tmp_path / "wan"
    shutil.copytree(t2v_folders[layout], root)
    state = diffusers_i2v("i2v", img_dim=1280).state_dict()  # text_dim 24 and the blocks fit the tiny T2V config
    if layout == "original":
        weights, state = root / "diffusion_pytorch_model.safetensors", dit_to_wan(state)
    else:
        weights = root / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    code = main(["convert", "wan", str(root), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{weights} holds weights that do not fit its config" in err and "img_emb" in err
    assert err.startswith("kino: error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- CLIP image encoder


transformers = pytest.importorskip("transformers")


def _clip(seed: int = 0):
    """A tiny random CLIPVisionModel (32x32 images, 8x8 patches: 17 tokens) and Wan's image_processor
    settings at its size (shortest edge and center crop 32, bicubic, CLIP mean and std)."""
    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(hidden_size=IMG_DIM, intermediate_size=40, num_hidden_layers=3,
                                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16,
                                           hidden_act="gelu")  # ViT-H/14 of Wan: exact GELU
    model = transformers.CLIPVisionModel(config).eval()
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, processor


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    model, processor = _clip()
    model.save_pretrained(root / "image_encoder")
    processor.save_pretrained(root / "image_processor")
    return model, processor, root


def _image(shape, seed):
    """uint8 (H, W, 3) with smooth gradients and sharp edges (bicubic overshoot gets clipped)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return (np.cumsum(rng.integers(0, 20, (*shape, 3)), axis=1) % 256).astype(np.uint8)


def test_clip_encoder_matches_transformers_with_diffusers_preprocessing(clip_folders):
    from PIL import Image

    from kino.models.clip import CLIPImageEncoder

    model, processor, root = clip_folders
    encoder = CLIPImageEncoder.from_folder(root / "image_encoder", root / "image_processor")
    for shape, resized in [((32, 32), False), ((32, 48), False), ((48, 80), True), ((100, 60), True),
                           ((20, 30), True)]:
        pixels = _image(shape, seed=sum(shape))
        # what diffusers' WanImageToVideoPipeline.encode_image does with a PIL image
        reference = processor(images=Image.fromarray(pixels), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            hidden = model(pixel_values=reference, output_hidden_states=True).hidden_states
        expected = hidden[-2]
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1  # kino's [-1, 1] pixels
        mine = encoder.preprocess(x)
        features = encoder.encode(x)
        assert features.shape == (1, 17, IMG_DIM) and features.dtype == torch.float32
        assert (hidden[-1] - expected).abs().max() > 0.1  # the penultimate layer, not the last
        if not resized:  # no resampling: exactly transformers' pixels
            torch.testing.assert_close(mine, reference, rtol=0, atol=1e-6)
            torch.testing.assert_close(features, expected, rtol=0, atol=1e-5)
        else:  # PIL's fixed-point bicubic: a few pixels one 8-bit level off (seen: <= 1 level, < 0.1%)
            level = 1 / 255 / min(encoder.std)
            diff = (mine - reference).abs()
            assert diff.max() <= 2 * level + 1e-6 and (diff > 1e-6).float().mean() < 0.01
            assert (features - expected).abs().max() < 0.02 * expected.abs().max()


def test_clip_encoder_bad_folders(clip_folders, tmp_path):
    import shutil

    from kino.errors import KinoUserError
    from kino.models.clip import CLIPImageEncoder

    _, processor, root = clip_folders
    with pytest.raises(KinoUserError, match="config.json is missing"):
        CLIPImageEncoder.from_folder(tmp_path, root / "image_processor")
    bad = shutil.copytree(root / "image_processor", tmp_path / "proc")
    config = json.loads((bad / "preprocessor_config.json").read_text())
    (bad / "preprocessor_config.json").write_text(json.dumps({**config, "resample": 2}))
    with pytest.raises(KinoUserError, match=r"preprocessor_config.json: CLIP preprocessing .*resample"):
        CLIPImageEncoder.from_folder(root / "image_encoder", bad)
    encoder = CLIPImageEncoder.from_folder(root / "image_encoder", resize="squash")
    assert encoder.preprocess(torch.zeros(2, 3, 48, 80)).shape == (2, 3, 32, 32)  # Wan's own: squashed, no crop


# ---------------------------------------------------------------------------- the I2V pipeline


def _i2v_components(kind: str):
    """test_wan.py's tiny VAE, UMT5 and tokenizer, with an I2V (or FLF2V) DiT whose image branch
    takes the tiny CLIP's features (17 tokens a frame)."""
    from test_wan import _components

    _, vae, text, tokenizer = _components()
    torch.manual_seed(7)
    dit = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=36, out_channels=16,
        text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=1024, image_dim=IMG_DIM, added_kv_proj_dim=32,
        pos_embed_seq_len=2 * 17 if kind == "flf2v" else None)
    clip, processor = _clip(seed=3)
    return _perturb(dit, 8).eval(), vae, text, tokenizer, _perturb(clip, 9).eval(), processor


def write_i2v_diffusers(root, components):
    dit, vae, text, tokenizer, clip, processor = components
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanImageToVideoPipeline", "_diffusers_version": diffusers.__version__,
        "image_encoder": ["transformers", "CLIPVisionModel"], "image_processor": ["transformers", "CLIPImageProcessor"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": [None, None], "vae": ["diffusers", "AutoencoderKLWan"]}))
    dit.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    text.save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    clip.save_pretrained(root / "image_encoder")
    processor.save_pretrained(root / "image_processor")
    return root


@pytest.fixture(scope="module", params=["i2v", "flf2v"])
def i2v(request, tmp_path_factory):
    components = _i2v_components(request.param)
    root = write_i2v_diffusers(tmp_path_factory.mktemp("i2v") / f"Wan2.1-{request.param}-tiny-Diffusers", components)
    return request.param, components, root


def test_i2v_sampling_matches_diffusers_wan_image_to_video_pipeline(i2v, monkeypatch):
    """Same tiny components, same initial noise: kino's Wan I2V / FLF2V conditioning (CLIP features,
    mask and image latents on 20 more channels) + UniPC + CFG == diffusers' WanImageToVideoPipeline."""
    import importlib.util
    import types

    from PIL import Image

    from kino.pipeline import Pipeline

    if importlib.util.find_spec("ftfy") is None:
        # diffusers' I2V prompt cleaning calls ftfy even when it is not installed (its T2V pipeline
        # checks first); without ftfy kino skips that step, so the stand-in does nothing either
        from diffusers.pipelines.wan import pipeline_wan_i2v

        monkeypatch.setattr(pipeline_wan_i2v, "ftfy", types.SimpleNamespace(fix_text=lambda t: t), raising=False)

    kind, (dit, vae, text, tokenizer, clip, processor), root = i2v
    pipe = Pipeline.from_pretrained(root, text_dtype="float32")
    assert pipe.image_encoder is not None and pipe.dit.config.img_dim == IMG_DIM
    assert (pipe.defaults.steps, pipe.defaults.shift) == ((40, 3.0) if kind == "i2v" else (50, 16.0))
    shift = pipe.defaults.shift
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  num_train_timesteps=1000, flow_shift=shift)
    reference = diffusers.WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text, vae=vae,
                                                  scheduler=scheduler, image_processor=processor,
                                                  image_encoder=clip, transformer=dit)
    reference.set_progress_bar_config(disable=True)
    start = (1 - 1e-6) / (shift - (shift - 1) * (1 - 1e-6))  # diffusers' grid, as in test_wan.py
    pipe.defaults = dataclasses.replace(pipe.defaults, t_max=start, t_min=0.001)

    # 32x48 images: CLIP's shortest edge (32) already, so both sides see the same pixels exactly
    first, last = _image((32, 48), seed=1), _image((32, 48), seed=2)
    as_kino = [torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1 for a in (first, last)]
    prompt, negative, steps = "a cat walks on the grass", "dog in snow", 5
    extra = {} if kind == "i2v" else {"last_image": as_kino[1]}
    clip_out = pipe.generate(prompt, negative=negative, frames=9, height=32, width=48, steps=steps, seed=3,
                             image=as_kino[0], **extra)
    noise = torch.randn(clip_out.latents.shape, generator=torch.Generator().manual_seed(3))
    assert clip_out.latents.shape == (1, 16, 3, 4, 6)
    kw = dict(image=Image.fromarray(first), prompt=prompt, negative_prompt=negative, height=32, width=48,
              num_frames=9, num_inference_steps=steps, guidance_scale=5.0, max_sequence_length=512)
    if kind == "flf2v":
        kw["last_image"] = Image.fromarray(last)
    with torch.no_grad():
        latents = reference(latents=noise.clone(), output_type="latent", **kw).frames
    assert latents.std() > 0.1
    torch.testing.assert_close(clip_out.latents, latents, rtol=0, atol=1e-4)  # seen: 2e-6 (I2V), 5e-6 (FLF2V)
    # the conditioning matters: another first frame gives another clip
    other = pipe.generate(prompt, negative=negative, frames=9, height=32, width=48, steps=steps, seed=3,
                          image=as_kino[0].flip(-1), **extra)
    assert (other.latents - latents).abs().max() > 1e-2


def test_i2v_frame_mask_is_wans():
    from kino.pipeline import frame_mask

    m = frame_mask(9, [0], 4)  # 9 frames -> 3 latent frames; frame 0 fills the first latent frame
    assert m.tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0]]
    m = frame_mask(9, [0, 8], 4)  # FLF2V: the last pixel frame is the 4th of the last latent frame
    assert m.tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 1]]


def test_kino_generate_and_convert_on_an_i2v_folder(i2v, tmp_path, capsys):
    import numpy as np

    from kino.cli import main
    from kino.data.video_io import read_metadata, read_video, write_video
    from kino.pipeline import Pipeline

    kind, _, root = i2v
    image = tmp_path / "first.png"
    write_video(image, torch.from_numpy(_image((40, 56), seed=4))[None], fps=16)
    argv = ["generate", "a cat walks on the grass", "--model", str(root), "--image", str(image), "--frames", "5",
            "--steps", "2", "--size", "32x48", "-q"]
    if kind == "flf2v":
        argv += ["--last-image", str(image)]
    out = tmp_path / "clip.mp4"
    assert main(argv + ["-o", str(out)]) == 0, capsys.readouterr().err
    video, fps = read_video(out)
    assert video.shape == (5, 32, 48, 3) and fps == 16
    meta = read_metadata(out)
    assert meta["task"] == f"image-to-video (Wan2.1 {kind.upper()})" and str(image) in meta["inputs"]

    # kino convert wan carries the image encoder; the converted folder samples the same latents
    dst = tmp_path / "kino-i2v"
    assert main(["convert", "wan", str(root), str(dst)]) == 0
    manifest = json.loads((dst / "kino.json").read_text())
    assert set(manifest["components"]) == {"vae", "dit", "text_encoder", "image_encoder"}
    x = torch.from_numpy(_image((32, 48), seed=5)).permute(2, 0, 1).float() / 127.5 - 1
    extra = {} if kind == "i2v" else {"last_image": x.flip(-1)}
    kw = dict(frames=5, height=32, width=48, steps=2, seed=1, image=x, **extra)
    a = Pipeline.from_pretrained(root, text_dtype="float32").generate("a cat", **kw)
    b = Pipeline.from_pretrained(dst, text_dtype="float32").generate("a cat", **kw)
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=1e-5)

    # without the image: a clear error, exit 2
    assert main(["generate", "a cat", "--model", str(dst), "-o", str(tmp_path / "x.mp4"), "-q"]) == 2
    assert "image-to-video model: give the first frame (--image)" in capsys.readouterr().err
    if kind == "i2v":
        assert main(argv + ["--last-image", str(image), "-o", str(tmp_path / "y.mp4")]) == 2
        assert "only a Wan2.1 FLF2V model takes a last frame" in capsys.readouterr().err
    assert np.asarray(video).std() > 0


def test_i2v_folder_in_small_gpu_mode_and_bad_folders(i2v, tmp_path, capsys):
    import shutil

    from kino.cli import main
    from kino.models.memory import MemoryPlan
    from kino.pipeline import Pipeline

    kind, _, root = i2v
    x = torch.from_numpy(_image((32, 48), seed=6)).permute(2, 0, 1).float() / 127.5 - 1
    kw = dict(frames=5, height=32, width=48, steps=2, seed=1, image=x,
              **({} if kind == "i2v" else {"last_image": x.flip(-2)}))
    base = Pipeline.from_pretrained(root, text_dtype="float32").generate("a cat", **kw)
    pipe = Pipeline.from_pretrained(root, text_dtype="float32",
                                    memory=MemoryPlan(dtype="bfloat16", weights="fp8", offload="model"))
    small = pipe.generate("a cat", **kw)
    err = (small.latents - base.latents).abs().mean() / base.latents.abs().mean()
    assert 0 < err < 0.05, err

    bad = shutil.copytree(root, tmp_path / "no-clip")
    shutil.rmtree(bad / "image_encoder")
    capsys.readouterr()
    assert main(["convert", "wan", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "image_encoder is missing" in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------- Wan's original CLIP checkpoint


def clip_to_wan(state):
    """transformers CLIPVisionModel -> Wan's open-clip XLM-RoBERTa ViT-H/14 names (wan/modules/clip.py:
    `visual.` VisionTransformer with a fused to_qkv), plus the parts a real checkpoint also holds
    (the text tower, log_scale, the projection head), which carry nothing for the image features."""
    state = {k.removeprefix("vision_model."): v for k, v in state.items()}
    dim = state["embeddings.patch_embedding.weight"].shape[0]
    out = {"visual.patch_embedding.weight": state["embeddings.patch_embedding.weight"],
           "visual.cls_embedding": state["embeddings.class_embedding"].reshape(1, 1, dim),
           "visual.pos_embedding": state["embeddings.position_embedding.weight"][None],
           "visual.head": torch.randn(dim, 16), "log_scale": torch.tensor(2.6),
           "textual.token_embedding.weight": torch.randn(5, 8)}
    for ours, theirs in [("pre_layrnorm", "pre_norm"), ("post_layernorm", "post_norm")]:
        for p in ("weight", "bias"):
            out[f"visual.{theirs}.{p}"] = state[f"{ours}.{p}"]
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
    for i in range(layers):
        pre = f"encoder.layers.{i}."
        for p in ("weight", "bias"):
            out[f"visual.transformer.{i}.attn.to_qkv.{p}"] = torch.cat(
                [state[f"{pre}self_attn.{n}_proj.{p}"] for n in "qkv"])
            for ours, theirs in [("self_attn.out_proj", "attn.proj"), ("layer_norm1", "norm1"),
                                 ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.2")]:
                out[f"visual.transformer.{i}.{theirs}.{p}"] = state[f"{pre}{ours}.{p}"]
    return out


def wan_clip_reference(model, images):
    """Wan's CLIP.visual: squash to the image size (bicubic, no antialiasing), [-1, 1] -> [0, 1],
    CLIP's mean / std, then the vision tower up to its penultimate block."""
    size = model.config.image_size
    x = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False).mul(0.5).add(0.5)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(pixel_values=(x - mean) / std, output_hidden_states=True).hidden_states[-2]


def test_clip_encoder_from_wans_checkpoint(tmp_path):
    from kino.errors import KinoUserError
    from kino.models.clip import CLIPImageEncoder

    model, _ = _clip(seed=11)
    _perturb(model, 12)
    pth = tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    torch.save(clip_to_wan(model.state_dict()), pth)
    encoder = CLIPImageEncoder.from_wan(pth, num_heads=2)
    assert encoder.resize == "squash" and encoder.size == 32
    images = torch.rand(2, 3, 48, 80, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected = wan_clip_reference(model, images)
    torch.testing.assert_close(encoder.encode(images), expected, rtol=0, atol=1e-5)
    # a wrong head count is a different computation: the features change (heads are not in the shapes)
    assert (CLIPImageEncoder.from_wan(pth, num_heads=4).encode(images) - expected).abs().max() > 1e-3
    torch.save({**clip_to_wan(model.state_dict()), "visual.extra.weight": torch.zeros(1)}, pth)
    with pytest.raises(KinoUserError, match="not in the layout of Wan2.1's CLIP vision tower"):
        CLIPImageEncoder.from_wan(pth, num_heads=2)


def test_original_layout_i2v_folder_matches_the_diffusers_one(tmp_path):
    """Wan's original I2V layout (WanModel config model_type i2v, its CLIP .pth, 1280-wide
    features as Wan hardcodes) loads into the same pipeline as the diffusers layout of the same
    weights: with an image at CLIP's size both preprocessings are the identity, so the latents
    agree (the diffusers layout is checked against diffusers above)."""
    from safetensors.torch import save_file
    from test_wan import umt5_to_wan, vae_to_wan, VAE

    from kino.pipeline import Pipeline

    dit, vae, text, tokenizer, _, processor = _i2v_components("i2v")
    torch.manual_seed(13)
    dit = _perturb(diffusers.WanTransformer3DModel(**{**dict(dit.config), "image_dim": 1280}), 14).eval()
    clip = _perturb(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=1280, intermediate_size=32, num_hidden_layers=2, num_attention_heads=16, image_size=32,
        patch_size=8, hidden_act="gelu")), 15).eval()
    both = (dit, vae, text, tokenizer, clip, processor)
    root_d = write_i2v_diffusers(tmp_path / "Wan2.1-I2V-tiny-Diffusers", both)
    root_o = tmp_path / "Wan2.1-I2V-tiny"
    root_o.mkdir()
    (root_o / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "model_type": "i2v", "dim": 32, "ffn_dim": 64, "freq_dim": 32, "in_dim": 36,
        "out_dim": 16, "num_heads": 2, "num_layers": 2, "eps": 1e-6, "text_len": 512, "text_dim": 24}))
    save_file({k: v.contiguous() for k, v in dit_to_wan(dit.state_dict()).items()},
              str(root_o / "diffusion_pytorch_model.safetensors"))
    torch.save(vae_to_wan(vae.state_dict(), VAE["num_res_blocks"]), root_o / "Wan2.1_VAE.pth")
    torch.save(umt5_to_wan(text.state_dict()), root_o / "models_t5_umt5-xxl-enc-bf16.pth")
    tokenizer.save_pretrained(root_o / "google" / "umt5-xxl")
    torch.save(clip_to_wan(clip.state_dict()), root_o / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")

    pipes = {name: Pipeline.from_pretrained(root, text_dtype="float32") for name, root in
             [("original", root_o), ("diffusers", root_d)]}
    assert pipes["original"].dit.config == pipes["diffusers"].dit.config
    assert pipes["original"].dit.config.img_dim == 1280 and pipes["original"].image_encoder.resize == "squash"
    x = torch.from_numpy(_image((32, 32), seed=8)).permute(2, 0, 1).float() / 127.5 - 1
    kw = dict(frames=5, height=32, width=48, steps=2, seed=2, image=x)
    a, b = (pipes[name].generate("a cat walks", **kw) for name in ("original", "diffusers"))
    assert b.latents.std() > 0.1
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=1e-5)
    # Wan's I2V-14B model does not depend on the size in the name: 1280 is hardcoded in WanModel
    with torch.no_grad():
        torch.testing.assert_close(pipes["original"].image_encoder.encode(x[None]),
                                   wan_clip_reference(clip, x[None]), rtol=0, atol=1e-5)
    # kino convert keeps Wan's preprocessing (squash) in the converted folder's image encoder reference
    from kino.cli import main

    dst = tmp_path / "kino-i2v"
    assert main(["convert", "wan", str(root_o), str(dst)]) == 0
    assert json.loads((dst / "image_encoder" / "config.json").read_text())["resize"] == "squash"
    c = Pipeline.from_pretrained(dst, text_dtype="float32").generate("a cat walks", **kw)
    torch.testing.assert_close(c.latents, a.latents, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["i2v", "flf2v"])
def test_lora_fine_tune_of_a_wan_i2v_model_on_videos(kind, tmp_path, capsys):
    """Fine-tuning Wan2.1 I2V (and FLF2V) on videos: `kino preprocess` stores each clip's image
    conditioning (the first (and last) frame's VAE latents with black frames between, and CLIP
    features) as Pipeline.image_condition computes it; `kino train dit` feeds it to the
    36-channel DiT with Wan's mask; the LoRA then changes `kino generate --image`."""
    from test_wan import video_run_config

    from kino.cli import main
    from kino.data.latent_cache import LatentCache
    from kino.data.preprocess import WanImageCondition
    from kino.data.video_io import write_video
    from kino.pipeline import Pipeline

    root = write_i2v_diffusers(tmp_path / "wan-i2v-diffusers", _i2v_components(kind))
    wan = tmp_path / "wan-i2v"
    assert main(["convert", "wan", str(root), str(wan)]) == 0
    pipe = Pipeline.from_pretrained(wan, text_dtype="float32")
    # the cache's conditioning is the pipeline's, up to the cache's bf16 / fp16 storage
    clip = torch.rand(3, 9, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    flf = kind == "flf2v"
    cond = WanImageCondition(pipe.vae, pipe.image_encoder, last=flf)([clip])
    expected = pipe.image_condition(clip[:, 0], 9, 32, 48, clip[:, -1] if flf else None)
    torch.testing.assert_close(cond["image_latents"].float(), expected.channels[:, 4:], rtol=0.01, atol=0.02)
    torch.testing.assert_close(cond["image_features"].float(), expected.features, rtol=0.01, atol=0.01)

    config = tmp_path / "run.toml"
    config.write_text(video_run_config(tmp_path, wan) + "[lora]\nrank = 2\n")
    assert main(["preprocess", "--config", str(config), "-q"]) == 0, capsys.readouterr().err
    cache = LatentCache(tmp_path / "cache")
    data = cache.get(cache.buckets[0], [0, 1])
    assert data["image_latents"].shape == data["latents"].shape
    assert data["image_features"].shape == (2, 17 * (2 if flf else 1), IMG_DIM)
    assert cache.meta["image_condition"]["kind"] == ("wan-first-last-frame" if flf else "wan-first-frame")
    # the trainer lays the DiT's input out as the pipeline does: noise, Wan's mask, image latents
    from kino.training.config import load_config
    from kino.training.dit import DiTRunConfig, DiTTask

    task = DiTTask(load_config(config, DiTRunConfig), cache, vae=pipe.vae)
    with torch.no_grad():  # a preview starts from the cached clip's first frame like generation
        (preview,) = task.samples(task.build_model().eval()).values()
    assert preview.shape == (9, 32, 64, 3) and preview.dtype == torch.uint8
    x = torch.randn(1, 16, 3, 4, 6)
    inp, extra = task.dit_input(x, {k: v.float() for k, v in cond.items()})
    assert torch.equal(inp[:, :16], x) and torch.equal(inp[:, 16:20], expected.channels[:, :4])
    torch.testing.assert_close(inp[:, 20:], expected.channels[:, 4:], rtol=0.01, atol=0.02)
    assert torch.equal(extra["image"], cond["image_features"].float())
    assert main(["train", "dit", "--config", str(config), "-q"]) == 0, capsys.readouterr().err
    lora = tmp_path / "run" / "lora.safetensors"
    image = tmp_path / "first.png"
    write_video(image, torch.from_numpy(_image((32, 48), seed=4))[None], fps=16)
    args = ["generate", "a cat walks", "--model", str(wan), "--image", str(image), "--frames", "5", "--steps", "2",
            "-q", *(["--last-image", str(image)] if flf else [])]
    assert main([*args, "-o", str(tmp_path / "plain.mp4")]) == 0
    assert main([*args, "--lora", str(lora), "-o", str(tmp_path / "lora.mp4")]) == 0, capsys.readouterr().err
    assert (tmp_path / "plain.mp4").read_bytes() != (tmp_path / "lora.mp4").read_bytes()
