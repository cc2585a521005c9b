"""The consent popup, the client SDK and the dashboard, driven in headless Chromium.

Every test runs ``wattgate demo``'s three servers (gateway, fake OpenRouter, the
"Demo Notes" example app on a second origin) and clicks through them as a user
would. Screenshots of the popup and the dashboard land in ``artifacts/``.
"""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

pytest.importorskip("playwright")
from chromium import shot
from playwright.async_api import BrowserContext, Error as PlaywrightError, Page, expect

from wattgate.demo import Demo, start_demo

pytestmark = pytest.mark.browser

KEY = "sk-or-v1-" + "d" * 48

async def click_closing(popup: Page, selector: str) -> None:
    """Click a button whose click closes the popup (window.close()).

    The page may close while Playwright still finishes the click: that is the
    expected outcome here (the caller awaits the "close" event), not a failure.
    """
    try:
        await popup.click(selector, no_wait_after=True)
    except PlaywrightError:
        if not popup.is_closed():
            raise


async def open_popup(page: Page, button: str) -> Page:
    async with page.expect_popup() as info:
        await page.click(button)
    popup = await info.value
    await popup.wait_for_load_state()
    return popup


async def approve_connect(page: Page, cap: str, key: str = KEY, screenshot: str | None = None) -> None:
    popup = await open_popup(page, "#connect")
    await expect(popup.locator("#origin-text")).to_contain_text("verified")
    await popup.fill("#cap", cap)
    await popup.fill("#key", key)
    if screenshot:
        await shot(popup, screenshot)
    async with popup.expect_event("close"):
        await click_closing(popup, "#approve")


async def bar_width(page: Page) -> float:
    return await page.eval_on_selector("#bar", "el => parseFloat(el.style.width || '0')")


async def status_of(demo: Demo, user: str) -> dict[str, Any]:
    """What the app's server reads, over loopback (the browser may know the gateway by a name)."""
    async with aiohttp.ClientSession() as http, http.get(
            (demo.local_gateway_url or demo.gateway_url) + "/api/v1/status", params={"appUserId": user},
            headers={"Authorization": f"Bearer {demo.secret_key}"}) as r:
        return await r.json()


async def test_connect_chat_and_revoke_from_dashboard(demo: Demo, context: BrowserContext) -> None:
    page = await context.new_page()
    await page.goto(demo.app_url)
    await expect(page.locator("#status")).to_contain_text("Not connected")

    popup = await open_popup(page, "#connect")
    # The popup names the app and the site asking, verified by the handshake.
    await expect(popup.locator("#app-name")).to_have_text("Demo Notes")
    await expect(popup.locator("#origin-text")).to_contain_text(
        demo.app_url.removeprefix("http://") + " · verified")
    await expect(popup.locator("#approve")).to_be_enabled()
    # The cap the app asked for in its session token is prefilled; the user picks another.
    await expect(popup.locator("#cap")).to_have_value("1")
    await expect(popup.locator("#cap-hint")).to_contain_text("Demo Notes asked for $1.00 a month")
    assert "token" not in popup.url and "#" not in popup.url
    await popup.fill("#cap", "0.25")
    await popup.fill("#key", KEY)
    await shot(popup, "consent-connect.png")
    async with popup.expect_event("close"):
        await click_closing(popup, "#approve")

    await expect(page.locator("#status")).to_contain_text("Connected")
    await expect(page.locator("#status")).to_contain_text("$0.25 / month")
    await expect(page.locator("#cap")).to_contain_text("$0.25 left of $0.25")
    assert await bar_width(page) == 0

    # A chat reply streams in: text is visible before the reply is complete.
    await page.fill("#chat-input", "What does metering mean?")
    await page.click("#send")
    await page.wait_for_function(
        "() => { const r = document.querySelector('.msg.assistant');"
        " return r && r.textContent.length > 0 && !r.dataset.done; }")
    reply = page.locator(".msg.assistant").last
    await expect(reply).to_have_attribute("data-done", "1")
    assert (await reply.text_content() or "").startswith("You wrote 4 words: “What does metering mean?”.")
    # ... and the budget bar moves by what the call cost.
    await expect(page.locator("#spent")).not_to_have_text("$0.00 spent")
    assert 0 < await bar_width(page) < 100
    await shot(page, "demo-app-connected.png")
    user = (await page.text_content("#user") or "").strip()
    status = await status_of(demo, user)
    assert status["connected"] is True and status["limits"] == {"monthlyUsd": 0.25}
    assert 0 < status["usage"]["monthlyUsd"] < 0.25

    # The session token never travelled in a URL the browser requested.
    token_calls = [u for u in context.seen_urls if "eyJ" in u]  # type: ignore[attr-defined]
    assert token_calls == []

    # The app links to the user's dashboard: the app, its cap, the spend and the last call.
    dash = await open_popup(page, "#manage")
    card = dash.locator("article.conn").first
    await expect(card.locator("h2")).to_have_text("Demo Notes")
    await expect(card.locator(".badge")).to_have_text("Connected")
    await expect(card.locator(".cap")).to_have_text("of $0.25 cap")
    await expect(card.locator("table.calls tbody tr")).to_have_count(1)
    await expect(card.locator("table.calls tbody tr td").nth(1)).to_have_text("wattgate/demo-chat")
    assert "What does metering mean" not in await dash.content()  # prompts are never shown
    await shot(dash, "dashboard.png")

    # Change the cap from the dashboard: the app sees it.
    await card.locator("input[type=number]").fill("0.4")
    await card.get_by_role("button", name="Save cap").click()
    await expect(dash.locator("article.conn .cap")).to_have_text("of $0.40 cap")
    await page.evaluate("window.dispatchEvent(new Event('focus'))")
    await expect(page.locator("#status")).to_contain_text("$0.40 / month")
    card = dash.locator("article.conn").first

    # Revoke (with a confirmation step), then the app shows disconnected.
    await card.locator("button.danger").click()
    await expect(card.locator("button.danger")).to_have_text("Revoke Demo Notes's access")
    await card.locator("button.danger").click()
    await expect(dash.locator("article.conn .badge")).to_have_text("Revoked")
    await shot(dash, "dashboard-revoked.png")
    await page.bring_to_front()
    await expect(page.locator("#status")).to_contain_text("Not connected", timeout=8000)
    assert (await status_of(demo, user))["connected"] is False


