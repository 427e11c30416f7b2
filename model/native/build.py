"""Compile the C kernels of csrc/ (beside this file) into a shared library, cache it, and bind its functions.

The sources ship in the package (fuyu/model/native/csrc/*.c, *.h). They are compiled with the system's C
compiler, `-O3 -fopenmp -march=native` (or, for debugging, `-O0 -g -fsanitize=address`), into
<cache>/native/native-<hash>.so, the hash covering the sources, the compiler, the flags and the
CPU's feature flags: a home folder shared by different machines never hands one a binary built for
another. The compiler's command and output go to the .log file beside it, failed or not.

The bindings come from one table, csrc/native.h: each line declaring a `fuyu_*` function gives
that function's ctypes argtypes and restype, and its enums the codes a call passes. native.c includes it, so the compiler checks every
definition against the same line, and a signature lives in one place.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SOURCE_DIR = Path(__file__).parent / "csrc"
MAIN = "native.c"  # the one translation unit; it includes the headers
HEADER = "native.h"  # the table of exported prototypes
FLAGS = ("-O3", "-fopenmp")  # and -march=<march>: native, or another target a test builds for
DEBUG_FLAGS = ("-O0", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-fopenmp")
SHARED = ("-shared", "-fPIC")
TIMEOUT_S = 120


def sources(source_dir: Path = SOURCE_DIR) -> dict[str, str]:
    """{file name: text} of the C sources, in name order."""
    return {p.name: p.read_text() for p in sorted(source_dir.iterdir()) if p.suffix in (".c", ".h")}


def cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for reports only: choices are keyed by cpu_flags."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown-cpu"


def flags(debug: bool = False, march: str = "native") -> tuple[str, ...]:
    return (*(DEBUG_FLAGS if debug else (*FLAGS, f"-march={march}")), *SHARED)


def _source_parts(source_dir: Path) -> list[str]:
    return [f"{name}\0{text}" for name, text in sources(source_dir).items()]


def source_digest(source_dir: Path = SOURCE_DIR) -> str:
    """A digest of the C sources: what a timing of the kernels built from them is valid for."""
    return hashlib.sha256("\0".join(_source_parts(source_dir)).encode()).hexdigest()[:16]


def library_path(cache_dir: Path, compiler: str, debug: bool = False,
                 source_dir: Path = SOURCE_DIR, march: str = "native") -> Path:
    """Where the library built from these sources, with this compiler and flags, on this CPU, lives."""
    parts = _source_parts(source_dir)
    digest = hashlib.sha256("\0".join([*parts, compiler, *flags(debug, march), cpu_flags()]).encode()).hexdigest()[:16]
    return cache_dir / "native" / f"native-{digest}.so"


@dataclass(frozen=True)
class Build:
    """One run of the compiler: what was run, what it said, and whether the library came out."""

    path: Path  # the library
    command: tuple[str, ...]
    returncode: int
    output: str  # the compiler's stderr and stdout

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def log(self) -> Path:
        return self.path.with_suffix(".log")

    def summary(self) -> str:
        """The compiler's first error line, or its exit status."""
        errors = [line for line in self.output.splitlines() if "error" in line]
        return errors[0].strip() if errors else f"exit status {self.returncode}"


def compiler_path(compiler: str) -> str | None:
    return shutil.which(compiler)


def build_command(compiler: str, debug: bool, out: Path, source_dir: Path = SOURCE_DIR,
                  march: str = "native") -> tuple[str, ...]:
    return (compiler, *flags(debug, march), str(source_dir / MAIN), "-o", str(out), "-lm")


def build(path: Path, compiler: str, debug: bool = False, source_dir: Path = SOURCE_DIR,
          announce: Callable[[str], None] | None = None, march: str = "native") -> Build:
    """Compile the sources into `path`, atomically (concurrent processes may build it at once),
    writing the command and the compiler's output to the log beside it. The compiler must exist
    (compiler_path); a failure to run it, or a timeout, is a failed Build too. announce, where
    given, is called with the command line before it runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        command = build_command(compiler, debug, out, source_dir, march)
        if announce is not None:
            announce(" ".join(command))
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
            returncode, output = done.returncode, done.stderr + done.stdout
        except (OSError, subprocess.SubprocessError) as e:
            returncode, output = -1, f"error: {e}"
        result = Build(path, command, returncode, output)
        result.log.write_text(" ".join(command) + "\n" + output + f"exit status {returncode}\n")
        if result.ok:
            os.replace(out, path)
    return result


# --- the bindings, from the table of prototypes -----------------------------------------------

PROTOTYPE = re.compile(r"^(void|int|int64_t) (fuyu_\w+)\((.*)\);$", re.MULTILINE)
ENUM = re.compile(r"^typedef enum \{ (.*) \} (\w+);$", re.MULTILINE)
SCALARS = {"int64_t": ctypes.c_int64, "int": ctypes.c_int, "dtype": ctypes.c_int, "wformat": ctypes.c_int,
           "float": ctypes.c_float}


def prototypes(source_dir: Path = SOURCE_DIR) -> dict[str, tuple[type | None, list[type]]]:
    """{function name: (restype, argtypes)} from the table (native.h)."""
    table = {}
    for result, name, params in PROTOTYPE.findall((source_dir / HEADER).read_text()):
        args = []
        for param in params.split(","):
            kind = param.rsplit(None, 1)[0].strip()  # the type, without the parameter's name
            args.append(ctypes.c_void_p if "*" in param else SCALARS[kind])
        table[name] = (None if result == "void" else SCALARS[result], args)
    return table


def enum_codes(name: str, source_dir: Path = SOURCE_DIR) -> dict[str, int]:
    """{enumerator: value} of the table's enum `name`, e.g. enum_codes("dtype") = {"F32": 0, "BF16": 1}."""
    enums = {enum: values for values, enum in ENUM.findall((source_dir / HEADER).read_text())}
    return {value.strip(): i for i, value in enumerate(enums[name].split(","))}


def bind(lib: ctypes.CDLL, source_dir: Path = SOURCE_DIR) -> ctypes.CDLL:
    """Set every exported function's argtypes and restype from the table."""
    for name, (restype, argtypes) in prototypes(source_dir).items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib
