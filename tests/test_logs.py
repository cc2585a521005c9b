"""The request log: one structured line per request, and no secret or prompt in any log line."""

from __future__ import annotations

import json
import logging
import re

import pytest
from conftest import FUNDING_KEY
from test_admin_functional import close_consoles, secret_in, sign_in  # noqa: F401 (fixture)
from test_grants_functional import mint_grant, redeem

from wattgate.logs import FIELDS, JSONFormatter, TextFormatter, configure, user_hash
from wattgate.redaction import Redactor, redact

PROMPT = "my-private-prompt-okapi-7731"
GRANT_FUNDING_KEY = "sk-or-v1-" + "9" * 48


_PAIR = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)=("(?:[^"\\]|\\.)*"|[^\s"=]+)(?: |$)')


def logfmt(line: str) -> dict[str, str]:
    """A strict logfmt reader: the whole line must be key=value pairs, one space apart."""
    assert "\n" not in line and "\r" not in line, line
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(line):
        m = _PAIR.match(line, pos)
        assert m, f"not logfmt at {pos}: {line[pos:pos + 40]!r}"
        key, raw = m.groups()
        assert key not in fields, f"field {key} twice in {line!r}"
        fields[key] = json.loads(raw) if raw.startswith('"') else raw
        pos = m.end()
    return fields


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
    assert line.endswith(' msg="GET /healthz 200" request_id=ab route=/healthz status=200 app=app1')
    fields = logfmt(line)
    assert fields["level"] == "info" and fields["logger"] == "wattgate.access"
    assert fields["time"].endswith("Z")
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


# ---- whatever the client sends, no secret and no forged field reaches a log line ----------
LEAKED = "S3cr3tVa1ue" * 3  # inside every secret below; must appear on no log line
SECRET_KEY = "sk_live_app0123456789abcdef_" + LEAKED
PRESENCE = "wg_presence=" + LEAKED
GRANT = "wfg_" + LEAKED
FORGED = "status=200 user=forged cost_usd=0"


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send bytes as they are (no client library fixing them up); the answer, until close."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(request)
        except OSError:  # the server may close before reading all of an over-long head
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
        return out


HOSTILE = [
    # Over the 64 KiB line limit, the secret at the start and at the end of the value.
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + SECRET_KEY.encode()
    + b"A" * 70000 + b"\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nCookie: " + b"B" * 66000 + PRESENCE.encode()
    + b"\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"C" * 65530 + GRANT.encode() + b"\r\n\r\n",
    # Malformed: no colon, a control character, a bad request line, a bad method.
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nCookie " + PRESENCE.encode() + b"\r\n\r\n",
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + SECRET_KEY.encode()
     + b"\x01\r\n\r\n"),
    b"GET /healthz?k=" + SECRET_KEY.encode() + b" HTTP/1.1 x\r\nHost: x\r\n\r\n",
    SECRET_KEY.encode() + b" /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nx-wattfare-grant: " + GRANT.encode()
    + b"\r\nContent-Length: nope\r\n\r\n",
]


