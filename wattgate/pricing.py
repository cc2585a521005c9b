"""Model prices: the dearest rate each kind of unit can be billed at.

Prices come from the upstream's ``GET /models`` (OpenRouter: ``pricing.prompt``
and ``pricing.completion`` in USD per token, ``pricing.request`` per call,
``pricing.image`` per input image, ``pricing.web_search`` per search, all
strings). Each ``Price`` is a ceiling, so a hold built on it covers the call:
a prompt token is priced at the dearest of ``prompt``, ``input_cache_write``
and ``input_cache_write_1h`` (a cache write bills above the plain rate), an
output token at the dearer of ``completion`` and ``internal_reasoning``, and
each rate at the dearest of its conditional ``overrides`` (long-context
pricing). ``Price.max`` is the ceiling over several models (a ``models``
fallback list). What a request can cost at most is ``wattgate.estimate``'s
rule. A model with no known price is refused: nothing leaves unmetered.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from .errors import InvalidRequest, UpstreamError
from .money import usd_to_nanos

_ZERO = Decimal(0)


@dataclass(frozen=True)
class Price:
    prompt: Decimal      # USD per prompt token
    completion: Decimal  # USD per completion token
    request: Decimal     # USD per call
    image: Decimal = _ZERO       # USD per input image
    web_search: Decimal = _ZERO  # USD per web search (result)

    def worst_cost_nanos(self, body_bytes: int, max_tokens: int) -> int:
        try:
            return self.cost_nanos(body_bytes, max_tokens)
        except ValueError:  # a price list out of all range (1e999999 per token)
            raise UpstreamError("The model's price from the provider is out of range, "
                                "so the call cannot be metered.") from None

    def max(self, other: Price) -> Price:
        """The dearer of two prices, rate by rate: bounds a call billed at either."""
        return Price(max(self.prompt, other.prompt), max(self.completion, other.completion),
                     max(self.request, other.request), max(self.image, other.image),
                     max(self.web_search, other.web_search))

    def cost_nanos(self, prompt_tokens: int, completion_tokens: int) -> int:
        """Rounded up to the nano-dollar; ValueError when out of the ledger's range."""
        try:
            usd = (self.prompt * prompt_tokens + self.completion * completion_tokens
                   + self.request)
        except ArithmeticError:  # decimal.Overflow: prices from the wire are not bounded
            raise ValueError("out of range") from None
        return usd_to_nanos(usd, round_up=True)


def _dec(value: Any) -> Decimal:
    if value is None or value == "":
        return Decimal(0)
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(value) from None
    if not d.is_finite() or d < 0:
        # OpenRouter uses "-1" for "variable" pricing (routers): not estimable.
        raise ValueError(value)
    return d


_PROMPT_RATES = ("prompt", "input_cache_write", "input_cache_write_1h")
# Reasoning tokens are output tokens and may be priced apart (``internal_reasoning``).
_OUTPUT_RATES = ("completion", "internal_reasoning")


def _ceiling(pricing: dict[str, Any]) -> Price:
    """The dearest rate of each kind, base pricing and every conditional override."""
    overrides = pricing.get("overrides") or []
    if not isinstance(overrides, list):  # unreadable: the model stays unpriced (refused)
        raise ValueError("overrides")  # noqa: TRY004
    tiers = [pricing, *(o for o in overrides if isinstance(o, dict))]

    def dearest(names: tuple[str, ...]) -> Decimal:
        return max(_dec(tier.get(name)) for tier in tiers for name in names)

    return Price(dearest(_PROMPT_RATES), dearest(_OUTPUT_RATES), dearest(("request",)),
                 dearest(("image",)), dearest(("web_search",)))


class PriceList:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.loaded_at: float | None = None
        self._prices: dict[str, Price] = {}

    def load(self, models: Any, *, now: float) -> None:
        prices: dict[str, Price] = {}
        for entry in (models.get("data") or []) if isinstance(models, dict) else []:
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                continue
            pricing = entry.get("pricing")
            if not isinstance(pricing, dict):
                continue
            try:
                prices[entry["id"]] = _ceiling(pricing)
            except ValueError:
                continue
        self._prices = prices
        self.loaded_at = now

    def __len__(self) -> int:
        """How many models have a known price (0 until loaded)."""
        return len(self._prices)

    def stale(self, now: float) -> bool:
        return self.loaded_at is None or now - self.loaded_at >= self.ttl

    def get(self, model: str) -> Price:
        price = self._prices.get(model)
        if price is None:
            raise InvalidRequest(f"Model {model!r} has no known price, so it cannot be metered; "
                                 "check the model id against GET /api/v1/models.")
        return price
