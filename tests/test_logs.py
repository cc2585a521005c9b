"""The request log: one structured line per request, and no secret or prompt in any log line."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import FUNDING_KEY
from test_admin_functional import close_consoles, secret_in, sign_in  # noqa: F401 (fixture)
from test_grants_functional import mint_grant, redeem

from wattgate.logs import JSONFormatter, TextFormatter, user_hash

PROMPT = "my-private-prompt-okapi-7731"
GRANT_FUNDING_KEY = "sk-or-v1-" + "9" * 48


def every_rendering(records: list[logging.LogRecord]) -> str:
    """Each record as JSON, as text, and every attribute it carries: all a handler could print."""
    out = []
    for fmt in (JSONFormatter(), TextFormatter()):
        out += [fmt.format(r) for r in records]
    out += [repr(r.__dict__) for r in records]
    return "\n".join(out)


def access_lines(records: list[logging.LogRecord]) -> list[dict]:
    return [json.loads(JSONFormatter().format(r)) for r in records
            if r.name == "wattgate.access"]


async def chat(h, app, headers: dict, *, stream: bool = False, model: str = "openai/gpt-4o-mini"):
    async with h.http.post(h.api + "/chat/completions",
                           json={"model": model, "stream": stream,
                                 "messages": [{"role": "user", "content": PROMPT}]},
                           headers={"Authorization": f"Bearer {app.secret_key}", **headers}) as r:
        await r.read()
        return r.status


async def test_no_secret_or_prompt_in_any_log_line(make_harness, caplog):
    caplog.set_level(logging.DEBUG)
    h = await make_harness({"WATTGATE_LIMITS__CHAT_PER_MINUTE": "1000"})
    app = await h.create_app()
    auth = {"Authorization": f"Bearer {app.secret_key}"}
    secrets_seen: list[str] = [app.secret_key, FUNDING_KEY, GRANT_FUNDING_KEY,
                               h.gw.keys.admin_token, h.gw.keys.jwt_secret]

    # Sessions, connections (approve, read, revoke), status.
    token = await h.session(app, "lena", monthly_usd=5)
    secrets_seen.append(token)
    await h.connect(app, "lena", monthly_usd=5)
    async with h.http.get(h.api + "/connections",
                          headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200
    await h.status(app, "lena")
    # Chat, whole and streamed, an upstream failure, a bad secret, and the model list.
    assert await chat(h, app, {"x-wattfare-user": "lena"}) == 200
    assert await chat(h, app, {"x-wattfare-user": "lena"}, stream=True) == 200
    assert await chat(h, app, {"x-wattfare-user": "lena"}, model="fake/fail-500") == 502
    wrong = app.secret_key[:-6] + "XXXXXX"
    secrets_seen.append(wrong)
    async with h.http.post(h.api + "/chat/completions", json={"model": "x", "messages": []},
                           headers={"Authorization": f"Bearer {wrong}",
                                    "x-wattfare-user": "lena"}) as r:
        assert r.status == 401
    async with h.http.get(h.api + "/models", headers=auth) as r:
        assert r.status == 200
    # Grants: minted with a typed funding key, redeemed, read.
    status, grant = await mint_grant(h, app, funding_key=GRANT_FUNDING_KEY, requests=2)
    assert status == 200, grant
    secrets_seen.append(grant["grantToken"])
    assert (await redeem(h, app, grant["grantToken"]))[0] == 200
    async with h.http.get(h.api + "/grants/current",
                          headers={**auth, "x-wattfare-grant": grant["grantToken"]}) as r:
        assert r.status == 200
    # Admin console: a failed and a good sign-in, pages, a download; metrics; health.
    console = await sign_in(h)
    assert (await console.post("/admin/login", {"token": "wrong-admin-guess"})).status == 401
    secrets_seen.append(console.csrf)
    secrets_seen += [c.value for c in console.http.cookie_jar]
    for path in ("/admin", "/admin/apps", f"/admin/apps/{app.app_id}",
                 f"/admin/apps/{app.app_id}/usage?format=jsonl"):
        assert (await console.page(path))[0] == 200
    created = await console.post("/admin/apps", {"name": "Logged", "csrf": console.csrf,
                                                 "origins": "https://logged.example"})
    secrets_seen.append(secret_in(created.text_body))
    lena_connection = await h.gw.store.get_connection(app.app_id, "lena")
    await console.post(f"/admin/apps/{app.app_id}/connections/"
                       f"{lena_connection.connection_id}/revoke", {"csrf": console.csrf})
    for path in ("/metrics", "/healthz"):
        async with h.http.get(h.url + path) as r:
            assert r.status == 200
    async with h.http.delete(h.api + "/connections",
                             headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 204
    rotated = await console.post(f"/admin/apps/{app.app_id}/rotate-secret",
                                 {"csrf": console.csrf})
    app.secret_key = secret_in(rotated.text_body)
    secrets_seen.append(app.secret_key)
    audit = [r.getMessage() for r in caplog.records if r.name == "wattgate.admin"]
    assert any("rotated the secret key of app " + app.app_id in m for m in audit)
    assert any(f"revoked connection {lena_connection.connection_id}" in m for m in audit)
    assert await chat(h, app, {"x-wattfare-user": "lena"}) == 402

    records = list(caplog.records)
    text = caplog.text + "\n" + every_rendering(records)
    for secret in secrets_seen:
        assert secret and secret not in text, f"a secret reached the log: {secret[:12]}…"
    assert PROMPT not in text
    assert "wrong-admin-guess" not in text
    assert "lena" not in "\n".join(json.dumps(line) for line in access_lines(records))

    # One access line per request, with what an operator needs to follow a call.
    lines = access_lines(records)
    chats = [line for line in lines if line["route"] == "/api/v1/chat/completions"]
    assert [line["status"] for line in chats] == [200, 200, 502, 401, 200, 402]
    ok = chats[0]
    assert ok["app"] == app.app_id
    assert ok["user"] == user_hash(h.gw.keys.hash_key, "lena")
    assert ok["model"] == "openai/gpt-4o-mini"
    assert ok["cost_usd"] > 0 and ok["cost_state"] == "final"
    assert len(ok["request_id"]) == 16 and ok["latency_ms"] >= 0
    assert chats[4]["grant"] > 0 and "user" not in chats[4]
    assert "user" not in chats[3] and "app" not in chats[3]  # a refused key names no one
    assert len({line["request_id"] for line in lines}) == len(lines)
    # The consent popup's calls carry a session token: their lines name its app and user.
    lena = user_hash(h.gw.keys.hash_key, "lena")
    popup = [line for line in lines if line["route"] == "/api/v1/connections"]
    assert [line["method"] for line in popup] == ["POST", "GET", "DELETE"]
    assert all(line["app"] == app.app_id and line["user"] == lena for line in popup)
    [status_line] = [line for line in lines if line["route"] == "/api/v1/status"]
    assert status_line["user"] == lena


async def test_request_id_is_sent_back_and_logged(harness, caplog):
    caplog.set_level(logging.INFO, logger="wattgate.access")
    async with harness.http.get(harness.url + "/healthz") as r:
        request_id = r.headers["X-Request-Id"]
    [line] = [x for x in access_lines(caplog.records) if x["route"] == "/healthz"]
    assert line["request_id"] == request_id and line["status"] == 200


def test_text_lines_carry_the_fields():
    record = logging.LogRecord("wattgate.access", logging.INFO, __file__, 1, "%s %s %s",
                               ("GET", "/healthz", 200), None)
    record.request = {"request_id": "ab", "status": 200, "route": "/healthz", "app": "app1"}
    line = TextFormatter().format(record)
    assert line.endswith("GET /healthz 200 request_id=ab route=/healthz status=200 app=app1")
    parsed = json.loads(JSONFormatter().format(record))
    assert parsed["level"] == "info" and parsed["app"] == "app1" and parsed["time"].endswith("Z")


@pytest.mark.parametrize("value,ok", [("json", True), ("TEXT", True), ("xml", False)])
def test_log_format_setting(value, ok):
    from wattgate.config import load_config
    from wattgate.errors import ConfigError
    if ok:
        assert load_config(None, env={"WATTGATE_LOG__FORMAT": value}).log_format == value.lower()
    else:
        with pytest.raises(ConfigError, match="log.format|LOG__FORMAT"):
            load_config(None, env={"WATTGATE_LOG__FORMAT": value})


async def test_serve_writes_json_lines_when_configured(tmp_path):
    """``wattgate serve`` with ``[log] format = "json"``: every stderr line is one JSON object."""
    import asyncio
    import os
    import sys

    import aiohttp
    from conftest import free_port

    port = free_port()
    config = tmp_path / "wattgate.toml"
    config.write_text('[log]\nformat = "json"\n')
    env = {**os.environ, "WATTGATE_DATABASE__PATH": str(tmp_path / "w.db"),
           "WATTGATE_CONFIG": str(config)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wattgate", "serve", "--port", str(port), "--log-level", "info",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert b"listening" in line
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                request_id = r.headers["X-Request-Id"]
            async with http.get(f"http://127.0.0.1:{port}/api/v1/models",
                                headers={"Authorization": "Bearer sk_live_nope_x"}) as r:
                assert r.status == 401
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    lines = [json.loads(x) for x in err.decode().splitlines() if x.strip()]
    health = [x for x in lines if x.get("route") == "/healthz"]
    assert health and health[0]["request_id"] == request_id and health[0]["level"] == "info"
    assert any(x.get("route") == "/api/v1/models" and x["status"] == 401 for x in lines)
    assert "sk_live_nope_x" not in err.decode()