async def test_returning_user_raises_cap_without_a_key(demo: Demo, context: BrowserContext) -> None:
    page = await context.new_page()
    await page.goto(demo.app_url)
    await approve_connect(page, "0.20")
    await expect(page.locator("#status")).to_contain_text("$0.20 / month")

    popup = await open_popup(page, "#connect")
    await expect(popup.locator("#returning")).to_be_visible()
    await expect(popup.locator("#cap")).to_have_value("0.2")
    # Paying from the existing budget is the user's choice, never preselected.
    await expect(popup.locator("#use-existing")).not_to_be_checked()
    await popup.check("#use-existing")
    await expect(popup.locator("#key")).to_be_hidden()
    await expect(popup.locator("#approve")).to_have_text("Update cap")
    await popup.fill("#cap", "0.75")
    await shot(popup, "consent-returning.png")
    async with popup.expect_event("close"):
        await click_closing(popup, "#approve")
    await expect(page.locator("#status")).to_contain_text("$0.75 / month")


async def test_one_request_grant_is_used_up(demo: Demo, context: BrowserContext) -> None:
    page = await context.new_page()
    await page.goto(demo.app_url)
    popup = await open_popup(page, "#convert")
    await expect(popup.locator("#origin-text")).to_contain_text("verified")
    await expect(popup.locator("#ask")).to_have_text("wants to make 1 AI request on your budget")
    await expect(popup.locator("#grant-requests")).to_have_text("1")
    await expect(popup.locator("#grant-max")).to_have_text("$0.50")
    await expect(popup.locator("#cap")).to_be_hidden()
    await popup.fill("#key", KEY)
    await shot(popup, "consent-grant.png")
    async with popup.expect_event("close"):
        await click_closing(popup, "#approve")

    await expect(page.locator("#convert-result")).to_contain_text("“Rewrite this as a headline:")
    await expect(page.locator("#convert-notice")).to_have_text("Done. 0 requests left on this grant.")
    await page.click("#convert-again")
    await expect(page.locator("#convert-notice")).to_contain_text("Grant used up")
    await shot(page, "demo-app-grant-used.png")
    # A grant is not a connection: the app still shows no budget.
    await expect(page.locator("#status")).to_contain_text("Not connected")


