"""wattgate.webhooks (bodies, thresholds, signatures) and the SDK's one-call verify."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from wattgate import webhooks
from wattgate.sdk import SIGNATURE_HEADER, WattfareError, WattfareWebhookError, verify_webhook

SECRET = "whsec_test"
T = 1_800_000_000
BODY = webhooks.body_of("evt_1", "budget.threshold", T + 0.7,
                        {"appId": "app1", "appUserId": "u", "spentUsd": webhooks.usd(8 * 10**9)})


def test_amounts_are_exact_decimal_strings():
    assert [webhooks.usd(n) for n in (0, 1, 10**9, 8 * 10**9, 12_345, 10_500_000_000)] == \
        ["0", "0.000000001", "1", "8", "0.000012345", "10.5"]
    assert webhooks.usd(None) is None
    assert json.loads(BODY) == {"id": "evt_1", "type": "budget.threshold", "created": T,
                                "data": {"appId": "app1", "appUserId": "u", "spentUsd": "8"}}


@pytest.mark.parametrize("cap,before,after,crossed", [
    (10, 7, 8, [80]), (10, 8, 9, []), (10, 9, 10, [100]), (10, 0, 10, [80, 100]),
    (10, 10, 12, []), (3, 0, 2, []), (3, 2, 3, [80, 100]),  # 2.4 is 80 % of 3: 2 is below it
    (None, 0, 10, []), (0, 0, 10, []), (10, 8, 8, []),
])
def test_thresholds_are_reached_in_exact_arithmetic(cap, before, after, crossed):
    assert webhooks.crossed_thresholds(cap, before, after) == crossed


def test_retries_double_up_to_the_most():
    assert [webhooks.retry_delay(n, 10, 3600) for n in (1, 2, 3, 9, 10, 500)] == \
        [10, 20, 40, 2560, 3600, 3600]


@pytest.mark.parametrize("url,why", [
    ("ftp://example.com/x", "http:// or https://"), ("example.com/hook", "http:// or https://"),
    ("javascript:alert(1)", "http:// or https://"), ("https:///path", "no host"),
    ("https://user:pw@example.com/", "user name or password"), ("", "empty"),
    ("https://exa mple.com/", "spaces"), ("https://example.com:99999/", "not a URL"),
    ("https://example.com/#frag", "fragment"), ("https://e.com/" + "a" * 2000, "longer"),
])
def test_bad_urls_are_refused_in_one_line(url, why):
    with pytest.raises(ValueError, match=why) as e:
        webhooks.validate_url(url)
    assert "\n" not in str(e.value)


def test_a_signature_is_the_hmac_of_t_dot_body():
    header = webhooks.sign(SECRET, BODY, T)
    mac = hmac.new(SECRET.encode(), f"{T}.{BODY}".encode(), hashlib.sha256).hexdigest()
    assert header == f"t={T},v1={mac}"
    assert verify_webhook(BODY.encode(), header, SECRET, now=T + 299) == json.loads(BODY)
    assert verify_webhook(BODY, header, SECRET, now=T - 299)["id"] == "evt_1"
    assert SIGNATURE_HEADER == "Wattgate-Signature"


@pytest.mark.parametrize("change,why", [
    (dict(secret="whsec_other"), "does not match"),
    (dict(body=BODY.replace('"8"', '"0"')), "does not match"),
    (dict(body=BODY + " "), "does not match"),
    (dict(now=T + 301), "outside the 300 s tolerance"),
    (dict(now=T - 301), "tolerance"),
    (dict(header=None), "no Wattgate-Signature header"),
    (dict(header=""), "no Wattgate-Signature header"),
    (dict(header="garbage"), "garbled"),
    (dict(header=f"t=1e9,v1={'0' * 64}"), "garbled timestamp"),
    (dict(header=f"t={T}"), "lacks t= or v1="),
    (dict(header=f"v1={'0' * 64}"), "lacks t= or v1="),
    (dict(header=f"t={T},v1=ß"), "does not match"),
    (dict(header=f"t={T + 5},v1=" + "{mac}"), "does not match"),  # a fresh t on an old MAC
    (dict(secret=""), "no webhook signing secret"),
])
def test_the_attackers_deliveries_are_refused_each_named(change, why):
    header = webhooks.sign(SECRET, BODY, T)
    args = {"body": BODY, "header": header, "secret": SECRET, "now": T}
    args.update(change)
    if isinstance(args["header"], str) and "{mac}" in args["header"]:
        args["header"] = args["header"].format(mac=header.split("v1=")[1])
    with pytest.raises(WattfareWebhookError, match=why) as e:
        verify_webhook(args["body"], args["header"], args["secret"], now=args["now"])
    assert isinstance(e.value, WattfareError)
    assert e.value.to_dict()["error"]["code"] == "webhook_signature" and e.value.status == 400


def test_a_signed_body_that_is_no_event_is_refused():
    for body in ("[1]", "nope", '{"id": 1}'):
        with pytest.raises(WattfareWebhookError, match="not"):
            verify_webhook(body, webhooks.sign(SECRET, body, T), SECRET, now=T)


def test_the_tolerance_is_the_callers_to_choose():
    header = webhooks.sign(SECRET, BODY, T)
    with pytest.raises(WattfareWebhookError, match="60 s tolerance"):
        verify_webhook(BODY, header, SECRET, now=T + 61, tolerance=60)
    assert verify_webhook(BODY, header, SECRET, now=T + 3000, tolerance=3600)["id"] == "evt_1"
