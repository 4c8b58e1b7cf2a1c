"""Budgets of what callers' inputs hold at once: memory (INPUT_MEMORY_MB: an edit's decoded pixels) and disk
(INPUT_DISK_MB: large bodies and input images in the spool, server/spool.py), reserved before they are kept.

One tenant holds at most its share of a budget (TENANT_QUEUE_SHARE, when requests can come from several tenants),
but a request may always take what it needs while its tenant holds nothing else: the largest legal request fits
(config.py, `largest_input_mb` and `largest_spool_mb`). Past the budget or the share: 429, as a full queue
answers. The request's owner (RequestLife) releases what it holds when it ends however it ends.
"""

import ctypes
import math
from collections import Counter
from collections.abc import Callable
from typing import Literal

from prometheus_client import Gauge

from server.errors import too_many

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
TRIM_AFTER = 32 * 2**20  # bytes given back to the budget between two trims of the server's heaps


def map_large_allocations() -> None:
    """A decode process: each allocation over 128 KiB (a file's bytes, a data URL, an image) mapped and unmapped on
    its own, so that a job's memory goes back to the system when it ends. glibc raises that threshold after each
    large free, up to 32 MiB, and the next jobs' inputs then stay in the heap (+120 MiB held after three 46 MB
    bodies, measured when bodies were parsed whole). Not in the server process: torch's CPU tensors would be
    mapped afresh at each step (2x slower). Nothing to do on a C library without mallopt."""
    if mallopt := getattr(ctypes.CDLL(None), "mallopt", None):
        mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


def trim_heaps() -> None:
    """A worker thread (ctypes lets go of the GIL): the free memory of the server's heaps back to the system.
    glibc keeps what a large request freed (now an edit's pixels) in the heap of the thread that held it, and the
    next large requests stack on it (+170 MiB held after three 46 MB bodies, measured when bodies were held in
    memory; with the trim +10 to +40 MiB). Nothing to do on a C library without malloc_trim."""
    if malloc_trim := getattr(ctypes.CDLL(None), "malloc_trim", None):
        malloc_trim(0)


class InputBudget:
    def __init__(
        self,
        total: int,
        tenant_share: float,
        gauge: Gauge,
        holding: Literal["memory", "disk"],
        retry_after: Callable[[], int] = lambda: 1,
        freed: Callable[[], None] = lambda: None,
    ) -> None:
        self.total = total
        self.holding = holding  # "memory" or "disk": in the 429s' words and codes
        self.tenant_bytes = max(1, math.floor(total * tenant_share))  # what one tenant may hold beside others
        self.held: Counter[str] = Counter()
        self._gauge = gauge
        self._retry_after = retry_after
        self._freed = freed  # called once TRIM_AFTER bytes have been given back (the server trims its heaps)
        self._given = 0

    def reservation(self, tenant: str) -> "Reservation":
        return Reservation(self, tenant)

    def take(self, tenant: str, size: int, own: int = 0) -> None:
        """`size` more bytes for a request of `tenant` that holds `own`, or 429 (`check`)."""
        self.check(tenant, size, own)
        self.held[tenant] += size
        self._gauge.inc(size)

    def check(self, tenant: str, size: int, own: int = 0) -> None:
        """429 if `size` more bytes for a request of `tenant` that holds `own` do not fit: the budget is full, or
        the tenant's other requests hold bytes and with these it would pass its share."""
        held = self.held.total()
        if held + size > self.total:
            raise too_many(
                f"The server holds as many callers' inputs as its {self.holding} for them allows "
                f"({self.total / 2**20:g} MiB); retry later.",
                f"input_{self.holding}_full",
                self._retry_after(),
            )
        mine = self.held[tenant]
        if mine > own and mine + size > self.tenant_bytes:
            raise too_many(
                f"Your requests already hold {mine / 2**20:.0f} MiB of the server's {self.holding} for inputs, "
                "your share of it; retry later.",
                f"tenant_input_{self.holding}_full",
                self._retry_after(),
            )

    def give(self, tenant: str, size: int) -> None:
        self.held[tenant] -= size
        if self.held[tenant] <= 0:
            del self.held[tenant]
        self._gauge.dec(size)
        self._given += size
        if self._given >= TRIM_AFTER:  # a trim walks every heap under its lock: not at every give-back
            self._given = 0
            self._freed()


class Reservation:
    """What one request holds of the budget; `release` (idempotent) gives it all back."""

    def __init__(self, budget: InputBudget, tenant: str) -> None:
        self._budget = budget
        self.tenant = tenant
        self.bytes = 0

    def resize(self, size: int) -> None:
        """Hold `size` bytes in all: more is taken (or 429, holding what it held), less is given back."""
        held, self.bytes = self.bytes, size
        if size > held:
            try:
                self._budget.take(self.tenant, size - held, held)
            except BaseException:
                self.bytes = held
                raise
        elif size < held:
            self._budget.give(self.tenant, held - size)

    def check(self, size: int) -> None:
        """429 if this request could not hold `size` bytes in all; nothing is taken."""
        if size > self.bytes:
            self._budget.check(self.tenant, size - self.bytes, self.bytes)

    def take(self, size: int) -> None:
        self.resize(self.bytes + size)

    def give(self, size: int) -> None:
        self.resize(max(0, self.bytes - size))

    def release(self) -> None:
        self.resize(0)
