"""Autotuner: implementations chosen by measurement, cached on disk across processes.

candidates.py  what may run at a site (layouts, merged adapters, the dense layer for `guard: dense`)
timing.py      medians within a time budget; `timing.RUNS` counts executions
cache.py       the persistent JSON cache (lock + atomic read-merge-write, corrupt files set aside)
shapelog.py    the site shapes compiles met, for `lrcompile warmup --from-log`
select.py      cache lookup or measurement, and the choice
site.py        the backend's entry point
warmup.py      ahead-of-time tuning (the CLI's `warmup`)
"""

from .candidates import DENSE, REFERENCE  # noqa: F401
from .select import Spec, bucket  # noqa: F401
from .site import Tuned, tune_site  # noqa: F401
