"""Secret rotation with an overlap, through the running gateway: the new secret works at
once, the old one (and the session tokens it minted) until its deadline on the injected
clock or its retirement, and never after; on every endpoint a secret authenticates."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import pytest

from wattgate import rotation
from wattgate.config import load_config
from wattgate.credentials import mint_credentials
from wattgate.errors import AuthError
from wattgate.gateway import matching_secret
from wattgate.store import open_store

HOUR = 3600.0
OVERLAP = 300.0  # shorter than a session token's life (600 s): what ends one is the rotation
CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def call(h, method: str, path: str, auth: str, *,  # type: ignore[no-untyped-def]
               headers: dict[str, str] | None = None, **kw: Any) -> tuple[int, Any]:
    hdrs = {"Authorization": f"Bearer {auth}"} | (headers or {})
    async with h.http.request(method, h.api + path, headers=hdrs, **kw) as r:
        raw = await r.read()
        assert b"Traceback" not in raw
        return r.status, json.loads(raw) if raw and r.content_type == "application/json" else None


async def secret_works(h, secret: str,  # type: ignore[no-untyped-def]
                       user: str = "u") -> dict[str, int]:
    """The status of every endpoint an app's secret key authenticates (401: refused)."""
    out = {}
    out["status"], _ = await call(h, "GET", f"/status?appUserId={user}", secret)
    out["models"], _ = await call(h, "GET", "/models", secret)
    out["chat"], _ = await call(h, "POST", "/chat/completions", secret,
                                headers={"x-wattfare-user": user}, json=CHAT)
    out["embeddings"], _ = await call(h, "POST", "/embeddings", secret,
                                      headers={"x-wattfare-user": user},
                                      json={"model": "openai/text-embedding-3-small",
                                            "input": "hi"})
    # A grant token the app does not have: past authentication it is a 4xx of its own.
    out["grant"], _ = await call(h, "GET", "/grants/current", secret,
                                 headers={"x-wattfare-grant": "wfg_" + "x" * 43})
    out["sessions"], body = await call(h, "POST", "/sessions", secret, json={"appUserId": user})
    if out["sessions"] == 200:
        out["its_token"] = await token_works(h, body["token"])
    return out


async def token_works(h, token: str) -> int:  # type: ignore[no-untyped-def]
    status, _ = await call(h, "GET", "/connections", token)
    return status


def refused(result: dict[str, int]) -> bool:
    return set(result.values()) == {401}


def accepted(result: dict[str, int]) -> bool:
    return 401 not in result.values() and result["status"] == result["chat"] == 200 \
        and result["its_token"] == 200


async def connected_app(h):  # type: ignore[no-untyped-def]
    """An app whose user "u" is connected (with the app's first secret)."""
    app = await h.create_app()
    await h.connect(app, "u", monthly_usd=10)
    return app


async def rotated(h, app, overlap: float) -> rotation.Rotation:  # type: ignore[no-untyped-def]
    done = await rotation.rotate(h.gw, app.app_id, overlap)
    assert done is not None
    return done


async def test_old_secret_works_during_the_overlap_and_fails_a_second_after_it(harness):
    h = harness
    app = await connected_app(h)
    old_token = await h.session(app, "u")
    assert accepted(await secret_works(h, app.secret_key))  # warm: the old key is cached
    done = await rotated(h, app, OVERLAP)
    assert done.previous_until is not None and h.clock() + OVERLAP <= done.previous_until \
        <= h.clock() + OVERLAP + 1
    assert accepted(await secret_works(h, done.secret_key))  # the new one: at once
    new_token = await h.session(dataclasses.replace(app, secret_key=done.secret_key), "u")
    during = await secret_works(h, app.secret_key)
    assert accepted(during)
    assert await token_works(h, old_token) == 200  # tokens the old one minted, too

    h.clock.now = done.previous_until - 1
    assert accepted(await secret_works(h, app.secret_key))
    assert await token_works(h, old_token) == 200
    h.clock.now = done.previous_until + 1
    # Cached or not, the deadline is read off the clock on every request.
    assert app.secret_key in h.gw._verified
    assert refused(await secret_works(h, app.secret_key))
    assert await token_works(h, old_token) == 401  # not expired (600 s): rotated away
    assert await token_works(h, new_token) == 200
    h.gw._verified.clear()
    assert refused(await secret_works(h, app.secret_key))
    assert accepted(await secret_works(h, done.secret_key))
    # The user's connection and budget never noticed.
    rolled = dataclasses.replace(app, secret_key=done.secret_key)
    assert (await h.status(rolled, "u"))["connected"] is True


async def test_a_session_minted_with_the_old_secret_during_the_overlap_ends_with_it(harness):
    h = harness
    app = await connected_app(h)
    done = await rotated(h, app, OVERLAP)
    late_token = await h.session(app, "u")  # an instance not rolled yet mints one
    new_token = await h.session(dataclasses.replace(app, secret_key=done.secret_key), "u")
    assert await token_works(h, late_token) == 200
    assert await h.gw.store.retire_previous_secret(app.app_id)
    assert await token_works(h, late_token) == 401
    assert await token_works(h, new_token) == 200
    # A token minted with the new secret outlives the old one's deadline too.
    assert done.previous_until is not None
    h.clock.now = done.previous_until + 1
    assert await token_works(h, new_token) == 200


