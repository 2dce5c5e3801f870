"""docs/REGISTERING.md's example, run as the guide runs it: `gearbox compress --spec` from the
repository root, `gearbox variants`, `gearbox serve`, and the guide's tritonclient script against
it over HTTP and gRPC."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from gearbox.compression import ModelRepository
from tests.integration.conftest import ROOT, _free_port, run_gearbox, wait_gateway_ready

SPEC = "docs.examples.breast_cancer:spec"
MODEL = "breast-cancer"
VARIANTS = ("fp32", "int8")


def _query(url: str, *flags: str) -> subprocess.CompletedProcess:
    """The guide's client, as a user runs it from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "docs.examples.query_breast_cancer", "--url", url, *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_registering_guide_end_to_end(ray_address: str, tmp_path: Path) -> None:
    repo = tmp_path / "cancer-repo"
    compressed = run_gearbox(
        "compress", "--spec", SPEC, "--repo", str(repo), "--variants", ",".join(VARIANTS),
        "--address", ray_address,
    )  # fmt: skip
    assert compressed.returncode == 0, compressed.stderr

    repository = ModelRepository(repo)
    record = repository.model(MODEL)
    assert record.spec == SPEC and record.reference_variant == "fp32"
    assert [t.name for t in record.signature.inputs] == ["measurements"]
    assert record.signature.inputs[0].shape == (-1, 30)
    manifests = {m.variant: m for m in repository.variants(MODEL)}
    assert set(manifests) == set(VARIANTS)
    for manifest in manifests.values():
        assert manifest.is_ready, manifest.reason
        # A classifier of this data that learnt anything is far above the 63 % majority class.
        assert manifest.quality.value > 0.85
    assert manifests["int8"].size_bytes < manifests["fp32"].size_bytes

    listed = run_gearbox("variants", "--repo", str(repo))
    assert listed.returncode == 0, listed.stderr
    assert all(variant in listed.stdout for variant in VARIANTS)

    http_port, grpc_port = _free_port(), _free_port()
    log = tmp_path / "serve.log"
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("gearbox")), "serve", "--repo", str(repo),
            "--address", ray_address, "--http-port", str(http_port),
            "--grpc-port", str(grpc_port), "--metrics-port", str(_free_port()),
        ],
        cwd=ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_gateway_ready(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", server, log)
        for url, flags in ((f"127.0.0.1:{http_port}", ()), (f"127.0.0.1:{grpc_port}", ("--grpc",))):
            answered = _query(url, *flags)
            # The script exits non-zero when fewer than half of its rows come back right.
            assert answered.returncode == 0, answered.stdout + answered.stderr
            chosen = answered.stdout.split()[1].rstrip(":")
            assert chosen in VARIANTS, answered.stdout
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=120)
    assert code == 0, log.read_text()
