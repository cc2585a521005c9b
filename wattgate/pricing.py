"""Model prices and the worst-case cost estimate behind every budget hold.

Prices come from the upstream's ``GET /models`` (OpenRouter: ``pricing.prompt``
and ``pricing.completion`` in USD per token, ``pricing.request`` per call, all
strings). The estimate is deliberately a ceiling, so a hold covers the call:

    prompt_price × (UTF-8 bytes of the request body)      # ≥ prompt tokens
  + completion_price × max_tokens
  + request_price

A token is at least one byte of text for the tokenizers in use, so the body
length bounds the prompt tokens from above. A model with no known price is
refused: nothing leaves unmetered.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from .errors import InvalidRequest, UpstreamError
from .money import usd_to_nanos


@dataclass(frozen=True)
class Price:
    prompt: Decimal      # USD per prompt token
    completion: Decimal  # USD per completion token
    request: Decimal     # USD per call

    def worst_cost_nanos(self, body_bytes: int, max_tokens: int) -> int:
        try:
            return self.cost_nanos(body_bytes, max_tokens)
        except ValueError:  # a price list out of all range (1e999999 per token)
            raise UpstreamError("The model's price from the provider is out of range, "
                                "so the call cannot be metered.") from None

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
                # Reasoning tokens count toward max_tokens and may be priced apart
                # (``internal_reasoning``): the dearer of the two bounds an output token.
                completion = max(_dec(pricing.get("completion")),
                                 _dec(pricing.get("internal_reasoning")))
                prices[entry["id"]] = Price(_dec(pricing.get("prompt")), completion,
                                            _dec(pricing.get("request")))
            except ValueError:
                continue
        self._prices = prices
        self.loaded_at = now

    def stale(self, now: float) -> bool:
        return self.loaded_at is None or now - self.loaded_at >= self.ttl

    def get(self, model: str) -> Price:
        price = self._prices.get(model)
        if price is None:
            raise InvalidRequest(f"Model {model!r} has no known price, so it cannot be metered; "
                                 "check the model id against GET /api/v1/models.")
        return price
