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
