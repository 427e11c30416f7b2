"""`python -m fuyu.model.native build [--debug]`: compile the C kernels in view."""

from __future__ import annotations

import argparse
import sys

from fuyu.model.native import build as native_build
from fuyu.model.settings import Settings


def main(argv: list[str] | None = None) -> int:
    """`python -m fuyu.model.native build [--debug]`: compile the kernels in view, whether or
    not a library is cached: the command, the compiler's output, where the library and log are."""
    ap = argparse.ArgumentParser(prog="python -m fuyu.model.native", description=main.__doc__.splitlines()[0])
    ap.add_argument("action", choices=["build"])
    ap.add_argument("--debug", action="store_true",
                    help="-O0 -g -fsanitize=address; loading it needs the sanitizer's runtime "
                         "preloaded: LD_PRELOAD=$(cc -print-file-name=libasan.so) FUYU_NATIVE=debug ...")
    args = ap.parse_args(argv)
    settings = Settings.from_environment()
    compiler = native_build.compiler_path(settings.compiler)
    if compiler is None:
        print(f"no C compiler: {settings.compiler} is not on PATH (set CC)", file=sys.stderr)
        return 1
    debug = args.debug or settings.debug
    path = native_build.library_path(settings.cache_dir, settings.compiler, debug)
    built = native_build.build(path, compiler, debug, announce=lambda line: print(line, flush=True))
    sys.stderr.write(built.output)
    print(f"{'built' if built.ok else 'FAILED'}: {path}\nlog: {built.log}")
    return 0 if built.ok else 1


if __name__ == "__main__":
    sys.exit(main())
