"""Where a kernel runs and how its generated source is loaded.

Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests); anything else takes the torch
implementation. Kernel source is generated per epilogue combination and written to a file (Triton's JIT reads a
function's source from its file) in a directory this process made for itself (mode 0700) and removes at exit,
then imported from there. Never from the shared cache directory: a file there may have been planted, and
importing it would run it. The interpreter flag is part of the in-process key because `triton.jit` picks
interpreted or compiled at decoration time.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from typing import Optional

import torch

# Tests set this: every output buffer a launcher allocates starts as NaN, so an element a kernel forgets to
# write cannot pass as a correct zero.
POISON = False

_modules: dict = {}
_late_warned = False
_private_dir: Optional[str] = None


def kernel_dir() -> str:
    """This process's own directory for generated kernel source (nobody else writes there)."""
    global _private_dir
    if _private_dir is None or not os.path.isdir(_private_dir):
        _private_dir = tempfile.mkdtemp(prefix="lrcompile-kernels-")
        atexit.register(shutil.rmtree, _private_dir, True)
    return _private_dir


def interpreting() -> bool:
    """TRITON_INTERPRET=1 and triton imported under it: `triton.jit` fixes interpreted-or-compiled when it
    decorates, triton.language's own helpers (tl.zeros, ...) included, so setting the variable after triton was
    imported cannot work; the torch path runs instead, with a warning."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    global _late_warned
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:
        return False
    if isinstance(tl.zeros, InterpretedFunction):
        return True
    if not _late_warned:
        _late_warned = True
        warnings.warn(
            "lrcompile: TRITON_INTERPRET=1 was set after triton was imported; the Triton interpreter "
            "cannot take effect, so kernels run their torch implementations (set it before any import)",
            stacklevel=2,
        )
    return False


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(x: torch.Tensor) -> bool:
    if x.is_cuda:
        return triton_available()
    return x.device.type == "cpu" and interpreting() and triton_available()


def alloc(shape, dtype: torch.dtype, device) -> torch.Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def load(name: str, source: str):
    """The module compiled from `source`, cached by the source's hash (on disk and in process)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    key = (digest, interpreting())
    mod = _modules.get(key)
    if mod is not None:
        return mod
    path = os.path.join(kernel_dir(), f"{name}_{digest}.py")
    if not os.path.exists(path):
        # a unique temp file beside the target (threads alike), then an atomic rename: writers produce the same bytes
        fd, tmp = tempfile.mkstemp(prefix=f"{name}_{digest}.", suffix=".tmp", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "w") as f:
                f.write(source)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    spec = importlib.util.spec_from_file_location(f"lrcompile_kernel_{name}_{digest}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _modules[key] = mod
    return mod


def dot_flags(dtype: torch.dtype) -> dict:
    """UPCAST: the CPU interpreter's bf16/fp16 tl.dot is wrong (triton 3.9), so it multiplies in fp32 there.
    PREC: fp32 operands multiply in full precision, as cuBLAS does with torch's default (TF32 off)."""
    return {"UPCAST": interpreting(), "PREC": "ieee" if dtype == torch.float32 or interpreting() else "tf32"}


# The dot every template uses, with the flags above as constexprs.
DOT_SOURCE = """
@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)
"""


def _version(v: str) -> tuple:
    return tuple(int(p) for p in v.split("+")[0].split(".")[:2])


def check_interpreter_numpy() -> None:
    """triton < 3.7's interpreter turns one-element arrays into Python ints (a runtime loop bound), which numpy
    2.4 refuses ("only 0-dimensional arrays can be converted"): fail with what to install instead."""
    import numpy
    import triton

    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        from ..errors import LrcompileError

        raise LrcompileError(
            f"lrcompile: the Triton interpreter of triton {triton.__version__} does not run with "
            f"numpy {numpy.__version__}; install numpy<2.4 (pip install 'lrcompile[triton36]') "
            "or triton>=3.7"
        )


def pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, (int(n) - 1).bit_length()))


def launch(mod, name: str, grid, args: tuple, consts: dict, configs: list, key: list, small: dict):
    """Run kernel `name` of `mod`: fixed small blocks under the interpreter (no timing without a GPU), Triton's
    autotuner over `configs` on a GPU (keyed on the named size arguments)."""
    import triton

    fn = getattr(mod, name)
    if interpreting():
        check_interpreter_numpy()
        meta = {**consts, **small}
        fn[grid(meta)](*args, **meta)
        return
    tuned_name = f"_tuned_{name}"
    tuned = getattr(mod, tuned_name, None)
    if tuned is None:
        tuned = triton.autotune(configs=[triton.Config(c, num_warps=w, num_stages=s) for c, w, s in configs], key=key)(
            fn
        )
        setattr(mod, tuned_name, tuned)
    tuned[grid](*args, **consts)


def out_dtype_of(compute: torch.dtype, out_dtype: Optional[torch.dtype]) -> torch.dtype:
    return out_dtype if out_dtype is not None else compute


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
