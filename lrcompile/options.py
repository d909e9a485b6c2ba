"""The backend's `options=` dict, validated with one-line errors."""
from __future__ import annotations

import dataclasses
import difflib
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
    fuse: Optional[bool] = None  # fuse sites with their prologue/epilogue into kernel ops; None: on iff CUDA is available

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
                    f"lrcompile: unknown option {key!r}" + (f" (did you mean {near[0]!r}?)" if near else f" (known: {', '.join(known)})"))
        return cls(**options)
