"""The command line as an operator uses it: real subprocesses, a real server, a fake upstream."""

from __future__ import annotations

import calendar
import json
import os
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import FUNDING_KEY, free_port

from wattgate.keyfile import load_keys
from wattgate.sealing import Sealer, connection_aad, key_id_of
from wattgate.store import SQLiteStore

ORIGIN = "http://localhost:3000"
NO_POLICY = {"models": [], "maxCapUsd": None, "maxTokens": None, "suggestedCapUsd": None}


def wait_for_port(port: int, proc: subprocess.Popen, deadline: float = 60.0) -> None:
    """Readiness, not timing: poll until the child listens (or died)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"process exited early: {proc.stderr.read() if proc.stderr else ''}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


@contextmanager
def running(args: list[str], env: dict[str, str], cwd: Path, port: int) -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, proc)
        yield
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.fixture(scope="module")
def upstream_url(tmp_path_factory) -> Iterator[str]:  # type: ignore[no-untyped-def]
    port = free_port()
    with running(["-m", "wattgate.fakeupstream", "--port", str(port)], clean_env(),
                 tmp_path_factory.mktemp("fake"), port):
        yield f"http://127.0.0.1:{port}/api/v1"


ROOT = Path(__file__).resolve().parent.parent


def clean_env(**settings: str) -> dict[str, str]:
    """No WATTGATE_* from the caller; children import this checkout's wattgate, whatever cwd."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATTGATE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(settings)
    return env


@pytest.fixture
def env(tmp_path, upstream_url) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return clean_env(WATTGATE_DATABASE__PATH=str(tmp_path / "data" / "wattgate.db"),
                     WATTGATE_UPSTREAM__BASE_URL=upstream_url)


