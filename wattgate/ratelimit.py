"""Token-bucket rate limits (RL_SESSIONS, RL_CHAT), in memory, clock passed in.

Each key gets a bucket of ``per_minute`` tokens refilled continuously; a
request takes one or is refused with the seconds until one is back. State is
per process: the SQLite ledger's ``rate_take`` keeps these buckets (one server
per database file); a fleet's limits are counted by its shared ledger.
"""

from __future__ import annotations

import math

from .errors import RateLimited


class RateLimiter:
    def __init__(self, per_minute: int, *, name: str, max_keys: int = 100_000) -> None:
        self.per_minute = per_minute
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.name = name
        self._buckets: dict[str, tuple[float, float]] = {}
        self._max_keys = max_keys
        self.rejections = 0

    def try_take(self, key: str, *, now: float, take: bool = True) -> int | None:
        """None when allowed (a token taken unless ``take`` is False), else the whole
        seconds until a token is back (nothing taken): ``Ledger.rate_take``'s answer."""
        try:
            if take:
                self.take(key, now=now)
            else:
                self.check(key, now=now)
        except RateLimited as e:
            return e.retry_after
        return None

    def check(self, key: str, *, now: float) -> None:
        """Refuse (RateLimited) when ``key`` has no token left, without taking one.

        For limits on failures (a wrong password): check before the attempt is
        judged, so that once the limit is hit even a right guess learns nothing,
        and ``take`` only when the attempt failed.
        """
        self._available(key, now)

    def take(self, key: str, *, now: float) -> None:
        tokens = self._available(key, now)
        if len(self._buckets) >= self._max_keys and key not in self._buckets:
            self._forget_full(now)
        self._buckets[key] = (tokens - 1.0, now)

    def _available(self, key: str, now: float) -> float:
        tokens, last = self._buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            self.rejections += 1
            raise RateLimited(f"Rate limit {self.name} reached; retry later.",
                              retry_after=math.ceil((1.0 - tokens) / self.rate))
        return tokens

    def _forget_full(self, now: float) -> None:
        # A bucket that has refilled is indistinguishable from a new one.
        full = [k for k, (t, last) in self._buckets.items()
                if t + (now - last) * self.rate >= self.capacity]
        for k in full:
            del self._buckets[k]
