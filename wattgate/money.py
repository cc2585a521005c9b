"""Exact money: integer nano-dollars (10⁻⁹ USD) from the parser to the ledger.

OpenRouter reports ``usage.cost`` as a JSON number in USD with up to ~10
significant decimals (cheap models cost fractions of a micro-dollar per call),
so the ledger counts in nano-dollars: an int64 holds $9.2 billion. Amounts are
parsed from ``Decimal`` (never a binary float) and rounded half-up to the
nano-dollar; they leave as JSON numbers only at the HTTP edge.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal, InvalidOperation

NANOS_PER_USD = 1_000_000_000
_NANO = Decimal(NANOS_PER_USD)
# The largest amount the ledger takes: 10⁹ USD = 10¹⁸ nano-dollars, within SQLite's int64
# (9.2 × 10¹⁸) with room for a period's sum. Anything larger is not money but a bug or
# an attack (``1e20``, ``1e999999``), refused here rather than overflowing the row.
MAX_USD = Decimal(10) ** 9


def usd_to_nanos(value: object, *, round_up: bool = False) -> int:
    """Convert a USD amount (Decimal, int, str, float) to nano-dollars.

    Floats are converted through ``repr`` so ``0.03`` means 3 cents, not the
    nearest binary fraction. Raises ``ValueError`` on anything not a finite number
    and on any amount beyond ``MAX_USD`` either way, never another exception.
    """
    if isinstance(value, bool):
        raise ValueError("not a number")
    if isinstance(value, float):
        value = repr(value)
    try:
        amount = Decimal(value)  # type: ignore[arg-type]
    except (InvalidOperation, TypeError, ValueError):
        raise ValueError("not a number") from None
    if not amount.is_finite():
        raise ValueError("not a finite number")
    if abs(amount) > MAX_USD:  # compared before any arithmetic: 1e999999 cannot overflow
        raise ValueError("out of range")
    rounding = ROUND_CEILING if round_up else ROUND_HALF_UP
    return int((amount * _NANO).to_integral_value(rounding=rounding))


def nanos_to_usd(nanos: int) -> Decimal:
    return Decimal(nanos) / _NANO


def nanos_to_json(nanos: int) -> float | int:
    """The JSON number for an amount: exact to the nano-dollar when printed."""
    amount = Decimal(nanos) / _NANO
    if amount == amount.to_integral_value():
        return int(amount)
    return float(amount.normalize())


def format_usd_exact(nanos: int) -> str:
    """An amount exactly as given, for an error that echoes what the client asked
    (``$20.0001``, ``$0.50``, ``$1,234.56``): rounding it could print a refused
    figure equal to the limit it broke."""
    amount = Decimal(nanos) / _NANO
    return _dollars("-" if amount < 0 else "", abs(amount))


def _dollars(sign: str, amount: Decimal) -> str:
    """``$1,234.5`` written with its cents: ``$1,234.50``; trailing zeros past them dropped."""
    whole, _, decimals = f"{amount:,f}".partition(".")
    return f"{sign}${whole}.{decimals.rstrip('0').ljust(2, '0')}"


def format_usd(nanos: int, *, round_up: bool = False) -> str:
    """An amount for a person to read, the one way every page and the CLI print money.

    ``$0.50`` (never ``$0.5``), ``$1,234.56``, and below a dollar the two
    significant digits that matter: ``$0.12``, ``$0.039``, ``$0.0042``,
    ``$0.000013``, down to the nano-dollar (``$0.000000001``). Cents always show.
    Rounded down by default, up with ``round_up``: a refusal shows a worst case never
    below the truth and what is left never above it, so the numbers it prints never
    make a refused call look as if it fitted.
    """
    rounding = ROUND_CEILING if round_up else ROUND_FLOOR
    amount = Decimal(nanos) / _NANO
    sign, amount = ("-", -amount) if amount < 0 else ("", amount)
    if sign:
        rounding = ROUND_FLOOR if round_up else ROUND_CEILING  # toward the same side of zero
    places = 2
    if 0 < amount < 1:
        # adjusted() is the first significant digit's exponent: -3 for 0.0042
        places = min(9, max(2, -amount.adjusted() + 1))
    return _dollars(sign, amount.quantize(Decimal(1).scaleb(-places), rounding=rounding))
