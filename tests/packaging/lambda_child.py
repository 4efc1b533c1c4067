"""One Lambda cold start, run by a plain interpreter from an unzipped artifact.

    python -I -S -B lambda_child.py < spec.json

`-I` ignores PYTHON* variables and the user's site-packages and keeps the
script's directory off sys.path, `-S` leaves out site-packages altogether,
and `-B` writes no bytecode (a Lambda's code directory is read-only, so every
cold start compiles from source). sys.path is then the standard library
only; the artifact directory goes first, as the runtime puts
LAMBDA_TASK_ROOT first. Standard library only: nothing here may be
importable from anywhere but the interpreter itself.

The spec (JSON on stdin): {"artifact": dir, "handler": "functions/health.handler",
"function_name": ..., "events": [...], "result": path}. The result file gets
the import time, each event's response and time, and every imported module
that came from neither the artifact nor the standard library (must be none).
"""

from __future__ import annotations

import importlib
import json
import sys
import sysconfig
import time
import uuid
from pathlib import Path
from typing import Any


class LambdaContext:
    """The attributes of the runtime's context object that code may read."""

    def __init__(self, function_name: str, timeout_seconds: int) -> None:
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.invoked_function_arn = f"arn:aws:lambda:eu-central-1:123456789012:function:{function_name}"
        self.memory_limit_in_mb = 512
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = "smoke"
        self._deadline = time.monotonic() + timeout_seconds

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def foreign_modules(artifact: Path) -> list[str]:
    """Imported modules loaded from outside the artifact and the standard library."""
    allowed = [artifact.resolve()]
    for key in ("stdlib", "platstdlib"):
        allowed.append(Path(sysconfig.get_paths()[key]).resolve())
    foreign = []
    for name, module in sorted(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not file or name == "__main__":
            continue  # built into the interpreter, a namespace package, or this script
        path = Path(file).resolve()
        if not any(path.is_relative_to(root) for root in allowed):
            foreign.append(f"{name} ({path})")
    return foreign


def main() -> None:
    spec: dict[str, Any] = json.load(sys.stdin)
    artifact = Path(spec["artifact"])
    sys.path.insert(0, str(artifact))

    module_path, attribute = spec["handler"].rsplit(".", 1)
    started = time.perf_counter()
    module = importlib.import_module(module_path.replace("/", "."))
    import_seconds = time.perf_counter() - started
    handler = getattr(module, attribute)

    invocations = []
    for event in spec["events"]:
        context = LambdaContext(spec["function_name"], spec.get("timeout", 15))
        started = time.perf_counter()
        response = handler(event, context)
        invocations.append({"response": response, "seconds": time.perf_counter() - started})

    result = {
        "python": sys.version.split()[0],
        "import_seconds": import_seconds,
        "invocations": invocations,
        "foreign_modules": foreign_modules(artifact),
        "boto3_imported": "boto3" in sys.modules,
        "sys_path": sys.path,
    }
    Path(spec["result"]).write_text(json.dumps(result, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
