"""Per-app policy: which models an app's calls may use, how long an answer may be,
and how large a monthly cap its users may approve.

The operator sets it (``wattgate apps set-policy``, the console's app page); it
is stored with the app (``records.AppPolicy``) and travels with the app the
gateway already holds on the hot path (``Gateway.app_for_secret``, refreshed
on every process when ``apps_version`` moves), so judging a call costs no
ledger round trip. Every judgement here is made before the ledger admits
anything, and needs no lock: a refused call never holds budget.

The rules:

- **Models.** A pattern is a model id, lower case, where ``*`` stands for any
  run of characters except ``/`` (``openai/*`` is every OpenAI model,
  ``openai/gpt-4o*`` also ``openai/gpt-4o-mini`` and ``openai/gpt-4o:online``;
  ``*`` never reaches another vendor's ids). No other character is special.
  Every model a call may be billed at is judged: ``model`` and each of its
  ``models`` fallbacks. A model id is compared in lower case, and only if it
  is made of the characters model ids use (ASCII letters, digits, ``._-:/~@+``):
  one with spaces, control characters or look-alike letters is refused, never
  read as a near match. An empty list allows every model. ``openrouter/auto``
  and presets (``@preset/…``) let OpenRouter pick the model: allow them only if
  any model will do.
- **Output.** ``max_tokens`` bounds the output of each answer (each of ``n``
  choices) as the hold counts it: the answer's limit (``max_tokens``,
  ``max_completion_tokens``, ``max_output_tokens``) plus the
  ``reasoning.max_tokens`` budget. A request that sets a limit above it is
  refused; one that sets none is sent with the policy's bound (less its
  reasoning budget), or the gateway's default when that is lower: clamped,
  never refused.
- **Caps.** No cap above ``max_cap`` (nor unlimited) can be approved, set or
  raised: in the consent popup, through ``POST /api/v1/connections``, on the
  user's ``/account`` page, or as a grant's dollar cap (a grant must then name
  one). A connection approved before the bound was lowered keeps its cap until
  its user changes it: an operator's change never moves a user's cap either way
  (lowering it is the user's call, raising it needs their consent).
  ``suggested_cap`` is what the popup preselects when the app asked for none.

Refusals are ``PolicyRefused`` (403 ``policy_violation``), naming the rule.
Nothing here imports aiohttp.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from .errors import PolicyRefused
from .estimate import MAX_TOKENS, ChatRequest
from .money import format_usd, format_usd_exact, nanos_to_json, usd_to_nanos
from .store import AppPolicy

__all__ = ["check_cap", "check_grant_cap", "check_request", "default_max_tokens", "describe",
           "make_policy", "model_allowed", "normalize_pattern", "parse_max_tokens", "summary"]

MAX_PATTERNS = 100
# What model ids are made of (OpenRouter's, aliases like ``~vendor/x`` and variants
# like ``:free`` included). Judged on the id as sent, before lower-casing, so no
# Unicode letter that lower-cases to ASCII (the Kelvin sign) slips through.
_MODEL_ID = re.compile(r"[A-Za-z0-9._\-:/~@+]{1,200}")
_PATTERN = re.compile(r"[a-z0-9._\-:/~@+*]{1,200}")


def normalize_pattern(text: str) -> str:
    """A pattern as stored (trimmed, lower case), or ValueError saying why not."""
    pattern = text.strip().lower()
    if not _PATTERN.fullmatch(pattern):
        raise ValueError(f"model pattern {text[:80]!r} must be a model id (letters, digits, "
                         "._-:/~@+) where * stands for any run of characters but /")
    return pattern


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile("[^/]*".join(re.escape(part) for part in pattern.split("*")))


def model_allowed(policy: AppPolicy, model: str) -> bool:
    if not policy.models:
        return True
    if not _MODEL_ID.fullmatch(model):
        return False
    model = model.lower()
    return any(_compiled(p).fullmatch(model) for p in policy.models)


def _usd(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    try:
        nanos = usd_to_nanos(value.strip() if isinstance(value, str) else value)
    except ValueError:
        raise ValueError(f"{name} must be an amount of USD, like 20 or 12.50") from None
    if nanos <= 0:
        raise ValueError(f"{name} must be more than $0")
    return nanos


def make_policy(*, models: Iterable[str] = (), max_cap_usd: str | None = None,
                max_tokens: int | None = None,
                suggested_cap_usd: str | None = None) -> AppPolicy:
    """A policy from an operator's input (CLI, console), or ValueError naming the field.

    Amounts are strings of USD, read exactly (``money.usd_to_nanos``)."""
    patterns = tuple(dict.fromkeys(normalize_pattern(m) for m in models if m.strip()))
    if len(patterns) > MAX_PATTERNS:
        raise ValueError(f"at most {MAX_PATTERNS} model patterns")
    max_cap = _usd(max_cap_usd, "max cap")
    suggested = _usd(suggested_cap_usd, "suggested cap")
    if max_tokens is not None and not 1 <= max_tokens <= MAX_TOKENS:
        raise ValueError(f"max tokens must be a whole number from 1 to {MAX_TOKENS}")
    if max_cap is not None and suggested is not None and suggested > max_cap:
        raise ValueError(f"the suggested cap ({format_usd(suggested)}) must not be above the "
                         f"max cap ({format_usd(max_cap)})")
    return AppPolicy(patterns, max_cap, max_tokens, suggested)


def parse_max_tokens(text: str | None) -> int | None:
    """The largest output per call as an operator typed it (None: no limit), or ValueError.

    ASCII digits only: ``int`` would also read other scripts' digits, and refuse a
    superscript or a 5,000-digit number with its own words."""
    if text is None:
        return None
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(MAX_TOKENS)):
        raise ValueError(f"max tokens must be a whole number from 1 to {MAX_TOKENS}")
    return int(text)


def describe(policy: AppPolicy) -> dict[str, Any]:
    """The policy as JSON (the CLI, the console session endpoint, the popup)."""
    def usd(nanos: int | None) -> float | int | None:
        return None if nanos is None else nanos_to_json(nanos)
    return {"models": list(policy.models), "maxCapUsd": usd(policy.max_cap_nanos),
            "maxTokens": policy.max_tokens, "suggestedCapUsd": usd(policy.suggested_cap_nanos)}


def summary(policy: AppPolicy, *, grant: bool = False) -> list[str]:
    """The limits in words, for the person asked to approve (the consent popup)."""
    lines = []
    if policy.max_cap_nanos is not None:
        top = format_usd(policy.max_cap_nanos)
        lines.append(f"Grants of at most {top}" if grant else f"Caps of at most {top} a month")
    if policy.models:
        lines.append("Only these models: " + ", ".join(policy.models))
    if policy.max_tokens is not None:
        lines.append(f"Answers of at most {policy.max_tokens:,} tokens")
    return lines


# ---- calls ---------------------------------------------------------------------------
def default_max_tokens(policy: AppPolicy, default: int) -> int:
    """The answer limit sent when a request sets none: the gateway's, within the policy."""
    return default if policy.max_tokens is None else min(default, policy.max_tokens)


