"""Sessions, connections and status through the running app."""

from __future__ import annotations

from conftest import FUNDING_KEY


async def test_connect_then_status(harness):
    app = await harness.create_app()
    status = await harness.status(app, "user_123")
    assert status == {"connected": False, "limits": None, "usage": {"monthlyUsd": 0},
                      "remainingUsd": 0}
    body = await harness.connect(app, "user_123", monthly_usd=10)
    assert body == {"connected": True, "limits": {"monthlyUsd": 10}, "usage": {"monthlyUsd": 0},
                    "remainingUsd": 10}
    assert await harness.status(app, "user_123") == body
    raw = (harness.tmp_path / "wattgate.db").read_bytes()
    assert FUNDING_KEY.encode() not in raw
