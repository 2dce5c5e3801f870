"""The Grafana dashboard's PromQL, outside Grafana: every panel's query, variables filled in.

``deploy/grafana/gearbox-dashboard.json`` is not package data, so callers (tests, a check
against a live Prometheus) load it themselves and hand the parsed JSON in.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_VARIABLES: Mapping[str, str] = {
    "job": "gearbox",
    "model": ".*",
    # Grafana's $__rate_interval is at least four scrape intervals; 1m covers a 5 s-15 s scrape.
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "15m",
}
"""Values that make every query runnable against a Prometheus scraping one gateway."""

# $name, ${name} and ${name:format}; Grafana's own variables start with two underscores.
_VARIABLE = re.compile(r"\$\{(\w+)(?::[\w-]+)?\}|\$(\w+)")


@dataclass(frozen=True)
class PanelQuery:
    panel_title: str
    ref_id: str
    expr: str


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        # A collapsed row holds its panels inside itself rather than after it.
        yield from _panels(panel.get("panels", []))


def panel_queries(dashboard: Mapping[str, Any]) -> list[PanelQuery]:
    """Every target of every panel (rows' nested panels included), in dashboard order."""
    return [
        PanelQuery(panel["title"], target["refId"], target["expr"])
        for panel in _panels(dashboard.get("panels", []))
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def substitute_variables(expr: str, values: Mapping[str, str] = DEFAULT_VARIABLES) -> str:
    """``expr`` with each ``$var``/``${var}`` replaced from ``values``; an unknown one raises.

    A multi-value variable is given as the regex Grafana would write (``a|b``, ``.*``).
    """

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for dashboard variable ${name} in: {expr}")
        return values[name]

    return _VARIABLE.sub(replace, expr)
