"""Budget webhooks end to end: a real gateway, a real receiver on loopback.

Every event type through the HTTP API and the proxy; deliveries verified with
the SDK's one call; a receiver that fails (500, a timeout, a refused
connection, a redirect) then recovers gets every event, in order per
connection, with the same ids; ``wattgate serve`` killed with -9 mid-delivery
delivers after its restart; two processes on one PostgreSQL ledger send each
event once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from conftest import FUNDING_KEY, free_port
from test_admin_functional import close_consoles, sign_in  # noqa: F401 (an autouse cleanup)
from test_grants_functional import mint_grant, redeem
from wattgate import webhooks
from wattgate.faults import GatewayProcess
from wattgate.sdk import WattfareWebhookError, verify_webhook

FAST = {"WATTGATE_WEBHOOKS__POLL_INTERVAL": "0.05", "WATTGATE_WEBHOOKS__TIMEOUT": "0.5",
        "WATTGATE_WEBHOOKS__RETRY_FIRST": "10", "WATTGATE_WEBHOOKS__GIVE_UP": "3600",
        "WATTGATE_LIMITS__CHAT_PER_MINUTE": "100000"}


@dataclass
class Receiver:
    """An app's webhook endpoint: records every delivery; answers what ``answers`` says
    next (a status, "hang" to never answer in time, ("redirect", path)), else 204."""

    port: int = field(default_factory=free_port)
    got: list[tuple[dict[str, str], bytes, float]] = field(default_factory=list)
    answers: list[Any] = field(default_factory=list)
    only: bytes = b""  # answers are for deliveries whose body holds this
    in_flight: Counter[str] = field(default_factory=Counter)
    overlapped: list[str] = field(default_factory=list)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        event_id = request.headers.get("Wattgate-Event-Id", "")
        if self.in_flight[event_id]:
            self.overlapped.append(event_id)
        self.in_flight[event_id] += 1
        try:
            self.got.append((dict(request.headers), raw, time.time()))
            answer = self.answers.pop(0) if self.answers and self.only in raw else 204
            if answer == "hang":
                await asyncio.sleep(60)
            if isinstance(answer, tuple):
                raise web.HTTPFound(answer[1])
            return web.Response(status=answer, text="receiver's own words, never logged")
        finally:
            self.in_flight[event_id] -= 1

    async def elsewhere(self, request: web.Request) -> web.Response:
        self.got.append(({"redirected": "yes"}, b"", time.time()))
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        app.router.add_post("/elsewhere", self.elsewhere)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def events(self, secret: str, tolerance: float = 300) -> list[dict[str, Any]]:
        """Every delivery, verified as a receiver would (the SDK's one call); a test that
        moved the gateway's clock ahead widens the tolerance by as much."""
        return [verify_webhook(raw, headers["Wattgate-Signature"], secret, tolerance=tolerance)
                for headers, raw, _ in self.got if "redirected" not in headers]

    async def wait(self, count: int, seconds: float = 20.0) -> None:
        deadline = time.monotonic() + seconds
        while len(self.got) < count:
            assert time.monotonic() < deadline, f"{len(self.got)} deliveries, not {count}"
            await asyncio.sleep(0.02)


@pytest.fixture
async def receiver():  # type: ignore[no-untyped-def]
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


async def pending(h: Any, app_id: str) -> list[Any]:
    return [e for e in await h.gw.store.recent_webhooks(app_id) if e.status == "pending"]


async def settled(h: Any, app_id: str, seconds: float = 20.0) -> list[Any]:
    """The app's events once none is pending, oldest first."""
    deadline = time.monotonic() + seconds
    while await pending(h, app_id):
        assert time.monotonic() < deadline, await pending(h, app_id)
        await asyncio.sleep(0.02)
    return list(reversed(await h.gw.store.recent_webhooks(app_id)))


async def call(h: Any, app: Any, user: str, model: str = "fake/flat-3c") -> int:
    async with h.http.post(h.api + "/chat/completions",
                           json={"model": model, "max_tokens": 8,
                                 "messages": [{"role": "user", "content": "hi"}]},
                           headers={"Authorization": f"Bearer {app.secret_key}",
                                    "x-wattfare-user": user}) as r:
        await r.read()
        return r.status


async def test_every_event_reaches_the_receiver_signed_and_verifiable(make_harness, receiver,
                                                                      caplog):
    h = await make_harness(FAST)
    app = await h.create_app()
    quiet = await h.create_app("No webhook")
    secret = await webhooks.set_endpoint(h.gw.store, h.gw.sealer, app.app_id, receiver.url)
    assert secret is not None and secret.startswith("whsec_")

    await h.connect(app, "alice", monthly_usd=0.2)                         # created
    token = await h.session(app, "alice")
    async with h.http.post(h.api + "/connections", json={"monthlyUsd": 0.15},
                           headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200, await r.text()                            # cap_changed
    for _ in range(4):                      # 3 cents each: 80 % at the 4th
        assert await call(h, app, "alice") == 200
    assert await call(h, app, "alice") == 402  # its worst case is a little over 3 cents
    # A 2-cent call the upstream bills 3 cents for (its price changed meanwhile): 100 %.
    h.fake.usage_text = ('{"prompt_tokens":8,"completion_tokens":8,"total_tokens":16,'
                         '"cost":0.03}')
    assert await call(h, app, "alice", "fake/flat-2c") == 200
    h.fake.usage_text = None
    async with h.http.delete(h.api + "/connections",
                             headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 204                                            # revoked
    bob_key = "sk-or-v1-" + "b" * 48
    await h.connect(app, "bob", monthly_usd=5, funding_key=bob_key)       # created
    h.fake.revoked_keys.add(bob_key)
    assert await call(h, app, "bob") == 402                               # funding.invalid
    status, grant = await mint_grant(h, app, requests=1, user="visitor")
    assert status == 200, grant
    assert (await redeem(h, app, grant["grantToken"]))[0] == 200          # grant.exhausted
    await h.connect(quiet, "carol")  # an app with no endpoint: no event at all

    events = await settled(h, app.app_id)
    assert all(e.status == "delivered" and e.attempts == 1 and e.last_code == 204
               for e in events)
    assert await h.gw.store.recent_webhooks(quiet.app_id) == []
    await receiver.wait(len(events))
    got = receiver.events(secret)
    assert len(got) == len(events), [e.type for e in events]
    assert len(got) == 8, [e.type for e in events]
    assert sorted(e["id"] for e in got) == sorted(e.public_id for e in events)
    by_user: dict[Any, list[tuple[str, dict[str, Any]]]] = {}
    for e in got:
        by_user.setdefault(e["data"]["appUserId"], []).append((e["type"], e["data"]))
    a = {"appId": app.app_id, "appUserId": "alice"}
    assert by_user["alice"] == [
        ("connection.created", {**a, "capUsd": "0.2"}),
        ("connection.cap_changed", {**a, "capUsd": "0.15", "previousCapUsd": "0.2"}),
        ("budget.threshold", {**a, "period": by_user["alice"][2][1]["period"], "percent": 80,
                              "capUsd": "0.15", "spentUsd": "0.12"}),
        ("budget.threshold", {**a, "period": by_user["alice"][2][1]["period"], "percent": 100,
                              "capUsd": "0.15", "spentUsd": "0.15"}),
        ("connection.revoked", {**a, "capUsd": "0.15"}),
    ]
    assert [t for t, _ in by_user["bob"]] == ["connection.created", "funding.invalid"]
    [(kind, data)] = by_user[None]
    assert kind == "grant.exhausted"
    assert data["requests"] == data["used"] == 1 and data["maxUsd"] is None
    assert all(abs(e["created"] - h.clock()) < 5 for e in got)
    headers = receiver.got[0][0]
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"].startswith("wattgate/")
    # Nothing secret or private reached the gateway's log.
    logged = caplog.text
    assert secret not in logged and receiver.url not in logged
    assert "receiver's own words" not in logged and '"appUserId"' not in logged


async def test_a_failing_receiver_gets_every_event_in_order_once_it_recovers(make_harness,
                                                                             receiver):
    h = await make_harness(FAST)
    app = await h.create_app()
    secret = await webhooks.set_endpoint(h.gw.store, h.gw.sealer, app.app_id, receiver.url)
    assert secret is not None
    receiver.answers = [500, "hang", ("redirect", "/elsewhere"), 401]
    receiver.only = b'"appUserId":"dana"'
    await h.connect(app, "dana", monthly_usd=1)
    token = await h.session(app, "dana")
    for cap in (0.5, 0.25):
        async with h.http.post(h.api + "/connections", json={"monthlyUsd": cap},
                               headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200
    await h.connect(app, "erin", monthly_usd=1)  # another stream: not held up by dana's

    async def attempt(n: int) -> Any:
        """The n-th delivery made, and dana's first event once its outcome is recorded
        (no longer leased: a lease ends at now + timeout + 5 s; retries wait 10 s or more)."""
        await receiver.wait(n)
        deadline = time.monotonic() + 10
        while True:
            events = await h.gw.store.recent_webhooks(app.app_id)
            e = events[-1]
            if abs(e.next_at - (h.clock() + 5.5)) > 0.01:
                return e
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)

    await attempt(2)  # dana's created: 500; erin's created delivered meanwhile
    first = await h.gw.store.recent_webhooks(app.app_id)
    dana = [e for e in first if json.loads(e.body)["data"]["appUserId"] == "dana"]
    assert [(e.type, e.status) for e in reversed(dana)] == [
        ("connection.created", "pending"), ("connection.cap_changed", "pending"),
        ("connection.cap_changed", "pending")]
    created = dana[-1]
    assert (created.attempts, created.last_code) == (1, 500)
    assert created.next_at == pytest.approx(h.clock() + 10)  # retry_first
    outcomes = []
    for n, wait in ((3, 10), (4, 20), (5, 40)):  # hang, redirect, 401: each wait doubles
        h.clock.advance(wait)
        e = await attempt(n)
        outcomes.append((e.attempts, e.last_code, e.last_error, e.next_at - h.clock()))
    assert outcomes == [(2, None, "no answer within 0.5 s", 20), (3, 302, None, 40),
                        (4, 401, None, 80)]
    await receiver.stop()  # connection refused
    h.clock.advance(80)
    await asyncio.sleep(0.5)
    e = [x for x in await h.gw.store.recent_webhooks(app.app_id)
         if x.event_id == created.event_id][0]
    assert (e.status, e.attempts, e.last_error) == ("pending", 5, "cannot connect (Connection refused)")
    await receiver.start()
    h.clock.advance(160)
    events = await settled(h, app.app_id)
    assert all(e.status == "delivered" for e in events)
    got = receiver.events(secret, tolerance=600)
    ids = [e["id"] for e in got if e["data"]["appUserId"] == "dana"]
    # The first event as many times as it was tried (5 reached the receiver), then the
    # rest once each, in order; the same id and the same body every time.
    assert ids == [created.public_id] * 5 + [e.public_id for e in reversed(dana[:-1])]
    bodies = {raw for headers, raw, _ in receiver.got
              if headers.get("Wattgate-Event-Id") == created.public_id}
    assert bodies == {created.body.encode()}
    assert [x for x in receiver.got if "redirected" in x[0]] == []  # never followed
    assert [e["type"] for e in got if e["data"]["appUserId"] == "dana"][-2:] == \
        ["connection.cap_changed", "connection.cap_changed"]
    assert [e["data"]["capUsd"] for e in got if e["data"]["appUserId"] == "dana"][-2:] == \
        ["0.5", "0.25"]


async def test_a_delivery_given_up_after_a_day_is_failed_and_resent_by_id(make_harness,
                                                                           receiver):
    h = await make_harness({**FAST, "WATTGATE_WEBHOOKS__GIVE_UP": "60"})
    app = await h.create_app()
    secret = await webhooks.set_endpoint(h.gw.store, h.gw.sealer, app.app_id, receiver.url)
    assert secret is not None
    receiver.answers = [503, 503, 503]
    await h.connect(app, "fay")
    await receiver.wait(1)
    for n, wait in ((2, 10), (3, 20)):
        h.clock.advance(wait)
        await receiver.wait(n)
    h.clock.advance(40)  # the next wait (40 s) would end past the 60 s given
    [event] = await settled(h, app.app_id)
    assert (event.status, event.attempts, event.last_code) == ("failed", 3, 503)
    assert await h.gw.store.resend_webhook(app.app_id, event.public_id, now=h.clock())
    [again] = await settled(h, app.app_id)
    assert (again.status, again.attempts) == ("delivered", 4)
    assert [e["id"] for e in receiver.events(secret, tolerance=600)] == [event.public_id] * 4
    # A cleared endpoint: what is pending fails, nothing new is written.
    assert await webhooks.clear_endpoint(h.gw.store, app.app_id)
    await h.connect(app, "gil")
    assert len(await h.gw.store.recent_webhooks(app.app_id)) == 1


async def served_gateway(backend: str, make_pg_url: Any, fake_upstream: Any,
                         tmp_path: Any) -> GatewayProcess:
    """``wattgate serve`` in its own process on the test's backend, delivering fast."""
    env = {"WATTGATE_WEBHOOKS__POLL_INTERVAL": "0.05", "WATTGATE_WEBHOOKS__TIMEOUT": "2"}
    if backend == "postgresql":
        env["WATTGATE_DATABASE__URL"] = make_pg_url()
    gw = GatewayProcess(tmp_path / "gw", fake_upstream.base_url, env)
    await gw.start()
    return gw


async def hooked_app(gw: GatewayProcess, receiver: Receiver) -> tuple[dict[str, Any], str]:
    """An app made with the command line, its webhooks sent to ``receiver``; (the app's
    credentials, its signing secret)."""
    code, out = await gw.cli("apps", "create", "--name", "Hooked", "--origin",
                             "http://localhost:3000", "--json")
    assert code == 0, out
    app = json.loads(out.splitlines()[-1])
    code, out = await gw.cli("apps", "set-webhook", app["appId"], "--url", receiver.url,
                             "--json")
    assert code == 0, out
    return app, json.loads(out)["secret"]


async def test_kill_9_mid_delivery_then_restart_delivers(backend, make_pg_url, fake_upstream,
                                                         receiver, tmp_path):
    gw = await served_gateway(backend, make_pg_url, fake_upstream, tmp_path)
    try:
        app, secret = await hooked_app(gw, receiver)
        receiver.answers = ["hang"]
        auth = {"Authorization": f"Bearer {app['secretKey']}"}
        async with aiohttp.ClientSession() as http:
            async with http.post(gw.api + "/sessions", json={"appUserId": "hal"},
                                 headers=auth) as r:
                token = (await r.json())["token"]
            for cap in (10, 5):
                body: dict[str, Any] = {"monthlyUsd": cap}
                if cap == 10:
                    body["fundingKey"] = FUNDING_KEY
                async with http.post(gw.api + "/connections", json=body,
                                     headers={"Authorization": f"Bearer {token}"}) as r:
                    assert r.status == 200, await r.text()
        await receiver.wait(1)  # the first delivery is in the receiver's hands
        gw.kill9()
        await gw.proc.wait()  # type: ignore[union-attr]
        killed_at = time.time()
        gw.port = free_port()
        await gw.start()
        await receiver.wait(3, seconds=30)
        got = receiver.events(secret)
        assert [e["type"] for e in got] == ["connection.created", "connection.created",
                                            "connection.cap_changed"]
        assert got[0]["id"] == got[1]["id"] and got[2]["id"] != got[0]["id"]
        # Tried again once its lease (timeout + 5 s) ended, not before.
        assert receiver.got[1][2] - killed_at < 2 + 5 + 5
    finally:
        await gw.stop()


async def test_two_processes_on_postgresql_send_each_event_once(make_pg_url, fake_upstream,
                                                                receiver, tmp_path):
    env = {"WATTGATE_WEBHOOKS__POLL_INTERVAL": "0.02",
           "WATTGATE_DATABASE__URL": make_pg_url(),
           "WATTGATE_KEYS__FILE": str(tmp_path / "keys.json")}  # one keys file for the fleet
    gws = [GatewayProcess(tmp_path / f"gw{i}", fake_upstream.base_url, env) for i in range(2)]
    for gw in gws:
        await gw.start()
    try:
        code, out = await gws[0].cli("apps", "create", "--name", "Fleet", "--origin",
                                     "http://localhost:3000", "--json")
        app = json.loads(out.splitlines()[-1])
        code, out = await gws[1].cli("apps", "set-webhook", app["appId"], "--url",
                                     receiver.url, "--json")
        assert code == 0, out
        secret = json.loads(out)["secret"]
        auth = {"Authorization": f"Bearer {app['secretKey']}"}

        async def connect(i: int) -> None:
            api = gws[i % 2].api
            async with http.post(api + "/sessions", json={"appUserId": f"u{i}"},
                                 headers=auth) as r:
                token = (await r.json())["token"]
            for cap in (10, 7, 5):
                body: dict[str, Any] = {"monthlyUsd": cap}
                if cap == 10:
                    body["fundingKey"] = FUNDING_KEY
                async with http.post(api + "/connections", json=body,
                                     headers={"Authorization": f"Bearer {token}"}) as r:
                    assert r.status == 200, await r.text()

        async with aiohttp.ClientSession() as http:
            await asyncio.gather(*(connect(i) for i in range(20)))
        await receiver.wait(60, seconds=30)
        await asyncio.sleep(1.0)  # a second sender, if any, would have sent by now
        got = receiver.events(secret)
        assert len(got) == 60
        assert Counter(e["id"] for e in got).most_common(1)[0][1] == 1
        assert receiver.overlapped == []
        for i in range(20):
            assert [(e["type"], e["data"]["capUsd"]) for e in got
                    if e["data"]["appUserId"] == f"u{i}"] == [
                ("connection.created", "10"), ("connection.cap_changed", "7"),
                ("connection.cap_changed", "5")]
    finally:
        for gw in gws:
            await gw.stop()


async def test_console_forms_need_the_sessions_csrf_token(make_harness, receiver):
    h = await make_harness(FAST)
    app = await h.create_app()
    c = await sign_in(h)
    base = f"/admin/apps/{app.app_id}"
    for data in ({"url": receiver.url}, {"url": receiver.url, "csrf": "forged"}):
        r = await c.post(base + "/webhook", data)
        assert r.status == 403 and "not sent by this console page" in r.text_body
    assert await h.gw.store.get_webhook(app.app_id) is None
    r = await c.post(base + "/webhook", {"url": "https://", "csrf": c.csrf})
    assert r.status == 400 and "names no host" in r.text_body
    r = await c.post(base + "/webhook", {"url": receiver.url, "csrf": c.csrf})
    assert r.status == 200
    secret = r.text_body.split('id="webhook-secret">')[1].split("<")[0]
    await h.connect(app, "ivy")
    [event] = await settled(h, app.app_id)
    r = await c.post(f"{base}/webhooks/{event.public_id}/resend", {})
    assert r.status == 403
    r = await c.post(f"{base}/webhooks/{event.public_id}/resend", {"csrf": c.csrf})
    assert r.status == 303 and r.headers["Location"].endswith("?webhook=resent#webhooks")
    other = await h.create_app("Other")  # another app's console URL cannot resend it
    r = await c.post(f"/admin/apps/{other.app_id}/webhooks/{event.public_id}/resend",
                     {"csrf": c.csrf})
    assert r.headers["Location"].endswith("?webhook=not-resent#webhooks")
    await settled(h, app.app_id)
    assert [e["id"] for e in receiver.events(secret)] == [event.public_id] * 2
    r = await c.post(base + "/webhook/clear", {})
    assert r.status == 403 and await h.gw.store.get_webhook(app.app_id) is not None
    r = await c.post(base + "/webhook/clear", {"csrf": c.csrf})
    assert r.status == 303 and await h.gw.store.get_webhook(app.app_id) is None


async def test_the_command_line_sets_and_clears_an_endpoint_beside_a_running_gateway(
        make_harness, receiver):
    import subprocess
    import sys

    h = await make_harness(FAST)
    app = await h.create_app()

    async def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "wattgate", "apps", *args],
            env={**h.db.env, "PYTHONPATH": ":".join(sys.path)}, capture_output=True,
            text=True, timeout=60, check=False)

    for args, why in ((("set-webhook", app.app_id, "--url", "ftp://x.example/"),
                       "must start with http:// or https://"),
                      (("set-webhook", app.app_id, "--url", "https://u:p@x.example/"),
                       "user name or password"),
                      (("set-webhook", "app0000000000000000", "--url", receiver.url),
                       "unknown app app0000000000000000"),
                      (("clear-webhook", "app0000000000000000"), "unknown app")):
        done = await cli(*args)
        assert done.returncode == 1 and done.stdout == "", done
        assert done.stderr.startswith("wattgate: error: ") and why in done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert await h.gw.store.get_webhook(app.app_id) is None
    done = await cli("set-webhook", app.app_id, "--url", receiver.url, "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert set(out) == {"url", "secret"} and out["url"] == receiver.url
    stored = await h.db.one("SELECT webhook_secret FROM apps WHERE app_id = ?", app.app_id)
    assert out["secret"] not in str(stored)  # sealed at rest, like a funding key
    await h.connect(app, "jo")
    await settled(h, app.app_id)
    [event] = receiver.events(out["secret"])
    assert event["type"] == "connection.created"
    done = await cli("set-webhook", app.app_id, "--url", receiver.url)  # a new secret
    assert done.returncode == 0 and "shown once" in done.stdout
    new_secret = done.stdout.split("signing secret: ")[1].split()[0]
    assert new_secret != out["secret"]
    await h.connect(app, "kim")
    await settled(h, app.app_id)
    headers, raw, _ = receiver.got[-1]
    assert verify_webhook(raw, headers["Wattgate-Signature"], new_secret)["type"] \
        == "connection.created"
    with pytest.raises(WattfareWebhookError, match="does not match"):
        verify_webhook(raw, headers["Wattgate-Signature"], out["secret"])
    done = await cli("clear-webhook", app.app_id)
    assert done.returncode == 0 and "cleared" in done.stdout
    assert await h.gw.store.get_webhook(app.app_id) is None


async def test_keys_rotate_reseals_signing_secrets_so_the_old_master_key_can_go(
        backend, make_pg_url, fake_upstream, receiver, tmp_path):
    """``wattgate keys rotate`` re-seals the apps' webhook signing secrets with the
    funding keys: once the old master key is removed from the keys file, a fresh
    gateway still signs every delivery with the very secret the app was given."""
    gw = await served_gateway(backend, make_pg_url, fake_upstream, tmp_path)
    try:
        app, secret = await hooked_app(gw, receiver)
        auth = {"Authorization": f"Bearer {app['secretKey']}"}

        async def connect(user: str) -> None:
            async with aiohttp.ClientSession() as http:
                async with http.post(gw.api + "/sessions", json={"appUserId": user},
                                     headers=auth) as r:
                    token = (await r.json())["token"]
                async with http.post(gw.api + "/connections",
                                     json={"monthlyUsd": 10, "fundingKey": FUNDING_KEY},
                                     headers={"Authorization": f"Bearer {token}"}) as r:
                    assert r.status == 200, await r.text()

        await connect("before")
        await receiver.wait(1)
        await gw.stop()
        code, out = await gw.cli("keys", "rotate")
        assert code == 0, out
        assert "re-sealed 1 funding keys and 1 webhook signing secrets" in out, out
        keys_file = gw.database.with_name(gw.database.name + ".keys.json")
        data = json.loads(keys_file.read_text())
        assert data["active_key_id"] == "k2"
        del data["master_keys"]["k1"]  # the operator retires the old master key
        keys_file.write_text(json.dumps(data))
        gw.port = free_port()
        await gw.start()
        await connect("after")
        await receiver.wait(2, seconds=15)
        got = receiver.events(secret)  # the secret the app was given, unchanged
        assert [(e["type"], e["data"]["appUserId"]) for e in got] == [
            ("connection.created", "before"), ("connection.created", "after")]
        async with aiohttp.ClientSession() as http:  # its funding key re-sealed too
            async with http.post(gw.api + "/chat/completions",
                                 json={"model": "fake/flat-3c", "max_tokens": 8,
                                       "messages": [{"role": "user", "content": "hi"}]},
                                 headers={**auth, "x-wattfare-user": "before"}) as r:
                assert r.status == 200, await r.text()
        assert "cannot be unsealed" not in (gw.data_dir / "serve.log").read_text()
    finally:
        await gw.stop()