def serve_log(tmp_path, fmt: str, requests: list[bytes]) -> tuple[str, list[bytes]]:
    """Run ``wattgate serve`` (log level debug, the given format), send raw requests; its
    stderr and the answers."""
    import os
    import subprocess
    import sys

    from conftest import free_port
    from test_cli import clean_env, wait_for_port

    port = free_port()
    env = clean_env(WATTGATE_DATABASE__PATH=str(tmp_path / f"{fmt}.db"),
                    WATTGATE_LOG__FORMAT=fmt, WATTGATE_UPSTREAM__BASE_URL="http://127.0.0.1:9/")
    proc = subprocess.Popen([sys.executable, "-m", "wattgate", "serve", "--port", str(port),
                             "--log-level", "debug"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc)
        answers = [raw_exchange(port, r) for r in requests]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert os.path.exists(tmp_path / f"{fmt}.db")
    return err.decode(), answers


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_malformed_and_over_long_headers_leak_no_secret_into_the_log(tmp_path, fmt):
    # aiohttp's parser logged "Error handling request" with an excerpt of the bytes it
    # refused: a whole secret key or presence cookie landed on stderr.
    err, answers = serve_log(tmp_path, fmt, HOSTILE)
    assert LEAKED not in err and LEAKED[:8] not in err, err[-2000:]
    for answer in answers:
        if answer:  # an answer, when there is one, is the JSON error body
            status = int(answer.split(b" ", 2)[1])
            assert 400 <= status < 500, answer[:200]
            assert b'"error"' in answer and LEAKED.encode() not in answer
    assert any(a for a in answers), "the server answered nothing at all"
    for line in err.splitlines():
        logfmt(line) if fmt == "text" else json.loads(line)  # one record, one line
    assert "malformed HTTP request" in err  # the refusals are logged, without their bytes


def test_forged_fields_in_the_request_stay_inside_their_value(tmp_path):
    # `Authorization: Bearer sk_live_FORGED status=200 user=… cost_usd=…` used to write
    # those fields into the text log; so could a path, an app id in a path, a user id.
    forged_key = "sk_live_FORGED " + FORGED
    requests = [
        b"GET /api/v1/nope HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + forged_key.encode()
        + b"\r\nConnection: close\r\n\r\n",
        (b"GET /api/v1/x%20status=200%0Auser=forged%22%20cost_usd=0 HTTP/1.1\r\nHost: x\r\n"
         b"Connection: close\r\n\r\n"),
        (b"GET /admin/apps/app%20status=200%0Auser=forged/usage HTTP/1.1\r\nHost: x\r\n"
         b"Connection: close\r\n\r\n"),
        b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + forged_key.encode() + b"\r\nx-wattfare-user: lena\" " + FORGED.encode()
        + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    ]
    err, answers = serve_log(tmp_path, "text", requests)
    statuses = [int(a.split(b" ", 2)[1]) for a in answers]
    access = [logfmt(line) for line in err.splitlines() if "logger=wattgate.access" in line]
    assert [int(f["status"]) for f in access] == statuses  # one line per request
    for fields in access:
        assert set(fields) <= {"time", "level", "logger", "msg", *FIELDS}
        assert "cost_usd" not in fields and "forged" not in fields.get("user", "")
        assert all("forged" not in v for k, v in fields.items() if k not in ("msg", "app"))
    assert [f.get("app") for f in access] == [None, None, "app status=200\nuser=forged", None]
    for line in err.splitlines():
        logfmt(line)


def test_a_forged_model_name_is_one_quoted_value():
    record = logging.LogRecord("wattgate.access", logging.INFO, __file__, 1, "%s %s %s",
                               ("POST", "/api/v1/chat/completions", 200), None)
    model = 'openai/gpt-4o" status=500 outcome=x\nlevel=error msg="forged'
    record.request = {"request_id": "ab", "status": 200, "model": model, "user": "u=1 x"}
    Redactor().filter(record)
    line = TextFormatter().format(record)
    fields = logfmt(line)
    assert fields["model"] == model and fields["status"] == "200" and fields["level"] == "info"
    assert fields["user"] == "u=1 x" and "outcome" not in fields


@pytest.mark.parametrize("text, kept", [
    ("Authorization: Bearer " + SECRET_KEY, "Authorization: [redacted]"),
    ("b'Cookie: " + PRESENCE + "\\r\\nHost: x'", "\\r\\nHost: x'"),
    ("key " + SECRET_KEY + " and sk-or-v1-" + LEAKED, "sk-or-[redacted]"),
    ("token=" + GRANT + "; next", "wfg_[redacted]"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0." + LEAKED, "jwt eyJ[redacted]"),
    ("Set-Cookie: wattgate_admin=" + LEAKED + "; Path=/admin", "Set-Cookie: [redacted]"),
    ("x-wattfare-grant=" + LEAKED, "x-wattfare-grant=[redacted]"),
])
def test_redact_removes_each_kind_of_secret(text, kept):
    out = redact(text)
    assert LEAKED not in out and LEAKED[:8] not in out and kept in out


def test_every_record_through_the_root_handler_is_redacted(capsys):
    # Whoever logs (here a library's logger with %-args and a traceback), configure()'s
    # handler writes it redacted.
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = [logging.StreamHandler()]
    try:
        configure("info", "text")
        try:
            raise ValueError("bad header b'Authorization: Bearer " + SECRET_KEY + "'")
        except ValueError:
            logging.getLogger("aiohttp.server").exception("Error handling %s", PRESENCE)
    finally:
        root.handlers, root.level = saved
        logging.captureWarnings(False)
    err = capsys.readouterr().err
    assert LEAKED not in err and "ValueError" in err and len(err.strip().splitlines()) == 1
