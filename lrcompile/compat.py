"""Every private torch / Dynamo / Inductor name lrcompile uses, and nothing else: the one module to change when
torch moves one. Supported: torch 2.11 to 2.14.

Each function says why its name is private and what differs between versions. A name that is missing is found
by feature, not by version number: an optional one falls back (and warns once where that loses a guarantee), one
the backend cannot work without raises a one-line LrcompileError. Private modules are imported on first use,
never at import time: `import lrcompile` must not pull in Inductor.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .errors import LrcompileError

SUPPORTED = "torch 2.11 to 2.14"

# Op identities Dynamo records as FX targets: F.linear / F.scaled_dot_product_attention / F.gelu are the
# torch._C._nn builtins themselves, but graphs may name either object.
LINEAR_OPS = frozenset({torch._C._nn.linear, F.linear})
SDPA_OPS = frozenset({torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention})
GELU_OPS = frozenset({torch._C._nn.gelu, F.gelu})

_warned: set = set()


def _missing(what: str) -> LrcompileError:
    return LrcompileError(f"lrcompile: torch {torch.__version__} has no {what} (lrcompile supports {SUPPORTED})")


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


# --- Dynamo: the frame being compiled ---------------------------------------------------------------------------


def frame_locals() -> Optional[dict]:
    """The locals of the frame Dynamo is compiling while a backend call runs, else None. Private: the translator's
    thread-local `InstructionTranslator.current_tx()`; 2.11 leaves it None after a compile, 2.13+ deletes it."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
    except ImportError as e:
        raise _missing("torch._dynamo.symbolic_convert.InstructionTranslator") from e
    current = getattr(InstructionTranslator, "current_tx", None)
    if current is None:
        raise _missing("InstructionTranslator.current_tx()")
    try:
        tx = current()
    except AttributeError:  # no compile has set it on this thread (2.13+: none running)
        return None
    return getattr(tx, "f_locals", None) if tx is not None else None


def grapharg(node) -> Any:
    """Dynamo's GraphArg of a placeholder (its source and the real example), or None. Private: node.meta's
    "grapharg" key, set by OutputGraph on every placeholder of the graph handed to a backend (2.11-2.14)."""
    meta = getattr(node, "meta", None)
    return meta.get("grapharg") if meta is not None else None


def source_name(source) -> Optional[str]:
    """A Dynamo Source's expression over the frame's locals (`L['self']._modules['fc']._parameters['weight']`).
    Private: Source.name, a cached property in 2.11-2.14 (a method in older torch: both are read); a plain string
    passes through."""
    if source is None or isinstance(source, str):
        return source
    name = source.name
    return name if isinstance(name, str) else name()


def placeholder_source(node) -> Optional[str]:
    """The source expression of a placeholder, from its grapharg; None for a graph input Dynamo did not name."""
    ga = grapharg(node)
    return source_name(getattr(ga, "source", None)) if ga is not None else None


def placeholder_example(node) -> Any:
    """The example a placeholder was traced from, as the grapharg holds it: the real tensor even where the backend
    is handed fake ones (DDPOptimizer's split subgraphs). Private: GraphArg.example (a property over a weakref)."""
    ga = grapharg(node)
    try:
        return getattr(ga, "example", None) if ga is not None else None
    except Exception:  # the weakly held example was collected
        return None


def example_value(node) -> Any:
    """A node's fake value: Dynamo's node.meta["example_value"] (private key), else "val" (FakeTensorProp's)."""
    meta = getattr(node, "meta", None)
    if meta is None:
        return None
    return meta.get("example_value", meta.get("val"))


def copy_dynamo_metadata(old_gm: torch.fx.GraphModule, new_gm: torch.fx.GraphModule, val_map: dict) -> None:
    """Carry what Dynamo reads back from a backend's graph onto a copy: the GraphModule's `_param_name_to_source`
    and each placeholder's `_dynamo_source` (private attributes, set before the backend call in 2.11-2.14)."""
    if hasattr(old_gm, "_param_name_to_source"):
        new_gm._param_name_to_source = dict(old_gm._param_name_to_source)
    for old, new in val_map.items():
        if old.op == "placeholder" and hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source


def mark_new_input(placeholder: torch.fx.Node) -> None:
    """A placeholder lrcompile added (factors fed at call time): no Dynamo source. Private: `_dynamo_source`;
    without it Dynamo (2.11-2.14) would look the node's grapharg up, which a new input has not got."""
    placeholder._dynamo_source = None


class _Nobody:
    """What a discarded entry's guards claim to have matched by identity: alive, and in no frame."""


_NOBODY = _Nobody()
_DISCARDED = "<discarded by lrcompile>"  # a local name no frame has


