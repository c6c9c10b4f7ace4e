"""The one time base for TTLs and expiries: a clock that keeps running through suspend.

``now()`` reads ``CLOCK_BOOTTIME`` (Linux): monotonic like ``time.monotonic`` but it
counts the time a laptop spent asleep, so an entry cached before 8 hours of sleep
wakes up expired, not "fresh". Where ``CLOCK_BOOTTIME`` does not exist (not Linux),
``time.monotonic`` stands in. Every stage takes its clock as a parameter defaulting to
this one, so tests fake time by passing their own.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

Clock = Callable[[], float]

#: Seconds on a clock that counts suspend; only differences are meaningful.
now: Clock
if hasattr(time, "CLOCK_BOOTTIME"):
    now = functools.partial(time.clock_gettime, time.CLOCK_BOOTTIME)
else:  # pragma: no cover - not Linux
    now = time.monotonic
