"""The admin console in headless Chromium: sign in, read the spend charts, revoke a connection.

Three weeks of metered calls go through the real proxy (the harness clock moves a
day at a time), then an operator signs in, sees the spend chart of the app and
revokes one user's connection; that user's next call is refused with
``402 not_connected``. Screenshots land in ``artifacts/``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

pytest.importorskip("playwright")
from chromium import ARTIFACTS
from playwright.async_api import Browser, Page, expect
from test_grants_functional import mint_grant, redeem

pytestmark = pytest.mark.browser

DAY = 86400
MODELS = ("openai/gpt-4o-mini", "anthropic/claude-sonnet-4", "fake/flat-3c", "fake/flat-2c")
USERS = ("dora", "eli", "farah", "gus", "hana")

@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    ctx = await browser.new_context(viewport={"width": 1200, "height": 900})
    ctx.set_default_timeout(10_000)
    p = await ctx.new_page()
    yield p
    await ctx.close()


async def chat(h, app, user: str, model: str, *, stream: bool = False,
               secret: str | None = None) -> tuple[int, dict]:
    async with h.http.post(h.api + "/chat/completions",
                           json={"model": model, "stream": stream,
                                 "messages": [{"role": "user", "content": "Summarise my notes"}]},
                           headers={"Authorization": f"Bearer {secret or app.secret_key}",
                                    "x-wattfare-user": user}) as r:
        if r.content_type == "application/json":
            return r.status, await r.json()
        await r.read()
        return r.status, {}


async def three_weeks_of_traffic(h) -> tuple:
    """Two apps, five users, a few calls a day over 21 days, through the metered proxy."""
    h.clock.now = time.time() - 20 * DAY
    notes = await h.create_app("Acme Notes", "https://notes.acme.example")
    tutor = await h.create_app("Tutor Bot", "https://tutor.example")
    for i, user in enumerate(USERS):
        await h.connect(notes, user, monthly_usd=[5, 10, 20, 10, 2][i])
    await h.connect(tutor, "ivan", monthly_usd=10)
    calls = 0
    for day in range(21):
        for i, user in enumerate(USERS):
            if (day + i) % (i + 2) == 0 or (user == "dora" and day % 2 == 0):
                model = MODELS[(day + i) % len(MODELS)]
                status, body = await chat(h, notes, user, model, stream=day % 3 == 0)
                assert status in (200, 402), body  # a small cap may run out: that is real
                calls += status == 200
        if day % 2:
            assert (await chat(h, tutor, "ivan", "fake/flat-2c"))[0] == 200
        if day == 18:
            status, grant = await mint_grant(h, notes, requests=5, max_usd=1, user="visitor")
            assert status == 200, grant
            assert (await redeem(h, notes, grant["grantToken"]))[0] == 200
        h.clock.advance(DAY)
    h.clock.now = time.time()
    return notes, tutor, calls


async def test_sign_in_see_spend_revoke_connection(make_harness, page: Page):
    h = await make_harness({"WATTGATE_LIMITS__CHAT_PER_MINUTE": "1000"})
    notes, _, calls = await three_weeks_of_traffic(h)
    assert calls > 20
    ARTIFACTS.mkdir(exist_ok=True)

    await page.goto(h.url + "/admin")
    await page.fill("#token", "not the token")
    await page.click("button[type=submit]")
    await expect(page.get_by_role("alert")).to_contain_text("not the admin token")
    await page.screenshot(path=str(ARTIFACTS / "admin-login.png"))
    await page.fill("#token", h.gw.keys.admin_token)
    await page.click("button[type=submit]")
    await expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    by_app = page.locator("#spend-by-app")
    await expect(by_app.locator(".legend")).to_contain_text("Acme Notes")
    await expect(by_app.locator(".legend")).to_contain_text("Tutor Bot")
    assert await by_app.locator("svg.chart rect").count() >= 21
    await expect(page.locator("#top-users")).to_contain_text("dora")
    await page.screenshot(path=str(ARTIFACTS / "admin-overview.png"), full_page=True)

    await page.get_by_role("link", name="Apps").click()
    await expect(page.get_by_role("heading", name="Apps")).to_be_visible()
    await page.screenshot(path=str(ARTIFACTS / "admin-apps.png"), full_page=True)
    await page.get_by_role("link", name="Acme Notes").click()
    await expect(page.locator("#grants .badge")).to_have_text(["expired"])
    chart = page.locator("#spend-chart")
    await expect(chart.locator(".legend")).to_contain_text("anthropic/claude-sonnet-4")
    bars = await chart.locator("svg.chart rect").count()
    assert bars >= 15
    # The bar's tooltip names the day, the model and the exact amount.
    assert "$" in (await chart.locator("svg.chart rect title").first.text_content())
    await page.get_by_role("link", name="90 days").click()
    await expect(page).to_have_url(f"{h.url}/admin/apps/{notes.app_id}?days=90")
    assert await chart.locator("svg.chart rect").count() == bars
    await page.screenshot(path=str(ARTIFACTS / "admin-app.png"), full_page=True)

    dora = page.locator('tr[data-user="dora"]')
    await expect(dora.locator(".badge")).to_have_text("active")
    assert (await chat(h, notes, "dora", "fake/flat-2c"))[0] == 200
    await dora.get_by_role("button", name="Revoke dora").click()
    await expect(dora.locator(".badge")).to_have_text("revoked")
    await expect(page.get_by_role("status")).to_contain_text(
        "Revoked the connection of dora: their next call is refused with 402 not_connected")
    await expect(dora.get_by_role("button")).to_have_count(0)
    await dora.scroll_into_view_if_needed()
    await page.screenshot(path=str(ARTIFACTS / "admin-revoked.png"))

    status, body = await chat(h, notes, "dora", "fake/flat-2c")
    assert (status, body["error"]["code"]) == (402, "not_connected")
    assert (await chat(h, notes, "eli", "fake/flat-2c"))[0] == 200  # others unaffected

    # Rotating the secret asks first (how long the old key may keep working: 24 hours
    # unless told), then shows the new key once; the old one works until retired.
    await page.goto(f"{h.url}/admin/apps/{notes.app_id}")
    await page.get_by_role("link", name="Rotate secret key").click()
    await expect(page.get_by_role("heading", name="Rotate the secret key of Acme Notes?")) \
        .to_be_visible()
    await expect(page.get_by_label("The current key keeps working for")).to_have_value("24h")
    await page.screenshot(path=str(ARTIFACTS / "admin-rotate-confirm.png"))
    await page.get_by_role("button", name="Rotate the secret key now").click()
    new_secret = (await page.locator("#secret-key").text_content()).strip()
    await expect(page.locator("#previous-until")).to_contain_text("keeps working until")
    await page.screenshot(path=str(ARTIFACTS / "admin-secret-shown.png"))
    assert new_secret.startswith(f"sk_live_{notes.app_id}_") and new_secret != notes.secret_key
    assert (await chat(h, notes, "eli", "fake/flat-2c"))[0] == 200  # the old one, rolling
    old_secret, notes.secret_key = notes.secret_key, new_secret
    assert (await chat(h, notes, "eli", "fake/flat-2c"))[0] == 200

    await page.get_by_role("link", name="Continue to the app").click()
    await expect(page.locator("#previous-secret")).to_contain_text("valid until")
    await page.locator("#keys").scroll_into_view_if_needed()
    await page.screenshot(path=str(ARTIFACTS / "admin-previous-secret.png"))
    await page.get_by_role("button", name="Retire the previous secret key now").click()
    await expect(page.locator("#keys").get_by_role("status")).to_contain_text(
        "The previous secret key no longer works")
    await expect(page.locator("#previous-secret")).to_have_count(0)
    await page.locator("#keys").scroll_into_view_if_needed()
    await page.screenshot(path=str(ARTIFACTS / "admin-secret-retired.png"))
    status, body = await chat(h, notes, "eli", "fake/flat-2c", secret=old_secret)
    assert (status, body["error"]["code"]) == (401, "auth")
    assert (await chat(h, notes, "eli", "fake/flat-2c"))[0] == 200

    # A leaked key: no overlap, the old one stops at once.
    await page.get_by_role("link", name="Rotate secret key").click()
    await page.get_by_label("The current key keeps working for").select_option("0")
    await page.get_by_role("button", name="Rotate the secret key now").click()
    await expect(page.locator("#previous-until")).to_contain_text("stopped working just now")
    assert (await chat(h, notes, "eli", "fake/flat-2c"))[0] == 401
    notes.secret_key = (await page.locator("#secret-key").text_content()).strip()
    assert (await chat(h, notes, "eli", "fake/flat-2c"))[0] == 200
