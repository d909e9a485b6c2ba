"""The contract every family (lowrank, monarch, lora, ...) fulfils, and the registry that names them.

A family is an nn.Module that replaces or augments one linear map y = x Wᵀ + b. Its math lives in a static
`functional(x, weight, bias, *tensors, **consts)` so that the same code runs in three places:
  - the module's own `forward` (eager, and installed modules traced by Dynamo),
  - the graph rewrite, which calls `functional` with the site's weight/bias nodes and the factors as graph inputs,
  - the tests, against `to_dense()`.
`weight` is the site's dense weight (out, in); compressing families ignore it, adapters add to it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Mapping
from typing import Callable, ClassVar, Optional

import sympy
import torch
from torch import nn

from ..errors import PolicyError

FAMILIES: dict[str, type["Structure"]] = {}

# Marks a parameter lrcompile created: it is never a site for another rewrite.
OWNED_ATTR = "_lrcompile_owned"


class Owner(nn.Module):
    """A module whose parameters named in `tensor_names` are lrcompile's (the families' Structures, attention's
    stacked factors). Known by module and name, ownership survives what replaces the parameter objects and drops
    their mark — FSDP2's fully_shard, deepcopy and the like keep the module and the name."""

    tensor_names: tuple[str, ...] = ()


def register(cls: type["Structure"]) -> type["Structure"]:
    """Add a family under `cls.name`. Its declarations are checked here: a typo would otherwise only make the
    family quietly lose its kernel, its candidates or its budget."""
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    problems = [
        f"budget_knob {cls.budget_knob!r} is not a field of {cls.Config.__name__}"
        if cls.budget_knob is not None and cls.budget_knob not in fields
        else None,
        "candidates must be a tuple of Candidate"
        if not (isinstance(cls.candidates, tuple) and all(isinstance(c, Candidate) for c in cls.candidates))
        else None,
        f"kernel must be an op name or None, got {cls.kernel!r}"
        if not (cls.kernel is None or (isinstance(cls.kernel, str) and cls.kernel))
        else None,
        "budget_error without a budget_knob" if cls.budget_error is not None and cls.budget_knob is None else None,
    ]
    problems = [p for p in problems if p]
    if problems:
        raise TypeError(f"lrcompile: family {getattr(cls, 'name', cls.__name__)!r}: {'; '.join(problems)}")
    FAMILIES[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a family (a test's toy family at teardown); every view below forgets it at once."""
    FAMILIES.pop(name, None)


def family(name: str) -> type["Structure"]:
    return FAMILIES[name]


class FamilyView(Mapping):
    """name -> trait(cls) over the registered families, skipping those where it is None. Recomputed on every
    access: the tables the passes, the tuner and the kernels read (KERNEL_OF, LINEAR_IN_X, EXTRA, ...) are views
    of what the families declare, so registering a family is all it takes and nothing can drift."""

    def __init__(self, trait: Callable[[type["Structure"]], object]):
        self._trait = trait

    def __getitem__(self, name: str):
        cls = FAMILIES.get(name)
        value = None if cls is None else self._trait(cls)
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self):
        return iter([n for n, cls in list(FAMILIES.items()) if self._trait(cls) is not None])

    def __len__(self) -> int:
        return len(list(iter(self)))

    def __repr__(self) -> str:
        return f"FamilyView({dict(self)!r})"


@dataclasses.dataclass(frozen=True)
class Candidate:
    """An implementation of one family's function that the autotuner (lrcompile.tune) may emit in place of
    `functional`, with the same signature. Families list theirs in `Structure.candidates`; it lives here, not in
    the tuner, so a family file can declare its own without importing the tuner."""

    name: str
    fn: Callable
    lossless: bool = True  # computes the family's function (else: lossy, e.g. the dense layer)
    device_types: tuple[str, ...] = ("cpu", "cuda")  # Triton kernels: ("cuda",)
    # timed forward only: a merged adapter's backward needs a full dW GEMM that the forward timing never sees
    inference_only: bool = False
    # computes the function of the family's base tensors only: not where the site passes extra ones (dropout)
    base_tensors_only: bool = False

    def __post_init__(self):
        if self.inference_only:  # merged forms fold the branch into W: the branch input must be x itself
            object.__setattr__(self, "base_tensors_only", True)


def mark_owned(t: torch.Tensor) -> torch.Tensor:
    setattr(t, OWNED_ATTR, True)
    return t


def is_owned(t, module: Optional[nn.Module] = None, name: Optional[str] = None) -> bool:
    """`t` was made by lrcompile: by its own mark, or (`module`, `name`: where it is registered) by the module
    being an `Owner` that lists it, which survives parameter replacement (FSDP2 sharding / unsharding)."""
    if bool(getattr(t, OWNED_ATTR, False)):
        return True
    return isinstance(module, Owner) and name is not None and name in module.tensor_names


def owned_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(path, parameter) of every lrcompile parameter of `model`, also after FSDP2 swapped them for DTensors;
    the current parameter objects are re-marked, so `is_owned(p)` holds for them too."""
    out = []
    for mpath, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if is_owned(p, mod, pname):
                mark_owned(p)
                out.append((f"{mpath}.{pname}" if mpath else pname, p))
    return out


_SITE: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("lrcompile_site", default=None)


@contextlib.contextmanager
def site_scope(fqn: Optional[str]):
    """Name the site being built, for the families' warnings (`from_dense` sees only tensors)."""
    token = _SITE.set(fqn)
    try:
        yield
    finally:
        _SITE.reset(token)


def site_label(stats=None, default: str = "this site") -> str:
    """`site 'fqn'` for warnings: from the statistics (CalibrationStats.get names them), else the enclosing
    `site_scope`, else `default`."""
    fqn = getattr(stats, "fqn", None) or _SITE.get()
    return f"site {fqn!r}" if fqn else default


@dataclasses.dataclass
class MethodConfig:
    """Options shared by every method; families subclass it with their own typed fields."""

    init: str = "svd"

    # Fields that a policy may give but that are not the family's own (handled by the planner).
    COMMON: ClassVar[tuple[str, ...]] = ("match", "method", "kind", "max_error", "min_features", "guard")
    INITS: ClassVar[tuple[str, ...]] = ("svd", "random")

    def validate(self) -> None:
        if self.init not in self.INITS:
            raise ValueError(f"init must be one of {', '.join(self.INITS)}, got {self.init!r}")

    def bind(self) -> None:
        """Called once when a policy rule creates this config (families with per-rule state override it)."""


class Structure(Owner):
    """Base class of every family module. Subclasses set `name`, `Config`, `compressing`, `tensor_names`, and
    declare below whatever the rest of lrcompile needs to know of them: a family is its one file (plus, if it
    has one, its kernel's), registered with `@register`."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]
    compressing: ClassVar[bool] = True  # True: replaces W (dense weight unused); False: an adapter, adds a branch to W
    tensor_names: ClassVar[tuple[str, ...]]  # parameter/buffer names passed to `functional`, in order

    # --- traits the passes, the tuner and the policy read ---------------------------------------------------
    # The fused kernel op torch.ops.lrcompile.<kernel> (lrcompile.kernels.op.define) that runs this family with
    # a prologue and an epilogue; None: no kernel, so the fusion pass leaves its sites alone and the tuner has no
    # kernel candidate. `kernel_module` is the module whose import defines the op (default
    # lrcompile.kernels.<kernel>); it is imported on first use.
    kernel: ClassVar[Optional[str]] = None
    kernel_module: ClassVar[Optional[str]] = None
    # f(αx) = α·f(x) without the bias: the fusion pass may fold an input scale into the kernel's accumulator
    # (a cast to the compute dtype always folds: the op casts x itself). NOBLE's cosine is not.
    linear_in_x: ClassVar[bool] = True
    # Lossless alternatives of `functional` the autotuner times (the kernel's candidate is added from `kernel`).
    candidates: ClassVar[tuple[Candidate, ...]] = ()
    # Adapters: True keeps the base weight trainable under `rewrite` (NOBLE); False (PEFT style): a policy with
    # this family freezes every parameter the model had.
    trains_base: ClassVar[bool] = False

    # --- how a policy budget sizes it (lrcompile.budget) ------------------------------------------------------
    # The int config field a budget chooses, rank-like: the cost grows with it, values 1..budget_max. A value the
    # rule gives caps the choice; None lets the budget choose alone. No knob: the family counts at the cost its
    # rule gives. With `budget_error` too the knob is allocated jointly with the other sites (error per cost);
    # without, each site gets the budget's fraction of its own dense cost.
    budget_knob: ClassVar[Optional[str]] = None
    # classmethod (weight (out, in), site statistics or None, cfg) -> error(k): the error of the knob value k,
    # comparable across sites and families (Σ of squared errors: of the output per token with statistics, of W
    # without). None: no error model (sized uniformly, see above).
    budget_error: ClassVar[Optional[Callable]] = None

    @classmethod
    def budget_max(cls, in_features: int, out_features: int, cfg: MethodConfig) -> int:
        """The largest knob value that changes anything at this shape."""
        return min(in_features, out_features)

    @classmethod
    def with_size(cls, cfg: MethodConfig, k: int) -> MethodConfig:
        """`cfg` with the knob set to `k`."""
        return dataclasses.replace(cfg, **{cls.budget_knob: int(k)})

    @classmethod
    def budget_cost(cls, in_features: int, out_features: int, cfg: MethodConfig, kind: str) -> Callable[[int], float]:
        """k -> parameters (kind 'params', bias excluded) or FLOPs per token ('flops') at knob value k."""
        count = cls.param_count if kind == "params" else cls.flops_per_token
        return lambda k: count(in_features, out_features, cls.with_size(cfg, k))

    def __init__(self, in_features: int, out_features: int, cfg: MethodConfig):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.cfg = cfg
        self.weight: Optional[nn.Parameter] = None  # adapters keep the dense weight here
        self.bias: Optional[nn.Parameter] = None

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias, cfg: MethodConfig, stats=None) -> "Structure":
        raise NotImplementedError

    def refit(self, weight: torch.Tensor, stats=None) -> None:
        """Recompute the factors in place from a changed dense weight (stale-factor repair)."""
        fresh = type(self).from_dense(weight, None, self.cfg, stats)
        with torch.no_grad():
            for n in self.tensor_names:
                getattr(self, n).copy_(getattr(fresh, n))

    # --- math ---------------------------------------------------------------------------------------------
    @staticmethod
    def functional(x, weight, bias, *tensors):
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, n) for n in self.tensor_names]

    def forward(self, x):
        return self.functional(x, self.weight, self.bias, *self.tensors())

    def to_dense(self) -> torch.Tensor:
        """The (out, in) matrix this module applies (without bias). This default runs `functional` on the
        identity, so it cannot check `functional`: families whose forward is more than a plain matmul override
        it with an independent construction from their factors (TwoCore, BLAST)."""
        eye = torch.eye(self.in_features, dtype=self.tensors()[0].dtype, device=self.tensors()[0].device)
        return self.functional(eye, self.weight, None, *self.tensors()).T

    # --- accounting ---------------------------------------------------------------------------------------
    def params(self) -> int:
        """Parameters this site runs with (weight kept by adapters and bias included)."""
        n = sum(getattr(self, k).numel() for k in self.tensor_names if isinstance(getattr(self, k), nn.Parameter))
        if self.weight is not None:
            n += self.weight.numel()
        if self.bias is not None:
            n += self.bias.numel()
        return n

    @classmethod
    def flops_per_token(cls, in_features: int, out_features: int, cfg: MethodConfig) -> int:
        raise NotImplementedError

    @classmethod
    def param_count(cls, in_features: int, out_features: int, cfg: MethodConfig) -> int:
        raise NotImplementedError

    @classmethod
    def exact(cls, in_features: int, out_features: int, cfg: MethodConfig) -> bool:
        """True where a compressing family represents every dense matrix of this shape (full rank): the original
        layer is then the same function, and the autotuner may pick it by default."""
        return False

    # --- save / load (lrcompile.persist) --------------------------------------------------------------------
    def plan_extra(self, shared: dict) -> dict:
        """Fields of this site's plan.json entry beyond the config and shape; `shared` is one dict per save (to
        number what several sites share)."""
        return {}

    @classmethod
    def config_from_plan(cls, cfg: MethodConfig, entry: dict, shared: dict) -> None:
        """Restore on a loaded `cfg` what `plan_extra` saved, before the site is built; `shared`: one per load."""

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, cfg={self.cfg}"


def dense_flops(in_features: int, out_features: int, tokens=None):
    """Multiply-add FLOPs (2 per MAC) of a dense linear; symbolic in the token count unless given."""
    n = sympy.Symbol("tokens", positive=True, integer=True) if tokens is None else tokens
    return 2 * n * in_features * out_features


def parse_config(cls: type[Structure], options: dict, where: str) -> MethodConfig:
    """Build the family's typed config from a rule's options, with one-line errors naming `where`."""
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    kwargs = {}
    for key, value in options.items():
        if key in MethodConfig.COMMON:
            continue
        if key not in fields:
            import difflib

            near = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f" (known: {', '.join(sorted(fields))})"
            raise PolicyError(f"{where}: unknown option '{key}' for method '{cls.name}'{hint}")
        kwargs[key] = value
    try:
        cfg = cls.Config(**kwargs)
        cfg.validate()
        cfg.bind()
    except (TypeError, ValueError) as e:
        raise PolicyError(f"{where}: method '{cls.name}': {e}") from None
    return cfg
