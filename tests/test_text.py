"""The frozen text encoder (shipped all-MiniLM-L6-v2), text fusion (000 Eq. 2) and text input."""

import logging

import pytest
import torch

from latentseg.errors import LatentSegError
from latentseg.text import TextEncoder, case_texts, load_text_encoder, resolve_encoder_path


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder()


def test_shipped_encoder_loads_offline_and_embeds(encoder):
    emb = encoder.encode(["the lesion in the upper left of the organ", "left ventricle"])
    assert emb.tokens.shape[0] == 2 and emb.tokens.shape[2] == encoder.dim == 384
    assert emb.padding[1].sum() > 0 and not emb.padding[0].any()  # the short one is padded
    assert torch.allclose(emb.pooled[1], emb.tokens[1][~emb.padding[1]].mean(0))
    # different sentences, different embeddings; the same sentence, the cached tensor
    assert not torch.allclose(emb.pooled[0], emb.pooled[1])
    assert encoder._embed_one("left ventricle")[0] is encoder._embed_one("left ventricle")[0]


def test_a_local_folder_loads_like_the_default(encoder):
    by_path = TextEncoder(resolve_encoder_path(""))
    text = "one small lesion in the lower right of the organ"
    assert torch.allclose(by_path.encode([text]).pooled, encoder.encode([text]).pooled)


def test_unicode_text_works(encoder):
    emb = encoder.encode(["Läsion im linken Leberlappen", "肝臓の腫瘍", "tumour ✓ — left kidney"])
    assert torch.isfinite(emb.tokens).all() and emb.pooled.shape == (3, 384)


def test_long_text_is_truncated_with_a_warning(encoder, caplog):
    with caplog.at_level(logging.WARNING, logger="latentseg.text"):
        emb = encoder.encode(["lesion " * 300])
    assert emb.tokens.shape[1] == encoder.max_length
    assert "truncated" in caplog.text


def test_empty_text_is_an_error(encoder):
    with pytest.raises(LatentSegError, match="empty text"):
        encoder.encode(["   "])


def test_an_encoder_that_is_not_there(tmp_path):
    with pytest.raises(LatentSegError, match="cannot load this folder"):
        TextEncoder(str(tmp_path))
    with pytest.raises(LatentSegError, match="nothing is downloaded"):
        TextEncoder("no-such-org/no-such-model")


def test_missing_case_texts_are_listed_unless_allowed():
    samples = [{"case_id": "a", "text": "x"}, {"case_id": "b", "text": None}, {"case_id": "c", "text": " "}]
    with pytest.raises(LatentSegError, match="no text for 2 case.*b, c"):
        case_texts(samples, False, "train")
    assert case_texts(samples, True, "train") == ["x", "no description", "no description"]
