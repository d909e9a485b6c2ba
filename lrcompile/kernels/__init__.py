"""Triton kernels, one family per file beside its launcher and torch reference, exposed as
`torch.ops.lrcompile.<op>` (op.py). KERNEL_OF maps a structure family to the op that runs it fused.

Importing needs triton (the GPU path and the CPU interpreter); without it the fuse pass is unavailable and the
rewritten graph runs unfused.
"""
from .op import OPS  # noqa: F401
from . import lowrank, lora, dora, noble, twocore, blast  # noqa: F401,E401  (register the ops)

KERNEL_OF = {"lowrank": "lowrank", "lora": "lora", "dora": "dora", "noble": "noble", "monarch": "twocore",
             "btt": "twocore", "blast": "blast"}
