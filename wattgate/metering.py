"""Turning what an answer said about itself into one ledger row; pure.

The bill is the provider's ``usage.cost`` (it includes tool and web-search
fees, so it is never recomputed from prices). For bring-your-own-provider-key
calls (``is_byok``), ``cost`` is only OpenRouter's fee and the provider charged
``cost_details.upstream_inference_cost`` on the user's own account: both are
the user's AI spend, so both count against the cap. An upstream that reports
tokens but no cost is billed tokens × the model's price. An answer that ended
with no usage at all (client gone before the drain could finish, upstream cut,
error event) is recorded at the hold's worst-case estimate, marked
provisional, for reconciliation to correct: never a silent $0.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .money import usd_to_nanos
from .pricing import Price
from .sse import Outcome
from .store.records import Usage


@dataclass(frozen=True)
class Bill:
    cost_nanos: int
    prompt_tokens: int
    completion_tokens: int
    provisional: bool


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)) or value < 0:
        return 0
    return int(value)


def _usd(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)) or value < 0:
        return None
    try:
        return usd_to_nanos(value)
    except ValueError:
        return None


def bill(outcome: Outcome, price: Price, estimate_nanos: int) -> Bill:
    usage = outcome.usage
    if usage is None:
        return Bill(estimate_nanos, 0, 0, provisional=True)
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    cost = _usd(usage.get("cost"))
    if cost is None:
        return Bill(price.cost_nanos(prompt, completion), prompt, completion, provisional=False)
    if usage.get("is_byok") is True:
        details = usage.get("cost_details")
        extra = _usd(details.get("upstream_inference_cost")) if isinstance(details, dict) else None
        cost += extra or 0
    return Bill(cost, prompt, completion, provisional=False)


def new_generation_id() -> str:
    """For upstreams that name no generation: unique, so the debit stays idempotent."""
    return "wg-" + secrets.token_hex(12)


def usage_row(outcome: Outcome, charge: Bill, *, app_id: str, connection_id: int | None,
              grant_id: int | None, model: str, status: str, started: float,
              now: float) -> Usage:
    """The ledger row; ``model`` (the one asked for) unless the answer named the one billed."""
    return Usage(
        generation_id=outcome.generation_id or new_generation_id(),
        app_id=app_id, connection_id=connection_id, grant_id=grant_id,
        model=(outcome.model or model)[:200],
        prompt_tokens=charge.prompt_tokens, completion_tokens=charge.completion_tokens,
        cost_nanos=charge.cost_nanos, provisional=charge.provisional, status=status,
        latency_ms=int(max(0.0, now - started) * 1000), created_at=now)
