"""Text in: BYTES tensors on the wire, tokenization with the model's own tokenizer, and a text
model served end to end by the data plane (tiny BERT plus a real word-level tokenizer)."""

from __future__ import annotations

import asyncio
import struct

import numpy as np
import pytest

from gearbox.compression import ModelRecord, ModelRepository
from gearbox.compression.errors import IntegrityError, InvalidArgumentError
from gearbox.compression.examples import minilm
from gearbox.compression.signature import TextInput
from gearbox.compression.techniques import Fp32Config, TechniqueInput, apply_technique
from gearbox.serving.inference import (
    InferRequest,
    Tensor,
    tensor_from_bytes,
    tensor_from_values,
    tensor_to_bytes,
)
from gearbox.serving.text import TOKENS_PARAMETER, TRUNCATED_PARAMETER, SentenceTokenizer
from tests.unit.serving_fixtures import started
from tests.unit.tiny_encoder import (
    TEXT_MAX_TOKENS,
    text_encoder_spec,
    tiny_encoder,
    tiny_tokenizer_json,
)
from tests.unit.tiny_model import make_manifest

# --- BYTES on the wire ----------------------------------------------------------------------


def prefixed(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def test_bytes_from_json_strings_keep_shape_and_order():
    tensor = tensor_from_values("text", "BYTES", [2, 1], [["héllo"], ["world"]])
    assert tensor.datatype == "BYTES"
    assert tensor.shape == (2, 1)
    assert tensor.data[:, 0].tolist() == ["héllo", "world"]


def test_bytes_from_length_prefixed_raw_data_round_trip():
    raw = prefixed("héllo".encode(), b"", b"world")
    tensor = tensor_from_bytes("text", "BYTES", [3], raw)
    assert tensor.data.tolist() == ["héllo".encode(), b"", b"world"]
    assert tensor_to_bytes(tensor) == raw


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (prefixed(b"one"), r"needs 2 length-prefixed BYTES elements; the 7 bytes hold 1"),
        (prefixed(b"one", b"two", b"three"), r"hold 2 and 9 bytes more"),
        (struct.pack("<I", 50) + b"short", r"element 0 claims 50 bytes, only 5 remain"),
        (b"\x01\x00", r"the 2 bytes hold 0"),
    ],
)
def test_malformed_raw_bytes_are_refused_naming_the_problem(raw, message):
    with pytest.raises(InvalidArgumentError, match=message):
        tensor_from_bytes("text", "BYTES", [2], raw)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["fine", 3], r"BYTES element 1 is a int, not a string"),
        ("just a string", r"BYTES data must be a list of strings"),
        (["a", "b", "c"], r"shape \[2\] needs 2 elements, data has 3"),
    ],
)
def test_malformed_json_bytes_are_refused_naming_the_problem(values, message):
    with pytest.raises(InvalidArgumentError, match=message):
        tensor_from_values("text", "BYTES", [2], values)


def test_deeply_nested_bytes_data_is_flattened_without_recursion():
    nested: list = ["deep"]
    for _ in range(5000):
        nested = [nested]
    assert tensor_from_values("text", "BYTES", [1], nested).data.tolist() == ["deep"]


# --- tokenization with the real all-MiniLM-L6-v2 tokenizer ------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> SentenceTokenizer:
    text = TextInput(name="text", max_tokens=16, refuse_factor=4)
    return SentenceTokenizer(text, minilm.tokenizer_file().read_bytes())


def sentences(*texts: str | bytes) -> np.ndarray:
    array = np.empty(len(texts), dtype=object)
    array[:] = list(texts)
    return array


LONG = "a much longer sentence that goes on and on and on about nothing at all really truly"


def test_a_request_is_padded_to_its_longest_sentence_as_the_model_tokenizes(tokenizer):
    tokenized = tokenizer.tokenize(sentences(b"Hello world", "Hello there, world!"))
    reference = minilm.tokenize(["Hello world", "Hello there, world!"], length=tokenized.tokens)
    assert tokenized.tokens == 7  # [CLS] hello there , world ! [SEP]
    assert tokenized.truncated == 0
    for name in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(tokenized.inputs[name], reference[name])
    assert tokenized.inputs["attention_mask"].sum(axis=1).tolist() == [4, 7]


