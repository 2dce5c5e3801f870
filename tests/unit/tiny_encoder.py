"""A tiny BERT sentence encoder built in the test (random weights, no files), with data.

It has the real example's structure (``SentenceEncoder`` over a Hugging Face ``BertModel``
with eager attention) at a size that exports, quantises and distils in seconds.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np
import torch

from gearbox.compression.examples.minilm import SentenceEncoder, keep_layers
from gearbox.compression.signature import Signature, TensorSpec, TextInput
from gearbox.compression.spec import DataSplits, ModelSpec, Split, TrainingConfig

VOCAB = 100
HIDDEN = 32
LAYERS = 4
HEADS = 4
SEQUENCE = 12
MODULE = "tests.unit.tiny_encoder"


def tiny_encoder() -> SentenceEncoder:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=4 * HIDDEN,
        max_position_embeddings=64,
        # Wide initial weights make sentences differ (at the default 0.02 a random BERT maps
        # every sentence to nearly the same embedding, leaving a student nothing to learn).
        initializer_range=0.5,
        attn_implementation="eager",
    )
    return SentenceEncoder(BertModel(config, add_pooling_layer=False)).eval()


def tiny_student() -> SentenceEncoder:
    return keep_layers(tiny_encoder(), (1, 3))


def _split(rows: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, SEQUENCE + 1, rows)
    ids = rng.integers(5, VOCAB, (rows, SEQUENCE))
    mask = (np.arange(SEQUENCE)[None, :] < lengths[:, None]).astype(np.int64)
    ids[:, 0] = 2  # a [CLS]-like first token
    return Split({"input_ids": (ids * mask).astype(np.int64), "attention_mask": mask})


def tiny_text_splits() -> DataSplits:
    return DataSplits(train=_split(96, 1), calibration=_split(32, 2), heldout=_split(48, 3))


def encoder_spec() -> ModelSpec:
    return ModelSpec(
        name="tiny-encoder",
        model_factory=f"{MODULE}:tiny_encoder",
        student_factory=f"{MODULE}:tiny_student",
        data_provider=f"{MODULE}:tiny_text_splits",
        task="embedding",
        metric="cosine",
        signature=Signature(
            inputs=(
                TensorSpec("input_ids", "INT64", (-1, -1)),
                TensorSpec("attention_mask", "INT64", (-1, -1)),
            ),
            outputs=(TensorSpec("sentence_embedding", "FP32", (-1, HIDDEN)),),
        ),
        student_training=TrainingConfig(epochs=3, batch_size=16, learning_rate=1e-3),
    )


WORDS = [f"w{i}" for i in range(4, VOCAB)]
"""The tiny tokenizer's vocabulary: "w4" is id 4, ... (0 [PAD], 1 [UNK], 2 [CLS], 3 [SEP])."""
TEXT_MAX_TOKENS = 10


def tiny_tokenizer_json() -> bytes:
    """A real ``tokenizers`` word-level tokenizer over :data:`WORDS`, BERT's specials around."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3} | {
        w: i + 4 for i, w in enumerate(WORDS)
    }
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tokenizer.to_str().encode()


def tiny_tokenizer_file() -> Path:
    data = tiny_tokenizer_json()
    path = (
        Path(tempfile.gettempdir()) / f"gearbox-tiny-{hashlib.sha256(data).hexdigest()[:12]}.json"
    )
    if not path.exists():
        path.write_bytes(data)
    return path


def text_encoder_spec() -> ModelSpec:
    """The tiny encoder taking sentences of :data:`WORDS` through :func:`tiny_tokenizer_file`."""
    import dataclasses

    return dataclasses.replace(
        encoder_spec(),
        name="tiny-text",
        text=TextInput(name="text", max_tokens=TEXT_MAX_TOKENS, refuse_factor=3),
        tokenizer_file=f"{MODULE}:tiny_tokenizer_file",
    )
