"""Secret-key authentication: verified keys are cached, never past a change of apps."""

from __future__ import annotations

import asyncio

import pytest

from wattgate.config import load_config
from wattgate.credentials import mint_credentials
from wattgate.errors import AuthError
from wattgate.store import open_store


async def test_cached_key_stops_working_when_another_process_rotates_it(harness):
    app = await harness.create_app()
    gw = harness.gw
    assert (await gw.app_for_secret(app.secret_key)).app_id == app.app_id
    assert app.secret_key in gw._verified  # warm: no read on the next call
    seen = gw.store.apps_version()
    # Another process (the CLI) rotates the secret: a store of its own on the same ledger.
    new = mint_credentials(app.app_id)
    other = await open_store(load_config(None, env=harness.db.env))
    try:
        assert await other.set_app_secret(app.app_id, gw.hash(new.secret))
    finally:
        await other.close()
    if harness.db.backend == "sqlite":
        # The next request: the store reads data_version once per turn of the event
        # loop, so a commit by another process counts from the next turn on.
        await asyncio.sleep(0)
    else:
        # PostgreSQL tells every process of the change (NOTIFY); it arrives soon after.
        for _ in range(1000):
            if gw.store.apps_version() != seen:
                break
            await asyncio.sleep(0.01)
    with pytest.raises(AuthError):
        await gw.app_for_secret(app.secret_key)
    assert (await gw.app_for_secret(new.secret_key)).app_id == app.app_id


async def test_cached_key_stops_working_when_this_process_deletes_the_app(harness):
    app = await harness.create_app()
    gw = harness.gw
    await gw.app_for_secret(app.secret_key)
    await gw.store.delete_app(app.app_id, now=harness.clock())
    with pytest.raises(AuthError):
        await gw.app_for_secret(app.secret_key)
