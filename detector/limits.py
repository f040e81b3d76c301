"""Rate limits: a per-run token bucket on points per second.

A run may send ``rate`` points a second on average, in bursts of up to
``burst`` points. A batch larger than the burst is still let through when the
bucket is full, and leaves it in debt: the run then waits until the debt is
paid back, so the long-run rate is bounded whatever the batch size (the client
SDK sends 2048-point batches; a limit below that must not refuse all of them).

A refused batch raises :class:`~detector.errors.RateLimited`
(``RESOURCE_EXHAUSTED``), carrying how long to wait before retrying; nothing of
it is ingested, so a retry after that delay is accepted whole.

>>> clock = [0.0]
>>> limiter = RunRateLimiter(rate=100, burst=100, clock=lambda: clock[0])
>>> limiter.take("run", 80)
>>> limiter.take("run", 80)
Traceback (most recent call last):
...
detector.errors.RateLimited: run 'run' is over its limit of 100 points/s; retry in 0.6 s
>>> clock[0] = 0.6
>>> limiter.take("run", 80)
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from detector.errors import InvalidArgument, RateLimited


class TokenBucket:
    """``rate`` tokens a second up to ``capacity``; ``take`` may leave it in debt.

    Not thread-safe by itself: :class:`RunRateLimiter` holds a lock around it.
    """

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.updated = now

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def try_take(self, amount: float, now: float) -> float:
        """Take ``amount`` and return 0, or take nothing and return the seconds to wait.

        A take needs ``min(amount, capacity)`` tokens in the bucket and may
        leave it negative: a batch larger than the bucket passes when it is full.
        """
        self.refill(now)
        need = min(amount, self.capacity)
        if self.tokens >= need - 1e-9 * need:  # waiting the time said is always enough
            self.tokens -= amount
            return 0.0
        return (need - self.tokens) / self.rate

    def full_at(self, now: float) -> bool:
        self.refill(now)
        return self.tokens >= self.capacity


class RunRateLimiter:
    """One :class:`TokenBucket` per run id, with bounded memory.

    ``rate`` points a second per run, bursts of ``burst`` points (default: one
    second's worth, at least 1). Buckets that refilled completely are forgotten
    when more than ``max_idle_buckets`` are kept: a full bucket is what a new
    run gets anyway, so forgetting one changes nothing.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_idle_buckets: int = 4096,
    ) -> None:
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
            raise InvalidArgument(f"the points-per-second limit must be positive, got {rate!r}")
        burst = max(1.0, float(rate)) if burst is None else burst
        if not (isinstance(burst, (int, float)) and math.isfinite(burst) and burst >= 1):
            raise InvalidArgument(f"the burst must be at least 1 point, got {burst!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._max_idle = max_idle_buckets
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def take(self, run_id: str, points: int) -> None:
        """Account ``points`` to ``run_id``, or raise RateLimited taking nothing."""
        if points <= 0:
            return
        with self._lock:
            now = self._clock()
            bucket = self._buckets.get(run_id)
            if bucket is None:
                if len(self._buckets) >= self._max_idle:
                    self._forget_full(now)
                bucket = self._buckets[run_id] = TokenBucket(self.rate, self.burst, now)
            wait = bucket.try_take(points, now)
        if wait > 0:
            raise RateLimited(
                f"run {run_id!r} is over its limit of {self.rate:g} points/s; "
                f"retry in {wait:.2g} s",
                retry_after=wait,
            )

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)

    def _forget_full(self, now: float) -> None:
        for run_id in [r for r, b in self._buckets.items() if b.full_at(now)]:
            del self._buckets[run_id]
