"""Triton kernels, one family per file beside its launcher and torch reference, exposed as
`torch.ops.lrcompile.<op>` (op.py). A family names its op in `Structure.kernel`; KERNEL_OF is the view of those
declarations (family -> op). Every module of this package is imported (so a new op file needs no edit here);
`op_of` also imports a family's `kernel_module` defined elsewhere the first time it is needed.

Importing needs only torch: triton is imported when a kernel first launches (runtime.py), so without triton
(or without a GPU and TRITON_INTERPRET=1) every op runs its torch implementation, fused groups included.
"""

import importlib
import pkgutil

from ..families import FAMILIES, FamilyView
from .op import OPS  # noqa: F401

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):  # every op file registers its op
    importlib.import_module(f"{__name__}.{_m.name}")
del _m

KERNEL_OF = FamilyView(lambda cls: cls.kernel)


def kernel_module(family: str) -> str:
    """The module that defines the family's op."""
    cls = FAMILIES[family]
    return cls.kernel_module or f"{__name__}.{cls.kernel}"


def op_of(family: str):
    """The family's kernel op (lrcompile.kernels.op.define), its module imported if it was not yet."""
    name = KERNEL_OF[family]
    if name not in OPS:
        importlib.import_module(kernel_module(family))
    if name not in OPS:
        raise KeyError(
            f"lrcompile: family {family!r} names kernel {name!r}, which {kernel_module(family)} does not define"
        )
    return OPS[name]