async def test_closing_the_popup_is_a_denial(demo: Demo, context: BrowserContext) -> None:
    page = await context.new_page()
    await page.goto(demo.app_url)
    popup = await open_popup(page, "#connect")
    await expect(popup.locator("#approve")).to_be_enabled()
    await popup.close()
    await expect(page.locator("#status")).to_contain_text("Not connected")
    await expect(page.locator("#status")).not_to_contain_text("Checking")

    popup = await open_popup(page, "#convert")
    await expect(popup.locator("#approve")).to_be_enabled()
    await popup.close()
    await expect(page.locator("#convert-notice")).to_have_text("No grant: the request was denied.")

    # The Deny button is a denial too.
    popup = await open_popup(page, "#connect")
    await expect(popup.locator("#approve")).to_be_enabled()
    async with popup.expect_event("close"):
        await click_closing(popup, "#deny")
    await expect(page.locator("#status")).to_contain_text("Not connected")
    user = (await page.text_content("#user") or "").strip()
    assert (await status_of(demo, user))["connected"] is False


EVIL_PAGE = """<!doctype html><title>Totally Demo Notes</title>
<button id="go">Connect</button><pre id="out"></pre>
<script type="module">
const cfg = %s;
const { createWattfare } = await import(cfg.gateway + "/sdk/client.js");
const wf = createWattfare({ publishableKey: cfg.pk, baseURL: cfg.gateway,
  session: async () => ({ token: cfg.token, expiresAt: Math.floor(Date.now() / 1000) + 600 }) });
window.heard = [];
addEventListener("message", (e) => window.heard.push(e.data));
document.getElementById("go").onclick = async () => {
  window.result = await wf.connect();
  document.getElementById("out").textContent = JSON.stringify(window.result);
};
</script>"""


async def test_unregistered_origin_cannot_complete_the_handshake(
        demo: Demo, context: BrowserContext, aiohttp_server: Any) -> None:
    # The worst case: a page elsewhere holds the app's publishable key and even a valid
    # session token for one of its users.
    async with aiohttp.ClientSession() as http, http.post(demo.gateway_url + "/api/v1/sessions",
                         headers={"Authorization": f"Bearer {demo.secret_key}"},
                         json={"appUserId": "victim"}) as r:
        stolen = (await r.json())["token"]
    evil_html = EVIL_PAGE % json.dumps({"gateway": demo.gateway_url, "pk": demo.publishable_key,
                                        "token": stolen})
    async def evil_page(request: web.Request) -> web.Response:
        return web.Response(text=evil_html, content_type="text/html")
    evil = web.Application()
    evil.router.add_get("/", evil_page)
    server = await aiohttp_server(evil)
    evil_url = f"http://localhost:{server.port}/"

    page = await context.new_page()
    await page.goto(evil_url)
    popup = await open_popup(page, "#go")
    await expect(popup.locator("#blocked")).to_contain_text(
        f"localhost:{server.port} is not a site of Demo Notes")
    await expect(popup.locator("#origin-dot")).to_have_class("dot bad")
    await expect(popup.locator("#approve")).to_be_disabled()
    await expect(popup.locator("#key")).to_be_disabled()
    await shot(popup, "consent-unregistered-origin.png")
    await expect(popup.locator("#cap")).to_be_hidden()
    # Even forcing the form cannot send a result to the page.
    await popup.evaluate("document.getElementById('key').disabled = false;"
                         f"document.getElementById('key').value = {KEY!r};"
                         "document.getElementById('approve').disabled = false;"
                         "document.getElementById('consent-form').requestSubmit()")
    await asyncio.sleep(0.3)
    async with popup.expect_event("close"):
        await click_closing(popup, "#deny")
    await page.wait_for_function("() => window.result !== undefined")
    heard = await page.evaluate("window.heard")
    assert heard and all(m.get("type") == "hello" for m in heard)
    assert (await page.evaluate("window.result"))["connected"] is False
    assert (await status_of(demo, "victim"))["connected"] is False


