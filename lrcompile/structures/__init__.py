"""Families of linear maps, one file each, registered by name (adding a family touches nothing else)."""
from .base import FAMILIES, MethodConfig, Structure, family, is_owned, parse_config, register  # noqa: F401
from . import lowrank  # noqa: F401  (registers)
