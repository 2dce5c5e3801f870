"""Device class files, gateway configuration and batching configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from gearbox.compression.devices import CPU, DeviceClass, load_device_classes
from gearbox.compression.errors import InvalidArgumentError
from gearbox.serving.config import BatchingConfig, GatewayConfig


def write(tmp_path, text):
    path = tmp_path / "device_classes.yaml"
    path.write_text(text)
    return path


def test_a_valid_file(tmp_path):
    path = write(
        tmp_path,
        """
device_classes:
  - name: cpu
    intra_op_threads: 2
    ray_resources: {CPU: 2}
  - name: gpu-a100
    execution_provider: CUDAExecutionProvider
    ray_resources: {GPU: 1, accelerator_type:A100: 0.001}
""",
    )
    cpu, gpu = load_device_classes(path)
    assert cpu == DeviceClass("cpu", "CPUExecutionProvider", 2, {"CPU": 2})
    assert gpu.name == "gpu-a100"
    assert gpu.execution_provider == "CUDAExecutionProvider"
    assert gpu.intra_op_threads == 1
    assert dict(gpu.ray_resources) == {"GPU": 1, "accelerator_type:A100": 0.001}
    assert DeviceClass.from_json(gpu.to_json()) == gpu


def test_cpu_is_added_first_when_missing(tmp_path):
    path = write(
        tmp_path,
        "device_classes:\n  - {name: gpu, execution_provider: CUDAExecutionProvider}\n",
    )
    classes = load_device_classes(path)
    assert [d.name for d in classes] == ["cpu", "gpu"]
    assert classes[0] == CPU


def test_a_file_defining_cpu_keeps_its_own(tmp_path):
    path = write(tmp_path, "device_classes:\n  - {name: cpu, intra_op_threads: 4}\n")
    [cpu] = load_device_classes(path)
    assert cpu.intra_op_threads == 4
    assert cpu != CPU


def test_duplicates_are_rejected(tmp_path):
    path = write(
        tmp_path,
        "device_classes:\n  - {name: gpu}\n  - {name: cpu}\n  - {name: gpu}\n",
    )
    with pytest.raises(InvalidArgumentError, match="defines gpu more than once"):
        load_device_classes(path)


def test_unknown_keys_are_rejected_and_the_known_listed(tmp_path):
    path = write(tmp_path, "device_classes:\n  - {name: gpu, provider: CUDA}\n")
    with pytest.raises(InvalidArgumentError) as caught:
        load_device_classes(path)
    assert "unknown key(s) provider" in caught.value.message
    assert "execution_provider" in caught.value.message


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ("{name: gpu, ray_resources: {GPU: -1}}", "ray resource GPU must be a non-negative"),
        ("{name: gpu, ray_resources: {GPU: lots}}", "ray resource GPU"),
        ("{name: gpu, ray_resources: {GPU: true}}", "ray resource GPU"),
        ("{name: gpu, ray_resources: [GPU]}", "ray_resources must be a mapping"),
        ("{name: gpu, intra_op_threads: 0}", "intra_op_threads must be at least 1"),
        ("{name: gpu, intra_op_threads: two}", "intra_op_threads must be an integer"),
        ("{name: gpu, intra_op_threads: 1.5}", "intra_op_threads must be an integer"),
        ("{name: gpu, workers: 0}", "workers must be at least 1"),
        ("{name: gpu, workers: two}", "workers must be an integer"),
        ("{name: gpu, workers: 1.5}", "workers must be an integer"),
        ("{name: gpu, workers: true}", "workers must be an integer"),
        (
            "{name: cpu, workers: 3, ray_resources: {CPU: 2}}",
            "3 workers x 1 intra-op threads need 3 CPUs, but it reserves 2",
        ),
        ("{name: 'g p u'}", "must be letters, digits"),
        ("{name: ''}", "must be letters, digits"),
        ("{execution_provider: CPUExecutionProvider}", "needs at least a name"),
        ("gpu", "needs at least a name"),
    ],
)
def test_bad_entries_are_rejected(tmp_path, entry, match):
    path = write(tmp_path, f"device_classes:\n  - {entry}\n")
    with pytest.raises(InvalidArgumentError, match=match):
        load_device_classes(path)


@pytest.mark.parametrize(
    "text",
    ["", "device_classes: []\n", "device_classes: {name: gpu}\n", "- {name: gpu}\n", "gpu\n"],
)
def test_the_file_must_hold_a_list_of_classes(tmp_path, text):
    with pytest.raises(InvalidArgumentError, match="non-empty list under 'device_classes'"):
        load_device_classes(write(tmp_path, text))


def test_invalid_yaml_is_rejected(tmp_path):
    with pytest.raises(InvalidArgumentError, match="cannot be read"):
        load_device_classes(write(tmp_path, "device_classes: [ {name: gpu\n"))


def test_a_missing_file_is_invalid(tmp_path):
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        load_device_classes(tmp_path / "nope.yaml")


# --- workers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resources", "intra_op_threads", "expected"),
    [
        ({}, 1, 1),  # no CPU reserved: one worker
        ({"CPU": 1}, 1, 1),
        ({"CPU": 4}, 1, 4),
        ({"CPU": 4}, 2, 2),
        ({"CPU": 0.5}, 1, 1),  # a fraction of a CPU still runs one
        ({"CPU": 2.5}, 1, 3),
        ({"CPU": 2}, 4, 1),  # never fewer than one
        ({"CPU": 0}, 1, 1),
        ({"GPU": 1}, 1, 1),
    ],
)
def test_workers_default_to_what_the_reserved_cpus_hold(resources, intra_op_threads, expected):
    device = DeviceClass("d", intra_op_threads=intra_op_threads, ray_resources=resources)
    assert device.workers is None
    assert device.worker_threads == expected


def test_the_built_in_cpu_class_runs_one_worker():
    assert CPU.worker_threads == 1


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"workers": 3, "ray_resources": {"CPU": 4}}, 3),
        ({"workers": 1, "ray_resources": {"CPU": 4}}, 1),
        ({"workers": 2, "intra_op_threads": 2, "ray_resources": {"CPU": 4}}, 2),
        ({"workers": 3, "ray_resources": {"CPU": 2.5}}, 3),
        ({"workers": 4, "ray_resources": {"GPU": 1}}, 4),  # no CPU reserved: no CPU bound
        ({"workers": 2}, 2),
    ],
)
def test_explicit_workers_are_used(options, expected):
    assert DeviceClass("d", **options).worker_threads == expected


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"workers": 0}, "workers must be at least 1"),
        ({"workers": -2}, "workers must be at least 1"),
        ({"workers": True}, "workers must be an integer"),
        ({"workers": 1.5}, "workers must be an integer"),
        ({"workers": "2"}, "workers must be an integer"),
        (
            {"workers": 3, "intra_op_threads": 2, "ray_resources": {"CPU": 4}},
            "device class 'd': 3 workers x 2 intra-op threads need 6 CPUs, but it reserves 4",
        ),
        ({"workers": 4, "ray_resources": {"CPU": 2.5}}, "need 4 CPUs, but it reserves 2.5"),
    ],
)
def test_invalid_workers_are_rejected(options, match):
    with pytest.raises(InvalidArgumentError, match=match):
        DeviceClass("d", **options)


def test_workers_round_trip_through_json_and_yaml(tmp_path):
    path = write(
        tmp_path,
        "device_classes:\n  - {name: cpu, workers: 2, ray_resources: {CPU: 2}}\n"
        "  - {name: gpu, execution_provider: CUDAExecutionProvider}\n",
    )
    cpu, gpu = load_device_classes(path)
    assert (cpu.workers, cpu.worker_threads) == (2, 2)
    assert cpu.to_json()["workers"] == 2
    assert DeviceClass.from_json(cpu.to_json()) == cpu
    # Unset, it is left out, and the default applies again after a round trip.
    assert gpu.workers is None
    assert "workers" not in gpu.to_json()
    assert DeviceClass.from_json(gpu.to_json()) == gpu


# --- GatewayConfig -------------------------------------------------------------------------


def test_gateway_config_puts_cpu_first(tmp_path):
    path = write(
        tmp_path,
        """
