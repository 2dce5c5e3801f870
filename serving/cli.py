"""The ``gearbox`` command line. Every error is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from rich.console import Console

if TYPE_CHECKING:
    from gearbox.compression import ModelSpec

from gearbox.compression import EXAMPLES, GearboxError, InvalidArgumentError, ModelRepository
from gearbox.compression.cluster import ray_session
from gearbox.compression.quality import DEFAULT_MAX_ACCURACY_DROP, DEFAULT_MAX_COSINE_DROP
from gearbox.serving.config import (
    ADMIN_TOKEN_VARIABLE,
    GRPC_PORT,
    HTTP_PORT,
    MAX_NICENESS,
    METRICS_PORT,
    BatchingConfig,
    GatewayConfig,
)
from gearbox.serving.console import RichProgress, rejected_reasons, variant_table
from gearbox.serving.dataplane import gearbox_version
from gearbox.serving.demo import (
    DigitsWorkload,
    Workload,
    report_table,
    run_workload,
    sentence_workload,
)
from gearbox.serving.experiment_store import declared_experiments
from gearbox.serving.experiments import Experiment
from gearbox.serving.experiments_cli import add_experiments_parser, run_experiments
from gearbox.serving.ingress import INGRESS_SWITCH, Ingress, local_state_dir, ray_environment
from gearbox.serving.server import (
    Endpoints,
    check_port_free,
    check_repository,
    serve_was_running,
    start_gateway,
    stop_gateway,
    until_stopped,
)
from gearbox.serving.tls import tls_files
from gearbox.serving.top import add_top_parser, run_top_command

EXIT_ERROR = 1
INGRESS_NOTES = {
    Ingress.HAPROXY: "Ray Serve's HAProxy ingress; --ingress proxy for the classic proxy",
    Ingress.PROXY: "Ray Serve's classic proxy: a second hop, several ms slower than haproxy",
}
EXIT_INTERRUPTED = 130


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None


def _positive_number(text: str) -> float:
    value = _number(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a finite positive number")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _niceness(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if not 0 <= value <= MAX_NICENESS:
        raise argparse.ArgumentTypeError(
            f"{value} is not a niceness step between 0 and {MAX_NICENESS}"
        )
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port")
    return value


def _non_negative(text: str) -> float:
    value = _number(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a finite non-negative number")
    return value


def _positive(text: str) -> float:
    value = _number(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a finite positive number")
    return value


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction between 0 and 1")
    return value


def _quantile(text: str) -> float:
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a quantile strictly between 0 and 1")
    return value


def _ingress(text: str) -> Ingress:
    try:
        return Ingress.parse(text)
    except GearboxError as error:
        raise argparse.ArgumentTypeError(error.message) from None


def _add_gateway_options(command: argparse.ArgumentParser, address: bool = True) -> None:
    command.add_argument(
        "--ingress",
        type=_ingress,
        default=None,
        metavar="haproxy|proxy",
        help="what fronts the gateway: Ray Serve's HAProxy ingress (default) or its classic "
        "proxy; also $GEARBOX_INGRESS. Applies to the Ray this command starts; a joined "
        "cluster keeps the ingress it was started with",
    )
    command.add_argument(
        "--http-port", type=_port, default=HTTP_PORT, metavar="PORT",
        help="OIP v2 over HTTP, on 127.0.0.1 (default: %(default)s)",
    )  # fmt: skip
    command.add_argument(
        "--grpc-port", type=_port, default=GRPC_PORT, metavar="PORT",
        help="OIP v2 over gRPC, on 127.0.0.1 (default: %(default)s)",
    )  # fmt: skip
    command.add_argument(
        "--metrics-port",
        type=_port,
        default=METRICS_PORT,
        metavar="PORT",
        help="where the gateway's replicas on each machine serve their Prometheus metrics "
        "(GET /metrics; default: %(default)s)",
    )
    if address:
        command.add_argument(
            "--address",
            metavar="RAY",
            help="Ray cluster to join ('auto': the one on this machine; default: start one)",
        )
    command.add_argument(
        "--device-classes", metavar="FILE", help="YAML file of device classes (default: cpu)"
    )
    command.add_argument(
        "--replicas",
        type=_positive_int,
        default=1,
        metavar="N",
        help="gateway replicas (default: %(default)s)",
    )
    command.add_argument(
        "--max-request-mb", type=_positive_number, default=64.0, metavar="MB",
        help="largest HTTP request body read; a larger one is refused with 413 "
        "(default: %(default)s)",
    )  # fmt: skip
    command.add_argument(
        "--max-request-rows", type=_positive_int, default=GatewayConfig.max_request_rows,
        metavar="ROWS",
        help="most rows (first dimension) an inference request's tensor may have; more is "
        "refused with 400 / INVALID_ARGUMENT (default: %(default)s)",
    )  # fmt: skip
    command.add_argument(
        "--max-tensor-elements", type=_positive_int,
        default=GatewayConfig.max_tensor_elements, metavar="N",
        help="most elements one tensor of a request may hold; more is refused with 413 / "
        "RESOURCE_EXHAUSTED (default: %(default)s)",
    )  # fmt: skip
    command.add_argument(
        "--shadow-fraction", type=_fraction, default=GatewayConfig.shadow_fraction,
        metavar="F",
        help="share of answers from a non-reference variant also run, off the response path, "
        "on the reference to measure live agreement (default %(default)s)",
    )  # fmt: skip
    command.add_argument(
        "--max-batch-size", type=_positive_int, default=BatchingConfig.max_batch_size,
        metavar="ROWS",
        help="most rows per dynamic batch; a variant merges fewer while few requests wait and "
        "its batch costs mostly per row, as a transformer's does (default %(default)s)",
    )  # fmt: skip
    command.add_argument(
        "--max-batch-wait-ms", type=_non_negative, default=BatchingConfig.max_wait_ms,
        metavar="MS", help="how long a batch may wait for more requests (default 0)",
    )  # fmt: skip
    command.add_argument(
        "--inline-max-ms", type=_non_negative, default=BatchingConfig.inline_max_ms,
        metavar="MS", help="batches predicted to run at most this long run on the event loop "
        "when nothing is queued, saving the hop to a worker thread (default 1)",
    )  # fmt: skip
    command.add_argument(
        "--no-priority-lane", dest="priority_lane", action="store_false",
        help="run every request on the standard workers, in arrival order, with no priority "
        "worker for tight budgets (see the README's routing section)",
    )  # fmt: skip
    command.add_argument(
        "--standard-niceness", type=_niceness, default=BatchingConfig.standard_niceness,
        metavar="N", help="how many steps below the replica's own priority the standard "
        "workers run, so that the priority lane takes a contended core from them "
        "(0-19, default %(default)s)",
    )  # fmt: skip
    command.add_argument(
        "--max-queue", type=_positive_int, default=BatchingConfig.max_queue, metavar="N",
        help="requests admitted per variant and device class before 429 / RESOURCE_EXHAUSTED "
        "(default: %(default)s)",
    )  # fmt: skip
    command.add_argument(
        "--answer-timeout-s", type=_positive, default=BatchingConfig.answer_timeout_s,
        metavar="S", help="longest a request waits for its variant's session before 503 / "
        "UNAVAILABLE (a stuck session costs its callers this, never the replica; default: "
        "%(default)s)",
    )  # fmt: skip
    command.add_argument(
        "--remote-timeout-s", type=_positive, default=GatewayConfig.remote_answer_timeout_s,
        metavar="S", help="longest a request waits for another device class's replicas "
        "before 503 / UNAVAILABLE (default: %(default)s)",
    )  # fmt: skip
    command.add_argument(
        "--transport-allowance-ms", type=_non_negative, default=0.0, metavar="MS",
        help="time your callers' budgets also spend outside the gateway (ingress, network), "
        "left free when choosing a variant (default 0)",
    )  # fmt: skip
    command.add_argument(
        "--prediction-quantile", type=_quantile, default=0.95, metavar="Q",
        help="a variant fits a budget when its prediction plus this quantile of its recent "
        "prediction errors does (default 0.95)",
    )  # fmt: skip
    command.add_argument(
        "--access-log", action="store_true",
        help="write Ray Serve's access log line per request (off: it costs time on every answer)",
    )  # fmt: skip


def _experiments_file(text: str) -> tuple[Experiment, ...]:
    try:
        document = yaml.safe_load(Path(text).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {error}") from None
    if isinstance(document, dict) and "experiments" in document:
        document = document["experiments"]
    if not isinstance(document, list):
        raise argparse.ArgumentTypeError(f"{text} must hold a list of experiments")
    try:
        return declared_experiments(document)
    except GearboxError as error:
        raise argparse.ArgumentTypeError(f"{text}: {error.message}") from None


def _gateway_config(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig.create(
        args.repo,
        args.device_classes,
        experiments=getattr(args, "experiments", ()),
        tls=tls_files(getattr(args, "tls_cert", None), getattr(args, "tls_key", None)),
        admin_token=os.environ.get(ADMIN_TOKEN_VARIABLE) or None,
        replicas=args.replicas,
        shadow_fraction=args.shadow_fraction,
        max_request_bytes=int(args.max_request_mb * 1024 * 1024),
        max_request_rows=args.max_request_rows,
        max_tensor_elements=args.max_tensor_elements,
        access_log=args.access_log,
        metrics_port=args.metrics_port,
        transport_allowance_ms=args.transport_allowance_ms,
        prediction_quantile=args.prediction_quantile,
        remote_answer_timeout_s=args.remote_timeout_s,
        batching=BatchingConfig(
            max_batch_size=args.max_batch_size,
            max_wait_ms=args.max_batch_wait_ms,
            max_queue=args.max_queue,
            inline_max_ms=args.inline_max_ms,
            priority_lane=args.priority_lane,
            standard_niceness=args.standard_niceness,
            answer_timeout_s=args.answer_timeout_s,
        ),
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gearbox",
        description="Compress models into variants on Ray and serve them over the "
        "Open Inference Protocol.",
    )
    parser.add_argument("--version", action="version", version=f"gearbox {gearbox_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    compress_cmd = commands.add_parser(
        "compress", help="compress a registered model into variants and publish them"
    )
    source = compress_cmd.add_mutually_exclusive_group(required=True)
    source.add_argument("--example", choices=sorted(EXAMPLES), help="a built-in example model")
    source.add_argument("--spec", metavar="MODULE:FUNCTION", help="function returning a ModelSpec")
    compress_cmd.add_argument("--repo", required=True, metavar="DIR", help="model repository")
    compress_cmd.add_argument(
        "--variants",
        metavar="A,B,…|all",
        help="variants to build (default: the model's own, else fp32,int8,pruned,distilled; "
        "'all': every technique and the composed recipes)",
    )
    compress_cmd.add_argument(
        "--recipe",
        metavar="FILE.yaml",
        help="a recipe file: the variants to build (names or full configs) and parameters to set",
    )
    compress_cmd.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="VARIANT.PARAM=VALUE",
        help="set one parameter of a variant being built, e.g. distilled.epochs=20 (repeatable)",
    )
    compress_cmd.add_argument(
        "--search",
        action="store_true",
        help="search technique parameters and student sizes with Ray Tune and publish the "
        "Pareto front of quality, latency and size inside the accuracy gate",
    )
    compress_cmd.add_argument(
        "--trials",
        type=_positive_int,
        default=20,
        metavar="N",
        help="--search: candidates to build and evaluate (default: 20)",
    )
    compress_cmd.add_argument(
        "--rebuild",
        action="store_true",
        help="build every variant again, even those whose inputs have not changed",
    )
    compress_cmd.add_argument(
        "--max-accuracy-drop",
        type=_fraction,
        metavar="X",
        help="largest absolute quality drop below fp32 a ready variant may have (default: "
        f"{DEFAULT_MAX_ACCURACY_DROP} in accuracy; {DEFAULT_MAX_COSINE_DROP} in mean cosine "
        "for embeddings)",
    )
    compress_cmd.add_argument(
        "--address", metavar="RAY", help="Ray cluster to use ('auto': the one on this machine)"
    )

    serve_cmd = commands.add_parser(
        "serve", help="serve a repository over OIP v2 (HTTP and gRPC) until Ctrl-C"
    )
    serve_cmd.add_argument("--repo", required=True, metavar="DIR", help="model repository")
    _add_gateway_options(serve_cmd)
    serve_cmd.add_argument(
        "--experiments",
        type=_experiments_file,
        default=(),
        metavar="FILE",
        help="A/B experiments to run from the start: a YAML or JSON list of definitions, as "
        "POST /v2/experiments takes them (default: none). Creating and ending them later "
        f"needs the admin token, read from ${ADMIN_TOKEN_VARIABLE} (unset: admin calls off)",
    )
    serve_cmd.add_argument(
        "--tls-cert", metavar="FILE",
        help="serve HTTPS and gRPC over TLS with this PEM certificate (chain), with --tls-key "
        "(Gearbox runs its own TLS terminator in front of the ingress)",
    )  # fmt: skip
    serve_cmd.add_argument(
        "--tls-key", metavar="FILE", help="the unencrypted PEM private key of --tls-cert"
    )

    demo_cmd = commands.add_parser(
        "demo", help="compress an example (digits), serve it, drive a mixed-budget workload"
    )
    demo_cmd.add_argument(
        "--example",
        choices=sorted(EXAMPLES),
        default="digits",
        help="which built-in example (default: digits; minilm takes several minutes to compress)",
    )
    demo_cmd.add_argument(
        "--repo", default="demo-repo", metavar="DIR", help="repository (default: demo-repo)"
    )
    demo_cmd.add_argument("--exit", action="store_true", help="stop after the report")
    demo_cmd.add_argument(
        "--reuse",
        action="store_true",
        help="serve what the repository already holds instead of compressing again",
    )
    demo_cmd.add_argument(
        "--requests",
        type=_positive_int,
        default=60,
        metavar="N",
        help="requests per budget (default: %(default)s)",
    )
    _add_gateway_options(demo_cmd, address=False)

    variants_cmd = commands.add_parser("variants", help="show a repository's variants")
    variants_cmd.add_argument("--repo", required=True, metavar="DIR", help="model repository")
    variants_cmd.add_argument("model", nargs="?", help="only this model")
    variants_cmd.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw quality against latency (batch 1), every variant labelled, rejected "
        "ones grey, the Pareto front joined (one model: name it if the repository has several)",
    )
    add_top_parser(commands)
    add_experiments_parser(commands)
    return parser


def _compress(args: argparse.Namespace, out: Console, err: Console) -> int:
    # The training stack (torch) loads only for the commands that train.
    from gearbox.compression import compress, load_spec, resolve_recipes
    from gearbox.compression.recipe_file import apply_settings, load_recipe_file

    spec = load_spec(EXAMPLES[args.example] if args.example else args.spec)
    if args.search:
        if args.variants or args.recipe or args.settings:
            raise InvalidArgumentError(
                "--search chooses its own candidates: leave out --variants, --recipe and --set"
            )
        return _search(args, spec, out, err)
    from_file, settings = load_recipe_file(args.recipe) if args.recipe else ((), [])
    names = args.variants or (None if from_file else ",".join(spec.default_variants) or None)
    recipes = apply_settings(resolve_recipes(names, from_file), [*settings, *args.settings])
    repository = ModelRepository(args.repo)
    repository.ensure_writable()  # fail in a second, before Ray starts (compress checks again)
    with ray_session(args.address), RichProgress(err) as progress:
        report = compress(
            spec,
            repository,
            recipes,
            max_accuracy_drop=args.max_accuracy_drop,
            progress=progress,
            rebuild=args.rebuild,
        )
    shown = sorted([*report.published, *report.unchanged], key=lambda m: m.variant)
    out.print(variant_table(spec.name, shown))
    for line in rejected_reasons(shown):
        out.print(line, highlight=False)
    kept = (
        f"; {len(report.unchanged)} unchanged variant(s) kept: "
        + ", ".join(m.variant for m in report.unchanged)
        if report.unchanged
        else ""
    )
    out.print(
        f"published {len(report.published)} variant(s) of '{spec.name}' to {repository.root} "
        f"in {report.seconds:.0f} s{kept}",
        highlight=False,
    )
    if report.failed:
        name, reason = next(iter(report.failed.items()))
        more = f" (and {len(report.failed) - 1} more)" if len(report.failed) > 1 else ""
        raise GearboxError(f"variant '{name}' failed: {reason}{more}")
    return 0


def _search(args: argparse.Namespace, spec: ModelSpec, out: Console, err: Console) -> int:
    from gearbox.compression.search import search

    repository = ModelRepository(args.repo)
    repository.ensure_writable()
    with ray_session(args.address), RichProgress(err) as progress:
        report = search(
            spec,
            repository,
            args.trials,
            max_accuracy_drop=args.max_accuracy_drop,
            progress=progress,
        )
    out.print(variant_table(spec.name, repository.variants(spec.name)))
    for trial in report.trials:
        figures = (f"{spec.metric} {trial.quality:.4f}, " if trial.quality is not None else "") + (
            f"{trial.latency_p50_ms:.3f} ms" if trial.latency_p50_ms is not None else ""
        )
        reason = f" ({trial.reason})" if trial.reason else ""
        out.print(
            f"  {trial.label} {trial.variant}: {trial.status}{reason} {figures}".rstrip(),
            highlight=False,
        )
    out.print(
        f"searched {len(report.trials)} candidate(s) of '{spec.name}' in {report.seconds:.0f} s; "
        f"published the front: {', '.join(report.front) or 'nothing inside the gate'}",
        highlight=False,
    )
    return 0


def _check_ports(args: argparse.Namespace) -> None:
    check_port_free(args.http_port, "http")
    check_port_free(args.grpc_port, "grpc")
    check_port_free(args.metrics_port, "metrics")


def _print_endpoints(out: Console, endpoints: Endpoints, models: list[str]) -> None:
    out.print(
        f"gearbox: serving {', '.join(models)} on device class(es) "
        f"{', '.join(endpoints.device_classes)}",
        highlight=False,
    )
    for name, reason in endpoints.skipped_device_classes.items():
        out.print(f"  device class {name} is not served: {reason}", highlight=False)
    for line in endpoints.unserved:
        out.print(f"  not served: {line}", highlight=False, soft_wrap=True)
    out.print(f"  HTTP     {endpoints.http}  (OIP v2, e.g. POST /v2/models/{models[0]}/infer)")
    over_tls = " over TLS" if endpoints.tls else ""
    out.print(f"  gRPC     {endpoints.grpc}  (inference.GRPCInferenceService{over_tls})")
    if endpoints.tls is not None:
        out.print(
            f"  TLS      certificate {endpoints.tls.certificate} (valid for "
            f"{endpoints.tls.server_name}), terminated by Gearbox's HAProxy, pid "
            f"{endpoints.tls.terminator_pid}",
            highlight=False,
        )
    out.print(f"  ingress  {endpoints.ingress.value}  ({INGRESS_NOTES[endpoints.ingress]})")
    for url in endpoints.metrics:
        out.print(f"  metrics  {url}")


def _serve_until_stopped(
    out: Console,
    stop: threading.Event,
    started_serve: bool,
    config: GatewayConfig,
    on_ready: Callable[[], None],
) -> None:
    """Runs ``on_ready`` then blocks until Ctrl-C or SIGTERM; always drains what it started."""
    try:
        on_ready()
        if not stop.is_set():
            out.print("ready; Ctrl-C or SIGTERM stops", highlight=False)
        while not stop.wait(0.5):
            pass
    finally:
        out.print("gearbox: draining and stopping", highlight=False)
        stop_gateway(started_serve, config)


def _ray_environment(args: argparse.Namespace, state_dir: Path | None) -> dict[str, str]:
    """What the Ray this command starts (or this job on a joined one) runs with: the chosen
    ingress's settings, where the environment already holds a value keeping it, unless
    --ingress was given, which decides the ingress itself."""
    ingress = Ingress.parse(args.ingress.value if args.ingress else None)
    env = ray_environment(ingress, state_dir if not args.address else None)
    chosen = {INGRESS_SWITCH} if args.ingress else set()
    return {
        key: value if key in chosen else os.environ.get(key, value) for key, value in env.items()
    }


def _serve(args: argparse.Namespace, out: Console, err: Console) -> int:
    models = check_repository(args.repo)
    config = _gateway_config(args)
    _check_ports(args)
    with local_state_dir() as state:
        env = _ray_environment(args, state)
        session = ray_session(args.address, env=env)
        with session, until_stopped() as stop:
            started_serve = not serve_was_running()
            if config.tls is not None and not started_serve:
                # Its ingress keeps the ports it started with, so Gearbox cannot put it on
                # internal ports behind the TLS terminator.
                raise InvalidArgumentError(
                    "Ray Serve already runs on this cluster and keeps the ports it started "
                    "with: --tls-cert needs a cluster without Serve running"
                )

            def start() -> None:
                endpoints = start_gateway(config, args.http_port, args.grpc_port)
                _print_endpoints(out, endpoints, models)

            _serve_until_stopped(out, stop, started_serve, config, start)
    return 0


def _demo(args: argparse.Namespace, out: Console, err: Console) -> int:
    from gearbox.compression import compress, load_spec, resolve_recipes

    _check_ports(args)
    spec = load_spec(EXAMPLES[args.example])
    repository = ModelRepository(args.repo)
    repository.ensure_writable()
    args.address = None
    with (
        local_state_dir() as state,
        ray_session(None, env=_ray_environment(args, state)),
    ):
        if args.reuse and spec.name in repository.models():
            manifests = repository.variants(spec.name)
        else:
            with RichProgress(err) as progress:
                recipes = resolve_recipes(",".join(spec.default_variants) or None)
                report = compress(spec, repository, recipes, progress=progress)
            manifests = sorted([*report.published, *report.unchanged], key=lambda m: m.variant)
        out.print(variant_table(spec.name, manifests))
        for line in rejected_reasons(manifests):
            out.print(line, highlight=False)
        with until_stopped() as stop:
            if args.exit:
                stop.set()  # the report is the whole job
            config = _gateway_config(args)
            _serve_until_stopped(
                out, stop, True, config, lambda: _demo_report(args, out, spec.name, config)
            )
    return 0


def _demo_workload(example: str, http_address: str, grpc_address: str) -> Workload:
    if example == "minilm":
        from gearbox.compression.examples.minilm import split_sentences

        _train, _calibration, heldout = split_sentences()
        sentences = heldout[:64]
        return sentence_workload(http_address, grpc_address, sentences, "fp32")
    from gearbox.compression.examples.digits import load_splits

    heldout = load_splits().heldout
    assert heldout.labels is not None
    return DigitsWorkload(heldout.inputs["images"], heldout.labels)
    return 0


def _demo_report(args: argparse.Namespace, out: Console, model: str, config: GatewayConfig) -> None:
    endpoints = start_gateway(config, args.http_port, args.grpc_port)
    _print_endpoints(out, endpoints, [model])
    workload = _demo_workload(args.example, endpoints.http, endpoints.grpc)
    reports = run_workload(
        endpoints.http, endpoints.grpc, workload, requests_per_budget=args.requests
    )
    out.print(report_table(reports, workload))
    out.print(
        "Budgets count from a request's arrival at the gateway replica's server to its encoded "
        f"answer (the {endpoints.ingress.value} ingress in front is outside that span); "
        f"metrics of every replica: {', '.join(endpoints.metrics)}",
        highlight=False,
    )


def _variants(args: argparse.Namespace, out: Console, err: Console) -> int:
    repository = ModelRepository(args.repo)
    models = [args.model] if args.model else repository.models()
    if not models:
        err.print(f"repository {repository.root} holds no models", highlight=False)
    if args.plot and len(models) > 1:
        raise InvalidArgumentError(f"--plot draws one model; name one of {', '.join(models)}")
    for model in models:
        manifests = repository.variants(model)
        out.print(variant_table(model, manifests))
        for line in rejected_reasons(manifests):
            out.print(line, highlight=False)
        if args.plot and manifests:
            from gearbox.compression.pareto import plot_front

            plot_front(manifests, args.plot)
            out.print(f"plot of {model}'s variants written to {args.plot}", highlight=False)
    return 0


COMMANDS = {
    "compress": _compress,
    "serve": _serve,
    "demo": _demo,
    "variants": _variants,
    "top": run_top_command,
    "experiments": run_experiments,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Like `python -m`, let --spec name modules in the current directory.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    # Tables are wide; a pipe or a log gets the full width rather than rich's 80 columns.
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        return COMMANDS[args.command](args, out, err)
    except GearboxError as exc:
        print(f"gearbox: error: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("gearbox: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if os.environ.get("GEARBOX_DEBUG"):
            traceback.print_exc()
        print(f"gearbox: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
