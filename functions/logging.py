"""The request log: one JSON line per request on the `dreamlens.request` logger.

The line carries only what an operator needs to find and weigh a request:
its id, method, route template (never the raw path, which holds ids), status,
duration, the database totals and the user id once identified. It never
carries headers, tokens, secrets, device ids, query strings or bodies
(prompts): those fields are simply not collected, so nothing can leak by
accident.
"""

from __future__ import annotations

import json
import logging
from typing import Any

request_log = logging.getLogger("dreamlens.request")

# The Lambda runtime leaves the root logger at WARNING unless the function's
# log level is configured; the request line must show either way.
if request_log.level == logging.NOTSET:
    request_log.setLevel(logging.INFO)


def log_request(fields: dict[str, Any]) -> None:
    status = fields.get("status", 500)
    level = logging.ERROR if isinstance(status, int) and status >= 500 else logging.INFO
    if request_log.isEnabledFor(level):
        request_log.log(level, json.dumps(fields, separators=(",", ":"), default=str))
