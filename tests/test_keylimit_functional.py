"""The cap enforced twice: by the ledger, and by OpenRouter on the key itself.

"Connect with OpenRouter" asks OpenRouter for a key whose own credit limit is
the approved cap, resetting monthly, labelled with the app's name; the fake
OpenRouter keeps that limit as OpenRouter does and refuses past it with 403
"Key limit exceeded", whoever calls. The browser test of the popup is in
test_browser_functional.py (``test_connect_with_openrouter_oauth``).
"""

from __future__ import annotations

import base64
import hashlib
from decimal import Decimal
from typing import Any

import openai
import pytest

from wattgate.fakeupstream import FakeKey

SAME = {"Sec-Fetch-Site": "same-origin"}
VERIFIER = "v" * 64
CHALLENGE = base64.urlsafe_b64encode(
    hashlib.sha256(VERIFIER.encode()).digest()).decode().rstrip("=")


async def sign_in(h: Any, **limits: str) -> dict[str, Any]:
    """What the popup does: OpenRouter's /auth page (here the fake's), then the exchange
    through the gateway; returns the gateway's answer to the popup."""
    async with h.http.get(h.fake.origin + "/auth", allow_redirects=False, params={
            "callback_url": h.url + "/connect/oauth-callback?n=x", "code_challenge": CHALLENGE,
            "code_challenge_method": "S256", **limits}) as r:
        assert r.status == 302, await r.text()
        code = r.headers["Location"].split("code=")[1]
    async with h.http.post(h.api + "/consent/oauth", headers=SAME,
                           json={"code": code, "codeVerifier": VERIFIER}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def say_hi(client: openai.AsyncOpenAI) -> None:
    """One call of a model billed $0.03 a call."""
    await client.chat.completions.create(
        model="fake/flat-3c", messages=[{"role": "user", "content": "hi"}])


async def test_oauth_key_is_made_with_the_cap_as_its_own_monthly_limit(harness):
    answer = await sign_in(harness, limit="2.5", usage_limit_type="monthly", key_label="Notes")
    # The gateway read the limit back from OpenRouter (GET /key) rather than assuming it.
    assert answer["keyLimit"] == {"limitUsd": 2.5, "reset": "monthly", "label": "Notes"}
    made = harness.fake.keys[answer["key"]]
    assert (made.limit, made.usage_limit_type) == (Decimal("2.5"), "monthly")


async def test_oauth_key_without_a_limit_is_reported_as_such(harness):
    answer = await sign_in(harness)
    assert answer["keyLimit"]["limitUsd"] is None


async def test_fake_refuses_a_call_past_the_keys_limit_without_the_gateway(harness):
    """Even with the gateway's ledger bypassed (a direct call with the key), OpenRouter
    stops spending at the key's own limit."""
    key = (await sign_in(harness, limit="0.05", usage_limit_type="monthly"))["key"]
    direct = openai.AsyncOpenAI(base_url=harness.fake.origin + "/api/v1", api_key=key,
                                max_retries=0)
    async with direct:
        for _ in range(2):  # $0.03 each: the second passes the $0.05 limit, as a call may
            await say_hi(direct)
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await say_hi(direct)
    assert refused.value.status_code == 403
    assert "Key limit exceeded" in str(refused.value)
    assert harness.fake.charged == Decimal("0.06")  # nothing billed for the refused call
    async with harness.http.get(harness.fake.origin + "/api/v1/key",
                                headers={"Authorization": f"Bearer {key}"}) as r:
        data = (await r.json())["data"]
    assert (data["limit"], data["limit_remaining"], data["limit_reset"]) == (0.05, 0, "monthly")


async def test_key_limit_reached_upstream_is_budget_exceeded_not_a_broken_key(harness):
    """A key whose own OpenRouter limit is below the gateway's cap: the user sees their
    budget is spent (402 budget_exceeded), and the connection is not marked broken."""
    key = "sk-or-v1-" + "k" * 48
    harness.fake.keys[key] = FakeKey("pasted", Decimal("0.03"), "monthly")
    app = await harness.create_app()
    await harness.connect(app, "carol", monthly_usd=10, funding_key=key)
    oa = openai.AsyncOpenAI(base_url=harness.api, api_key=app.secret_key, max_retries=0,
                            default_headers={"x-wattfare-user": "carol"})
    async with oa:
        await say_hi(oa)
        with pytest.raises(openai.APIStatusError) as refused:
            await say_hi(oa)
    assert refused.value.status_code == 402
    assert refused.value.body["code"] == "budget_exceeded"  # type: ignore[index]
    assert "own credit limit" in refused.value.body["message"]  # type: ignore[index]
    status = await harness.status(app, "carol")
    assert status["connected"] is True
    assert await harness.gw.store.open_holds() == 0
