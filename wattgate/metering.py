"""Turning what an answer said about itself into one ledger row; pure.

What a call cost is decided in ONE place, ``charged``, whichever source tells
it: the stream's final ``usage`` (``usage_charge``) or, during reconciliation,
OpenRouter's ``GET /generation`` (``generation_charge``). The bill is the
provider's ``cost`` (``total_cost`` on ``/generation``; it includes tool and
web-search fees, so it is never recomputed from prices). For
bring-your-own-provider-key calls (``is_byok``) that figure is only
OpenRouter's fee and the provider charged ``upstream_inference_cost`` on the
user's own account: both are the user's AI spend, so both count against the
cap, from either source.

Hostile or broken usage never crashes a stream nor leaks a hold: a cost that
is missing, not a JSON number (a string, ``NaN``, ``Infinity``, ``true``),
negative, or above ``MAX_CALL_USD`` for one call (``1e20``, ``1e999999``) is
not believed. The call is then recorded *provisional* at the hold's worst-case
estimate (never at a token-price figure: the hold also covered web results,
images and dearer fallbacks that tokens do not show, so a lower row would free
room the call may already have spent), for reconciliation to correct;
``Bill.problem`` says why, for one log line. Token counts that are not whole
numbers in ``0..MAX_TOKENS_REPORTED`` are recorded as 0 (they are informative;
the bill is the cost). An answer that ended with no usage at all (client gone
before the drain could finish, upstream cut, error event, ``usage: null``) is
recorded at the estimate, provisional: never a silent $0.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .money import usd_to_nanos
from .sse import Outcome
from .store.records import UPSTREAM_REFUSED, Usage

# One call billed more than this is not believed (a buggy or hostile upstream):
# the call stays provisional at its estimate and a warning names the generation.
# The dearest real calls (a million-token context on the dearest model) cost
# hundreds of dollars; $10,000 leaves a wide margin and 900,000 such calls fit a
# period's int64 aggregate.
MAX_CALL_USD = 10_000
MAX_CALL_NANOS = MAX_CALL_USD * 1_000_000_000
MAX_TOKENS_REPORTED = 10**12


@dataclass(frozen=True)
class Bill:
    cost_nanos: int
    prompt_tokens: int
    completion_tokens: int
    provisional: bool
    problem: str | None = None  # why the upstream's usage was not taken as it came


def _count(value: Any) -> int | None:
    """A token count (0 when absent), or None when it is not a whole number in range."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        return None
    if isinstance(value, Decimal) and (not value.is_finite() or value != value.to_integral_value()):
        return None
    if not 0 <= value <= MAX_TOKENS_REPORTED:
        return None
    return int(value)


def _usd(value: Any, name: str) -> tuple[int | None, str | None]:
    if value is None:
        return None, f"no {name}"
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        return None, f"{name} is not a number ({type(value).__name__})"
    try:
        nanos = usd_to_nanos(value)
    except ValueError:
        return None, f"{name} is out of range"
    if nanos < 0:
        return None, f"{name} is negative"
    if nanos > MAX_CALL_NANOS:
        return None, f"{name} is above ${MAX_CALL_USD} for one call"
    return nanos, None


def charged(cost: Any, is_byok: Any, upstream_inference_cost: Any, *,
            cost_name: str = "cost") -> tuple[int | None, str | None]:
    """What one call cost the user, in nano-dollars, or (None, why not).

    ``cost``: what OpenRouter charged the key's credits; for a BYOK call
    (``is_byok`` true) the provider's ``upstream_inference_cost`` is added.
    """
    nanos, problem = _usd(cost, cost_name)
    if nanos is None:
        return None, problem
    if is_byok is True:
        extra, problem = _usd(upstream_inference_cost, "upstream_inference_cost")
        if extra is None:
            return None, f"a bring-your-own-key call with {problem}"
        nanos += extra
        if nanos > MAX_CALL_NANOS:
            return None, f"cost is above ${MAX_CALL_USD} for one call"
    return nanos, None


def usage_charge(usage: dict[str, Any]) -> tuple[int | None, str | None]:
    """``charged`` from a chat answer's ``usage`` object."""
    details = usage.get("cost_details")
    return charged(usage.get("cost"), usage.get("is_byok"),
                   details.get("upstream_inference_cost") if isinstance(details, dict) else None)


def generation_charge(data: Any) -> tuple[int | None, str | None]:
    """``charged`` from ``GET /generation``'s ``data`` object (the same rule as the stream)."""
    if not isinstance(data, dict):
        return None, "no data object"
    return charged(data.get("total_cost"), data.get("is_byok"),
                   data.get("upstream_inference_cost"), cost_name="total_cost")


def bill(outcome: Outcome, estimate_nanos: int) -> Bill:
    usage = outcome.usage
    if usage is None:
        return Bill(estimate_nanos, 0, 0, provisional=True)
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    tokens_ok = prompt is not None and completion is not None
    prompt, completion = prompt or 0, completion or 0
    cost, problem = usage_charge(usage)
    if cost is not None:
        return Bill(cost, prompt, completion, provisional=False,
                    problem=None if tokens_ok else "token counts out of range, recorded as 0")
    # Never below the hold: the call may have billed what the hold priced beside tokens
    # (web results, images, a dearer fallback), and a row below it would free room the
    # call already spent. Reconciliation brings it to what the upstream billed.
    return Bill(estimate_nanos, prompt, completion, provisional=True,
                problem=f"{problem}: recorded provisional at the estimate")


def new_generation_id() -> str:
    """For upstreams that name no generation: unique, so the debit stays idempotent."""
    return "wg-" + secrets.token_hex(12)


def usage_row(outcome: Outcome, charge: Bill, *, app_id: str, connection_id: int | None,
              grant_id: int | None, model: str, status: str, started: float,
              now: float, admitted_at: float) -> Usage:
    """The call's row, dated at its admission: a call belongs to the period it was
    admitted in (``ledger.period_of``), so its date must fall in that period too. Its
    ``model`` is the one asked for unless the answer named the one billed."""
    return Usage(
        generation_id=outcome.generation_id or new_generation_id(),
        app_id=app_id, connection_id=connection_id, grant_id=grant_id,
        model=(outcome.model or model)[:200],
        prompt_tokens=charge.prompt_tokens, completion_tokens=charge.completion_tokens,
        cost_nanos=charge.cost_nanos, provisional=charge.provisional, status=status,
        latency_ms=int(max(0.0, now - started) * 1000), created_at=admitted_at)


def refused_row(*, app_id: str, connection_id: int | None, grant_id: int | None,
                model: str, code: int, started: float, now: float,
                admitted_at: float) -> Usage:
    """The $0 row of a call the upstream refused before any byte (``UPSTREAM_REFUSED``):
    no generation was named, so its id is one of ours (``wg-``: never reconciled)."""
    return Usage(generation_id=new_generation_id(), app_id=app_id,
                 connection_id=connection_id, grant_id=grant_id, model=model[:200],
                 prompt_tokens=0, completion_tokens=0, cost_nanos=0, provisional=False,
                 status=UPSTREAM_REFUSED, latency_ms=int(max(0.0, now - started) * 1000),
                 created_at=admitted_at, upstream_code=code)
