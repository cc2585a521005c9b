"""What the gateway observes about its own traffic, for ``/metrics`` and the request log.

``Observer`` holds one Prometheus ``CollectorRegistry`` per gateway (never the
process-global one, so several apps in one test process do not collide) and
the hooks the metered proxy calls on its hot path: ``answered`` when the
upstream's response headers arrive, ``settled`` when a call is written to the
ledger. Each hook is a few in-memory increments: no lock beyond the ones
prometheus-client takes per sample, no I/O.

``RequestNote`` is what the current request learned for its log line (app,
user, model, cost); the request-log middleware opens one per request in a
context variable and the hooks fill it in. Values that need the database
(holds open, reconciliation backlog) are read at scrape time by the
``/metrics`` view and set with ``set_gauges``.

Nothing here imports aiohttp.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from .money import NANOS_PER_USD
from .store.records import Usage

# Seconds: a chat call spans a fast first token to a minutes-long answer.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
TTFB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class _Limiter(Protocol):
    name: str
    rejections: int


@dataclass
class RequestNote:
    """What one request's log line says beyond method, path and status."""

    app_id: str | None = None
    grant_id: int | None = None
    model: str | None = None
    cost_nanos: int | None = None
    provisional: bool | None = None
    outcome: str | None = None    # the ledger's status for a metered call


_note: ContextVar[RequestNote | None] = ContextVar("wattgate_request_note", default=None)


def open_note() -> RequestNote:
    note = RequestNote()
    _note.set(note)
    return note


class _Rejections(Collector):
    """Reads the rate limiters' own counters at scrape time: nothing added to ``take``."""

    def __init__(self, limiters: Iterable[_Limiter]) -> None:
        self._limiters = tuple(limiters)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("wattgate_rate_limit_rejections",
                                     "Requests refused by a rate limit.", labels=["limit"])
        counts: dict[str, int] = {}
        for limiter in self._limiters:  # one series per limit, whoever counted it
            counts[limiter.name] = counts.get(limiter.name, 0) + limiter.rejections
        for name, count in counts.items():
            family.add_metric([name], count)
        yield family


class _Dollars(Collector):
    """Dollars metered per app, summed as exact nano-dollars and shown as USD."""

    def __init__(self) -> None:
        self.nanos: dict[str, int] = {}

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("wattgate_metered_usd",
                                     "US dollars of metered calls whose real cost is known.",
                                     labels=["app"])
        for app_id, nanos in sorted(self.nanos.items()):
            family.add_metric([app_id], nanos / NANOS_PER_USD)
        yield family


class Observer:
    def __init__(self, limiters: Iterable[_Limiter] = ()) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("wattgate_http_requests", "HTTP requests answered.",
                                ["route", "method", "status"], registry=r)
        self.upstream_latency = Histogram(
            "wattgate_upstream_latency_seconds",
            "From sending a call upstream to its cost being known (end of the answer).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_ttfb = Histogram(
            "wattgate_upstream_ttfb_seconds",
            "From sending a call upstream to its response headers.",
            buckets=TTFB_BUCKETS, registry=r)
        self.upstream_responses = Counter("wattgate_upstream_responses",
                                          "Upstream answers by HTTP status.", ["status"],
                                          registry=r)
        self.calls = Counter("wattgate_metered_calls", "Calls written to the ledger.",
                             ["app", "state"], registry=r)
        self.holds_open = Gauge("wattgate_holds_open",
                                "Budget holds of calls in flight.", registry=r)
        self.backlog = Gauge("wattgate_reconciliation_backlog",
                             "Calls recorded at their estimate (provisional), awaiting "
                             "their real cost.", registry=r)
        # Labelled children cached by label values: .labels() takes a lock and
        # builds a key on every call; the hot path only needs the child.
        self._children: dict[tuple[str, ...], Any] = {}
        self._dollars = _Dollars()
        r.register(self._dollars)
        r.register(_Rejections(limiters))

    # ---- hooks of the metered proxy (hot path: memory only) -------------
    @staticmethod
    def clock() -> float:
        return time.perf_counter()

    def _child(self, metric: Counter, *labels: str) -> Any:
        key = (metric._name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def answered(self, sent: float, status: int) -> None:
        self.upstream_ttfb.observe(time.perf_counter() - sent)
        self._child(self.upstream_responses, str(status)).inc()

    def settled(self, row: Usage, sent: float | None) -> None:
        if sent is not None:
            self.upstream_latency.observe(time.perf_counter() - sent)
        if not row.provisional:  # an estimate counts once reconciliation knows the truth
            self._add_dollars(row.app_id, row.cost_nanos)
        self._child(self.calls, row.app_id, "provisional" if row.provisional else "final").inc()
        note = _note.get()
        if note is not None:
            note.app_id, note.grant_id, note.model = row.app_id, row.grant_id, row.model
            note.cost_nanos, note.provisional, note.outcome = \
                row.cost_nanos, row.provisional, row.status

    def reconciled(self, app_id: str, cost_nanos: int) -> None:
        """A provisional call's real cost became known (reconciliation)."""
        self._add_dollars(app_id, cost_nanos)

    def _add_dollars(self, app_id: str, nanos: int) -> None:
        self._dollars.nanos[app_id] = self._dollars.nanos.get(app_id, 0) + nanos

    # ---- the web layer ----------------------------------------------------
    def request_done(self, route: str, method: str, status: int) -> None:
        self._child(self.requests, route, method, str(status)).inc()

    def set_gauges(self, *, holds_open: int, backlog: int) -> None:
        self.holds_open.set(holds_open)
        self.backlog.set(backlog)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