def test_a_sentence_past_the_maximum_is_cut_as_the_model_cuts_it_and_counted(tokenizer):
    tokenized = tokenizer.tokenize(sentences("short", LONG))
    assert tokenized.truncated == 1
    assert tokenized.tokens == 16
    reference = minilm.tokenize([LONG], length=16)
    np.testing.assert_array_equal(tokenized.inputs["input_ids"][1], reference["input_ids"][0])


def test_a_column_of_sentences_is_accepted(tokenizer):
    column = sentences("one", "two").reshape(2, 1)
    assert tokenizer.tokenize(column).inputs["input_ids"].shape == (2, 3)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (sentences("fine", b"\xff\xfe oops"), r"sentence 1 is not valid UTF-8"),
        (sentences("fine", "word " * 100), r"sentence 1 has 102 tokens, more than 4x .* of 16"),
        (sentences(), r"the batch is empty"),
        (sentences("a", "b").reshape(1, 2), r"shape \[1, 2\] must be \[sentences\]"),
    ],
)
def test_malformed_text_is_refused_naming_the_problem(tokenizer, batch, message):
    with pytest.raises(InvalidArgumentError, match=message):
        tokenizer.tokenize(batch)


def test_a_non_string_sentence_is_refused(tokenizer):
    with pytest.raises(InvalidArgumentError, match="sentence 0 is a int, not a string"):
        tokenizer.tokenize(sentences(7))  # type: ignore[arg-type]


def test_a_text_input_must_match_the_graphs_token_inputs():
    spec = text_encoder_spec()
    with pytest.raises(InvalidArgumentError, match="needs a graph input 'token_ids'"):
        TextInput(ids_input="token_ids").check_against(spec.signature)
    with pytest.raises(InvalidArgumentError, match="clashes with a graph input"):
        TextInput(name="input_ids").check_against(spec.signature)


# --- a text model served by the data plane ----------------------------------------------------

SPEC = text_encoder_spec()
TOKENIZER = tiny_tokenizer_json()


@pytest.fixture(scope="module")
def text_repository(tmp_path_factory) -> ModelRepository:
    repository = ModelRepository(tmp_path_factory.mktemp("text-repo"))
    repository.ensure_writable()
    repository.register_model(
        ModelRecord.for_spec(SPEC, reference_variant="fp32", tokenizer=TOKENIZER), TOKENIZER
    )
    built = apply_technique(
        Fp32Config(),
        TechniqueInput(spec=SPEC, data=SPEC.load_data(), reference_model=tiny_encoder()),
    )
    repository.publish_variant(make_manifest(built.onnx, model=SPEC.name), built.onnx)
    return repository


def text_request(*texts: str | bytes, **parameters) -> InferRequest:
    return InferRequest(SPEC.name, (Tensor("text", sentences(*texts)),), parameters=parameters)


def ids_request(inputs: dict[str, np.ndarray]) -> InferRequest:
    return InferRequest(SPEC.name, tuple(Tensor(k, v) for k, v in inputs.items()))


def test_the_repository_carries_the_tokenizer_and_checks_it(text_repository, tmp_path):
    record = text_repository.model(SPEC.name)
    assert record.text == SPEC.text
    assert text_repository.read_tokenizer(record) == TOKENIZER
    copy = ModelRepository(tmp_path)
    copy.register_model(record, TOKENIZER)
    (tmp_path / SPEC.name / "tokenizer.json").write_bytes(TOKENIZER + b" ")
    with pytest.raises(IntegrityError, match="does not match the sha256"):
        copy.read_tokenizer(record)
    with pytest.raises(InvalidArgumentError, match="registered with the tokenizer its record"):
        copy.register_model(record, None)


def test_text_and_its_token_ids_give_the_same_embedding(text_repository):
    async def scenario():
        async with started(text_repository, shadow_fraction=0) as served:
            text = await served.answer(text_request("w5 w6 w7", "w9"))
            ids = SentenceTokenizer(SPEC.text, TOKENIZER).tokenize(sentences("w5 w6 w7", "w9"))
            by_ids = await served.answer(ids_request(ids.inputs))
            return text, by_ids

    text, by_ids = asyncio.run(scenario())
    [embedding] = text.outputs
    assert embedding.shape == (2, 32)
    np.testing.assert_allclose(embedding.data, by_ids.outputs[0].data, atol=1e-6)
    assert text.parameters[TOKENS_PARAMETER] == 5
    assert text.parameters[TRUNCATED_PARAMETER] == 0
    assert by_ids.parameters[TOKENS_PARAMETER] == 5
    assert TRUNCATED_PARAMETER not in by_ids.parameters


