"""The ``gearbox experiments`` command: create, list, end and report A/B experiments on a
running gateway over its HTTP admin endpoints (see docs/EXPERIMENTS.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from gearbox.compression.errors import GearboxError, InvalidArgumentError
from gearbox.serving.config import ADMIN_TOKEN_VARIABLE
from gearbox.serving.console import say
from gearbox.serving.experiments import Experiment

ABSENT = "-"
DEFAULT_URL = "http://127.0.0.1:8000"
TOKEN_VARIABLE = ADMIN_TOKEN_VARIABLE
"""The admin token's environment variable, read by this command and by ``gearbox serve``."""
HTTP_TIMEOUT_S = 30.0
EXIT_ERROR = 1


def _confidence(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a confidence strictly between 0 and 1")
    return value


def _url(text: str) -> str:
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise argparse.ArgumentTypeError(f"'{text}' is not an http:// or https:// URL")
    return text.rstrip("/")


def _add_url(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--url", type=_url, default=DEFAULT_URL, metavar="URL",
        help="the gateway's HTTP address (default: %(default)s)",
    )  # fmt: skip


def _add_token(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--token", metavar="TOKEN",
        help=f"admin token sent as 'Authorization: Bearer TOKEN' (default: ${TOKEN_VARIABLE})",
    )  # fmt: skip


def add_experiments_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Add ``experiments`` and its sub-commands to the ``gearbox`` command line."""
    command = subparsers.add_parser(
        "experiments", help="create, list, end and report A/B experiments on a running gateway"
    )
    actions = command.add_subparsers(dest="experiments_command", required=True, metavar="ACTION")

    report_cmd = actions.add_parser("report", help="compare an experiment's arms")
    report_cmd.add_argument("name", metavar="NAME", help="the experiment")
    report_cmd.add_argument(
        "--json", action="store_true", help="print the report as JSON instead of a table"
    )
    report_cmd.add_argument(
        "--plot", metavar="FILE.png",
        help="also draw accuracy and latency per arm to this PNG (default: no plot)",
    )  # fmt: skip
    report_cmd.add_argument(
        "--confidence", type=_confidence, default=0.95, metavar="C",
        help="confidence level of the intervals and tests (default: %(default)s)",
    )  # fmt: skip
    _add_url(report_cmd)

    list_cmd = actions.add_parser("list", help="show every experiment the gateway knows")
    _add_url(list_cmd)

    create_cmd = actions.add_parser("create", help="start an experiment from a JSON definition")
    create_cmd.add_argument(
        "file", metavar="FILE.json|-", help="the experiment as JSON; '-' reads standard input"
    )
    _add_url(create_cmd)
    _add_token(create_cmd)

    end_cmd = actions.add_parser(
        "end", help="stop assigning requests to an experiment (its report is kept)"
    )
    end_cmd.add_argument("name", metavar="NAME", help="the experiment")
    _add_url(end_cmd)
    _add_token(end_cmd)


class _GatewayError(GearboxError):
    """The gateway answered with an error, or could not be reached."""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _call(url: str, method: str = "GET", body: object = None, token: str | None = None) -> Any:
    """Send one request to the gateway and return its decoded JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    host = urllib.parse.urlsplit(url).hostname
    # A gateway on this machine is never behind the HTTP proxy the environment may name.
    proxies = {} if host in ("127.0.0.1", "localhost", "::1") else None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))
    try:
        with opener.open(request, timeout=HTTP_TIMEOUT_S) as response:
            payload = response.read()
    except urllib.error.HTTPError as error:
        raw = error.read().decode(errors="replace")
        try:
            message = str(json.loads(raw)["error"])
        except (ValueError, KeyError, TypeError):
            message = raw.strip() or error.reason
        hint = ""
        if error.code in (401, 403) and not token:
            hint = f"; give --token or set {TOKEN_VARIABLE}"
        raise _GatewayError(f"{_one_line(str(message))} (HTTP {error.code}{hint})") from None
    except urllib.error.URLError as error:
        reason = error.reason
        why = reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
        base = urllib.parse.urlsplit(url)
        raise _GatewayError(
            f"cannot reach the gateway at {base.scheme}://{base.netloc}: {_one_line(str(why))} "
            "(is `gearbox serve` running there? see --url)"
        ) from None
    except TimeoutError:
        raise _GatewayError(
            f"the gateway did not answer {url} within {HTTP_TIMEOUT_S:g} s"
        ) from None
    except OSError as error:
        raise _GatewayError(
            f"the connection to the gateway failed: {_one_line(str(error))}"
        ) from None
    if not payload:
        return None
    try:
        return json.loads(payload)
    except ValueError:
        raise _GatewayError(f"the gateway's answer to {url} is not JSON") from None