async def test_retiring_ends_the_overlap_at_once(harness):
    h = harness
    app = await connected_app(h)
    done = await rotated(h, app, 7 * 24 * HOUR)
    assert accepted(await secret_works(h, app.secret_key))
    assert await h.gw.store.retire_previous_secret(app.app_id)
    assert refused(await secret_works(h, app.secret_key))
    assert accepted(await secret_works(h, done.secret_key))
    assert not await h.gw.store.retire_previous_secret(app.app_id)


async def test_a_retirement_by_another_process_is_seen_within_a_second(harness):
    h = harness
    app = await connected_app(h)
    await rotated(h, app, HOUR)
    assert accepted(await secret_works(h, app.secret_key))  # cached on this process
    other = await open_store(load_config(None, env=h.db.env))  # the CLI, another host
    try:
        assert await other.retire_previous_secret(app.app_id)
    finally:
        await other.close()
    loop = asyncio.get_running_loop()
    retired_at = loop.time()
    while True:
        status, _ = await call(h, "GET", "/status?appUserId=u", app.secret_key)
        if status == 401:
            break
        assert loop.time() - retired_at < 1.0, "the old secret outlived its retirement"
        await asyncio.sleep(0.02)
    assert refused(await secret_works(h, app.secret_key))


async def test_an_immediate_rotation_kills_the_old_secret_at_once(harness):
    h = harness
    app = await connected_app(h)
    old_token = await h.session(app, "u")
    assert accepted(await secret_works(h, app.secret_key))
    done = await rotated(h, app, 0)
    assert done.previous_until is None
    assert refused(await secret_works(h, app.secret_key))
    assert await token_works(h, old_token) == 401
    assert accepted(await secret_works(h, done.secret_key))


async def test_a_second_rotation_during_the_overlap_drops_the_oldest(harness):
    h = harness
    app = await connected_app(h)
    b = await rotated(h, app, HOUR)
    assert accepted(await secret_works(h, app.secret_key))
    c = await rotated(h, app, HOUR)
    assert refused(await secret_works(h, app.secret_key))  # A: gone, not 3 secrets
    assert accepted(await secret_works(h, b.secret_key))
    assert accepted(await secret_works(h, c.secret_key))
    # A leak found during an overlap: an immediate rotation ends every older secret.
    d = await rotated(h, app, 0)
    assert refused(await secret_works(h, b.secret_key))
    assert refused(await secret_works(h, c.secret_key))
    assert accepted(await secret_works(h, d.secret_key))


async def test_a_deleted_apps_secrets_both_fail_and_it_cannot_be_rotated(harness):
    h = harness
    app = await connected_app(h)
    old_token = await h.session(app, "u")
    done = await rotated(h, app, HOUR)
    new_token = await h.session(dataclasses.replace(app, secret_key=done.secret_key), "u")
    assert accepted(await secret_works(h, app.secret_key))
    assert await h.gw.store.delete_app(app.app_id, now=h.clock())
    for secret in (app.secret_key, done.secret_key):
        assert refused(await secret_works(h, secret))
    for token in (old_token, new_token):
        assert await token_works(h, token) == 401
    assert await rotation.rotate(h.gw, app.app_id, HOUR) is None
    assert await rotation.rotate(h.gw, app.app_id, 0) is None
    assert not await h.gw.store.retire_previous_secret(app.app_id)
    for secret in (app.secret_key, done.secret_key):
        assert refused(await secret_works(h, secret))


async def test_another_apps_secret_never_matches_through_the_overlap(harness):
    h = harness
    a = await h.create_app("A")
    b = await h.create_app("B")
    await rotated(h, a, HOUR)
    # B's secret under A's id (either of A's secrets' places): refused.
    forged = f"sk_live_{a.app_id}_{b.secret_key.split('_', 3)[3]}"
    assert refused(await secret_works(h, forged))
    fresh = mint_credentials(a.app_id)
    assert refused(await secret_works(h, fresh.secret_key))


def test_matching_secret_names_which_one_and_honours_the_deadline():
    assert matching_secret("c", "p", 100.0, "c", now=50.0) is None
    assert matching_secret("c", "p", 100.0, "p", now=99.0) == 100.0
    for presented, now in (("p", 100.0), ("p", 101.0), ("x", 50.0), ("", 50.0)):
        with pytest.raises(AuthError):
            matching_secret("c", "p", 100.0, presented, now=now)
    with pytest.raises(AuthError):  # a tombstone's empty secret matches nothing
        matching_secret("", None, None, "", now=0.0)
    with pytest.raises(AuthError):  # no previous secret: nothing to match it with
        matching_secret("c", None, None, "-" * 64, now=0.0)


@pytest.mark.parametrize("text,seconds", [("24h", 86400.0), ("90m", 5400.0), ("7d", 604800.0),
                                          ("30", 30.0), ("0", 0.0), (" 2h ", 7200.0)])
def test_overlaps_are_read_as_durations(text, seconds):
    assert rotation.parse_overlap(text) == seconds


@pytest.mark.parametrize("text", ["", "-1h", "1w", "1.5h", "31d", "h", "24 hours"])
def test_a_bad_overlap_is_refused_with_the_forms_it_takes(text):
    with pytest.raises(ValueError, match="overlap"):
        rotation.parse_overlap(text)


def test_deadlines_read_the_same_for_people_and_machines():
    assert rotation.utc(1_800_000_000) == "2027-01-15 08:00:00 UTC"
    assert rotation.iso(1_800_000_000) == "2027-01-15T08:00:00Z"