def discard_compiled(backend) -> int:
    """Throw away every frame Dynamo compiled with `backend` (the callable given to torch.compile, by identity) and
    nothing else: torch.compiler.reset would make every other compiled model in the process recompile. Returns
    the number of cache entries discarded. Private, torch has no per-entry API (2.11-2.14 alike):
    - the code objects Dynamo converted: `convert_frame.input_codes` (weak references; resume functions included);
      their entries: `torch._C._dynamo.eval_frame._debug_get_cache_entry_list`; an entry's `backend` is
      torch.compile's `_TorchCompileWrapper` (its `compiler_fn` is ours), or the callable itself;
    - each entry is invalidated as Dynamo does when a guarded object dies: `guard_manager.extra_state.invalidate(
      entry, DeletedGuardManagerWrapper(reason))`. It never matches again and drops its compiled code, whose
      globals (the graph, the backend's runner) Dynamo then deletes. The entry's shell stays in the code object's
      list (C++ has no removal of one entry). The recompile limit counts only shells whose identity-matched
      objects (`id_matched_objs`) are the frame's (`cache_size._has_same_id_matched_objs`), so the replacement
      claims one no frame holds;
    - a code object left with shells only is reset (`eval_frame.reset_code`, per code object: nothing live is
      lost), which also restarts its compile count: Dynamo refuses a code object's 256th compile
      (`accumulated_recompile_limit`, shells and compiles of every backend counted). Not while a compile is in
      progress (`CompileContext.try_get()`): it holds the state of the code object it compiles. A code object that
      keeps another compile's live entries keeps our shells and counts;
    - torch.compile keeps every backend in `eval_frame.cached_backends` until a reset: ours is removed."""
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
        from torch._dynamo import convert_frame, eval_frame
        from torch._dynamo.guards import DeletedGuardManagerWrapper
        from torch._guards import CompileContext
    except ImportError as e:
        raise _missing("Dynamo's cache-entry listing or invalidation") from e

    def ours(b) -> bool:
        return b is backend or getattr(b, "compiler_fn", None) is backend

    n = 0
    with convert_frame.compile_lock:
        touched = []
        for ref in list(convert_frame.input_codes.seen):
            code = ref()
            for entry in _debug_get_cache_entry_list(code) if code is not None else ():
                old = entry.guard_manager
                if not ours(entry.backend) or isinstance(old, DeletedGuardManagerWrapper):
                    continue
                gone = DeletedGuardManagerWrapper(f"thrown away by lrcompile (a capture of {code.co_name})")
                gone.id_matched_objs = {_DISCARDED: weakref.ref(_NOBODY)}
                old.extra_state.invalidate(entry, gone)
                old.cache_entry = old.extra_state = None  # its guarded objects' finalizers must not reach the shell
                n += 1
                if not touched or touched[-1] is not code:
                    touched.append(code)
        if CompileContext.try_get() is None:
            for code in touched:
                entries = _debug_get_cache_entry_list(code)
                if all(isinstance(e.guard_manager, DeletedGuardManagerWrapper) for e in entries):
                    eval_frame.reset_code(code)
        for key, b in list(eval_frame.cached_backends.items()):
            if ours(b):
                del eval_frame.cached_backends[key]
    return n


# --- the Python stack -------------------------------------------------------------------------------------------


def caller_frames(skip: int = 0):
    """The frames above the caller, innermost first. A backend call receives only the graph: the compiled model
    that encloses the frame Dynamo compiles, and the module instance a shared graph runs for, are found on the
    stack (CPython's sys._getframe: torch offers no public way to either)."""
    f = sys._getframe(skip + 2)
    while f is not None:
        yield f
        f = f.f_back


# --- compiled modules -------------------------------------------------------------------------------------------


def compiled_original(obj) -> Optional[torch.nn.Module]:
    """The user's module behind a compiled one: `torch.compile(m)` (an OptimizedModule, `_orig_mod`) or
    `m.compile()` (m itself, which holds `_compiled_call_impl`); None for anything else. Private: both
    attributes and torch._dynamo.eval_frame.OptimizedModule (same in 2.11-2.14)."""
    if is_optimized_module(obj):
        return obj._orig_mod
    if isinstance(obj, torch.nn.Module) and getattr(obj, "_compiled_call_impl", None) is not None:
        return obj
    return None


def is_optimized_module(obj) -> bool:
    """Whether obj is what `torch.compile(module)` returns. Private: torch._dynamo.eval_frame.OptimizedModule."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError as e:
        raise _missing("torch._dynamo.eval_frame.OptimizedModule") from e
    return isinstance(obj, OptimizedModule)


# --- fake tensors and symbolic shapes ----------------------------------------------------------------------------


def fake_mode_of(inputs) -> Any:
    """The FakeTensorMode the graph's example inputs live in, or None. Private: torch._guards.detect_fake_mode
    (reads the tracing context first, then the inputs; 2.11-2.14)."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode(inputs)


