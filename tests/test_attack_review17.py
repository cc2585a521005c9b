"""Attacker's review of per-app policy and secret rotation (issue 17), through a real gateway.

Each test is a way an app's backend, a forged page or a careless operator could
break a promise: a cap above the app's policy or above what the user approved,
a secret or session token outliving its rotation, a console form that accepts
what it should not. The findings fixed here are described by the test that
failed first; the rest are probes that found the rule sound.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import FUNDING_KEY
from fleet import funding_key
from test_fleet_functional import make_fleet  # noqa: F401 (the fleet fixture)
from test_admin_functional import close_consoles, sign_in  # noqa: F401 (closes consoles)
from test_policy_functional import SAME, approve, refused, set_policy

from wattgate import rotation
from wattgate.store import AppPolicy


def _race(h, name: str, meanwhile) -> None:  # type: ignore[no-untyped-def]
    """The next read of a connection through ``store.<name>`` returns what was there, then
    ``meanwhile()`` (another real request to the gateway) commits its change before the
    reader goes on: the interleaving two browsers, or an app and its user, can produce."""
    store = h.gw.store
    real = getattr(store, name)
    fired = False

    async def racing(*args: Any):  # type: ignore[no-untyped-def]
        nonlocal fired
        got = await real(*args)
        if not fired and got is not None:
            fired = True
            await meanwhile()
        return got
    setattr(store, name, racing)


async def _account_connection(h, cookie: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    async with h.http.get(h.api + "/account", headers={"Cookie": f"wg_presence={cookie}",
                                                       **SAME}) as r:
        [conn] = (await r.json())["connections"]
    return conn  # type: ignore[no-any-return]


async def _user_sets_cap(h, conn_id: int, cookie: str, usd: float) -> None:  # type: ignore[no-untyped-def]
    async with h.http.post(f"{h.api}/account/connections/{conn_id}", json={"monthlyUsd": usd},
                           headers={"Cookie": f"wg_presence={cookie}", **SAME}) as r:
        assert r.status == 200, await r.text()


# ---- caps ------------------------------------------------------------------------------

async def test_an_app_cannot_undo_a_users_lowering_by_racing_it(harness):
    """Found: ``POST /connections`` with a session token alone judged "no raise" against
    the cap it had read, then wrote that cap whatever it had become meanwhile. An app
    posting its user's current cap in a loop restores it over the user's own lowering
    (here a cap above the app's largest, approved before the bound), no consent asked."""
    h = harness
    app = await h.create_app()
    status, _, cookie = await approve(h, app, "u", {"monthlyUsd": 30,
                                                    "fundingKey": FUNDING_KEY})
    assert status == 200 and cookie
    await set_policy(h, app, max_cap_usd="10")  # 30 stands: approved before the bound
    conn = await _account_connection(h, cookie)
    _race(h, "get_connection", lambda: _user_sets_cap(h, conn["id"], cookie, 5))
    token = await h.session(app, "u")
    async with h.http.post(h.api + "/connections", json={"monthlyUsd": 30},
                           headers={"Authorization": f"Bearer {token}"}) as r:
        answered = await r.json()
    # The user's lowering stands, and the app is told what is true.
    assert (await h.status(app, "u"))["limits"] == {"monthlyUsd": 5}
    assert r.status == 200 and answered["limits"] == {"monthlyUsd": 5}, answered


async def test_a_users_change_is_never_written_over_a_cap_it_did_not_see(harness):
    """The same compare-and-set on the dashboard: the user's raise to $9, judged against
    $8, lands on the $3 the app lowered it to meanwhile only if nothing moved."""
    h = harness
    app = await h.create_app()
    status, _, cookie = await approve(h, app, "u", {"monthlyUsd": 8,
                                                    "fundingKey": FUNDING_KEY})
    assert status == 200 and cookie
    conn = await _account_connection(h, cookie)

    async def app_lowers() -> None:
        token = await h.session(app, "u")
        async with h.http.post(h.api + "/connections", json={"monthlyUsd": 3},
                               headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200, await r.text()
    _race(h, "get_connection_by_id", app_lowers)
    async with h.http.post(f"{h.api}/account/connections/{conn['id']}", json={"monthlyUsd": 9},
                           headers={"Cookie": f"wg_presence={cookie}", **SAME}) as r:
        assert r.status == 200, await r.text()
        body = await r.json()
    assert body["status"]["limits"] == {"monthlyUsd": 3}
    assert (await h.status(app, "u"))["limits"] == {"monthlyUsd": 3}


async def test_a_token_minted_before_the_bound_cannot_approve_above_it(harness):
    h = harness
    app = await h.create_app()
    token = await h.session(app, "u", monthly_usd=100)  # before any policy
    await set_policy(h, app, max_cap_usd="10")
    async with h.http.post(h.api + "/connections", json={"fundingKey": FUNDING_KEY},
                           headers={"Authorization": f"Bearer {token}", **SAME}) as r:
        refused(r.status, await r.json(), "$100.00", "at most $10.00")
    assert await h.gw.store.get_connection(app.app_id, "u") is None


# ---- the console -----------------------------------------------------------------------

@pytest.mark.parametrize("form", [
    {"max_cap": "1e400"}, {"max_cap": "NaN"}, {"max_cap": "-1"}, {"max_cap": "0.1e-20"},
    {"max_cap": "Infinity"}, {"suggested_cap": "0"}, {"max_tokens": "²"},
    {"max_tokens": "9" * 5000}, {"max_tokens": "0"}, {"max_tokens": "-5"},
    {"models": "openai/gpt-4o\u200b"}, {"models": "ｏpenai/*"},
])
async def test_the_console_refuses_odd_values_saying_why(harness, form):
    app = await harness.create_app()
    await set_policy(harness, app, max_cap_usd="7")
    console = await sign_in(harness)
    r = await console.post(f"/admin/apps/{app.app_id}/policy", {"csrf": console.csrf, **form})
    assert r.status == 400, r.text_body
    assert "Traceback" not in r.text_body and "invalid literal" not in r.text_body
    assert "Exceeds the limit" not in r.text_body
    got = await harness.gw.store.get_app(app.app_id)
    assert got.policy.max_cap_nanos == 7 * 10**9 and got.policy.max_tokens is None


async def test_the_console_does_not_report_a_policy_saved_on_a_deleted_app(harness):
    app = await harness.create_app()
    console = await sign_in(harness)
    store = harness.gw.store
    real = store.set_app_policy

    async def deleted_meanwhile(app_id: str, policy: AppPolicy):  # type: ignore[no-untyped-def]
        await store.delete_app(app_id, now=harness.clock())
        return await real(app_id, policy)
    store.set_app_policy = deleted_meanwhile
    r = await console.post(f"/admin/apps/{app.app_id}/policy",
                           {"csrf": console.csrf, "max_cap": "5"})
    assert r.status == 404, (r.status, r.headers.get("Location"))


# ---- rotation --------------------------------------------------------------------------

async def test_tokens_of_the_oldest_secret_die_with_a_second_rotation_on_every_path(harness):
    h = harness
    app = await h.create_app()
    await h.connect(app, "u", monthly_usd=10)
    old_token = await h.session(app, "u")
    first = await rotation.rotate(h.gw, app.app_id, 3600)
    assert first is not None
    mid_token = await h.session(type(app)(app.app_id, app.publishable_key, first.secret_key,
                                          app.origin), "u")
    second = await rotation.rotate(h.gw, app.app_id, 3600)
    assert second is not None

    async def works(token: str) -> dict[str, int]:
        hdrs = {"Authorization": f"Bearer {token}"}
        out = {}
        async with h.http.get(h.api + "/connections", headers=hdrs) as r:
            out["connections"] = r.status
        async with h.http.post(h.api + "/grants", json={"requests": 1, "maxUsd": 1},
                               headers=hdrs) as r:
            out["grants"] = r.status
        async with h.http.get(h.api + "/consent/session", headers={**hdrs, **SAME}) as r:
            out["consent"] = r.status
        async with h.http.post(h.api + "/connections", json={"monthlyUsd": 1},
                               headers=hdrs) as r:
            out["lower"] = r.status
        return out
    assert set((await works(old_token)).values()) == {401}
    assert 401 not in (await works(mid_token)).values()
    # The deadline, a second past: the middle secret's token stops too.
    h.clock.advance(3601)
    assert set((await works(mid_token)).values()) == {401}
    current = type(app)(app.app_id, app.publishable_key, second.secret_key, app.origin)
    assert (await h.status(current, "u"))["limits"] == {"monthlyUsd": 1}


async def test_old_secret_stops_at_its_deadline_even_while_cached_and_busy(harness):
    h = harness
    app = await h.create_app()
    done = await rotation.rotate(h.gw, app.app_id, 10)
    assert done is not None and done.previous_until is not None
    hdrs = {"Authorization": f"Bearer {app.secret_key}"}

    async def status_of() -> int:
        async with h.http.get(h.api + "/status?appUserId=u", headers=hdrs) as r:
            return r.status
    assert set(await asyncio.gather(*(status_of() for _ in range(20)))) == {200}
    h.clock.now = done.previous_until - 0.001
    assert await status_of() == 200
    h.clock.now = done.previous_until
    assert set(await asyncio.gather(*(status_of() for _ in range(20)))) == {401}


# ---- the fleet -------------------------------------------------------------------------

@pytest.mark.slow
async def test_a_policy_set_by_the_cli_binds_every_process_of_a_fleet_within_a_second(
        make_fleet):  # noqa: F811 (the fixture imported above)
    """Probe, found sound: every process has the app (and its empty policy) cached from
    calls it served; a policy set by ``wattgate apps set-policy`` binds all of them on
    the next call (PostgreSQL's notification), and so does clearing it."""
    fleet = await make_fleet()
    app = await fleet.create_app()
    await fleet.connect(app, "alice", cap_usd=10)

    async def everywhere(expect: int, code: str | None = None, **chat: Any) -> None:
        for p in fleet.processes:
            for _ in range(2 * p.workers):
                answer = await fleet.chat(app, user="alice", via=p, **chat)
                assert (answer.status, answer.code) == (expect, code), (p.name, answer.body)
    await everywhere(200, model="anthropic/claude-sonnet-4", max_tokens=32)
    code, out = await fleet.cli("apps", "set-policy", app.app_id, "--models", "openai/*",
                                "--max-tokens", "16", "--max-cap", "5")
    assert code == 0, out
    await asyncio.sleep(1.0)
    await everywhere(403, "policy_violation", model="anthropic/claude-sonnet-4", max_tokens=8)
    await everywhere(403, "policy_violation", max_tokens=32)
    await everywhere(200, max_tokens=16)
    assert fleet.http is not None
    for p in fleet.processes:  # a new user's approval above the bound, on any process
        token = await fleet.session(app, f"bob-{p.name}", via=p)
        async with fleet.http.post(p.api + "/connections",
                                   json={"monthlyUsd": 6, "fundingKey": funding_key("bob")},
                                   headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 403, (p.name, await r.text())
    code, out = await fleet.cli("apps", "set-policy", app.app_id, "--clear")
    assert code == 0, out
    await asyncio.sleep(1.0)
    await everywhere(200, model="anthropic/claude-sonnet-4", max_tokens=32)
