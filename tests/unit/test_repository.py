import dataclasses
import json
import re

import pytest

from gearbox.compression import (
    IntegrityError,
    InvalidArgumentError,
    ModelRecord,
    ModelRepository,
    NotFoundError,
    RepositoryError,
)
from gearbox.compression.repository import (
    ARTIFACT_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    Quality,
    sha256_hex,
)
from tests.unit.tiny_model import CONV_SIGNATURE, linear_onnx, make_manifest, make_record

MODEL = "tiny"


@pytest.fixture
def repo(tmp_path):
    repository = ModelRepository(tmp_path / "repo")
    repository.ensure_writable()
    repository.register_model(make_record())
    return repository


def test_publish_and_read_back_round_trip(repo):
    fp32 = linear_onnx(seed=0)
    int8 = linear_onnx(seed=1)
    published = repo.publish_variant(make_manifest(fp32), fp32)
    assert published == repo.root / MODEL / "fp32"
    repo.publish_variant(
        make_manifest(
            int8,
            variant="int8",
            technique="quantize",
            parent="fp32",
            status="rejected",
            reason="too inaccurate",
            params={"mode": "static"},
        ),
        int8,
    )

    assert repo.models() == [MODEL]
    record = repo.model(MODEL)
    assert record.signature == CONV_SIGNATURE
    assert record.reference_variant == "fp32"
    assert record.spec == "tests.unit.tiny_model:conv_spec"
    assert record.description == "a tiny model"

    variants = repo.variants(MODEL)
    assert [m.variant for m in variants] == ["fp32", "int8"]
    fp32_manifest, int8_manifest = variants
    assert fp32_manifest.is_ready
    assert not int8_manifest.is_ready
    assert int8_manifest.reason == "too inaccurate"
    assert int8_manifest.parent == "fp32"
    assert int8_manifest.params == {"mode": "static"}
    assert fp32_manifest.latency_ms["cpu"]["8"] == {"p50": 0.3, "p95": 0.4}
    assert fp32_manifest.quality == Quality("accuracy", 0.9, 0.91, 0.97)
    assert repo.manifest(MODEL, "int8") == int8_manifest
    assert fp32_manifest.to_json() == make_manifest(fp32).to_json() | {
        "created_at": fp32_manifest.created_at
    }

    assert repo.read_artifact(fp32_manifest) == fp32
    assert repo.read_artifact(int8_manifest) == int8


