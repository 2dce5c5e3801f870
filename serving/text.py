"""Text in: a BYTES tensor of UTF-8 sentences becomes a text model's token ids.

The gateway tokenizes with the model's own ``tokenizer.json`` (the ``tokenizers`` library, whose
batch encoding runs in Rust, with no Python loop per token), pads each request to its longest
sentence, and cuts sentences past the model's maximum length, saying how many it cut. A sentence
far past that length is refused instead: cutting a document to its first few hundred tokens is
rarely what the caller meant.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Encoding, Tokenizer

from gearbox.compression.errors import InvalidArgumentError
from gearbox.compression.signature import TextInput

TOKENS_PARAMETER = "tokens"
"""Response parameter: the token length the graph ran at (the request's longest sentence)."""
TRUNCATED_PARAMETER = "truncated_sentences"
"""Response parameter: how many of the request's sentences were cut to the maximum length."""


@dataclass(frozen=True)
class Tokenized:
    inputs: dict[str, np.ndarray]
    """The graph's token-id and mask inputs, INT64 [sentences, tokens]."""
    tokens: int
    truncated: int


class SentenceTokenizer:
    """One text model's tokenizer, configured for serving: pad to the longest, cut at the max."""

    def __init__(self, text: TextInput, tokenizer_json: bytes) -> None:
        try:
            tokenizer = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        except Exception as exc:  # the library raises plain Exceptions on a bad file
            raise InvalidArgumentError(f"text input '{text.name}': bad tokenizer: {exc}") from exc
        padding = tokenizer.padding or {}
        tokenizer.enable_padding(
            pad_id=int(padding.get("pad_id", 0)), pad_token=padding.get("pad_token", "[PAD]")
        )
        tokenizer.enable_truncation(max_length=text.max_tokens)
        self._tokenizer = tokenizer
        self._text = text

    @property
    def text(self) -> TextInput:
        return self._text

    def tokenize(self, sentences: np.ndarray) -> Tokenized:
        """Token ids for a BYTES tensor of shape [n] or [n, 1]."""
        name = self._text.name
        if sentences.ndim == 2 and sentences.shape[1] == 1:
            sentences = sentences[:, 0]
        if sentences.ndim != 1:
            raise InvalidArgumentError(
                f"input '{name}': shape {list(sentences.shape)} must be [sentences] or "
                "[sentences, 1]"
            )
        if sentences.size == 0:
            raise InvalidArgumentError(f"input '{name}': the batch is empty (no sentence)")
        encodings = self._tokenizer.encode_batch(_decoded(name, sentences))
        truncated = 0
        limit = self._text.max_tokens * self._text.refuse_factor
        for position, encoding in enumerate(encodings):
            if encoding.overflowing:
                truncated += 1
                length = _original_length(encoding)
                if length > limit:
                    raise InvalidArgumentError(
                        f"input '{name}': sentence {position} has {length} tokens, more than "
                        f"{self._text.refuse_factor}x the model's maximum of "
                        f"{self._text.max_tokens}; split it into sentences"
                    )
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return Tokenized(
            {self._text.ids_input: ids, self._text.mask_input: mask}, int(ids.shape[1]), truncated
        )


def _decoded(name: str, sentences: np.ndarray) -> list[str]:
    texts = []
    for position, sentence in enumerate(sentences):
        if isinstance(sentence, bytes):
            try:
                sentence = sentence.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidArgumentError(
                    f"input '{name}': sentence {position} is not valid UTF-8 ({exc.reason} at "
                    f"byte {exc.start})"
                ) from None
        elif not isinstance(sentence, str):
            raise InvalidArgumentError(
                f"input '{name}': sentence {position} is a {type(sentence).__name__}, not a string"
            )
        texts.append(sentence)
    return texts


def _original_length(encoding: Encoding) -> int:
    """Tokens of a cut sentence before the cut: every piece's content plus one piece's specials
    (each overflowing piece carries its own [CLS] and [SEP])."""

    def counts(piece: Encoding) -> tuple[int, int]:
        real = [
            s for s, m in zip(piece.special_tokens_mask, piece.attention_mask, strict=True) if m
        ]
        return len(real) - sum(real), sum(real)

    content, specials = counts(encoding)
    return content + specials + sum(counts(piece)[0] for piece in encoding.overflowing)