def _experiments_url(base: str, name: str | None = None) -> str:
    return f"{base}/v2/experiments" + (
        "" if name is None else f"/{urllib.parse.quote(name, safe='')}"
    )


def _report(args: argparse.Namespace, out: Console) -> int:
    query = urllib.parse.urlencode({"confidence": args.confidence})
    answer = _call(f"{_experiments_url(args.url, args.name)}/report?{query}")
    try:
        # Statistics and plotting load scipy and matplotlib: only when a report is shown.
        from gearbox.serving.experiment_report import ExperimentReport, plot, render

        report = ExperimentReport.model_validate(answer)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "the body"
        raise _GatewayError(
            f"the gateway's report cannot be read ({where}: {first['msg']}); "
            "are the gateway and this command the same version?"
        ) from None
    if args.json:
        say(out, report.model_dump_json(indent=2))
    else:
        render(report, out)
    if args.plot:
        try:
            plot(report, args.plot)
        except OSError as error:
            raise InvalidArgumentError(
                f"cannot write the plot to {args.plot}: {error.strerror or error}"
            ) from None
        say(out, f"plot of experiment {report.experiment} written to {args.plot}")
    return 0


def _list(args: argparse.Namespace, out: Console) -> int:
    answer = _call(_experiments_url(args.url))
    experiments = answer.get("experiments", []) if isinstance(answer, dict) else answer
    if not isinstance(experiments, list):
        raise _GatewayError("the gateway's list of experiments is not a list")
    if not experiments:
        say(out, "no experiments")
        return 0
    table = Table(title="experiments", title_justify="left")
    for column in ("name", "model", "arms (control first)", "state", "requests", "feedback"):
        table.add_column(column, justify="right" if column in ("requests", "feedback") else "left")
    for item in experiments:
        if not isinstance(item, dict):
            continue
        arms = ", ".join(
            f"{arm.get('name')}={arm.get('variant')} {float(arm.get('weight', 0)) * 100:.0f} %"
            for arm in item.get("arms", [])
            if isinstance(arm, dict)
        )
        state = "active" if item.get("active", True) else "ended"
        table.add_row(
            str(item.get("name", "?")), str(item.get("model", "?")), arms, state,
            str(item.get("requests", ABSENT)), str(item.get("feedback", ABSENT)),
        )  # fmt: skip
    out.print(table)
    return 0


def _read_definition(source: str) -> object:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as error:
        raise InvalidArgumentError(f"cannot read {source}: {error.strerror}") from None
    try:
        return json.loads(text)
    except ValueError as error:
        where = "standard input" if source == "-" else source
        raise InvalidArgumentError(f"{where} is not JSON: {error}") from None


def _create(args: argparse.Namespace, out: Console) -> int:

    body = _read_definition(args.file)
    # Checked here too so that a typo fails at once, with the same message the gateway gives.
    experiment = Experiment.from_dict(body)
    _call(_experiments_url(args.url), "POST", body, _token(args))
    arms = ", ".join(
        f"{arm.name}={arm.variant} {arm.weight * 100:.0f} %" for arm in experiment.arms
    )
    say(out, f"created experiment {experiment.name} on {experiment.model}: {arms}")
    return 0


def _end(args: argparse.Namespace, out: Console) -> int:
    _call(_experiments_url(args.url, args.name), "DELETE", token=_token(args))
    say(
        out,
        f"ended experiment {args.name}; its report is kept "
        f"(gearbox experiments report {args.name})",
    )
    return 0


def _token(args: argparse.Namespace) -> str | None:
    # Read at run time rather than as the option's default, so the value never shows in --help.
    return args.token or os.environ.get(TOKEN_VARIABLE) or None


_ACTIONS = {"report": _report, "list": _list, "create": _create, "end": _end}


def run_experiments(args: argparse.Namespace, out: Console, err: Console) -> int:
    """Run one ``gearbox experiments`` action; an error is one line on ``err`` and exit 1."""
    try:
        return _ACTIONS[args.experiments_command](args, out)
    except GearboxError as error:
        say(err, f"gearbox: error: {_one_line(error.message)}")
        return EXIT_ERROR
