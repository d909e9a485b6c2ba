"""The backend's `options=` dict, validated with one-line errors."""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, Optional

from .errors import LrcompileError


@dataclasses.dataclass
class Options:
    policy: Any = None  # path, YAML text, dict or Policy
    calibration: Any = None  # CalibrationStats or path
    report: Optional[str] = None  # JSON path, rewritten on every backend call
    inductor: bool = True  # False: run the rewritten graph eagerly (tests, debugging)
    verbose: bool = False  # print the report table after each backend call
    tune: bool = True
    strict: Optional[bool] = None  # overrides the policy's defaults.strict
    fuse: Optional[bool] = (
        None  # fuse sites with their prologue/epilogue into kernel ops; None: on iff CUDA is available
    )

    def fuse_enabled(self) -> bool:
        if self.fuse is not None:
            return bool(self.fuse)
        import torch

        return torch.cuda.is_available()

    @classmethod
    def parse(cls, options: Optional[dict]) -> "Options":
        options = dict(options or {})
        known = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in known:
                near = difflib.get_close_matches(key, known, n=1)
                raise LrcompileError(
                    f"lrcompile: unknown option {key!r}"
                    + (f" (did you mean {near[0]!r}?)" if near else f" (known: {', '.join(known)})")
                )
        for key, value in options.items():
            want, what = _TYPES.get(key, (None, None))
            if want is not None and not isinstance(value, want) and not (value is None and key not in _NOT_NONE):
                raise LrcompileError(f"lrcompile: option {key!r} must be {what}, got {value!r}")
        return cls(**options)


# Options with a fixed type (policy and calibration take several forms; their loaders check them).
_TYPES = {
    "report": ((str, os.PathLike), "a file path"),
    "inductor": (bool, "true or false"),
    "verbose": (bool, "true or false"),
    "tune": (bool, "true or false"),
    "strict": (bool, "true or false"),
    "fuse": (bool, "true or false"),
}
_NOT_NONE = ("inductor", "verbose", "tune")  # the others take None: not given
