"""The request log: one JSON line per request on the `dreamlens.request` logger.

The line carries only what an operator needs to find and weigh a request:
its id, method, route template (never the raw path, which holds ids), status,
duration, the database totals and the user id once identified. It never
carries headers, tokens, secrets, device ids, query strings or bodies
(prompts): those fields are simply not collected, so nothing can leak by
accident.
"""

from __future__ import annotations

import logging
from typing import Any

from functions import metrics

# the request line is an EMF document too: as it is on stdout inside Lambda
request_lines = metrics.JsonLines(logging.getLogger("dreamlens.request"))


_cold_start = True


def request_metrics(fields: dict[str, Any], more: metrics.Gathered | None = None) -> dict[str, Any]:
    """The request line as a CloudWatch EMF document: the same line is the log
    entry and the metrics (requests by route and status, latency, database ms
    and round trips, cold starts, and what the endpoint emitted: `more`), so
    metrics cost no extra line and no AWS call."""
    global _cold_start
    values: dict[str, float | int] = {
        "Requests": 1,
        "LatencyMs": fields.get("duration_ms", 0),
        "DbMs": fields.get("db_ms", 0),
        "DbRoundTrips": fields.get("db_round_trips", 0),
    }
    if _cold_start:
        values["ColdStarts"] = 1
        _cold_start = False
    dimensions = {"Route": str(fields.get("route") or "unmatched"), "Status": str(fields.get("status"))}
    return metrics.document(values, dimensions, properties=fields, more=more)


def log_request(fields: dict[str, Any], more: metrics.Gathered | None = None) -> None:
    status = fields.get("status", 500)
    level = logging.ERROR if isinstance(status, int) and status >= 500 else logging.INFO
    request_lines.write(metrics.as_json_line(request_metrics(fields, more)), level)