def check_request(policy: AppPolicy, req: ChatRequest) -> ChatRequest:
    """The request as it may be sent, or PolicyRefused naming the rule it breaks.

    ``req`` was read with ``default_max_tokens(policy, …)``; when it set no answer
    limit and its reasoning budget leaves less room, the limit injected is lowered.
    """
    for model in req.models:
        if not model_allowed(policy, model):
            where = "" if model == req.model else " in models (a fallback)"
            raise PolicyRefused(
                f"Model {model[:100]!r}{where} is not allowed by this app's policy "
                f"(allowed: {', '.join(policy.models)}).")
    bound = policy.max_tokens
    if bound is None or req.endpoint.output_limit is None:
        return req
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = req.body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > bound:
            raise PolicyRefused(f"{name} {value} is above this app's policy limit of "
                                f"{bound} output tokens per call.")
    if req.output_tokens <= bound:
        return req
    limit = req.endpoint.output_limit
    if req.inject_max_tokens is not None and not _client_limit(req):
        reasoning = req.output_tokens - req.inject_max_tokens
        if reasoning < bound:  # the gateway's own default: lowered to fit, not refused
            return dataclasses.replace(req, inject_max_tokens=bound - reasoning,
                                       output_tokens=bound)
    raise PolicyRefused(f"{limit} plus reasoning.max_tokens ({req.output_tokens} tokens) is "
                        f"above this app's policy limit of {bound} output tokens per call.")


def _client_limit(req: ChatRequest) -> bool:
    return any(req.body.get(n) is not None
               for n in ("max_tokens", "max_completion_tokens", "max_output_tokens"))


# ---- caps ----------------------------------------------------------------------------
def check_cap(policy: AppPolicy, cap_nanos: int | None, *, kept: bool = False) -> None:
    """Refuse a monthly cap above the policy's largest (None: unlimited).

    ``kept``: the connection already has this very cap and keeps its key (the
    user changed nothing), so a cap approved before the bound was lowered stands.
    """
    top = policy.max_cap_nanos
    if top is None or kept or (cap_nanos is not None and cap_nanos <= top):
        return
    asked = "An unlimited cap" if cap_nanos is None else \
        f"A monthly cap of {format_usd_exact(cap_nanos)}"
    raise PolicyRefused(f"{asked} is above this app's policy: at most {format_usd(top)} "
                        "a month.")


def check_grant_cap(policy: AppPolicy, max_nanos: int | None) -> None:
    """A grant's dollar cap, when the policy bounds caps: required, and within it."""
    top = policy.max_cap_nanos
    if top is None:
        return
    if max_nanos is None:
        raise PolicyRefused(f"This app's policy needs a grant to name its dollar cap (maxUsd), "
                            f"at most {format_usd(top)}.")
    if max_nanos > top:
        raise PolicyRefused(f"A grant of {format_usd_exact(max_nanos)} is above this "
                            f"app's policy: at most {format_usd(top)}.")