async def test_connect_with_openrouter_oauth(demo: Demo, context: BrowserContext) -> None:
    page = await context.new_page()
    await page.goto(demo.app_url)
    popup = await open_popup(page, "#connect")
    await expect(popup.locator("#oauth")).to_be_enabled()
    await expect(popup.locator("#oauth-hint")).to_contain_text("stops itself at your monthly cap")
    await popup.fill("#cap", "0.30")
    async with popup.expect_popup() as info:
        await popup.click("#oauth")
    signin = await info.value
    # The fake OpenRouter sends the user straight back with a code; the window closes.
    await signin.wait_for_event("close")
    await expect(popup.locator("#oauth-done")).to_be_visible()
    await expect(popup.locator("#key")).to_be_hidden()
    # The popup says what the user got: OpenRouter itself stops the key at the cap.
    await expect(popup.locator("#oauth-limit")).to_contain_text(
        "OpenRouter itself also stops this key at $0.30 a month")
    await expect(popup.locator("#cap")).to_be_disabled()
    await shot(popup, "consent-oauth-done.png")
    async with popup.expect_event("close"):
        await click_closing(popup, "#approve")
    await expect(page.locator("#status")).to_contain_text("$0.30 / month")
    assert demo.fake.oauth_codes == {}  # the code was exchanged (and only once)
    # The key OpenRouter made has its own credit limit: the approved cap, every month,
    # labelled with the app's name.
    [(key, made)] = demo.fake.keys.items()
    assert (made.limit, made.usage_limit_type, made.label) == \
        (Decimal("0.30"), "monthly", "Demo Notes")

    # A higher cap on the dashboard cannot raise the key's own limit: the dashboard says so.
    dash = await open_popup(page, "#manage")
    card = dash.locator("article.conn").first
    await card.locator("input[type=number]").fill("5")
    await card.get_by_role("button", name="Save cap").click()
    await expect(dash.locator("article.conn .cap")).to_have_text("of $5.00 cap")
    warning = dash.locator("article.conn .alert.warn")
    await expect(warning).to_contain_text("OpenRouter itself limits this key to $0.30 (monthly)")
    await shot(dash, "dashboard-key-limit.png")
    # Back within the key's limit, the warning goes.
    card = dash.locator("article.conn").first
    await card.locator("input[type=number]").fill("0.2")
    await card.get_by_role("button", name="Save cap").click()
    await expect(dash.locator("article.conn .cap")).to_have_text("of $0.20 cap")
    await expect(dash.locator("article.conn .alert.warn")).to_have_count(0)


async def test_oauth_key_for_a_grant_is_limited_to_the_grants_dollar_cap(
        demo: Demo, context: BrowserContext) -> None:
    page = await context.new_page()
    await page.goto(demo.app_url)
    popup = await open_popup(page, "#convert")
    await expect(popup.locator("#grant-max")).to_have_text("$0.50")
    await expect(popup.locator("#oauth")).to_be_enabled()
    async with popup.expect_popup() as info:
        await popup.click("#oauth")
    await (await info.value).wait_for_event("close")
    await expect(popup.locator("#oauth-limit")).to_contain_text(
        "OpenRouter itself also stops this key at $0.50 in total")
    async with popup.expect_event("close"):
        await click_closing(popup, "#approve")
    await expect(page.locator("#convert-result")).to_contain_text("“Rewrite this as a headline:")
    [made] = demo.fake.keys.values()
    assert (made.limit, made.usage_limit_type, made.label) == (Decimal("0.5"), None, "Demo Notes")


async def test_oauth_needs_a_cap_before_the_key_is_made(demo: Demo, context: BrowserContext) -> None:
    page = await context.new_page()
    await page.goto(demo.app_url)
    popup = await open_popup(page, "#connect")
    await expect(popup.locator("#oauth")).to_be_enabled()
    await popup.fill("#cap", "")
    await popup.click("#oauth")
    await expect(popup.locator("#error")).to_contain_text("Choose your monthly cap first")
    assert demo.fake.keys == {}  # no key was made without a limit


async def test_pasted_key_advice_links_to_openrouter_keys(demo: Demo, context: BrowserContext) -> None:
    page = await context.new_page()
    await page.goto(demo.app_url)
    popup = await open_popup(page, "#connect")
    advice = popup.locator("#key-advice")
    await expect(advice).to_be_visible()
    await expect(advice).to_contain_text("its own monthly credit limit")
    assert await advice.locator("a").get_attribute("href") == "https://openrouter.ai/settings/keys"
    await shot(popup, "consent-key-advice.png")


