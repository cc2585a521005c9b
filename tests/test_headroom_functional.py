"""Budget headroom a person can understand: refusals that say how to fit, and calls
fitted to what is left (metering.fit_to_budget), through a real gateway with the
official openai client."""

from __future__ import annotations

import re
from decimal import Decimal

import openai
import pytest

from test_grants_functional import mint_grant
from wattgate.money import usd_to_nanos

DEAR = "anthropic/claude-sonnet-4"  # $15 per million answer tokens: 4096 of them ≈ $0.0615


def client(h, app, user: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=h.api, api_key=app.secret_key, max_retries=0,
                              default_headers={"x-wattfare-user": user})


async def spend_two_cents(h, app, user: str) -> None:
    """The issue's user: a $0.05 cap with $0.03 left."""
    await h.connect(app, user, monthly_usd=0.05)
    async with client(h, app, user) as oa:
        await oa.chat.completions.create(model="fake/flat-2c",
                                         messages=[{"role": "user", "content": "hi"}])
    assert (await h.status(app, user))["remainingUsd"] == 0.03


async def refusal(h, app, user: str, **body) -> str:
    async with client(h, app, user) as oa:
        with pytest.raises(openai.APIStatusError) as e:
            await oa.chat.completions.create(
                model=body.pop("model", DEAR), messages=[{"role": "user", "content": "hi"}],
                **body)
    assert e.value.status_code == 402
    return e.value.body["message"]  # type: ignore[index]


