"""Per-app policy through the running gateway, as an attacker would probe it.

The app's backend (holding only its secret key) tries to spend on a model its
operator did not allow, through ``model``, through ``models`` fallbacks, with
case, whitespace and look-alike tricks, on every metered endpoint and through
a grant; to ask for longer answers than allowed; and the app's pages (forged
form posts included) try to approve or raise a cap above the app's largest.
Each refusal is ``403 policy_violation`` naming the rule, reaches no upstream,
and holds nothing.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import FUNDING_KEY

import wattgate
from wattgate.policy import make_policy
from wattgate.store import AppPolicy

SAME = {"Sec-Fetch-Site": "same-origin"}
ALLOWED = ("openai/*", "anthropic/claude-3.5-sonnet", "fake/fail-*")


def client(h, app, user: str) -> openai.AsyncOpenAI:  # type: ignore[no-untyped-def]
    return openai.AsyncOpenAI(base_url=h.api, api_key=app.secret_key,
                              default_headers={"x-wattfare-user": user}, max_retries=0)


async def set_policy(h, app, **kw: Any) -> AppPolicy:  # type: ignore[no-untyped-def]
    saved = await h.gw.store.set_app_policy(app.app_id, make_policy(**kw))
    assert saved is not None
    return saved.policy


async def post(h, app, path: str, body: dict[str, Any], **headers: str) -> tuple[int, Any]:  # type: ignore[no-untyped-def]
    hdrs = {"Authorization": f"Bearer {app.secret_key}", **headers}
    async with h.http.post(h.api + path, json=body, headers=hdrs) as r:
        return r.status, await r.json()


def chat(model: str = "openai/gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


async def nothing_spent(h, app, user: str = "u") -> None:  # type: ignore[no-untyped-def]
    assert await h.gw.store.open_holds() == 0
    status = await h.status(app, user)
    assert status["usage"]["monthlyUsd"] == 0


def refused(status: int, body: Any, *words: str) -> None:
    assert status == 403, body
    assert body["error"]["code"] == "policy_violation", body
    for word in words:
        assert word in body["error"]["message"], body


# ---- models ------------------------------------------------------------------------

async def test_allowed_models_pass_and_others_are_refused_before_the_upstream(harness):
    app = await harness.create_app()
    await harness.connect(app, "u", monthly_usd=5)
    await set_policy(harness, app, models=ALLOWED)
    async with client(harness, app, "u") as oa:
        reply = await oa.chat.completions.create(
            model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
        calls = len(harness.fake.calls)
        with pytest.raises(openai.PermissionDeniedError) as refusal:
            await oa.chat.completions.create(
                model="anthropic/claude-sonnet-4", messages=[{"role": "user", "content": "hi"}])
    assert refusal.value.status_code == 403
    error = refusal.value.body
    assert error["code"] == "policy_violation"
    assert "'anthropic/claude-sonnet-4'" in error["message"]
    assert "not allowed by this app's policy" in error["message"]
    assert "openai/*" in error["message"]
    assert len(harness.fake.calls) == calls  # never reached the upstream
    assert await harness.gw.store.open_holds() == 0
    spent = (await harness.status(app, "u"))["usage"]["monthlyUsd"]
    assert spent == pytest.approx(float(harness.fake.charged))  # the allowed call alone


async def test_a_forbidden_fallback_in_models_is_refused(harness):
    """OpenRouter bills the first of model + models that answers: a dead allowed model
    with a forbidden fallback would spend on the forbidden one."""
    app = await harness.create_app()
    await harness.connect(app, "u", monthly_usd=5)
    attack = chat("fake/fail-500", models=["anthropic/claude-sonnet-4"])
    # Without a policy the fallback is what gets billed: the attack is real.
    status, _ = await post(harness, app, "/chat/completions", attack, **{"x-wattfare-user": "u"})
    assert status == 200 and harness.fake.calls[-1].model == "anthropic/claude-sonnet-4"
    await set_policy(harness, app, models=ALLOWED)
    calls = len(harness.fake.calls)
    async with client(harness, app, "u") as oa:
        with pytest.raises(openai.PermissionDeniedError) as refusal:
            await oa.chat.completions.create(
                model="fake/fail-500", messages=[{"role": "user", "content": "hi"}],
                extra_body={"models": ["openai/gpt-4o-mini", "anthropic/claude-sonnet-4"]})
    assert refusal.value.body["code"] == "policy_violation"
    assert "'anthropic/claude-sonnet-4' in models" in refusal.value.body["message"]
    assert len(harness.fake.calls) == calls
    assert await harness.gw.store.open_holds() == 0


@pytest.mark.parametrize("model", [
    "Anthropic/Claude-Sonnet-4",             # case does not make a forbidden model allowed
    " anthropic/claude-3.5-sonnet",           # nor whitespace an allowed one (refused, not trimmed)
    "anthropic/claude-3.5-sonnet\n",
    "openai/../anthropic/claude-sonnet-4",    # * never crosses a /
    "openai/x/anthropic/claude-sonnet-4",
    "ｏpenai/gpt-4o-mini",                    # a look-alike letter
    "openai/gpt-4o-mini\u212a",              # the Kelvin sign lower-cases to k
    "anthropic/claude-3.5-sonnet:online",     # a variant is another id
    "openrouter/auto",                        # picks any model
])
async def test_tricks_do_not_pass_a_forbidden_model(harness, model):
    app = await harness.create_app()
    await harness.connect(app, "u", monthly_usd=5)
    await set_policy(harness, app, models=ALLOWED)
    calls = len(harness.fake.calls)
    for body in (chat(model), chat("openai/gpt-4o-mini", models=[model])):
        status, answer = await post(harness, app, "/chat/completions", body,
                                    **{"x-wattfare-user": "u"})
        refused(status, answer, "not allowed by this app's policy")
    assert len(harness.fake.calls) == calls
    await nothing_spent(harness, app)


async def test_case_is_not_a_refusal_of_an_allowed_model(harness):
    app = await harness.create_app()
    await harness.connect(app, "u", monthly_usd=5)
    await set_policy(harness, app, models=["OpenAI/GPT-4o-*"])  # stored lower case
    status, body = await post(harness, app, "/chat/completions", chat("openai/gpt-4o-mini"),
                              **{"x-wattfare-user": "u"})
    assert status == 200, body


async def test_responses_embeddings_and_grants_are_judged_too(harness):
    app = await harness.create_app()
    await harness.connect(app, "u", monthly_usd=5)
    await set_policy(harness, app, models=["openai/gpt-4o-mini"])
    user = {"x-wattfare-user": "u"}
    refused(*await post(harness, app, "/responses",
                        {"model": "anthropic/claude-sonnet-4", "input": "hi"}, **user),
            "anthropic/claude-sonnet-4")
    refused(*await post(harness, app, "/responses",
                        {"model": "openai/gpt-4o-mini", "input": "hi",
                         "models": ["anthropic/claude-sonnet-4"]}, **user), "models")
    refused(*await post(harness, app, "/embeddings",
                        {"model": "openai/text-embedding-3-small", "input": "hi"}, **user),
            "openai/text-embedding-3-small")
    # A grant spends under the same app's policy.
    token = await harness.session(app, "visitor")
    async with harness.http.post(harness.api + "/grants",
                                 json={"requests": 2, "fundingKey": FUNDING_KEY},
                                 headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200
        grant = (await r.json())["grantToken"]
    calls = len(harness.fake.calls)
    refused(*await post(harness, app, "/chat/completions", chat("anthropic/claude-sonnet-4"),
                        **{"x-wattfare-grant": grant}), "anthropic/claude-sonnet-4")
    assert len(harness.fake.calls) == calls
    status, _ = await post(harness, app, "/chat/completions", chat(),
                           **{"x-wattfare-grant": grant})
    assert status == 200
    async with harness.http.get(harness.api + "/grants/current",
                                headers={"Authorization": f"Bearer {app.secret_key}",
                                         "x-wattfare-grant": grant}) as r:
        assert (await r.json())["used"] == 1  # the refused call used none of it
    await nothing_spent(harness, app)


async def test_a_policy_change_applies_to_the_next_call_and_clears(harness):
    app = await harness.create_app()
    await harness.connect(app, "u", monthly_usd=5)
    user = {"x-wattfare-user": "u"}
    body = chat("anthropic/claude-sonnet-4")
    assert (await post(harness, app, "/chat/completions", body, **user))[0] == 200
    await set_policy(harness, app, models=["openai/*"])
    refused(*await post(harness, app, "/chat/completions", body, **user))
    await harness.gw.store.set_app_policy(app.app_id, AppPolicy())
    assert (await post(harness, app, "/chat/completions", body, **user))[0] == 200


async def test_a_policy_set_by_the_cli_binds_the_running_gateway(harness):
    """Another process (the CLI) writes the policy; the serving gateway's app cache
    follows within a second (SQLite's data_version, PostgreSQL's NOTIFY)."""
    app = await harness.create_app()
    await harness.connect(app, "u", monthly_usd=5)
    # This source tree's wattgate, whatever the installed one is.
    env = {**harness.db.env, "PYTHONPATH": str(Path(wattgate.__file__).parents[1])}
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "wattgate", "apps", "set-policy", app.app_id,
                         "--models", "openai/*", "--max-tokens", "64", "--json"],
        env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["policy"]["models"] == ["openai/*"]
    status = None
    for _ in range(20):
        status, body = await post(harness, app, "/chat/completions",
                                  chat("anthropic/claude-sonnet-4"), **{"x-wattfare-user": "u"})
        if status == 403:
            break
        await asyncio.sleep(0.1)
    assert status == 403


# ---- max_tokens --------------------------------------------------------------------

async def test_an_answer_longer_than_the_policy_allows_is_refused(harness):
    app = await harness.create_app()
    await harness.connect(app, "u", monthly_usd=5)
    await set_policy(harness, app, max_tokens=50)
    calls = len(harness.fake.calls)
    async with client(harness, app, "u") as oa:
        for kw in ({"max_tokens": 51}, {"max_completion_tokens": 500}):
            with pytest.raises(openai.PermissionDeniedError) as refusal:
                await oa.chat.completions.create(
                    model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                    **kw)
            message = refusal.value.body["message"]
            assert next(iter(kw)) in message and "policy limit of 50" in message
        with pytest.raises(openai.PermissionDeniedError) as refusal:
            await oa.responses.create(model="openai/gpt-4o-mini", input="hi",
                                      max_output_tokens=100)
        assert "max_output_tokens 100" in refusal.value.body["message"]
        with pytest.raises(openai.PermissionDeniedError) as refusal:  # reasoning on top
            await oa.chat.completions.create(
                model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                max_tokens=40, extra_body={"reasoning": {"max_tokens": 20}})
        assert "reasoning.max_tokens (60 tokens)" in refusal.value.body["message"]
    assert len(harness.fake.calls) == calls
    await nothing_spent(harness, app)


async def test_a_call_naming_no_limit_is_sent_with_the_policys(harness):
    app = await harness.create_app()
    await harness.connect(app, "u", monthly_usd=5)
    await set_policy(harness, app, max_tokens=50)
    async with client(harness, app, "u") as oa:
        await oa.chat.completions.create(model="openai/gpt-4o-mini",
                                         messages=[{"role": "user", "content": "hi"}])
        assert harness.fake.calls[-1].body["max_tokens"] == 50
        await oa.chat.completions.create(model="openai/gpt-4o-mini", max_tokens=50,
                                         messages=[{"role": "user", "content": "hi"}])
        assert harness.fake.calls[-1].body["max_tokens"] == 50
        # A reasoning budget leaves the answer the rest of the bound.
        await oa.chat.completions.create(model="openai/gpt-4o-mini",
                                         messages=[{"role": "user", "content": "hi"}],
                                         extra_body={"reasoning": {"max_tokens": 30}})
        assert harness.fake.calls[-1].body["max_tokens"] == 20
        await oa.responses.create(model="openai/gpt-4o-mini", input="hi")
        assert harness.fake.calls[-1].body["max_output_tokens"] == 50
    # The gateway's own default stays when it is the smaller.
    await set_policy(harness, app, max_tokens=10_000_000)
    async with client(harness, app, "u") as oa:
        await oa.chat.completions.create(model="openai/gpt-4o-mini",
                                         messages=[{"role": "user", "content": "hi"}])
    assert harness.fake.calls[-1].body["max_tokens"] == harness.gw.config.metering_default_max_tokens


# ---- caps --------------------------------------------------------------------------

async def approve(h, app, user: str, body: dict[str, Any], cookie: str | None = None,  # type: ignore[no-untyped-def]
                  ) -> tuple[int, Any, str | None]:
    """A POST /connections as the consent popup (or a forgery of it) sends it."""
    token = await h.session(app, user)
    headers = {"Authorization": f"Bearer {token}", "Origin": h.url, **SAME}
    if cookie:
        headers["Cookie"] = f"wg_presence={cookie}"
    async with h.http.post(h.api + "/connections", json=body, headers=headers) as r:
        got = r.cookies.get("wg_presence")
        return r.status, await r.json(), got.value if got is not None else cookie


async def test_a_cap_above_the_policys_largest_is_never_approved(make_harness):
    h = await make_harness({"WATTGATE_DEV__ALLOW_UNLIMITED": "true"})
    app = await h.create_app()
    await set_policy(h, app, max_cap_usd="20", suggested_cap_usd="5")
    # The forged form post: the popup's own request, with a cap the page never offered.
    for cap in (20.01, 1000, None):
        status, body, _ = await approve(h, app, "u", {"monthlyUsd": cap,
                                                      "fundingKey": FUNDING_KEY})
        refused(status, body, "at most $20.00 a month")
        assert await h.gw.store.get_connection(app.app_id, "u") is None
    # Nor through the app's session token asking for it (the body names no cap).
    token = await h.session(app, "u", monthly_usd=50)
    async with h.http.post(h.api + "/connections", json={"fundingKey": FUNDING_KEY},
                           headers={"Authorization": f"Bearer {token}", **SAME}) as r:
        refused(r.status, await r.json(), "$50.00")
    status, body, cookie = await approve(h, app, "u", {"monthlyUsd": 20,
                                                       "fundingKey": FUNDING_KEY})
    assert status == 200 and body["limits"] == {"monthlyUsd": 20}
    assert cookie
    # Raising it later, with the user's own presence cookie, is bounded the same way.
    for cap in (21, None):
        status, body, _ = await approve(h, app, "u", {"monthlyUsd": cap}, cookie)
        refused(status, body)
    async with h.http.get(h.api + "/account", headers={"Cookie": f"wg_presence={cookie}",
                                                       **SAME}) as r:
        [conn] = (await r.json())["connections"]
    assert conn["app"]["maxCapUsd"] == 20
    url = f"{h.api}/account/connections/{conn['id']}"
    for cap in (25, None):
        async with h.http.post(url, json={"monthlyUsd": cap},
                               headers={"Cookie": f"wg_presence={cookie}", **SAME}) as r:
            refused(r.status, await r.json(), "at most $20.00")
    assert (await h.status(app, "u"))["limits"] == {"monthlyUsd": 20}
    async with h.http.post(url, json={"monthlyUsd": 12.5},
                           headers={"Cookie": f"wg_presence={cookie}", **SAME}) as r:
        assert r.status == 200
    assert (await h.status(app, "u"))["limits"] == {"monthlyUsd": 12.5}


async def test_a_lowered_bound_keeps_an_approved_cap_until_its_user_changes_it(harness):
    app = await harness.create_app()
    status, _, cookie = await approve(harness, app, "u", {"monthlyUsd": 30,
                                                          "fundingKey": FUNDING_KEY})
    assert status == 200
    await set_policy(harness, app, max_cap_usd="10")
    # Kept: never clamped (nor raised) behind the user's back; calls go on.
    assert (await harness.status(app, "u"))["limits"] == {"monthlyUsd": 30}
    status, _ = await post(harness, app, "/chat/completions", chat(), **{"x-wattfare-user": "u"})
    assert status == 200
    # Saying the same cap again changes nothing, so it stands; any new one is bounded.
    status, body, _ = await approve(harness, app, "u", {"monthlyUsd": 30}, cookie)
    assert status == 200 and body["limits"] == {"monthlyUsd": 30}
    refused(*(await approve(harness, app, "u", {"monthlyUsd": 20}, cookie))[:2])
    status, body, _ = await approve(harness, app, "u", {"monthlyUsd": 10}, cookie)
    assert status == 200 and body["limits"] == {"monthlyUsd": 10}
    # A new key is a new approval: judged afresh, even at the old cap.
    refused(*(await approve(harness, app, "u", {"monthlyUsd": 30,
                                                "fundingKey": FUNDING_KEY}, cookie))[:2])


async def test_a_grants_dollar_cap_is_bounded_and_required(harness):
    app = await harness.create_app()
    await set_policy(harness, app, max_cap_usd="2")
    token = await harness.session(app, "visitor")
    for body, words in (({"requests": 3, "fundingKey": FUNDING_KEY}, "maxUsd"),
                        ({"requests": 3, "maxUsd": 2.5, "fundingKey": FUNDING_KEY}, "$2.50")):
        async with harness.http.post(harness.api + "/grants", json=body,
                                     headers={"Authorization": f"Bearer {token}"}) as r:
            refused(r.status, await r.json(), words)
    async with harness.http.post(harness.api + "/grants",
                                 json={"requests": 3, "maxUsd": 2, "fundingKey": FUNDING_KEY},
                                 headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200


async def test_the_popup_context_carries_the_policy(harness):
    app = await harness.create_app()
    await set_policy(harness, app, models=["openai/*"], max_cap_usd="20", max_tokens=500,
                     suggested_cap_usd="7.5")
    token = await harness.session(app, "u")
    async with harness.http.get(harness.api + "/consent/session",
                                headers={"Authorization": f"Bearer {token}", **SAME}) as r:
        body = await r.json()
    assert body["app"]["policy"] == {"models": ["openai/*"], "maxCapUsd": 20,
                                     "maxTokens": 500, "suggestedCapUsd": 7.5}


# ---- the console -------------------------------------------------------------------

async def test_the_console_sets_shows_and_clears_the_policy(harness):
    from test_admin_functional import sign_in

    app = await harness.create_app()
    console = await sign_in(harness)
    try:
        base = f"/admin/apps/{app.app_id}"
        r = await console.post(base + "/policy", {
            "csrf": console.csrf, "models": "OpenAI/*\r\nanthropic/claude-3.5-sonnet",
            "max_cap": "25.50", "suggested_cap": "10", "max_tokens": "800"})
        assert r.status == 303 and r.headers["Location"] == base + "?policy=saved#policy"
        got = await harness.gw.store.get_app(app.app_id)
        assert got.policy == make_policy(models=["openai/*", "anthropic/claude-3.5-sonnet"],
                                         max_cap_usd="25.50", suggested_cap_usd="10",
                                         max_tokens=800)
        status, page = await console.page(base + "?policy=saved")
        assert status == 200 and "Policy saved" in page
        assert "openai/*\nanthropic/claude-3.5-sonnet</textarea>" in page
        assert 'name="max_cap" inputmode="decimal" value="25.5"' in page
        assert 'value="800"' in page
        # Bad input changes nothing and says why; a forged form (no CSRF token) neither.
        for form, words in (({"max_cap": "5", "suggested_cap": "6"}, "must not be above"),
                            ({"max_tokens": "lots"}, "whole number"),
                            ({"models": "<script>x</script>"}, "model pattern")):
            r = await console.post(base + "/policy", {"csrf": console.csrf, **form})
            assert r.status == 400 and words in r.text_body and "<script>x" not in r.text_body
        r = await console.post(base + "/policy", {"csrf": "forged", "clear": "1"})
        assert r.status == 403
        assert (await harness.gw.store.get_app(app.app_id)).policy == got.policy
        r = await console.post(base + "/policy", {"csrf": console.csrf, "clear": "1",
                                                 "max_cap": "3"})
        assert r.status == 303
        assert (await harness.gw.store.get_app(app.app_id)).policy == AppPolicy()
    finally:
        await console.http.close()
