"""The app's policy as its user sees it, in headless Chromium against ``wattgate demo``:
the consent popup shows the limits and preselects the suggested cap, a cap above
the largest is refused by the page and by the gateway, and the dashboard says the
bound and enforces it. Screenshots: /tmp/policy-*.png (and artifacts/)."""

from __future__ import annotations

from http.cookies import SimpleCookie
from typing import Any

import aiohttp
import pytest

pytest.importorskip("playwright")
from chromium import shot
from playwright.async_api import BrowserContext, Page, Route, expect
from test_browser_functional import KEY, click_closing, open_popup, status_of

from wattgate.demo import USER_COOKIE, Demo
from wattgate.policy import make_policy
from wattgate.views.state import gateway_key

pytestmark = pytest.mark.browser


async def set_policy(demo: Demo, **kw: Any) -> None:
    gw = demo.gateway[gateway_key]
    [app] = await gw.store.list_apps()
    assert await gw.store.set_app_policy(app.app_id, make_policy(**kw)) is not None


async def both_shots(page: Page, name: str) -> None:
    await shot(page, name)
    await page.screenshot(path=f"/tmp/{name}", full_page=True)


async def asking_for_no_cap(demo: Demo, page: Page) -> None:
    """The app's token route minting sessions that name no cap (the demo's asks $1)."""
    async def mint(route: Route) -> None:
        cookies = SimpleCookie((await route.request.all_headers()).get("cookie", ""))
        user = cookies[USER_COOKIE].value
        async with aiohttp.ClientSession() as http, http.post(
                (demo.local_gateway_url or demo.gateway_url) + "/api/v1/sessions",
                json={"appUserId": user},
                headers={"Authorization": f"Bearer {demo.secret_key}"}) as r:
            await route.fulfill(status=r.status, content_type="application/json",
                                body=await r.text())
    await page.route("**/api/wattfare-token", mint)


async def test_the_popup_shows_the_limits_and_preselects_the_suggested_cap(
        demo: Demo, context: BrowserContext) -> None:
    await set_policy(demo, models=["wattgate/demo-*", "openai/*"], max_cap_usd="3",
                     suggested_cap_usd="2.50", max_tokens=500)
    page = await context.new_page()
    await asking_for_no_cap(demo, page)
    await page.goto(demo.app_url)
    popup = await open_popup(page, "#connect")
    await expect(popup.locator("#origin-text")).to_contain_text("verified")
    limits = popup.locator("#limits")
    await expect(limits).to_be_visible()
    await expect(limits).to_contain_text("Caps of at most $3.00 a month")
    await expect(limits).to_contain_text("Only these models: wattgate/demo-*, openai/*")
    await expect(limits).to_contain_text("Answers of at most 500 tokens")
    await expect(popup.locator("#cap")).to_have_value("2.5")
    await expect(popup.locator("#cap-hint")).to_contain_text("up to $3.00")
    await popup.fill("#key", KEY)
    await both_shots(popup, "policy-popup.png")

    # Above the bound: the page says so and sends nothing.
    posted: list[str] = []
    popup.on("request", lambda r: posted.append(r.url) if r.method == "POST" else None)
    await popup.fill("#cap", "5")
    await popup.click("#approve")
    await expect(popup.locator("#error")).to_contain_text("at most $3.00 a month")
    assert not [u for u in posted if u.endswith("/api/v1/connections")]
    await both_shots(popup, "policy-popup-refused.png")

    await popup.fill("#cap", "3")
    async with popup.expect_event("close"):
        await click_closing(popup, "#approve")
    await expect(page.locator("#status")).to_contain_text("$3.00 / month")
    user = (await page.text_content("#user") or "").strip()
    assert (await status_of(demo, user))["limits"] == {"monthlyUsd": 3}

    # The dashboard names the bound, and the gateway refuses past it (the page does not
    # check: what the user sees is the server's answer).
    dash = await context.new_page()
    await dash.goto(demo.gateway_url + "/account")
    card = dash.locator("article.conn")
    await expect(card).to_contain_text("allows a cap of at most $3.00 a month")
    await dash.wait_for_timeout(900)  # the dashboard's activation guard
    await card.locator("input[type=number]").fill("10")
    await card.get_by_role("button", name="Save").click()
    await expect(card.locator(".alert.error")).to_contain_text("at most $3.00 a month")
    await both_shots(dash, "policy-account.png")
    assert (await status_of(demo, user))["limits"] == {"monthlyUsd": 3}


async def test_an_apps_request_above_its_own_bound_is_preselected_at_the_bound(
        demo: Demo, context: BrowserContext) -> None:
    await set_policy(demo, max_cap_usd="0.50")  # the demo app asks for $1
    page = await context.new_page()
    await page.goto(demo.app_url)
    popup = await open_popup(page, "#connect")
    await expect(popup.locator("#origin-text")).to_contain_text("verified")
    await expect(popup.locator("#cap")).to_have_value("0.5")
    await expect(popup.locator("#cap-hint")).to_contain_text("asked for $1.00")
    await expect(popup.locator("#limits")).to_contain_text("Caps of at most $0.50 a month")
    await expect(popup.locator("#limits")).not_to_contain_text("models")


async def test_a_grant_beyond_the_apps_bound_cannot_be_approved(
        demo: Demo, context: BrowserContext) -> None:
    await set_policy(demo, max_cap_usd="0.25")  # the demo's grant asks for $0.50
    page = await context.new_page()
    await page.goto(demo.app_url)
    popup = await open_popup(page, "#convert")
    await expect(popup.locator("#blocked")).to_contain_text(
        "asked for a grant of $0.50, beyond its own limit of $0.25")
    await expect(popup.locator("#limits")).to_contain_text("Grants of at most $0.25")
    await expect(popup.locator("#approve")).to_be_disabled()
    await both_shots(popup, "policy-grant-blocked.png")