async def test_budget_exceeded_says_what_the_call_could_cost_and_how_to_fit(make_harness):
    h = await make_harness({"WATTGATE_METERING__FIT_TO_BUDGET": "never"})
    app = await h.create_app()
    await spend_two_cents(h, app, "ann")
    message = await refusal(h, app, "ann")
    assert message.startswith("This call could cost up to $0.06")
    assert "max_tokens 4096, the gateway's default, as the request set none" in message
    assert "$0.03 is left of this month's cap of $0.05 ($0.02 spent)" in message
    fits = int(re.search(r"lower max_tokens to (\d+) or less", message).group(1))
    assert 1000 < fits < 2000
    # The advice is true: that many fit, and noticeably more do not.
    async with client(h, app, "ann") as oa:
        reply = await oa.chat.completions.create(
            model=DEAR, max_tokens=fits, messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    await h.connect(app, "bo", monthly_usd=0.05)
    async with client(h, app, "bo") as oa:
        await oa.chat.completions.create(model="fake/flat-2c",
                                         messages=[{"role": "user", "content": "hi"}])
    assert "lower max_tokens to" in await refusal(h, app, "bo", max_tokens=fits + 20)


async def test_refusal_when_nothing_fits_says_so(harness):
    app = await harness.create_app()
    await harness.connect(app, "cy", monthly_usd=0.05)
    async with client(harness, app, "cy") as oa:
        for _ in range(2):
            await oa.chat.completions.create(model="fake/flat-2c",
                                             messages=[{"role": "user", "content": "hi"}])
    message = await refusal(harness, app, "cy", model="fake/flat-2c")
    assert "$0.01 is left of this month's cap of $0.05 ($0.04 spent)" in message
    assert "Even max_tokens 1 could cost $0.02" in message


async def test_a_call_without_max_tokens_is_fitted_to_what_is_left(harness):
    """fit_to_budget's default (unset): the 4096 was the gateway's guess, not the client's."""
    app = await harness.create_app()
    await spend_two_cents(harness, app, "di")
    for stream in (False, True):
        async with client(harness, app, "di") as oa:
            raw = await oa.chat.completions.with_raw_response.create(
                model=DEAR, stream=stream, messages=[{"role": "user", "content": "hi"}])
            answer = raw.parse()
            if stream:
                async for _ in answer:
                    pass
        fitted = int(raw.headers["x-wattfare-max-tokens"])
        assert 256 <= fitted < 4096
        sent = harness.fake.calls[-1].body
        assert sent["max_tokens"] == fitted  # the hold is the worst case of what was sent
        spent = Decimal(str((await harness.status(app, "di"))["usage"]["monthlyUsd"]))
        assert spent <= Decimal("0.05")
    assert await harness.gw.store.open_holds() == 0


async def test_a_clients_own_max_tokens_is_refused_unless_always(make_harness, harness):
    app = await harness.create_app()
    await spend_two_cents(harness, app, "ed")
    message = await refusal(harness, app, "ed", max_tokens=4096)
    assert "max_tokens 4096, as the request asked" in message
    assert "lower max_tokens to" in message

    h = await make_harness({"WATTGATE_METERING__FIT_TO_BUDGET": "always"})
    app = await h.create_app()
    await spend_two_cents(h, app, "ed")
    async with client(h, app, "ed") as oa:
        raw = await oa.chat.completions.with_raw_response.create(
            model=DEAR, max_tokens=4096, max_completion_tokens=3000,
            messages=[{"role": "user", "content": "hi"}])
    fitted = int(raw.headers["x-wattfare-max-tokens"])
    sent = h.fake.calls[-1].body
    assert sent["max_tokens"] == sent["max_completion_tokens"] == fitted < 3000


async def test_below_the_minimum_the_call_is_refused(make_harness):
    h = await make_harness({"WATTGATE_METERING__FIT_MIN_TOKENS": "3000"})
    app = await h.create_app()
    await spend_two_cents(h, app, "fe")
    assert "lower max_tokens to" in await refusal(h, app, "fe")
    assert len(h.fake.calls) == 1  # only the first call reached the upstream


async def test_a_grants_max_usd_refusal_says_what_fits(make_harness):
    h = await make_harness({"WATTGATE_METERING__FIT_TO_BUDGET": "never"})
    app = await h.create_app()
    status, grant = await mint_grant(h, app, requests=3, max_usd=0.01)
    assert status == 200, grant
    async with openai.AsyncOpenAI(base_url=h.api, api_key=app.secret_key, max_retries=0,
                                  default_headers={"x-wattfare-grant": grant["grantToken"]}) as oa:
        with pytest.raises(openai.APIStatusError) as e:
            await oa.chat.completions.create(model=DEAR,
                                             messages=[{"role": "user", "content": "hi"}])
        assert e.value.body["code"] == "grant_invalid"  # type: ignore[index]
        message = e.value.body["message"]  # type: ignore[index]
        assert "$0.01 is left of this grant's maxUsd of $0.01 ($0.00 spent)" in message
        fits = int(re.search(r"lower max_tokens to (\d+) or less", message).group(1))
        await oa.chat.completions.create(model=DEAR, max_tokens=fits,
                                         messages=[{"role": "user", "content": "hi"}])
    # The refused call used none of the grant's requests; the fitted one used one.
    assert (await h.gw.store.get_grant_by_id(1)).used == 1


async def test_a_grant_is_fitted_to_its_max_usd_by_default(harness):
    app = await harness.create_app()
    status, grant = await mint_grant(harness, app, requests=2, max_usd=0.01)
    async with openai.AsyncOpenAI(base_url=harness.api, api_key=app.secret_key, max_retries=0,
                                  default_headers={"x-wattfare-grant": grant["grantToken"]}) as oa:
        raw = await oa.chat.completions.with_raw_response.create(
            model=DEAR, messages=[{"role": "user", "content": "hi"}])
    fitted = int(raw.headers["x-wattfare-max-tokens"])
    assert harness.fake.calls[-1].body["max_tokens"] == fitted < 700
    assert usd_to_nanos(harness.fake.charged) <= usd_to_nanos("0.01")


async def test_status_shows_what_calls_in_flight_hold(harness):
    """heldUsd: the worst case of each call still running, apart from what was spent."""
    from wattgate.sdk import Wattfare

    harness.fake.chunk_delay = 0.1
    app = await harness.create_app()
    await harness.connect(app, "gus", monthly_usd=1)
    wf = Wattfare(app.secret_key, base_url=harness.url)
    async with client(harness, app, "gus") as oa:
        stream = await oa.chat.completions.create(
            model=DEAR, max_tokens=1000, stream=True,
            messages=[{"role": "user", "content": "hi"}])
        status = await wf.user("gus").status()
        assert Decimal("0.015") < status.held_usd < Decimal("0.016")  # 1000 × $15/M + prompt
        assert status.usage.monthly_usd == 0 and status.remaining_usd == 1  # as the reference
        assert (await harness.status(app, "gus"))["heldUsd"] == float(status.held_usd)
        async for _ in stream:
            pass
    status = await wf.user("gus").status()
    assert status.held_usd == 0 and status.usage.monthly_usd > 0


async def test_a_reasoning_budget_is_named_and_never_lowered(make_harness):
    h = await make_harness({"WATTGATE_METERING__FIT_TO_BUDGET": "always"})
    app = await h.create_app()
    await spend_two_cents(h, app, "hal")
    # 3000 thinking tokens of the dear model alone pass the $0.03 left: nothing fits.
    message = await refusal(h, app, "hal", max_tokens=100, extra_body={
        "reasoning": {"max_tokens": 3000}})
    assert "max_tokens 100 plus reasoning.max_tokens 3000" in message
    assert "Even max_tokens 1 could cost $0.04" in message
    assert "lower reasoning.max_tokens" in message
    # A smaller budget fits once the answer is lowered; the budget is sent as asked.
    async with client(h, app, "hal") as oa:
        raw = await oa.chat.completions.with_raw_response.create(
            model=DEAR, max_tokens=2000, extra_body={"reasoning": {"max_tokens": 1000}},
            messages=[{"role": "user", "content": "hi"}])
    assert int(raw.headers["x-wattfare-max-tokens"]) < 1000
    assert h.fake.calls[-1].body["reasoning"] == {"max_tokens": 1000}
