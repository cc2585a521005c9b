"""/readyz beside /healthz, and forwarded headers believed only from trusted proxies."""

from __future__ import annotations

import json
import logging

from wattgate.logs import JSONFormatter


async def test_readyz_is_ready_once_the_ledger_answers_and_prices_are_loaded(harness):
    async with harness.http.get(harness.url + "/readyz") as r:
        assert r.status == 200, await r.text()
        body = await r.json()
    assert body["ready"] is True
    assert body["checks"]["ledger"] == {"ok": True}
    assert body["checks"]["prices"]["ok"] and body["checks"]["prices"]["models"] > 0


async def test_readyz_names_the_upstream_when_prices_cannot_be_loaded(make_harness):
    # An upstream nobody listens on: the process is alive, but no call could be priced.
    h = await make_harness({"WATTGATE_UPSTREAM__BASE_URL": "http://127.0.0.1:9/api/v1",
                            "WATTGATE_UPSTREAM__CONNECT_TIMEOUT": "1"})
    async with h.http.get(h.url + "/healthz") as r:
        assert r.status == 200
    async with h.http.get(h.url + "/readyz") as r:
        assert r.status == 503
        body = await r.json()
    assert body["ready"] is False and body["checks"]["ledger"] == {"ok": True}
    assert body["checks"]["prices"]["ok"] is False
    assert "price list" in body["checks"]["prices"]["message"]


async def test_readyz_names_the_ledger_when_it_does_not_answer(harness):
    harness.gw.store.close_now()  # the database handle gone, as on a lost volume
    async with harness.http.get(harness.url + "/readyz") as r:
        assert r.status == 503
        body = await r.json()
    assert body["checks"]["ledger"]["ok"] is False
    assert "ledger" in body["checks"]["ledger"]["message"]


def access(records: list[logging.LogRecord], route: str) -> list[dict]:
    return [line for line in (json.loads(JSONFormatter().format(r)) for r in records
                              if r.name == "wattgate.access") if line["route"] == route]


async def test_the_request_log_names_the_forwarded_client_only_behind_a_trusted_proxy(
        make_harness, caplog):
    caplog.set_level(logging.INFO, logger="wattgate.access")
    forwarded = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
    untrusted = await make_harness()
    async with untrusted.http.get(untrusted.url + "/healthz", headers=forwarded) as r:
        assert r.status == 200
    trusted = await make_harness({"WATTGATE_SERVER__TRUSTED_PROXIES": "127.0.0.1"})
    async with trusted.http.get(trusted.url + "/readyz", headers=forwarded) as r:
        assert r.status == 200
    [plain] = access(caplog.records, "/healthz")
    [proxied] = access(caplog.records, "/readyz")
    assert plain["client"] == "127.0.0.1" and "scheme" not in plain
    assert proxied["client"] == "203.0.113.9" and proxied["scheme"] == "https"


async def test_metrics_trusts_a_forwarded_loopback_client_only_from_a_listed_proxy(make_harness):
    local = {"X-Forwarded-For": "127.0.0.1"}
    remote = {"X-Forwarded-For": "198.51.100.7"}
    untrusted = await make_harness()
    async with untrusted.http.get(untrusted.url + "/metrics") as r:
        assert r.status == 200  # loopback, no proxy
    async with untrusted.http.get(untrusted.url + "/metrics", headers=local) as r:
        assert r.status == 403  # an unlisted proxy: its word proves nothing
    trusted = await make_harness({"WATTGATE_SERVER__TRUSTED_PROXIES": "127.0.0.1/32"})
    async with trusted.http.get(trusted.url + "/metrics", headers=local) as r:
        assert r.status == 200
    async with trusted.http.get(trusted.url + "/metrics", headers=remote) as r:
        assert r.status == 403
        assert (await r.json())["error"]["code"] == "forbidden"


async def _fail_logins(h, client: str | None, times: int) -> list[int]:
    import aiohttp

    statuses = []
    async with aiohttp.ClientSession() as http:
        for _ in range(times):
            headers = {"X-Forwarded-For": client} if client else {}
            async with http.post(h.url + "/admin/login", data={"token": "wrong-guess"},
                                 headers=headers, allow_redirects=False) as r:
                statuses.append(r.status)
    return statuses


async def test_the_admin_login_limiter_counts_each_client_behind_a_trusted_proxy(make_harness):
    trusted = await make_harness({"WATTGATE_SERVER__TRUSTED_PROXIES": "127.0.0.1"})
    # One guesser behind the proxy runs out of tries; another client behind it still may try.
    first = await _fail_logins(trusted, "203.0.113.9", 12)
    assert first[:10] == [401] * 10 and first[10:] == [429, 429]
    assert await _fail_logins(trusted, "203.0.113.10", 1) == [401]

    # Without the setting, a guesser cannot escape the limiter by inventing addresses.
    untrusted = await make_harness()
    statuses = []
    for i in range(12):
        statuses += await _fail_logins(untrusted, f"203.0.113.{i}", 1)
    assert statuses[:10] == [401] * 10 and statuses[10:] == [429, 429]
