"""Metrics as CloudWatch Embedded Metric Format (EMF) log lines.

CloudWatch turns a JSON log line carrying an `_aws` block into metrics, so
nothing on the request path calls AWS: a metric costs one line on stdout,
which Lambda ships to CloudWatch Logs anyway.

    emit({"TokensSpent": 2}, dimensions={"Function": "generations"})

Counts default to the unit "Count"; names ending in "Ms" are "Milliseconds".
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

NAMESPACE = os.environ.get("METRICS_NAMESPACE", "DreamLens")


def json_lines_to_stdout(logger: logging.Logger) -> None:
    """Inside Lambda, write this logger's lines to stdout exactly as they are.

    The Lambda runtime's root handler prefixes every logging line
    (`[INFO]\t<time>\t<request id>\t...`); CloudWatch extracts EMF metrics only
    from a log event that is a JSON object, so the metric and request lines
    bypass it. Elsewhere (tests, `dreamlens serve`) they propagate as usual."""
    if os.environ.get("AWS_LAMBDA_FUNCTION_NAME") and not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


metrics_log = logging.getLogger("dreamlens.metrics")
if metrics_log.level == logging.NOTSET:
    metrics_log.setLevel(logging.INFO)
json_lines_to_stdout(metrics_log)


def unit_for(name: str) -> str:
    return "Milliseconds" if name.endswith("Ms") else "Count"


def function_name() -> str:
    # the deployed function's short name (dreamlens-prod-tokens -> tokens); "local" off Lambda
    full = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "")
    return full.rsplit("-", 1)[-1] if full else "local"


def document(
    values: Mapping[str, float | int],
    dimensions: Mapping[str, str] | None = None,
    properties: Mapping[str, Any] | None = None,
    timestamp_ms: int | None = None,
) -> dict[str, Any]:
    """The EMF document: metric values at the top level beside their
    dimensions, and the `_aws` block that declares them."""
    dims = {"Function": function_name(), **(dimensions or {})}
    return {
        **(properties or {}),
        **dims,
        **values,
        "_aws": {
            "Timestamp": timestamp_ms if timestamp_ms is not None else int(time.time() * 1000),
            "CloudWatchMetrics": [
                {
                    "Namespace": NAMESPACE,
                    "Dimensions": [sorted(dims)],
                    "Metrics": [{"Name": name, "Unit": unit_for(name)} for name in values],
                }
            ],
        },
    }


def emit(
    values: Mapping[str, float | int],
    dimensions: Mapping[str, str] | None = None,
    properties: Mapping[str, Any] | None = None,
) -> None:
    if values and metrics_log.isEnabledFor(logging.INFO):
        line = json.dumps(document(values, dimensions, properties), separators=(",", ":"))
        metrics_log.info(line)