async def test_token_is_cached_between_calls(demo: Demo, context: BrowserContext) -> None:
    page = await context.new_page()
    minted: list[float] = []
    page.on("request", lambda r: minted.append(time.monotonic())
            if r.url.endswith("/api/wattfare-token") else None)
    await page.goto(demo.app_url)
    await expect(page.locator("#status")).to_contain_text("Not connected")
    await page.evaluate("window.dispatchEvent(new Event('focus'))")
    await asyncio.sleep(0.3)
    await page.evaluate("window.dispatchEvent(new Event('focus'))")
    await asyncio.sleep(0.3)
    assert len(minted) == 1


async def test_grant_paid_from_the_existing_connection_needs_no_key(
        demo: Demo, context: BrowserContext) -> None:
    page = await context.new_page()
    await page.goto(demo.app_url)
    await approve_connect(page, "0.50")
    await expect(page.locator("#status")).to_contain_text("$0.50 / month")

    popup = await open_popup(page, "#convert")
    await expect(popup.locator("#use-existing")).not_to_be_checked()
    await popup.check("#use-existing")
    await expect(popup.locator("#existing-hint")).to_contain_text("counts toward its monthly cap")
    await expect(popup.locator("#key")).to_be_hidden()
    async with popup.expect_event("close"):
        await click_closing(popup, "#approve")
    await expect(page.locator("#convert-result")).to_contain_text("“Rewrite this as a headline:")
    # The grant's call counts toward the connection's monthly spend.
    await page.evaluate("window.dispatchEvent(new Event('focus'))")
    await expect(page.locator("#spent")).not_to_have_text("$0.00 spent")
    await expect(page.locator("#status")).to_contain_text("$0.50 / month")


# ---- the React SDK in a real browser -------------------------------------------------
JS = Path(__file__).resolve().parent.parent / "js"
VENDOR = {"scheduler": "scheduler/cjs/scheduler.development.js",
          "react": "react/cjs/react.development.js",
          "react-dom": "react-dom/cjs/react-dom.development.js",
          "react-dom/client": "react-dom/cjs/react-dom-client.development.js"}


def react_bundle() -> str:
    """React's CommonJS builds behind a tiny require(), as one classic script (no bundler)."""
    head = ("(function () {\nconst process = { env: { NODE_ENV: 'development' } };\n"
            "const sources = {}; const cache = {};\n"
            "function require(name) { if (!cache[name]) { const module = { exports: {} };"
            " cache[name] = module; sources[name](module, module.exports, require); }"
            " return cache[name].exports; }\n")
    parts = [head]
    for name, path in VENDOR.items():
        source = (JS / "node_modules" / path).read_text(encoding="utf-8")
        parts.append(f"sources[{json.dumps(name)}] = function (module, exports, require) {{\n"
                     f"{source}\n}};\n")
    parts.append("window.__React = require('react');"
                 " window.__ReactDOMClient = require('react-dom/client');\n})();\n")
    return "".join(parts)


REACT_SHIM = """const R = window.__React; export default R;
export const { createContext, createElement, useCallback, useContext, useEffect, useMemo,
  useRef, useState } = R;"""

REACT_PAGE = """<!doctype html><title>React Notes</title>
<script src="/vendor/react-bundle.js"></script>
<script type="importmap">{"imports": {"react": "/vendor/react.js"}}</script>
<div id="root"></div>
<script type="module">
import { createElement as h, useState } from "react";
import { WattfareProvider, useWattfare } from "/js/react.js";
const cfg = %s;
function Budget() {
  const wf = useWattfare();
  const [grant, setGrant] = useState("none");
  const state = wf.loading ? "loading" : wf.connected
    ? `connected cap=${wf.limits.monthlyUsd} remaining=${wf.remainingUsd}` : "not connected";
  return h("div", null,
    h("p", { id: "state" }, state),
    h("button", { id: "connect", onClick: wf.connect }, "Connect"),
    h("button", { id: "grant", onClick: async () => {
      const r = await wf.requestGrant({ requests: 2 });
      setGrant(r ? `granted ${r.requests}` : "denied");
    } }, "Grant"),
    h("button", { id: "disconnect", onClick: wf.disconnect }, "Disconnect"),
    h("p", { id: "grant-out" }, grant));
}
window.__ReactDOMClient.createRoot(document.getElementById("root")).render(
  h(WattfareProvider, { publishableKey: cfg.pk, session: "/token", baseURL: cfg.gateway },
    h(Budget)));
</script>"""


