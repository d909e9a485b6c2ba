"""Triton kernels, one family per file beside its launcher and torch reference, exposed as
`torch.ops.lrcompile.<op>` (op.py). KERNEL_OF maps a structure family to the op that runs it fused.

Importing needs only torch: triton is imported when a kernel first launches (runtime.py), so without triton
(or without a GPU and TRITON_INTERPRET=1) every op runs its torch implementation, fused groups included.
"""
from .op import OPS  # noqa: F401
from . import lowrank, lora, dora, noble, twocore, blast  # noqa: F401,E401  (register the ops)

KERNEL_OF = {"lowrank": "lowrank", "lora": "lora", "dora": "dora", "noble": "noble", "monarch": "twocore",
             "btt": "twocore", "blast": "blast"}
