"""Secret-key authentication: verified keys are cached, never past a change of apps."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from wattgate.credentials import mint_credentials
from wattgate.errors import AuthError


async def test_cached_key_stops_working_when_another_process_rotates_it(harness):
    app = await harness.create_app()
    gw = harness.gw
    assert (await gw.app_for_secret(app.secret_key)).app_id == app.app_id
    assert app.secret_key in gw._verified  # warm: no read on the next call
    # Another process (the CLI) rotates the secret directly in the database.
    new = mint_credentials(app.app_id)
    db = sqlite3.connect(harness.tmp_path / "wattgate.db")
    db.execute("UPDATE apps SET secret_hash = ? WHERE app_id = ?",
               (gw.hash(new.secret), app.app_id))
    db.commit()
    db.close()
    # The next request: the store reads data_version once per turn of the event loop,
    # so a commit by another process counts from the next turn on.
    await asyncio.sleep(0)
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
