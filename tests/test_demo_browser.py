"""The demo app on a phone: 390 px wide, in headless Chromium, from connect to a streamed reply.

Nothing may stick out sideways (no horizontal scrolling), every control stays inside
the screen, and the consent popup, opened as a phone opens it (a full-width window),
fits too. Screenshots: artifacts/demo-390-*.png.
"""

from __future__ import annotations

import pytest

pytest.importorskip("playwright")
from chromium import shot
from playwright.async_api import Page, expect
from test_browser_functional import KEY, click_closing, open_popup

from wattgate.demo import Demo
from wattgate.fakemodel import reply_words

pytestmark = pytest.mark.browser

PHONE = {"width": 390, "height": 844}


async def fits(page: Page, *selectors: str) -> None:
    """No sideways scrolling, and each element lies within the screen's width."""
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"{page.url} is {width} px wide"
    for selector in selectors:
        box = await page.locator(selector).first.bounding_box()
        assert box is not None, selector
        assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], (selector, box)


async def test_the_demo_app_works_at_390_px(demo: Demo, browser) -> None:
    context = await browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    context.set_default_timeout(10_000)
    try:
        page = await context.new_page()
        await page.goto(demo.app_url)
        await expect(page.locator("#status")).to_contain_text("Not connected")
        await fits(page, "#connect", "#chat-input", "#send", "#convert", "#convert-text")
        await shot(page, "demo-390-start.png")

        popup = await open_popup(page, "#connect")
        await popup.set_viewport_size(PHONE)
        await expect(popup.locator("#origin-text")).to_contain_text("verified")
        await fits(popup, "#cap", "#key", "#approve")
        await popup.fill("#cap", "0.50")
        await popup.fill("#key", KEY)
        await shot(popup, "demo-390-consent.png")
        async with popup.expect_event("close"):
            await click_closing(popup, "#approve")
        await expect(page.locator("#status")).to_contain_text("$0.50 / month")

        # The chat sits right under the budget on a phone, and the reply fits the screen.
        budget = await page.locator("#budget-panel").bounding_box()
        chat = await page.locator("#chat-form").bounding_box()
        convert = await page.locator("#convert").bounding_box()
        assert budget and chat and convert
        assert budget["y"] < chat["y"] < convert["y"]
        question = "Will this long question about budgets wrap nicely on a small phone screen?"
        await page.fill("#chat-input", question)
        await page.click("#send")
        reply = page.locator(".msg.assistant").last
        await expect(reply).to_have_attribute("data-done", "1")
        assert (await reply.text_content() or "").strip() == "".join(reply_words(question))
        await expect(page.locator("#spent")).not_to_have_text("$0.00 spent")
        await fits(page, ".msg.assistant", ".msg.user", "#bar", "#cap", "#send")
        await shot(page, "demo-390-chat.png")
    finally:
        await context.close()
