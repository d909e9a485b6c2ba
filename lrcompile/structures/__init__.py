"""Families of linear maps, one file each, registered by name (adding a family touches nothing else)."""
from .base import FAMILIES, MethodConfig, Structure, family, is_owned, parse_config, register  # noqa: F401
from . import lowrank  # noqa: F401  (registers)
from . import lora, dora, vera, noble  # noqa: F401,E401  (register the adapter families)
from . import monarch, btt, blast  # noqa: F401,E401  (register the structured families)
