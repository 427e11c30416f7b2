"""The environment variables the library reads, all in one place: `Settings.from_environment()`.

  FUYU_KERNELS    the CPU kernel plan at load: auto (default: timed), plain, or a fixed native,
                  native+w8a8, packed or linear (model/plan.py)
  FUYU_NATIVE     0: never build or load our C kernels (model/native/); debug: build them with
                  -O0 -g -fsanitize=address (load with the sanitizer's runtime preloaded)
  CC              the C compiler (default: cc)
  XDG_CACHE_HOME  where kernel plans and the compiled C library are cached (default ~/.cache),
                  under fuyu/

The rest of the library reads them through this function: a call that takes `settings=None` reads
them here and says so in its docstring (model/native looks its three up by name only as the key of
what it already built for them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping


@dataclass(frozen=True)
class Settings:
    kernels: str | None = None  # None: the caller's default ("auto")
    native: bool = True  # build and load the C kernels where a compiler works
    debug: bool = False  # ... as a sanitizer build
    compiler: str = "cc"
    cache_dir: Path = Path.home() / ".cache" / "fuyu"

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        cache = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        switch = environ.get("FUYU_NATIVE", "")
        return cls(kernels=environ.get("FUYU_KERNELS") or None, native=switch != "0",
                   debug=switch == "debug", compiler=environ.get("CC") or "cc",
                   cache_dir=Path(cache) / "fuyu")
