"""Metrics as CloudWatch Embedded Metric Format (EMF) log lines.

CloudWatch turns a JSON log line carrying an `_aws` block into metrics, so
nothing on the request path calls AWS: a metric costs one line on stdout,
which Lambda ships to CloudWatch Logs anyway.

    emit({"TokensSpent": 2}, dimensions={"Function": "generations"})

Counts default to the unit "Count"; names ending in "Ms" are "Milliseconds".

Inside a request (functions/app.py's RequestLog opens `gathered()`), emit()
writes nothing itself: the values ride on the request's own log line, which
is an EMF document already, as a directive of their own. A request then
writes one line whatever it counts, and a spend pays for no second line.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import time
from collections.abc import Mapping
from functools import lru_cache
from typing import IO, Any

from pydantic_core import to_json

NAMESPACE = os.environ.get("METRICS_NAMESPACE", "DreamLens")


class JsonLines:
    """Where one logger's JSON lines (EMF documents) go.

    Inside Lambda: straight to stdout, exactly as they are, one write each.
    The Lambda runtime's root handler prefixes every logging line
    (`[INFO]\t<time>\t<request id>\t...`) and CloudWatch extracts EMF metrics
    only from a log event that is a JSON object; and the logging machinery
    (a LogRecord, the caller's frame, a handler lock) cost every request
    about 40 µs for a line whose level and format never change.
    Elsewhere (tests, `dreamlens serve`) the lines go through `logger`, so
    caplog and the local server's handlers see them. `stream` may be set to
    send them elsewhere as Lambda would (the benchmarks: /dev/null)."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        if logger.level == logging.NOTSET:
            # the Lambda runtime leaves the root logger at WARNING unless the
            # function's log level is configured; these lines show either way
            logger.setLevel(logging.INFO)
        self.stream: IO[str] | None = None
        self.to_stdout = bool(os.environ.get("AWS_LAMBDA_FUNCTION_NAME"))

    def write(self, line: str, level: int = logging.INFO) -> None:
        stream = self.stream if self.stream is not None else sys.stdout if self.to_stdout else None
        if stream is not None:
            stream.write(line + "\n")
            stream.flush()
        elif self.logger.isEnabledFor(level):
            self.logger.log(level, line)


metric_lines = JsonLines(logging.getLogger("dreamlens.metrics"))


def unit_for(name: str) -> str:
    return "Milliseconds" if name.endswith("Ms") else "Count"


@lru_cache(maxsize=1)
def function_name() -> str:
    # the deployed function's short name (dreamlens-prod-tokens -> tokens); "local" off Lambda.
    # Read once: a process is one function, and os.environ is slow to ask on every line.
    full = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "")
    return full.rsplit("-", 1)[-1] if full else "local"


# dimension values (sorted name, value pairs) -> metric values, for the request under way
Gathered = dict[tuple[tuple[str, str], ...], dict[str, float | int]]
_gathered: contextvars.ContextVar[Gathered | None] = contextvars.ContextVar(
    "dreamlens_request_metrics", default=None
)


class gathered:
    """Collect what emit() is given in the block, for the request line to
    carry. A class rather than @contextmanager: every request opens one."""

    __slots__ = ("_token", "collected")

    def __init__(self) -> None:
        self.collected: Gathered = {}

    def __enter__(self) -> Gathered:
        self._token = _gathered.set(self.collected)
        return self.collected

    def __exit__(self, *exc_info: object) -> None:
        _gathered.reset(self._token)


@lru_cache(maxsize=256)
def _directive(names: tuple[str, ...], dimension_names: tuple[str, ...]) -> dict[str, Any]:
    # the same few per route: built once, shared by every line (never mutated)
    return {
        "Namespace": NAMESPACE,
        "Dimensions": [list(dimension_names)],
        "Metrics": [{"Name": name, "Unit": unit_for(name)} for name in names],
    }


def document(
    values: Mapping[str, float | int],
    dimensions: Mapping[str, str] | None = None,
    properties: Mapping[str, Any] | None = None,
    timestamp_ms: int | None = None,
    more: Gathered | None = None,
) -> dict[str, Any]:
    """The EMF document: metric values at the top level beside their
    dimensions, and the `_aws` block that declares them. `more` adds metrics
    with dimensions of their own (Function and theirs), one directive each;
    a group whose names would clash with the document's is written as a line
    of its own instead."""
    dims = {"Function": function_name(), **(dimensions or {})}
    root: dict[str, Any] = {**(properties or {}), **dims, **values}
    directives = [_directive(tuple(values), tuple(sorted(dims)))]
    for pairs, group in (more or {}).items():
        group_dims = {"Function": dims["Function"], **dict(pairs)}
        clashes = any(name in root for name in group) or any(
            root.get(name, value) != value for name, value in group_dims.items()
        )
        if clashes:
            _write(document(group, dict(pairs)))
            continue
        root.update(group_dims)
        root.update(group)
        directives.append(_directive(tuple(group), tuple(sorted(group_dims))))
    root["_aws"] = {
        "Timestamp": timestamp_ms if timestamp_ms is not None else int(time.time() * 1000),
        "CloudWatchMetrics": directives,
    }
    return root


def as_json_line(document: Mapping[str, Any]) -> str:
    """The document as one compact JSON line. pydantic-core's encoder (already
    loaded for the models) writes a request line about three times as fast
    as the json module; what it cannot encode is written as its str()."""
    return to_json(document, fallback=str).decode()


def _write(emf: dict[str, Any]) -> None:
    metric_lines.write(as_json_line(emf))


def emit(
    values: Mapping[str, float | int],
    dimensions: Mapping[str, str] | None = None,
    properties: Mapping[str, Any] | None = None,
) -> None:
    if not values:
        return
    collected = _gathered.get()
    if collected is not None and properties is None:
        group = collected.setdefault(tuple(sorted((dimensions or {}).items())), {})
        for name, value in values.items():
            group[name] = group.get(name, 0) + value
        return
    _write(document(values, dimensions, properties))
