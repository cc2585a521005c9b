"""The console's webhooks in headless Chromium: set an endpoint (its secret shown once),
watch deliveries fail then succeed, resend one, stop sending. Screenshots in ``artifacts/``."""

from __future__ import annotations

import asyncio
import pytest

pytest.importorskip("playwright")
from chromium import ARTIFACTS
from playwright.async_api import Page, expect
from test_admin_browser import page  # noqa: F401 (a fixture: a 1200 × 900 page)
from test_webhooks_functional import FAST, receiver, settled  # noqa: F401 (a fixture)

from wattgate.sdk import verify_webhook

pytestmark = pytest.mark.browser


async def test_set_an_endpoint_see_deliveries_resend_and_stop(make_harness, receiver,  # noqa: F811
                                                                page: Page):  # noqa: F811
    h = await make_harness({**FAST, "WATTGATE_WEBHOOKS__GIVE_UP": "5"})
    app = await h.create_app("Acme Notes", "https://notes.acme.example")
    ARTIFACTS.mkdir(exist_ok=True)
    await page.goto(h.url + "/admin")
    await page.fill("#token", h.gw.keys.admin_token)
    await page.click("button[type=submit]")
    await page.goto(f"{h.url}/admin/apps/{app.app_id}")
    hooks = page.locator("#webhooks")
    await expect(hooks).to_contain_text("No endpoint")

    # A bad URL is refused in one line, nothing stored.
    await hooks.get_by_label("Webhook endpoint URL").fill("ftp://example.com/x")
    await hooks.get_by_role("button", name="Set endpoint").click()
    await expect(page.locator("body")).to_contain_text("must start with http:// or https://")
    assert await h.gw.store.get_webhook(app.app_id) is None

    await page.goto(f"{h.url}/admin/apps/{app.app_id}")
    await hooks.get_by_label("Webhook endpoint URL").fill(receiver.url)
    await hooks.get_by_role("button", name="Set endpoint").click()
    secret = (await page.locator("#webhook-secret").text_content() or "").strip()
    assert secret.startswith("whsec_")
    await page.screenshot(path=str(ARTIFACTS / "admin-webhook-secret.png"))
    await page.get_by_role("link", name="Continue to the app").click()
    await expect(page.locator("#webhook-url")).to_have_text(receiver.url)
    assert secret not in await page.content()  # shown once, never again

    receiver.answers = [500]
    await h.connect(app, "dora", monthly_usd=5)   # the receiver fails it
    await receiver.wait(1)
    h.clock.advance(10)  # the retry would end past the 5 s given: failed
    [failed] = await settled(h, app.app_id)
    assert failed.status == "failed"
    await h.connect(app, "eli", monthly_usd=5)
    await settled(h, app.app_id)
    await page.reload()
    rows = page.locator("table.deliveries tbody tr")
    await expect(rows).to_have_count(2)
    dora = page.locator(f'tr[data-event="{failed.public_id}"]')
    await expect(dora.locator(".badge")).to_have_text("failed")
    await expect(dora).to_contain_text("HTTP 500")
    await expect(rows.first.locator(".badge")).to_have_text("delivered")
    await page.screenshot(path=str(ARTIFACTS / "admin-webhooks.png"), full_page=True)

    await dora.get_by_role("button", name=f"Resend {failed.public_id}").click()
    await expect(page.get_by_role("status")).to_contain_text("Queued for delivery again")
    [again] = [e for e in await settled(h, app.app_id) if e.public_id == failed.public_id]
    assert again.status == "delivered" and again.attempts == 2
    await page.reload()
    await expect(dora.locator(".badge")).to_have_text("delivered")
    await expect(dora).to_contain_text("HTTP 204")
    got = [verify_webhook(raw, headers["Wattgate-Signature"], secret, tolerance=600)
           for headers, raw, _ in receiver.got]
    assert [e["id"] for e in got].count(failed.public_id) == 2

    await page.get_by_role("button", name="Stop sending webhooks").click()
    await expect(page.get_by_role("status")).to_contain_text("Webhooks stopped")
    await expect(hooks).to_contain_text("No endpoint")
    await page.screenshot(path=str(ARTIFACTS / "admin-webhooks-stopped.png"), full_page=True)
    await h.connect(app, "farah")
    await asyncio.sleep(0.2)
    assert len(await h.gw.store.recent_webhooks(app.app_id)) == 2