def wattgate(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wattgate", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def ok(env: dict[str, str], *args: str) -> Any:
    result = wattgate(env, *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if "--json" in args else result.stdout


@pytest.fixture
def server(env, tmp_path) -> Iterator[str]:  # type: ignore[no-untyped-def]
    port = free_port()
    with running(["-m", "wattgate", "serve", "--port", str(port)], env, tmp_path, port):
        yield f"http://127.0.0.1:{port}"


def http(method: str, url: str, auth: str | None = None, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if auth:
        req.add_header("Authorization", f"Bearer {auth}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def connect(url: str, secret_key: str, user: str, cap: float = 10) -> dict[str, Any]:
    status, body = http("POST", url + "/api/v1/sessions", secret_key, {"appUserId": user})
    assert status == 200, body
    status, body = http("POST", url + "/api/v1/connections", body["token"],
                        {"monthlyUsd": cap, "fundingKey": FUNDING_KEY})
    assert status == 200, body
    return body


def user_status(url: str, secret_key: str, user: str) -> tuple[int, Any]:
    return http("GET", f"{url}/api/v1/status?appUserId={user}", secret_key)


def create(env: dict[str, str], name: str = "Demo") -> dict[str, str]:
    return ok(env, "apps", "create", "--name", name, "--origin", ORIGIN, "--json")


# ---- apps create --json, and its keys against a running server ---------------

def test_apps_create_json_keys_work_against_a_running_server(env, tmp_path):
    creds = create(env)
    assert set(creds) == {"appId", "publishableKey", "secretKey"}
    app_id = creds["appId"]
    assert "_" not in app_id
    assert creds["publishableKey"] == f"pk_live_{app_id}"
    assert creds["secretKey"].startswith(f"sk_live_{app_id}_")
    keys_file = tmp_path / "data" / "wattgate.db.keys.json"
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600

    port = free_port()
    with running(["-m", "wattgate", "serve", "--port", str(port)], env, tmp_path, port):
        url = f"http://127.0.0.1:{port}"
        assert http("GET", url + "/healthz") == (200, {"ok": True})
        assert user_status(url, creds["secretKey"], "user_1")[1]["connected"] is False
        connect(url, creds["secretKey"], "user_1", cap=10)
        status, body = user_status(url, creds["secretKey"], "user_1")
        assert status == 200 and body == {"connected": True, "limits": {"monthlyUsd": 10},
                                          "usage": {"monthlyUsd": 0}, "remainingUsd": 10,
                                          "heldUsd": 0}
        # The server reused the keys file the CLI created: no second one, same secrets.
        assert [p.name for p in keys_file.parent.glob("*.keys.json")] == [keys_file.name]


def test_human_output_shows_the_keys_once(env):
    out = ok(env, "apps", "create", "--name", "Demo", "--origin", ORIGIN)
    assert "pk_live_app" in out and "sk_live_app" in out and "shown once" in out


def test_apps_list_and_origins(env):
    creds = create(env, "Listed")
    app_id = creds["appId"]
    [row] = ok(env, "apps", "list", "--json")
    assert row == {"appId": app_id, "name": "Listed", "publishableKey": f"pk_live_{app_id}",
                   "origins": [ORIGIN], "policy": NO_POLICY}
    assert "sk_live" not in json.dumps(row)
    ok(env, "apps", "add-origin", app_id, "HTTPS://App.Example.com:443/")
    assert ok(env, "apps", "list", "--json")[0]["origins"] == ["http://localhost:3000",
                                                               "https://app.example.com"]
    ok(env, "apps", "remove-origin", app_id, ORIGIN)
    assert ok(env, "apps", "list", "--json")[0]["origins"] == ["https://app.example.com"]
    ok(env, "apps", "delete", app_id)
    assert ok(env, "apps", "list", "--json") == []


def test_rotate_secret_with_overlap_0_stops_the_old_key_at_once(env, server):
    creds = create(env)
    connect(server, creds["secretKey"], "u")
    _, session = http("POST", server + "/api/v1/sessions", creds["secretKey"], {"appUserId": "u"})
    rotated = ok(env, "apps", "rotate-secret", creds["appId"], "--overlap", "0", "--json")
    assert rotated["appId"] == creds["appId"] and rotated["secretKey"] != creds["secretKey"]
    assert rotated["previousValidUntil"] is None
    status, body = user_status(server, creds["secretKey"], "u")
    assert (status, body["error"]["code"]) == (401, "auth")
    status, body = user_status(server, rotated["secretKey"], "u")
    assert status == 200 and body["connected"] is True
    # Session tokens minted with the old secret end with it.
    status, body = http("GET", server + "/api/v1/connections", session["token"])
    assert (status, body["error"]["code"]) == (401, "auth")


def test_rotate_secret_keeps_the_old_key_for_the_overlap_until_retired(env, server):
    creds = create(env)
    connect(server, creds["secretKey"], "u")
    _, session = http("POST", server + "/api/v1/sessions", creds["secretKey"], {"appUserId": "u"})
    before = time.time()
    rotated = ok(env, "apps", "rotate-secret", creds["appId"], "--overlap", "24h", "--json")
    until = calendar.timegm(time.strptime(rotated["previousValidUntil"], "%Y-%m-%dT%H:%M:%SZ"))
    assert before + 86400 - 1 <= until <= time.time() + 86400 + 1
    for secret in (creds["secretKey"], rotated["secretKey"]):  # both, while deploys roll
        status, body = user_status(server, secret, "u")
        assert status == 200 and body["connected"] is True
    assert http("GET", server + "/api/v1/connections", session["token"])[0] == 200

    assert ok(env, "apps", "retire-secret", creds["appId"], "--json") == {
        "appId": creds["appId"], "retired": True}
    status, body = user_status(server, creds["secretKey"], "u")  # the server: at once
    assert (status, body["error"]["code"]) == (401, "auth")
    status, body = http("GET", server + "/api/v1/connections", session["token"])
    assert (status, body["error"]["code"]) == (401, "auth")
    assert user_status(server, rotated["secretKey"], "u")[0] == 200
    assert "nothing to retire" in ok(env, "apps", "retire-secret", creds["appId"])


def test_rotate_secret_without_overlap_stops_the_old_key_at_once_as_it_always_did(env, server):
    # A runbook for a leaked key types the command bare: the key must not work a day more.
    creds = create(env)
    connect(server, creds["secretKey"], "u")
    rotated = ok(env, "apps", "rotate-secret", creds["appId"], "--json")
    assert rotated["previousValidUntil"] is None
    status, body = user_status(server, creds["secretKey"], "u")
    assert (status, body["error"]["code"]) == (401, "auth")
    assert user_status(server, rotated["secretKey"], "u")[0] == 200


def test_rotate_secret_says_until_when_the_old_key_works_and_how_to_end_it(env):
    creds = create(env)
    out = ok(env, "apps", "rotate-secret", creds["appId"], "--overlap", "90m")
    assert "sk_live_" + creds["appId"] in out and "shown once" in out
    assert " UTC" in out and f"wattgate apps retire-secret {creds['appId']}" in out
    out = ok(env, "apps", "retire-secret", creds["appId"])
    assert "retired the previous secret key" in out
    out = ok(env, "apps", "rotate-secret", creds["appId"], "--overlap", "0")
    assert "no longer works" in out and "retire-secret" not in out


@pytest.mark.parametrize("overlap", ["1w", "-1h", "31d", "soon"])
def test_rotate_secret_refuses_a_bad_overlap_and_rotates_nothing(env, overlap):
    creds = create(env)
    assert_one_line_error(wattgate(env, "apps", "rotate-secret", creds["appId"],
                                   f"--overlap={overlap}"), "--overlap")
    assert "nothing to retire" in ok(env, "apps", "retire-secret", creds["appId"])


def test_a_deleted_app_cannot_be_rotated_or_retired(env):
    creds = create(env)
    ok(env, "apps", "rotate-secret", creds["appId"])
    ok(env, "apps", "delete", creds["appId"])
    for command in ("rotate-secret", "retire-secret"):
        assert_one_line_error(wattgate(env, "apps", command, creds["appId"]), "unknown app")


def test_deleted_app_stops_at_once(env, server):
    creds = create(env)
    ok(env, "apps", "delete", creds["appId"])
    assert user_status(server, creds["secretKey"], "u")[0] == 401


# ---- apps set-policy -----------------------------------------------------------

def test_set_policy_round_trip_binds_a_running_server(env, server):
    creds = create(env)
    app_id = creds["appId"]
    connect(server, creds["secretKey"], "u", cap=10)
    set_ = ok(env, "apps", "set-policy", app_id, "--models", "OpenAI/*", "fake/flat-2c",
              "--max-cap", "20", "--max-tokens", "300", "--suggested-cap", "7.50", "--json")
    wanted = {"models": ["openai/*", "fake/flat-2c"], "maxCapUsd": 20, "maxTokens": 300,
              "suggestedCapUsd": 7.5}
    assert set_ == {"appId": app_id, "policy": wanted}
    assert ok(env, "apps", "list", "--json")[0]["policy"] == wanted
    assert ok(env, "apps", "show", app_id, "--json")["policy"] == wanted
    shown = ok(env, "apps", "show", app_id)
    assert "openai/*, fake/flat-2c" in shown and "$20.00 a month" in shown
    assert "300 per call" in shown and "$7.50" in shown
    # Options given replace those limits only; "none" removes one; --models alone, all.
    partial = ok(env, "apps", "set-policy", app_id, "--max-tokens", "none", "--models", "--json")
    assert partial["policy"] == {**wanted, "models": [], "maxTokens": None}
    ok(env, "apps", "set-policy", app_id, "--models", "openai/*", "--max-tokens", "300")

    def chat(model: str, **extra: Any) -> tuple[int, Any]:
        return http("POST", server + "/api/v1/chat/completions", creds["secretKey"],
                    {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra},
                    {"x-wattfare-user": "u"})
    deadline = time.monotonic() + 5  # the server sees another process's commit within 1 s
    while (answer := chat("anthropic/claude-sonnet-4"))[0] != 403 and time.monotonic() < deadline:
        time.sleep(0.1)
    status, body = answer
    assert (status, body["error"]["code"]) == (403, "policy_violation"), body
    assert "anthropic/claude-sonnet-4" in body["error"]["message"]
    assert chat("openai/gpt-4o-mini")[0] == 200
    status, body = chat("openai/gpt-4o-mini", max_tokens=301)
    assert status == 403 and "max_tokens 301" in body["error"]["message"]
    assert ok(env, "apps", "set-policy", app_id, "--clear", "--json")["policy"] == NO_POLICY
    deadline = time.monotonic() + 5
    while chat("anthropic/claude-sonnet-4")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.mark.parametrize("args, words", [
    (("--max-cap", "5", "--suggested-cap", "6"), "must not be above the max cap"),
    (("--max-cap", "0"), "more than $0"),
    (("--max-cap", "ten"), "amount of USD"),
    (("--max-tokens", "many"), "whole number"),
    (("--max-tokens", "0"), "max tokens"),
    (("--models", "open ai/*"), "model pattern"),
])
def test_set_policy_refuses_bad_input_in_one_line(env, args, words):
    app_id = create(env)["appId"]
    assert_one_line_error(wattgate(env, "apps", "set-policy", app_id, *args), words)
    assert ok(env, "apps", "show", app_id, "--json")["policy"] == NO_POLICY


# ---- keys rotate -------------------------------------------------------------

def test_keys_rotate_reseals_every_funding_key(env, server, tmp_path):
    creds = create(env)
    connect(server, creds["secretKey"], "u1")
    connect(server, creds["secretKey"], "u2", cap=3)
    out = ok(env, "keys", "rotate")
    assert "re-sealed 2 funding keys" in out

    keys = load_keys(tmp_path / "data" / "wattgate.db.keys.json", env={}, create=False)
    assert keys.active_key_id == "k2" and set(keys.master_keys) == {"k1", "k2"}
    sealer = Sealer(keys.master_keys, keys.active_key_id)
    store = SQLiteStore.open(tmp_path / "data" / "wattgate.db")
    try:
        for table, row_id, sealed in _run(store.all_sealed_keys()):
            assert table == "connections" and key_id_of(sealed) == "k2"
            assert sealer.unseal(sealed, connection_aad(row_id)) == FUNDING_KEY
    finally:
        _run(store.close())
    for user in ("u1", "u2"):
        assert user_status(server, creds["secretKey"], user)[1]["connected"] is True


def test_proxied_calls_work_after_keys_rotate_without_a_restart(env, server):
    creds = create(env)
    connect(server, creds["secretKey"], "u")
    ok(env, "keys", "rotate")
    status, body = http("POST", server + "/api/v1/chat/completions", creds["secretKey"],
                        {"model": "openai/gpt-4o-mini",
                         "messages": [{"role": "user", "content": "hi"}]},
                        headers={"x-wattfare-user": "u"})
    assert status == 200, body
    assert body["choices"][0]["message"]["content"]


def _run(coro: Any) -> Any:
    import asyncio

    async def wrap() -> Any:
        return await coro
    return asyncio.run(wrap())


# ---- errors: one line, non-zero, no traceback --------------------------------

def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wattgate: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_config_file(env, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nport = 1\n")
    assert_one_line_error(wattgate(env, "apps", "list", "--config", str(bad)), "not valid TOML")
    assert_one_line_error(wattgate(env | {"WATTGATE_CONFIG": str(bad)}, "apps", "list"),
                          "not valid TOML")
    assert_one_line_error(wattgate(env, "serve", "--config", str(tmp_path / "missing.toml")),
                          "not found")


@pytest.mark.parametrize("token", ["4821", "Password1!", "a" * 40, "0123456789abcdef" * 2])
def test_a_guessable_admin_token_refuses_to_serve(env, token):
    # A 4-digit token was guessed in 0.6 s: the server must not start with one.
    result = wattgate(env | {"WATTGATE_ADMIN_TOKEN": token}, "serve", "--port", str(free_port()))
    assert_one_line_error(result, "WATTGATE_ADMIN_TOKEN", "too weak")
    assert token not in result.stderr + result.stdout


def test_unknown_key_in_toml(env, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nprot = 8080\n")
    assert_one_line_error(wattgate(env, "serve", "--config", str(bad)), "server.prot")


def test_bad_value_in_environment(env):
    assert_one_line_error(wattgate(env | {"WATTGATE_SERVER__PORT": "http"}, "serve"),
                          "WATTGATE_SERVER__PORT")


@pytest.mark.parametrize("args", [
    ("apps", "rotate-secret", "app0000000000000000"), ("apps", "delete", "app0000000000000000"),
    ("apps", "retire-secret", "app0000000000000000"),
    ("apps", "add-origin", "app0000000000000000", "https://x.example"),
    ("apps", "remove-origin", "nonsense", "https://x.example"),
    ("apps", "set-policy", "app0000000000000000", "--clear"),
    ("apps", "show", "app0000000000000000"),
])
def test_unknown_app(env, args):
    assert_one_line_error(wattgate(env, *args), "unknown app")


def test_bad_origin(env):
    assert_one_line_error(wattgate(env, "apps", "create", "--name", "X", "--origin",
                                   "localhost:3000/path"), "not an origin")


@pytest.mark.parametrize("command", [("apps", "list"), ("keys", "rotate"),
                                     ("serve", "--port", "0")])
def test_unwritable_database_path(env, tmp_path, command):
    (tmp_path / "a-file").write_text("")
    bad = env | {"WATTGATE_DATABASE__PATH": str(tmp_path / "a-file" / "wattgate.db")}
    assert_one_line_error(wattgate(bad, *command), "cannot open database")


def test_a_lost_keys_file_is_not_silently_replaced(env, tmp_path):
    create(env)
    keys_file = tmp_path / "data" / "wattgate.db.keys.json"
    keys_file.unlink()
    for command in (("apps", "list"), ("serve", "--port", "0")):
        assert_one_line_error(wattgate(env, *command), "restore the keys file")
    assert not keys_file.exists()


def test_busy_port(env, server, tmp_path):
    port = server.rsplit(":", 1)[1]
    other = {**env, "WATTGATE_DATABASE__PATH": str(tmp_path / "other" / "wattgate.db")}
    assert_one_line_error(wattgate(other, "serve", "--port", port), "cannot listen", port)


def test_a_second_server_on_one_database_is_refused(env, server):
    # Budget holds of calls in flight live in the serving process: two servers on one
    # ledger could together pass a cap, so the second one refuses to start.
    assert_one_line_error(wattgate(env, "serve", "--port", str(free_port())),
                          "another wattgate server is using", "wattgate.db")
    assert ok(env, "apps", "list") is not None  # CLI commands still work beside it


def test_newer_database_is_refused(env, tmp_path):
    import sqlite3

    path = tmp_path / "data" / "wattgate.db"
    path.parent.mkdir()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 999")
    db.close()
    assert_one_line_error(wattgate(env, "apps", "list"), "newer")


def test_serve_log_level(env, tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "wattgate", "serve", "--port", str(port),
                             "--log-level", "debug"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, proc)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert f"listening on http://127.0.0.1:{port}" in out
    assert "level=debug" in err  # logfmt text lines
    assert wattgate(env, "serve", "--log-level", "loud").returncode == 2  # argparse usage


def test_serve_runs_on_embedded_defaults_in_the_current_folder(tmp_path, upstream_url):
    """No config at all: the database and keys file land in the working folder."""
    port = free_port()
    env = clean_env()
    with running(["-m", "wattgate", "serve", "--port", str(port)], env, tmp_path, port):
        assert http("GET", f"http://127.0.0.1:{port}/healthz") == (200, {"ok": True})
    assert (tmp_path / "wattgate.db").exists()
    assert stat.S_IMODE((tmp_path / "wattgate.db.keys.json").stat().st_mode) == 0o600
