"""Families of linear maps, one file each, registered by name: adding a family is adding its file here (every
module of this package is imported below, so `@register` runs), plus its kernel's file if it has one."""

import importlib
import pkgutil

from .base import (
    FAMILIES,
    Candidate,
    FamilyView,
    MethodConfig,
    Structure,
    family,
    is_owned,
    parse_config,
    register,
    unregister,
)

__all__ = [
    "FAMILIES",
    "Candidate",
    "FamilyView",
    "MethodConfig",
    "Structure",
    "family",
    "is_owned",
    "parse_config",
    "register",
    "unregister",
]

for _m in sorted(pkgutil.walk_packages(__path__, prefix=f"{__name__}."), key=lambda m: m.name):
    importlib.import_module(_m.name)
del _m