device_classes:
  - {name: gpu, execution_provider: CUDAExecutionProvider, ray_resources: {GPU: 1}}
  - {name: cpu, intra_op_threads: 2}
  - {name: npu}
""",
    )
    config = GatewayConfig.create(tmp_path / "repo", path, replicas=2)
    assert [d.name for d in config.device_classes] == ["cpu", "gpu", "npu"]
    assert config.gateway_device_class.name == "cpu"
    assert config.gateway_device_class.intra_op_threads == 2
    assert config.replicas == 2


def test_gateway_config_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = GatewayConfig.create("repo")
    assert config.device_classes == (CPU,)
    assert config.repository == str(tmp_path.resolve() / "repo")
    assert Path(config.repository).is_absolute()
    assert config.batching == BatchingConfig()


def test_gateway_config_reports_a_bad_file(tmp_path):
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        GatewayConfig.create(tmp_path, tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"device_classes": ()}, "at least one device class"),
        ({"replicas": 0}, "replicas"),
        ({"shadow_fraction": 1.5}, "shadow_fraction"),
        ({"shadow_fraction": -0.1}, "shadow_fraction"),
    ],
)
def test_gateway_config_validation(options, match):
    with pytest.raises(InvalidArgumentError, match=match):
        GatewayConfig("repo", **options)


# --- BatchingConfig ------------------------------------------------------------------------


def test_batching_defaults_add_no_wait():
    # An idle gateway must not hold a lone request back waiting for company.
    assert BatchingConfig().max_wait_ms == 0.0


def test_batching_accepts_the_smallest_valid_values():
    config = BatchingConfig(max_batch_size=1, max_wait_ms=0, max_queue=1)
    assert (config.max_batch_size, config.max_wait_ms, config.max_queue) == (1, 0, 1)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be at least 1"),
        ({"max_batch_size": -4}, "max_batch_size must be at least 1"),
        ({"max_wait_ms": -0.5}, "max_wait_ms must not be negative"),
        ({"max_queue": 0}, "max_queue must be at least 1"),
    ],
)
def test_batching_validation(options, match):
    with pytest.raises(InvalidArgumentError, match=match):
        BatchingConfig(**options)


# --- the application ----------------------------------------------------------------------


@pytest.mark.parametrize("access_log", [False, True])
def test_the_access_log_setting_reaches_every_deployment(tmp_path, access_log):
    from gearbox.serving.app import build_app

    gpu = DeviceClass("gpu", ray_resources={"CPU": 1})
    config = GatewayConfig(str(tmp_path), device_classes=(CPU, gpu), access_log=access_log)
    app = build_app(config)
    gateway = app._bound_deployment
    hosts = [host._bound_deployment for host in gateway.init_args[1].values()]
    assert [host.name for host in hosts] == ["DeviceClass-gpu"]
    for deployment in [gateway, *hosts]:
        assert deployment.logging_config["enable_access_log"] is access_log


def test_the_access_log_is_off_by_default(tmp_path):
    assert GatewayConfig(str(tmp_path)).access_log is False