@pytest.mark.skipif(not (JS / "node_modules" / "react-dom").exists(),
                    reason="npm install in js/ first (React is a dev dependency)")
async def test_react_hook_drives_the_same_flow(demo: Demo, context: BrowserContext,
                                               aiohttp_server: Any) -> None:
    from wattgate.credentials import mint_credentials
    from wattgate.views.state import gateway_key

    port_app = web.Application()
    gw = demo.gateway[gateway_key]
    creds = mint_credentials()
    bundle = react_bundle()
    user = "react_user"

    async def page(request: web.Request) -> web.Response:
        cfg = json.dumps({"pk": creds.publishable_key, "gateway": demo.gateway_url})
        return web.Response(text=REACT_PAGE % cfg, content_type="text/html")

    async def vendor(request: web.Request) -> web.Response:
        if request.match_info["name"] == "react-bundle.js":
            return web.Response(text=bundle, content_type="text/javascript")
        return web.Response(text=REACT_SHIM, content_type="text/javascript")

    async def js_file(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in ("react.js", "client.js"):
            raise web.HTTPNotFound()
        return web.FileResponse(JS / name, headers={"Content-Type": "text/javascript"})

    async def token(request: web.Request) -> web.Response:
        async with aiohttp.ClientSession() as http, http.post(
                demo.gateway_url + "/api/v1/sessions", json={"appUserId": user},
                headers={"Authorization": f"Bearer {creds.secret_key}"}) as r:
            return web.json_response(await r.json(), status=r.status)

    port_app.router.add_get("/", page)
    port_app.router.add_get("/vendor/{name}", vendor)
    port_app.router.add_get("/js/{name}", js_file)
    port_app.router.add_post("/token", token)
    server = await aiohttp_server(port_app)
    origin = f"http://localhost:{server.port}"
    await gw.store.create_app(creds.app_id, "React Notes", gw.hash(creds.secret), [origin],
                              now=gw.clock())

    page_ = await context.new_page()
    errors: list[str] = []
    page_.on("pageerror", lambda e: errors.append(str(e)))
    await page_.goto(origin + "/")
    await expect(page_.locator("#state")).to_have_text("not connected")

    popup = await open_popup(page_, "#connect")
    await expect(popup.locator("#app-name")).to_have_text("React Notes")
    await expect(popup.locator("#approve")).to_be_enabled()
    await popup.fill("#cap", "3")
    await popup.fill("#key", KEY)
    async with popup.expect_event("close"):
        await click_closing(popup, "#approve")
    await expect(page_.locator("#state")).to_have_text("connected cap=3 remaining=3")

    # requestGrant resolves with the grant and leaves the connection state as it was.
    popup = await open_popup(page_, "#grant")
    await expect(popup.locator("#grant-requests")).to_have_text("2")
    await popup.check("#use-existing")  # paying from the budget is chosen, never preselected
    async with popup.expect_event("close"):
        await click_closing(popup, "#approve")
    await expect(page_.locator("#grant-out")).to_have_text("granted 2")
    await expect(page_.locator("#state")).to_have_text("connected cap=3 remaining=3")

    popup = await open_popup(page_, "#grant")
    await expect(popup.locator("#approve")).to_be_enabled()
    await popup.close()
    await expect(page_.locator("#grant-out")).to_have_text("denied")

    await page_.click("#disconnect")
    await expect(page_.locator("#state")).to_have_text("not connected")
    assert errors == []


async def test_token_in_the_fragment_is_accepted_and_wiped_from_the_address_bar(
        demo: Demo, context: BrowserContext) -> None:
    """For integrations without the SDK: /connect?pk=…#token=…, then the same handshake."""
    page = await context.new_page()
    await page.goto(demo.app_url)
    user = (await page.text_content("#user") or "").strip()
    async with aiohttp.ClientSession() as http, http.post(
            demo.gateway_url + "/api/v1/sessions", json={"appUserId": user},
            headers={"Authorization": f"Bearer {demo.secret_key}"}) as r:
        token = (await r.json())["token"]
    url = f"{demo.gateway_url}/connect?pk={demo.publishable_key}#token={token}"
    async with page.expect_popup() as info:
        await page.evaluate("""([url, gateway]) => {
            addEventListener("message", (e) => {
              if (e.origin !== gateway) return;
              if (e.data.type === "hello") e.source.postMessage({ wattgate: 1, type: "session" }, gateway);
              if (e.data.type === "result") window.res = e.data;
            });
            window.open(url, "", "popup");
        }""", [url, demo.gateway_url])
    popup = await info.value
    await expect(popup.locator("#origin-text")).to_contain_text("verified")
    assert token not in popup.url and "#" not in popup.url
    await popup.fill("#cap", "2")
    await popup.fill("#key", KEY)
    async with popup.expect_event("close"):
        await click_closing(popup, "#approve")
    result = await page.evaluate("window.res")
    assert result["approved"] is True and result["status"]["limits"] == {"monthlyUsd": 2}
    assert all(token not in u for u in context.seen_urls)  # type: ignore[attr-defined]


async def test_a_popup_left_open_past_the_token_life_still_approves(
        tmp_path: Path, context: BrowserContext) -> None:
    from conftest import Clock

    clock = Clock()
    demo = await start_demo(data_dir=tmp_path / "demo", chunk_delay=0.0, clock=clock)
    try:
        page = await context.new_page()
        await page.goto(demo.app_url)
        popup = await open_popup(page, "#connect")
        await expect(popup.locator("#approve")).to_be_enabled()
        await popup.fill("#cap", "0.60")
        await popup.fill("#key", KEY)
        clock.advance(3600)  # the user went to OpenRouter to make a key; the token expired
        async with popup.expect_event("close"):
            await popup.click("#approve")
        await expect(page.locator("#status")).to_contain_text("$0.60 / month")
    finally:
        await demo.close()


async def test_budget_bar_shows_spent_and_held_apart(tmp_path: Path,
                                                     context: BrowserContext) -> None:
    """While a reply streams, the bar shows what it holds apart from what was spent; a
    message that cannot fit says what it could cost and what is left."""
    demo = await start_demo(data_dir=tmp_path / "demo", chunk_delay=0.6)  # a slow reply
    try:
        page = await context.new_page()
        await page.goto(demo.app_url)
        await approve_connect(page, "0.05")
        await expect(page.locator("#cap")).to_contain_text("$0.05 left of $0.05")
        await expect(page.locator("#held-note")).to_be_hidden()

        await page.fill("#chat-input", "What does metering mean?")
        await page.click("#send")
        # Streaming: the held part shows, apart from the spent part (nothing spent yet).
        await expect(page.locator("#held-note")).to_be_visible()
        await expect(page.locator("#held")).to_contain_text("held")
        await expect(page.locator("#spent")).to_have_text("$0.00 spent")
        held_width = await page.eval_on_selector(
            "#held-bar", "el => parseFloat(el.style.width || '0')")
        assert 40 < held_width < 100  # the reply's worst case, ~$0.04 of $0.05
        assert await bar_width(page) == 0
        await page.wait_for_timeout(500)  # the bar's width transition, for the screenshot
        await shot(page, "demo-app-held.png")
        reply = page.locator(".msg.assistant").last
        await expect(reply).to_have_attribute("data-done", "1", timeout=15_000)
        # Finished: the hold became the (much smaller) real cost.
        await expect(page.locator("#held-note")).to_be_hidden()
        await expect(page.locator("#spent")).not_to_have_text("$0.00 spent")
        assert 0 < await bar_width(page) < 40

        # The next message's worst case no longer fits: the app says why, in numbers.
        await page.fill("#chat-input", "And budgets?")
        await page.click("#send")
        error = page.locator("#chat-error")
        await expect(error).to_be_visible()
        await expect(error).to_contain_text("This call could cost up to $0.0")
        await expect(error).to_contain_text("left of this month's cap of $0.05")
        await expect(error).to_contain_text("lower max_tokens to")
        await page.wait_for_timeout(500)  # the bar's width transition, for the screenshot
        assert await page.eval_on_selector(
            "#held-bar", "el => parseFloat(el.style.width || '0')") == 0  # refused: no hold
        await shot(page, "demo-app-refused.png")
    finally:
        await demo.close()
