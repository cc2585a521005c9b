"""The consent popup against the attacks and setups issue 14 names, in headless Chromium.

- A gateway on plain http at a hostname other than localhost (a LAN or staging
  host): Chromium sends no ``Sec-Fetch-*`` there, and no ``Origin`` on a GET.
- Double-click-jacking: the page that opens the popup places a click where
  Approve will be, a moment after the popup opens.

Each test runs ``wattgate demo``'s three servers, as ``test_browser_functional`` does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

pytest.importorskip("playwright")
from chromium import CHROMIUM, CHROMIUM_ARGS, shot
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect
from playwright.async_api import Error as PlaywrightError
from test_browser_functional import KEY, approve_connect, click_closing, open_popup, status_of

from wattgate.consent import PRESENCE_COOKIE
from wattgate.demo import Demo, start_demo

pytestmark = pytest.mark.browser

LAN_HOST = "wattgate.test"


@pytest.fixture
async def lan_browser() -> AsyncIterator[Browser]:
    """Chromium resolving wattgate.test to this machine: a non-localhost, non-secure origin."""
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=[
            *CHROMIUM_ARGS, f"--host-resolver-rules=MAP {LAN_HOST} 127.0.0.1"])
        yield b
        await b.close()


@pytest.fixture
async def lan_demo(tmp_path: Path) -> AsyncIterator[Demo]:
    d = await start_demo(data_dir=tmp_path / "demo", chunk_delay=0.01, gateway_hostname=LAN_HOST)
    yield d
    await d.close()


async def test_the_popup_works_on_plain_http_at_a_lan_hostname(
        lan_demo: Demo, lan_browser: Browser) -> None:
    assert lan_demo.gateway_url.startswith(f"http://{LAN_HOST}:")
    context = await lan_browser.new_context(viewport={"width": 1100, "height": 760})
    context.set_default_timeout(10_000)
    statuses: list[tuple[str, int]] = []
    context.on("response", lambda r: statuses.append((r.url, r.status)))
    page = await context.new_page()
    await page.goto(lan_demo.app_url)
    popup = await open_popup(page, "#connect")
    assert await popup.evaluate("window.isSecureContext") is False
    await expect(popup.locator("#origin-text")).to_contain_text("verified")
    # Connect with OpenRouter needs a secure page (Web Crypto); the popup says so.
    await expect(popup.locator("#oauth")).to_be_hidden()
    await expect(popup.locator("#oauth-insecure")).to_be_visible()
    await popup.fill("#cap", "0.40")
    await popup.fill("#key", KEY)
    await shot(popup, "consent-lan-http.png")
    async with popup.expect_event("close"):
        await click_closing(popup, "#approve")
    await expect(page.locator("#status")).to_contain_text("$0.40 / month")
    user = (await page.text_content("#user") or "").strip()
    assert (await status_of(lan_demo, user))["limits"] == {"monthlyUsd": 0.4}
    assert not [s for s in statuses if s[0].startswith(lan_demo.gateway_url) and s[1] == 401]

    # The dashboard on the same host lists it, keyed by the cookie the approval set.
    dash = await context.new_page()
    await dash.goto(lan_demo.gateway_url + "/account")
    await expect(dash.locator("article.conn")).to_have_count(1)
    await expect(dash.locator("article.conn")).to_contain_text("Demo Notes")
    await context.close()


# ---- double-click-jacking ---------------------------------------------------------------------
def approvals_posted(context: BrowserContext) -> list[str]:
    """Every approval the popup sends (POST /connections or /grants), as it happens."""
    posted: list[str] = []
    context.on("request", lambda r: posted.append(r.url) if r.method == "POST" and (
        r.url.endswith("/api/v1/connections") or r.url.endswith("/api/v1/grants")) else None)
    return posted


async def connected_user(demo: Demo, page: Page, cap: str) -> None:
    """A returning user: connected once in this browser, with a cap."""
    await page.goto(demo.app_url)
    popup = await open_popup(page, "#connect")
    await popup.fill("#cap", cap)
    await popup.fill("#key", KEY)
    async with popup.expect_event("close"):
        await click_closing(popup, "#approve")
    await expect(page.locator("#status")).to_contain_text(f"${cap} / month")


async def clickjack(page: Page, button: str, target: str = "#approve",
                    until: float = 0.6) -> Page:
    """What a hostile opener does: open the popup from the user's click, then keep
    double-clicking where ``target`` will be (the user's next clicks) from 150 ms on."""
    opened = time.monotonic()
    async with page.expect_popup() as info:
        await page.click(button)
    popup = await info.value
    x, y = 0.0, 0.0
    while time.monotonic() - opened < until and not popup.is_closed():
        try:
            box = await popup.locator(target).first.bounding_box(timeout=100)
            if box:
                x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            if time.monotonic() - opened >= 0.15 and x:
                await popup.mouse.dblclick(x, y)
        except PlaywrightError:
            pass  # not laid out yet, or closed by an approval (the caller sees that)
        await asyncio.sleep(0.03)
    return popup


async def test_a_click_placed_by_the_opener_approves_no_grant(
        demo: Demo, context: BrowserContext) -> None:
    page = await context.new_page()
    await connected_user(demo, page, "0.50")
    posted = approvals_posted(context)
    popup = await clickjack(page, "#convert")
    assert not popup.is_closed() and posted == []
    # The existing budget is offered, never preselected: Approve alone approves nothing.
    await expect(popup.locator("#use-existing-choice")).to_be_visible()
    await expect(popup.locator("#use-existing")).not_to_be_checked()
    await expect(popup.locator("#approve")).to_be_enabled()
    await popup.mouse.click(*await center(popup, "#approve"))
    await expect(popup.locator("#error")).to_contain_text("Choose how to pay")
    assert posted == [] and not popup.is_closed()
    await shot(popup, "consent-grant-choose.png")
    # The user chooses deliberately, waits to read, and approves.
    await popup.check("#use-existing")
    await expect(popup.locator("#approve")).to_be_disabled()  # re-armed by the choice
    async with popup.expect_event("close"):
        await click_closing(popup, "#approve")
    await expect(page.locator("#convert-result")).to_contain_text("“Rewrite this as a headline:")
    assert len(posted) == 1


async def test_a_click_placed_by_the_opener_approves_no_cap(
        demo: Demo, context: BrowserContext) -> None:
    page = await context.new_page()
    await connected_user(demo, page, "0.20")
    posted = approvals_posted(context)
    popup = await clickjack(page, "#connect")
    assert not popup.is_closed() and posted == []
    # Losing focus or visibility disarms Approve; it re-arms only after a fresh delay.
    await expect(popup.locator("#approve")).to_be_enabled()
    await popup.evaluate("window.dispatchEvent(new Event('blur'))")
    assert await popup.locator("#approve").is_disabled()
    await expect(popup.locator("#approve")).to_be_enabled()
    await popup.fill("#cap", "0.90")
    await popup.check("#use-existing")
    async with popup.expect_event("close"):
        await click_closing(popup, "#approve")
    await expect(page.locator("#status")).to_contain_text("$0.90 / month")
    assert len(posted) == 1


async def test_a_new_users_popup_ignores_early_clicks_too(
        demo: Demo, context: BrowserContext) -> None:
    page = await context.new_page()
    await page.goto(demo.app_url)
    posted = approvals_posted(context)
    popup = await clickjack(page, "#connect")
    assert posted == [] and not popup.is_closed()
    await expect(popup.locator("#error")).to_be_hidden()  # not even a "paste your key" error


async def test_a_page_that_opens_the_dashboard_cannot_revoke_with_a_double_click(
        demo: Demo, context: BrowserContext) -> None:
    page = await context.new_page()
    await connected_user(demo, page, "0.20")
    dash = await clickjack(page, "#manage", "article.conn button.danger")
    card = dash.locator("article.conn").first
    await expect(card.locator(".badge")).to_have_text("Connected")
    await expect(card.locator("button.danger")).to_have_text("Revoke")  # not even half-way
    # The user revokes deliberately: the confirmation takes its own click, after a pause.
    await card.locator("button.danger").click()
    await expect(card.locator("button.danger")).to_be_disabled()
    await expect(card.locator("button.danger")).to_have_text("Revoke Demo Notes's access")
    await card.locator("button.danger").click()
    await expect(card.locator(".badge")).to_have_text("Revoked")


async def center(page: Page, selector: str) -> tuple[float, float]:
    box = await page.locator(selector).bounding_box()
    assert box
    return box["x"] + box["width"] / 2, box["y"] + box["height"] / 2


# ---- presence-cookie fixation -----------------------------------------------------------------
async def own_presence_value(demo: Demo) -> str:
    """The planter approves a connection of their own and keeps the cookie it gave them."""
    base = demo.local_gateway_url or demo.gateway_url
    auth = {"Authorization": f"Bearer {demo.secret_key}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/api/v1/sessions", headers=auth,
                             json={"appUserId": "planter"}) as r:
            token = (await r.json())["token"]
        async with http.post(base + "/api/v1/connections",
                             json={"monthlyUsd": 1, "fundingKey": "sk-or-v1-" + "f" * 48},
                             headers={"Authorization": f"Bearer {token}",
                                      "Sec-Fetch-Site": "same-origin"}) as r:
            assert r.status == 200
            return r.cookies[PRESENCE_COOKIE].value


async def dashboard_as(demo: Demo, value: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(
            (demo.local_gateway_url or demo.gateway_url) + "/api/v1/account",
            headers={"Sec-Fetch-Site": "same-origin",
                     "Cookie": f"{PRESENCE_COOKIE}={value}"}) as r:
        return await r.json()


async def test_a_cookie_planted_before_the_approval_gets_its_planter_nothing(
        demo: Demo, context: BrowserContext) -> None:
    planted = await own_presence_value(demo)
    # Set as a service on another port of the same host would: same host, Path=/.
    host = demo.gateway_url.split("://", 1)[1].split(":")[0]
    await context.add_cookies([{"name": PRESENCE_COOKIE, "value": planted, "domain": host,
                                "path": "/", "httpOnly": True, "sameSite": "Strict"}])
    page = await context.new_page()
    await page.goto(demo.app_url)
    await approve_connect(page, "0.30")
    await expect(page.locator("#status")).to_contain_text("$0.30 / month")

    [now] = [c["value"] for c in await context.cookies(demo.gateway_url)
             if c["name"] == PRESENCE_COOKIE]
    assert now != planted
    seen = await dashboard_as(demo, planted)
    assert not any(c["app"]["name"] == "Demo Notes" and c["status"]["limits"] ==
                   {"monthlyUsd": 0.3} for c in seen["connections"])
    # The user's own browser lists it (and the planter's connection it was handed).
    dash = await context.new_page()
    await dash.goto(demo.gateway_url + "/account")
    await expect(dash.locator("article.conn").filter(has_text="$0.30")).to_have_count(1)