def test_a_sentence_answers_alike_alone_and_beside_a_longer_one(text_repository):
    """Padding is masked: a request padded to its neighbour's length answers as it would alone."""

    async def scenario():
        async with started(text_repository, shadow_fraction=0) as served:
            alone = await served.answer(text_request("w5 w6"))
            beside = await served.answer(text_request("w5 w6", "w7 w8 w9 w10 w11 w12"))
            return alone.outputs[0].data, beside.outputs[0].data

    alone, beside = asyncio.run(scenario())
    np.testing.assert_allclose(alone[0], beside[0], atol=1e-5)


def test_the_response_says_how_many_sentences_were_cut(text_repository):
    async def scenario():
        async with started(text_repository, shadow_fraction=0) as served:
            return await served.answer(text_request("w5 " * 12, "w6", "w7 " * 20))

    response = asyncio.run(scenario())
    assert response.parameters[TRUNCATED_PARAMETER] == 2
    assert response.parameters[TOKENS_PARAMETER] == TEXT_MAX_TOKENS


@pytest.mark.parametrize(
    ("request_of", "message"),
    [
        (lambda: text_request(b"w5 \xff"), r"sentence 0 is not valid UTF-8"),
        (lambda: text_request("w5 " * 40), r"sentence 0 has 42 tokens, more than 3x"),
        (
            lambda: InferRequest(
                SPEC.name,
                (
                    Tensor("text", sentences("w5")),
                    Tensor("input_ids", np.ones((1, 3), np.int64)),
                ),
            ),
            r"give sentences in 'text' or token ids .*not both",
        ),
        (
            lambda: InferRequest(SPEC.name, (Tensor("text", np.ones(2, np.float32)),)),
            r"input 'text' has datatype FP32, the model expects BYTES",
        ),
    ],
)
def test_malformed_text_requests_fail_alone_and_the_plane_keeps_serving(
    text_repository, request_of, message
):
    async def scenario():
        async with started(text_repository, shadow_fraction=0) as served:
            with pytest.raises(InvalidArgumentError, match=message):
                await served.answer(request_of())
            return await served.answer(text_request("w5"))

    assert asyncio.run(scenario()).outputs[0].shape == (1, 32)


def test_metadata_lists_the_text_input_first_and_the_token_inputs_after(text_repository):
    async def scenario():
        async with started(text_repository, shadow_fraction=0) as served:
            return served.plane.model_metadata(SPEC.name)

    metadata = asyncio.run(scenario())
    assert [(t.name, t.datatype, t.shape) for t in metadata.inputs] == [
        ("text", "BYTES", (-1,)),
        ("input_ids", "INT64", (-1, -1)),
        ("attention_mask", "INT64", (-1, -1)),
    ]
    assert metadata.parameters["text_input"] == "text"
    assert metadata.parameters["max_tokens"] == TEXT_MAX_TOKENS


def test_a_requests_predicted_latency_follows_its_own_token_count(text_repository, tmp_path):
    """Profiled at 4 tokens (1 ms) and 8 tokens (5 ms), the variant is predicted 4 ms slower
    for an 8-token sentence than for a 4-token one."""
    import dataclasses

    by_tokens = {"4": {"p50": 1.0, "p95": 1.2}, "8": {"p50": 5.0, "p95": 6.0}}
    profile = {"cpu": {"1": {"p50": 3.0, "p95": 3.6, "tokens": by_tokens}}}
    repository = ModelRepository(tmp_path)
    record = text_repository.model(SPEC.name)
    repository.register_model(record, TOKENIZER)
    manifest = text_repository.manifest(SPEC.name, "fp32")
    repository.publish_variant(
        dataclasses.replace(manifest, latency_ms=profile),
        text_repository.read_artifact(manifest),
    )

    async def scenario():
        async with started(repository, shadow_fraction=0) as served:
            by_length = {
                tokens: served.backend.predict_ms(SPEC.name, "fp32", 1, tokens) for tokens in (4, 8)
            }
            expected = round(served.plane.overhead_ms + by_length[8], 4)
            answer = await served.answer(text_request("w5 w6 w7 w8 w9 w10", latency_budget_ms=1e3))
            return by_length, expected, answer.parameters

    by_length, expected, parameters = asyncio.run(scenario())
    assert by_length[8] - by_length[4] == pytest.approx(4.0)
    assert parameters[TOKENS_PARAMETER] == 8
    assert parameters["predicted_latency_ms"] == expected