def test_published_files_are_plain_json_and_onnx(repo):
    artifact = linear_onnx()
    repo.publish_variant(make_manifest(artifact), artifact)
    variant_dir = repo.root / MODEL / "fp32"
    assert sorted(p.name for p in variant_dir.iterdir()) == sorted([MANIFEST_FILE, ARTIFACT_FILE])
    assert (variant_dir / ARTIFACT_FILE).read_bytes() == artifact
    data = json.loads((variant_dir / MANIFEST_FILE).read_text())
    assert data["sha256"] == sha256_hex(artifact)
    assert data["size_bytes"] == len(artifact)
    model = json.loads((repo.root / MODEL / MODEL_FILE).read_text())
    assert model["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]


def test_republishing_replaces_the_variant_and_leaves_no_staging_behind(repo):
    first, second = linear_onnx(seed=0), linear_onnx(seed=1)
    repo.publish_variant(make_manifest(first, param_count=1), first)
    repo.publish_variant(make_manifest(second, param_count=2), second)

    [manifest] = repo.variants(MODEL)
    assert manifest.param_count == 2
    assert manifest.sha256 == sha256_hex(second)
    assert repo.read_artifact(manifest) == second
    model_dir = repo.root / MODEL
    assert sorted(p.name for p in model_dir.iterdir()) == ["fp32", MODEL_FILE]


def test_refused_publish_keeps_the_previous_variant(repo):
    good, other = linear_onnx(seed=0), linear_onnx(seed=1)
    repo.publish_variant(make_manifest(good), good)
    with pytest.raises(IntegrityError):
        repo.publish_variant(make_manifest(good), other)
    assert repo.read_artifact(repo.manifest(MODEL, "fp32")) == good


def test_hidden_staging_and_trash_entries_are_never_listed(repo):
    artifact = linear_onnx()
    repo.publish_variant(make_manifest(artifact), artifact)
    model_dir = repo.root / MODEL
    for hidden in (".staging-int8-0123", ".trash-fp32-4567"):
        (model_dir / hidden).mkdir()
        (model_dir / hidden / MANIFEST_FILE).write_text(
            json.dumps(make_manifest(artifact, variant="int8").to_json())
        )
        (model_dir / hidden / ARTIFACT_FILE).write_bytes(artifact)
    hidden_model = repo.root / ".staging-model"
    hidden_model.mkdir()
    (hidden_model / MODEL_FILE).write_text(json.dumps(make_record(name="staged").to_json()))

    assert repo.models() == [MODEL]
    assert [m.variant for m in repo.variants(MODEL)] == ["fp32"]


def test_directories_without_a_manifest_are_not_variants(repo):
    (repo.root / MODEL / "half-written").mkdir()
    (repo.root / "not-a-model").mkdir()
    assert repo.models() == [MODEL]
    assert repo.variants(MODEL) == []


def test_read_artifact_detects_tampering(repo):
    artifact = linear_onnx()
    repo.publish_variant(make_manifest(artifact), artifact)
    manifest = repo.manifest(MODEL, "fp32")
    path = repo.root / MODEL / "fp32" / ARTIFACT_FILE
    tampered = bytearray(artifact)
    tampered[-1] ^= 0xFF
    path.write_bytes(bytes(tampered))
    with pytest.raises(IntegrityError, match="does not match its manifest's sha256"):
        repo.read_artifact(manifest)


def test_read_artifact_reports_a_missing_file(repo):
    artifact = linear_onnx()
    repo.publish_variant(make_manifest(artifact), artifact)
    manifest = repo.manifest(MODEL, "fp32")
    (repo.root / MODEL / "fp32" / ARTIFACT_FILE).unlink()
    with pytest.raises(RepositoryError, match="cannot read artifact"):
        repo.read_artifact(manifest)


def test_publish_refuses_a_manifest_that_does_not_describe_the_artifact(repo):
    artifact = linear_onnx()
    manifest = make_manifest(artifact)
    with pytest.raises(IntegrityError, match="manifest does not describe the artifact"):
        repo.publish_variant(manifest, artifact + b"\0")
    assert not (repo.root / MODEL / "fp32").exists()
    assert sorted(p.name for p in (repo.root / MODEL).iterdir()) == [MODEL_FILE]


def test_publish_before_register_is_not_found(tmp_path):
    repository = ModelRepository(tmp_path / "repo")
    repository.ensure_writable()
    artifact = linear_onnx()
    with pytest.raises(NotFoundError, match="model 'tiny' is not registered"):
        repository.publish_variant(make_manifest(artifact), artifact)
    assert not (repository.root / MODEL / "fp32").exists()


@pytest.mark.parametrize("variant", [".hidden", "a/b", "..", ""])
def test_publish_rejects_bad_variant_names(repo, variant):
    artifact = linear_onnx()
    with pytest.raises(InvalidArgumentError, match="invalid variant name"):
        repo.publish_variant(make_manifest(artifact, variant=variant), artifact)


def test_register_rejects_bad_model_names(tmp_path):
    repository = ModelRepository(tmp_path)
    with pytest.raises(InvalidArgumentError, match=re.escape("invalid model name '.staging'")):
        repository.register_model(make_record(name=".staging"))


def test_registering_again_replaces_model_json(repo):
    repo.register_model(
        ModelRecord(
            name=MODEL,
            signature=CONV_SIGNATURE,
            task="classification",
            metric="accuracy",
            reference_variant="fp32",
            description="second registration",
        )
    )
    assert repo.model(MODEL).description == "second registration"
    assert sorted(p.name for p in (repo.root / MODEL).iterdir()) == [MODEL_FILE]


def test_ensure_writable_creates_the_root_and_leaves_nothing_in_it(tmp_path):
    repository = ModelRepository(tmp_path / "a" / "b")
    repository.ensure_writable()
    assert repository.root.is_dir()
    assert list(repository.root.iterdir()) == []


def test_ensure_writable_fails_when_the_parent_is_a_regular_file(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    repository = ModelRepository(blocker / "repo")
    with pytest.raises(RepositoryError) as caught:
        repository.ensure_writable()
    assert caught.value.message.startswith(f"repository {blocker / 'repo'} is not writable: ")
    assert blocker.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_missing_repository_root_is_not_found(tmp_path):
    repository = ModelRepository(tmp_path / "missing")
    with pytest.raises(NotFoundError, match="does not exist"):
        repository.models()
    with pytest.raises(NotFoundError, match="does not exist"):
        repository.model(MODEL)
    with pytest.raises(NotFoundError, match="does not exist"):
        repository.variants(MODEL)
    assert not repository.root.exists()


def test_unknown_model_is_not_found(repo):
    with pytest.raises(NotFoundError, match="model 'other' not found"):
        repo.model("other")
    with pytest.raises(NotFoundError, match="model 'other' not found"):
        repo.variants("other")


def test_unknown_variant_is_not_found(repo):
    with pytest.raises(NotFoundError, match="variant 'int8' of model 'tiny' not found"):
        repo.manifest(MODEL, "int8")


def test_variant_json_that_is_not_json_is_a_repository_error(repo):
    artifact = linear_onnx()
    repo.publish_variant(make_manifest(artifact), artifact)
    (repo.root / MODEL / "fp32" / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(RepositoryError, match="cannot read"):
        repo.variants(MODEL)


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data.pop("sha256"),
        lambda data: data.update(size_bytes="many"),
        lambda data: data.update(quality={"metric": "accuracy"}),
    ],
    ids=["missing-key", "bad-number", "bad-quality"],
)
def test_malformed_variant_json_is_a_repository_error(repo, damage):
    artifact = linear_onnx()
    repo.publish_variant(make_manifest(artifact), artifact)
    path = repo.root / MODEL / "fp32" / MANIFEST_FILE
    data = json.loads(path.read_text())
    damage(data)
    path.write_text(json.dumps(data))
    with pytest.raises(RepositoryError, match="malformed variant manifest"):
        repo.manifest(MODEL, "fp32")


def test_malformed_model_json_is_a_repository_error(repo):
    path = repo.root / MODEL / MODEL_FILE
    data = json.loads(path.read_text())
    del data["reference_variant"]
    path.write_text(json.dumps(data))
    with pytest.raises(
        RepositoryError, match=re.escape("malformed tiny/model.json: missing 'reference_variant'")
    ):
        repo.model(MODEL)


# --- latency per token length ---------------------------------------------------------------


def _by_tokens(base_ms):
    """Figures that grow with length: 16 -> base, 32 -> 2x, 64 -> 4x, 128 -> 8x (p95 +10%)."""
    return {
        str(length): {"p50": base_ms * length / 16, "p95": 1.1 * base_ms * length / 16}
        for length in (16, 32, 64, 128)
    }


def _with_latency(manifest, latency_ms):
    return dataclasses.replace(manifest, latency_ms=latency_ms)


ENCODER_LATENCY = {
    "cpu": {
        "1": {"p50": 4.0, "p95": 4.4, "tokens": _by_tokens(1.0)},
        "8": {"p50": 32.0, "p95": 35.2, "tokens": _by_tokens(8.0)},
    }
}


def test_latency_per_token_length_survives_the_round_trip(repo):
    artifact = linear_onnx()
    repo.publish_variant(_with_latency(make_manifest(artifact), ENCODER_LATENCY), artifact)
    raw = json.loads((repo.root / MODEL / "fp32" / MANIFEST_FILE).read_text())
    assert raw["latency_ms"] == ENCODER_LATENCY
    manifest = repo.manifest(MODEL, "fp32")
    assert manifest.latency_ms == ENCODER_LATENCY
    assert manifest.to_json()["latency_ms"] == ENCODER_LATENCY
    # What readers that know nothing of lengths look at is where it always was.
    assert manifest.latency_ms["cpu"]["1"]["p50"] == 4.0


def test_latency_at_a_profiled_length_is_its_own_figures():
    manifest = _with_latency(make_manifest(linear_onnx()), ENCODER_LATENCY)
    assert manifest.latency_at("cpu", 1, tokens=32) == {"p50": 2.0, "p95": 2.2}
    assert manifest.latency_at("cpu", 8, tokens=128) == {"p50": 64.0, "p95": pytest.approx(70.4)}


def test_latency_between_two_lengths_is_interpolated_linearly():
    manifest = _with_latency(make_manifest(linear_onnx()), ENCODER_LATENCY)
    at_48 = manifest.latency_at("cpu", 1, tokens=48)  # halfway from 32 (2 ms) to 64 (4 ms)
    assert at_48 == {"p50": pytest.approx(3.0), "p95": pytest.approx(3.3)}
    at_40 = manifest.latency_at("cpu", 8, tokens=40)  # a quarter from 32 (16 ms) to 64 (32 ms)
    assert at_40 == {"p50": pytest.approx(20.0), "p95": pytest.approx(22.0)}


def test_latency_outside_the_profiled_lengths():
    manifest = _with_latency(make_manifest(linear_onnx()), ENCODER_LATENCY)
    # Shorter than the shortest: the shortest's figures.
    assert manifest.latency_at("cpu", 1, tokens=3) == {"p50": 1.0, "p95": 1.1}
    # Longer than the longest: on along the line through the two longest (64 -> 4, 128 -> 8).
    assert manifest.latency_at("cpu", 1, tokens=256) == {
        "p50": pytest.approx(16.0),
        "p95": pytest.approx(17.6),
    }
    # A noisy profile whose longest length measured faster never predicts below it.
    noisy = {
        "cpu": {
            "1": {
                "p50": 5.0,
                "p95": 6.0,
                "tokens": {"64": {"p50": 5.0, "p95": 6.0}, "128": {"p50": 4.0, "p95": 5.0}},
            }
        }
    }
    at_512 = _with_latency(make_manifest(linear_onnx()), noisy).latency_at("cpu", 1, tokens=512)
    assert at_512 == {"p50": 4.0, "p95": 5.0}


def test_latency_without_a_length_or_of_a_fixed_shape_model_is_the_batch_figures():
    encoder = _with_latency(make_manifest(linear_onnx()), ENCODER_LATENCY)
    assert encoder.latency_at("cpu", 8) == {"p50": 32.0, "p95": 35.2}
    digits = make_manifest(linear_onnx())
    assert digits.latency_at("cpu", 1) == {"p50": 0.1, "p95": 0.2}
    assert digits.latency_at("cpu", 8, tokens=100) == {"p50": 0.3, "p95": 0.4}


def test_latency_of_an_unprofiled_device_class_or_batch_size_is_none():
    manifest = _with_latency(make_manifest(linear_onnx()), ENCODER_LATENCY)
    assert manifest.latency_at("gpu", 1, tokens=64) is None
    assert manifest.latency_at("cpu", 4, tokens=64) is None
    assert _with_latency(make_manifest(linear_onnx()), {}).latency_at("cpu", 1) is None


def test_latency_at_refuses_a_length_below_one():
    manifest = _with_latency(make_manifest(linear_onnx()), ENCODER_LATENCY)
    with pytest.raises(InvalidArgumentError, match="at least 1"):
        manifest.latency_at("cpu", 1, tokens=0)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda lat: lat.update(cpu=[1, 2]), "latency_ms.cpu must be an object, not list"),
        (lambda lat: lat["cpu"].update(one={"p50": 1, "p95": 2}), "'one' is not a batch size"),
        (lambda lat: lat["cpu"]["1"].pop("p95"), "latency_ms.cpu.1: missing 'p95'"),
        (
            lambda lat: lat["cpu"]["8"].update(p50="fast"),
            "latency_ms.cpu.8.p50 must be a number of milliseconds, not 'fast'",
        ),
        (lambda lat: lat["cpu"]["8"].update(p50=True), "latency_ms.cpu.8.p50 must be a number"),
        (lambda lat: lat["cpu"]["8"].update(p95=-1.0), "latency_ms.cpu.8.p95 must be finite"),
        (lambda lat: lat["cpu"]["1"].update(tokens=[]), "latency_ms.cpu.1.tokens must be an obj"),
        (lambda lat: lat["cpu"]["1"].update(tokens={}), "latency_ms.cpu.1.tokens lists no lengths"),
        (
            lambda lat: lat["cpu"]["1"]["tokens"].update({"016": {"p50": 1, "p95": 2}}),
            "latency_ms.cpu.1.tokens.016: '016' is not a token count",
        ),
        (
            lambda lat: lat["cpu"]["1"]["tokens"]["32"].pop("p50"),
            "latency_ms.cpu.1.tokens.32: missing 'p50'",
        ),
    ],
    ids=[
        "batches-not-an-object",
        "batch-not-a-number",
        "missing-p95",
        "p50-not-a-number",
        "p50-a-boolean",
        "negative-p95",
        "tokens-not-an-object",
        "tokens-empty",
        "token-count-not-canonical",
        "length-missing-p50",
    ],
)
def test_malformed_latency_is_a_repository_error_naming_the_figure(repo, damage, message):
    artifact = linear_onnx()
    repo.publish_variant(_with_latency(make_manifest(artifact), ENCODER_LATENCY), artifact)
    path = repo.root / MODEL / "fp32" / MANIFEST_FILE
    data = json.loads(path.read_text())
    damage(data["latency_ms"])
    path.write_text(json.dumps(data))
    with pytest.raises(RepositoryError) as caught:
        repo.manifest(MODEL, "fp32")
    assert caught.value.message.startswith(f"{MODEL}/fp32/{MANIFEST_FILE}: malformed variant ")
    assert message in caught.value.message