def new_fake_mode() -> Any:
    """A fresh FakeTensorMode, for a graph no fake mode came with. Private: torch._subclasses.fake_tensor."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


def is_fake(t) -> bool:
    """Whether t is a FakeTensor (Dynamo's shape-only examples). Private: torch._subclasses.fake_tensor."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def fake_in(mode, t) -> bool:
    """Whether t is a FakeTensor of `mode` (fake tensors of another mode cannot be mixed with it)."""
    return is_fake(t) and t.fake_mode is mode


def to_fake(mode, t: torch.Tensor) -> torch.Tensor:
    """A fake copy of t in `mode`, with t's static shape (FakeTensorMode.from_tensor's `static_shapes`)."""
    return mode.from_tensor(t, static_shapes=True)


def size_hint(expr, fallback: int = 1) -> int:
    """A concrete value for a (symbolic) size without adding a guard. Private: torch.fx.experimental.symbolic_shapes
    names it `size_hint` in 2.11, `optimization_hint` from 2.13 on (2.14 has only that)."""
    if isinstance(expr, int):
        return expr
    from torch.fx.experimental import symbolic_shapes as ss

    fn = getattr(ss, "optimization_hint", None) or getattr(ss, "size_hint", None)
    if fn is None:
        raise _missing("symbolic_shapes.optimization_hint or size_hint")
    return int(fn(expr, fallback=fallback))


def statically_known_true(cond) -> bool:
    """Whether a (symbolic) condition is true without adding a guard. Private-ish symbolic_shapes helper
    (2.11-2.14); a plain bool passes through."""
    if isinstance(cond, bool):
        return cond
    from torch.fx.experimental.symbolic_shapes import statically_known_true as skt

    return skt(cond)


# --- Inductor ---------------------------------------------------------------------------------------------------


def compile_fx(gm: torch.fx.GraphModule, inputs: list, mode: Optional[str] = None):
    """Inductor's compiler for a torch-level graph, with `torch.compile(mode=...)`'s config patches as
    backend="inductor" applies them. Private: torch._inductor.compile_fx.compile_fx and
    torch._inductor.list_mode_options (2.11-2.14); looked up per call (tests replace compile_fx)."""
    import torch._inductor
    import torch._inductor.compile_fx as cfx

    patches = torch._inductor.list_mode_options(mode) if mode not in (None, "default") else None
    return cfx.compile_fx(gm, inputs, config_patches=patches)


# --- autograd / functorch / distributed ---------------------------------------------------------------------------


@torch.compiler.assume_constant_result
def _autocast_available(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type)


def autocast_available(device_type: str) -> bool:
    """Whether a device type has autocast at all (meta has not). Dynamo constant-folds the builtin behind
    torch.amp.is_autocast_available from 2.13 on; 2.11 cannot trace it (a graph break in every adapter's forward),
    so the call is marked constant: it depends only on the device type, which the tensor's guards fix."""
    return _autocast_available(device_type)


def is_functorch_wrapped(t: torch.Tensor) -> bool:
    """Whether t is wrapped by a torch.func transform (vmap, grad, jvp). Private:
    torch._C._functorch.is_functorch_wrapped_tensor (2.11-2.14); without it, never (with a warning)."""
    fn = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    if fn is None:
        _warn_once(
            "functorch",
            f"lrcompile: torch {torch.__version__} has no is_functorch_wrapped_tensor; "
            "tensors inside torch.func transforms cannot be told apart",
        )
        return False
    return bool(fn(t))


def storage_identity(t: torch.Tensor) -> Optional[int]:
    """Which storage t lives in: the same number while the storage object lives, even when it is resized to
    another address (FSDP2 frees and refills unsharded parameters that way). Private: UntypedStorage._cdata
    (2.11-2.14); without it, or for a tensor with no storage of its own (wrapper subclasses), its data address
    (None when it has none)."""
    try:
        return t.untyped_storage()._cdata
    except (AttributeError, RuntimeError, NotImplementedError):
        try:
            return t.data_ptr()
        except (RuntimeError, NotImplementedError):
            return None


def active_ddp_module() -> Optional[torch.nn.Module]:
    """The DistributedDataParallel module whose forward is being compiled, or None. Private:
    DistributedDataParallel._get_active_ddp_module (a classmethod in 2.11-2.14). Without it DDP cannot be
    detected: a one-time warning says so, since factors made under DDP would not have their gradients synced."""
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:
        return None
    get = getattr(DistributedDataParallel, "_get_active_ddp_module", None)
    if get is None:
        _warn_once(
            "ddp",
            f"lrcompile: torch {torch.__version__} has no DistributedDataParallel."
            "_get_active_ddp_module; a compile under DDP cannot be detected, so call "
            "lrcompile.rewrite before wrapping the model",
        )
        return None
    return get()


# --- recompiles ---------------------------------------------------------------------------------------------------


def fail_on_recompile_limit():
    """A context in which reaching Dynamo's recompile limit raises instead of silently running the frame
    uncompiled (calibration must not skip batches). Private: torch._dynamo.config.fail_on_recompile_limit_hit
    (2.11-2.14)."""
    import torch._dynamo

    return torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)


def recompile_limit_error() -> type:
    """The exception `fail_on_recompile_limit` raises. Private: torch._dynamo.exc.FailOnRecompileLimitHit."""
    import torch._dynamo.exc as exc

    return getattr(exc, "FailOnRecompileLimitHit", RuntimeError)
