"""Budget headroom: why a call did not fit its cap, and the call that would.

A hold is a call's worst case (``estimate``), and most of it is usually the
answer's limit: 4,096 tokens of an expensive model when the request set no
``max_tokens``. So a user with $0.03 left of $0.05 can be refused a call that
would have cost a tenth of a cent. This module words that refusal so a person
understands it (what the call could cost at most, what is left, the
``max_tokens`` that fits) and, where the operator allows
(``metering.fit_to_budget``), builds the call that fits instead: the same body
with its answer limit lowered, re-read and re-priced by ``estimate`` so the
hold is still the worst case of the body actually sent.

The worst case is linear in the answer limit (``n`` × the completion rate per
token); the body's own bytes move by a digit or two with the limit, which the
re-pricing takes into account. ``reasoning.max_tokens`` is the client's own
thinking budget and is never lowered. Nothing here imports aiohttp.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal

from .errors import BudgetExceeded, GrantInvalid, Shortfall
from .estimate import CHAT, ChatRequest, Endpoint, Plan, ceiling, plan, read_request
from .money import NANOS_PER_USD, format_usd
from .pricing import PriceList

def limit_fields(req: ChatRequest) -> tuple[str, ...]:
    """The fields that bound the answer of this request's endpoint (chat: both of
    ``max_tokens`` and ``max_completion_tokens``; responses: ``max_output_tokens``;
    embeddings: none, its cost is its input's)."""
    primary = req.endpoint.output_limit
    if primary is None:
        return ()
    return (primary, "max_completion_tokens") if primary == "max_tokens" else (primary,)


def limit_name(req: ChatRequest) -> str:
    return req.endpoint.output_limit or "max_tokens"


@dataclass(frozen=True)
class Pricing:
    """How the proxy reads and prices a body (its settings), to re-price a fitted one."""

    prices: PriceList
    default_max_tokens: int
    stream_upstream: bool
    send_max_price: bool

    def read(self, raw: bytes, endpoint: Endpoint = CHAT) -> ChatRequest:
        return read_request(raw, default_max_tokens=self.default_max_tokens,
                            max_price=self.send_max_price, endpoint=endpoint)

    def plan(self, req: ChatRequest) -> Plan:
        return plan(req, self.prices, stream_upstream=self.stream_upstream,
                    send_max_price=self.send_max_price)


@dataclass(frozen=True)
class Fitted:
    req: ChatRequest
    plan: Plan
    max_tokens: int  # the answer limit the call is sent with


def client_set_limit(req: ChatRequest) -> bool:
    """Did the client choose the answer's length itself (not the gateway's default)?"""
    return req.inject_max_tokens is None \
        or _limit(req.body, "max_completion_tokens") is not None


def answer_limit(req: ChatRequest) -> int:
    """The answer's limit as the hold prices it: the larger of the two fields, or the
    one the gateway injects (``req.body`` only ever gains an injected ``max_tokens``)."""
    if req.inject_max_tokens is not None:
        return req.inject_max_tokens
    limits = [v for v in (_limit(req.body, n) for n in limit_fields(req)) if v is not None]
    return max(limits, default=0)


def _limit(body: dict, name: str) -> int | None:
    value = body.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def with_limit(req: ChatRequest, tokens: int, pricing: Pricing) -> ChatRequest:
    """The client's body with its answer limit set to ``tokens`` (both fields, when it set
    ``max_completion_tokens`` too), read again as the proxy reads any body."""
    body = json.loads(req.raw)
    fields = limit_fields(req)
    body[fields[0]] = tokens
    for name in fields[1:]:
        if _limit(body, name) is not None:
            body[name] = tokens
    return pricing.read(json.dumps(body).encode(), req.endpoint)


def largest_fit(req: ChatRequest, worst: int, left: int, pricing: Pricing) -> Fitted | None:
    """The request with the largest answer limit whose worst case is within ``left``
    nano-dollars, or None when not even one token fits (or the limit does not move
    the price: a flat per-call model)."""
    if not limit_fields(req):
        return None  # embeddings: nothing to lower
    price = ceiling(pricing.prices, req.models)
    per_token = price.completion * req.choices * NANOS_PER_USD  # nano-dollars, Decimal
    if per_token <= 0:
        return None
    tokens = answer_limit(req)
    for _ in range(4):  # the body's bytes move with the limit's digits: re-check
        tokens -= max(1, _ceil((worst - left) / per_token))
        if tokens < 1:
            return None
        fitted = with_limit(req, tokens, pricing)
        fitted_plan = pricing.plan(fitted)
        if fitted_plan.worst_nanos <= left:
            return Fitted(fitted, fitted_plan, tokens)
        worst = fitted_plan.worst_nanos
    return None


def _ceil(value: Decimal) -> int:
    return int(value.to_integral_value(rounding=ROUND_CEILING))


def explained(error: BudgetExceeded | GrantInvalid, req: ChatRequest, fit: Fitted | None,
              pricing: Pricing, *, grant: bool) -> BudgetExceeded | GrantInvalid:
    """``error`` again, its message saying what the call could cost, what is left and how
    to fit. An error without a shortfall (not about money) comes back as it was."""
    short = error.shortfall
    if short is None:
        return error
    message = f"{_could_cost(short, req)}; {_left(short, error, grant=grant)}. " \
              f"{_how_to_fit(short, req, fit, pricing)}"
    return type(error)(message, shortfall=short)


def _could_cost(short: Shortfall, req: ChatRequest) -> str:
    if not limit_fields(req):
        return (f"This call could cost up to {format_usd(short.worst, round_up=True)} "
                "(its worst case, priced on its input)")
    limit = answer_limit(req)
    why = "the gateway's default, as the request set none" \
        if not client_set_limit(req) else "as the request asked"
    choices = f" for each of {req.choices} choices" if req.choices > 1 else ""
    thinking = req.output_tokens - limit
    reasoning = f" plus reasoning.max_tokens {thinking}" if thinking > 0 else ""
    return (f"This call could cost up to {format_usd(short.worst, round_up=True)} "
            f"(its worst case: an answer of {limit_name(req)} {limit}{reasoning}{choices}, {why})")


def _left(short: Shortfall, error: BudgetExceeded | GrantInvalid, *, grant: bool) -> str:
    if isinstance(error, GrantInvalid):
        whose = "this grant's maxUsd of"
    elif grant:
        whose = "this month's cap of the connection funding this grant,"
    else:
        whose = "this month's cap of"
    held = f", {format_usd(short.held, round_up=True)} held by calls in flight" \
        if short.held else ""
    return (f"{format_usd(short.left)} is left of {whose} {format_usd(short.cap)} "
            f"({format_usd(short.spent, round_up=True)} spent{held})")


def _how_to_fit(short: Shortfall, req: ChatRequest, fit: Fitted | None,
                pricing: Pricing) -> str:
    if fit is not None:
        return f"To fit, lower {limit_name(req)} to {fit.max_tokens} or less."
    if short.left == 0:
        wait = "a call in flight settles, " if short.held else ""
        return f"Nothing fits until {wait}the cap is raised or a new month starts."
    if not limit_fields(req):
        return "Shorten the input, choose a cheaper model, or ask the user to raise the cap."
    shortest = pricing.plan(with_limit(req, 1, pricing)).worst_nanos
    thinking = "lower reasoning.max_tokens, " if req.output_tokens > answer_limit(req) else ""
    return (f"Even {limit_name(req)} 1 could cost {format_usd(shortest, round_up=True)}: {thinking}"
            "shorten the prompt, choose a cheaper model, or ask the user to raise the cap.")
