"""One Lambda cold start, run by a plain interpreter from an unzipped artifact.

    python -I -S -B lambda_child.py < spec.json

`-I` ignores PYTHON* variables and the user's site-packages and keeps the
script's directory off sys.path, `-S` leaves out site-packages altogether,
and `-B` writes no bytecode, as on a Lambda's read-only code directory
(PYTHONDONTWRITEBYTECODE=1 would say the same, but -I ignores it). -B does
not stop bytecode from being read: the artifact's own __pycache__/*.pyc,
shipped in the zip, are what the imports load. sys.path is then the
standard library only; the artifact directory goes first, as the runtime
puts LAMBDA_TASK_ROOT first. Standard library only: nothing here may be
importable from anywhere but the interpreter itself.

The spec (JSON on stdin): {"artifact": dir, "handler": "functions/health.handler",
"function_name": ..., "events": [...], "result": path}. The result file gets
the import time, each event's response and time, every imported module that
came from neither the artifact nor the standard library (must be none), and
every module of the artifact that was not loaded from its shipped pyc (must
be none: each one compiled from source at this cold start).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
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


def record_compiles() -> list[str]:
    """The source files the import system compiles from now on: a source
    loader compiles only when no valid pyc is there to load."""
    compiled: list[str] = []
    loader = importlib.machinery.SourceFileLoader
    original = loader.source_to_code

    def source_to_code(self: Any, data: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        compiled.append(str(path))
        return original(self, data, path, *args, **kwargs)

    loader.source_to_code = source_to_code
    return compiled


def not_from_bytecode(artifact: Path, compiled: list[str]) -> list[str]:
    """Modules of the artifact not loaded from their shipped pyc."""
    root = artifact.resolve()
    ours = [path for path in compiled if Path(path).resolve().is_relative_to(root)]
    missing = [f"compiled from source: {path}" for path in ours]
    for name, module in sorted(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not file or not file.endswith(".py") or not Path(file).resolve().is_relative_to(root):
            continue
        cached = importlib.util.cache_from_source(file)
        # cryptography puts a deprecation wrapper without a __spec__ in
        # sys.modules for a few of its modules (serialization, dh, ...): for
        # those the shipped pyc must be there, and the hook above saw any compile
        spec = getattr(module, "__spec__", None)
        if (spec is not None and spec.cached != cached) or not Path(cached).is_file():
            missing.append(f"{name}: no shipped {cached}")
    return missing


def artifact_modules(artifact: Path) -> int:
    root = artifact.resolve()
    return sum(
        1
        for module in list(sys.modules.values())
        if (file := getattr(module, "__file__", None)) and Path(file).resolve().is_relative_to(root)
    )


def main() -> None:
    spec: dict[str, Any] = json.load(sys.stdin)
    artifact = Path(spec["artifact"])
    sys.path.insert(0, str(artifact))
    compiled = record_compiles()

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
        "not_from_bytecode": not_from_bytecode(artifact, compiled),
        "artifact_modules": artifact_modules(artifact),
        "cache_tag": sys.implementation.cache_tag,
        "boto3_imported": "boto3" in sys.modules,
        "sys_path": sys.path,
    }
    Path(spec["result"]).write_text(json.dumps(result, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
