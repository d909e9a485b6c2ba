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
from typing import ClassVar, Optional

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
    FAMILIES[cls.name] = cls
    return cls


def family(name: str) -> type["Structure"]:
    return FAMILIES[name]


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
    """Base class of every family module. Subclasses set `name`, `Config`, `compressing`, `tensor_names`."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]
    compressing: ClassVar[bool] = True  # True: replaces W (dense weight unused); False: adds a branch to W
    tensor_names: ClassVar[tuple[str, ...]]  # parameter/buffer names passed to `functional`, in order

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
