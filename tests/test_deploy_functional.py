"""wattgate behind a real nginx with TLS from a local CA: the recipe in docs/nginx.conf, run.

The test starts Debian's nginx on loopback with ``docs/nginx.conf`` itself (only its
ports and certificate paths swapped), in front of ``wattgate demo``'s gateway whose
``server.public_url`` is the proxy's https URL and whose ``server.trusted_proxies``
names it. Through the proxy: the consent popup in Chromium sets the ``__Host-``
presence cookie, the demo app's cross-origin calls pass CORS, a streamed answer's
first chunk arrives while the model is still writing, ``/metrics`` answers the
loopback scraper, and the request log names the client and scheme nginx saw.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import os
import shutil
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from conftest import free_port
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from wattgate.consent import PRESENCE_COOKIE
from wattgate.demo import Demo, start_demo
from wattgate.logs import JSONFormatter

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "docs" / "nginx.conf"
KEY = "sk-or-v1-" + "e" * 48


# ---- a local CA and a server certificate for 127.0.0.1 / localhost ---------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_tls(folder: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, fullchain.pem, privkey.pem), made now, valid for a day."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("wattgate test CA"))
          .issuer_name(_name("wattgate test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("localhost"))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    ca_path, chain, private = folder / "ca.pem", folder / "fullchain.pem", folder / "privkey.pem"
    ca_path.write_bytes(ca.public_bytes(pem))
    chain.write_bytes(cert.public_bytes(pem) + ca.public_bytes(pem))
    private.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return ca_path, chain, private


# ---- nginx with docs/nginx.conf ---------------------------------------------------------------
def site_config(*, https_port: int, http_port: int, gateway_port: int, chain: Path,
                private: Path) -> str:
    """docs/nginx.conf with this test's ports and certificate: each swap must match once,
    so an edit of the recipe that this test no longer exercises fails here."""
    text = SITE.read_text()
    for old, new in (("listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;"),
                     ("listen 80;", f"listen 127.0.0.1:{http_port};"),
                     ("server 127.0.0.1:8787;", f"server 127.0.0.1:{gateway_port};"),
                     ("/etc/ssl/wattgate/fullchain.pem", str(chain)),
                     ("/etc/ssl/wattgate/privkey.pem", str(private))):
        assert text.count(old) == 1, f"docs/nginx.conf no longer has {old!r} once"
        text = text.replace(old, new)
    return text


def main_config(folder: Path, site: Path) -> str:
    """The nginx.conf Debian ships, reduced to what a test run in a folder needs."""
    user = "user root;\n" if os.geteuid() == 0 else ""  # the workers read the test's files
    temp = "\n".join(f"    {kind}_temp_path {folder / kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"{user}daemon off;\nworker_processes 1;\npid {folder / 'nginx.pid'};\n"
            f"error_log {folder / 'error.log'} warn;\n"
            "events { worker_connections 256; }\n"
            f"http {{\n    access_log {folder / 'access.log'};\n{temp}\n"
            f"    include {site};\n}}\n")


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)
    if found is None:
        pytest.fail("nginx is not installed: apt-get install nginx (scripts/test does)")
    return found


async def wait_listening(port: int, proc: asyncio.subprocess.Process, log: Path) -> None:
    while True:
        if proc.returncode is not None:
            pytest.fail("nginx exited: " + (log.read_text() if log.exists() else "no log"))
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return


@dataclass
class Proxied:
    url: str          # https, through nginx
    http_url: str     # plain http, nginx's redirect
    demo: Demo
    ssl: ssl.SSLContext


@pytest.fixture
async def proxied(tmp_path: Path) -> AsyncIterator[Proxied]:
    ca, chain, private = make_tls(tmp_path)
    https_port, http_port, gateway_port = free_port(), free_port(), free_port()
    url = f"https://127.0.0.1:{https_port}"
    demo = await start_demo(data_dir=tmp_path / "demo", gateway_port=gateway_port,
                            chunk_delay=0.05, public_url=url,
                            settings={"WATTGATE_SERVER__TRUSTED_PROXIES": "127.0.0.1"})
    folder = tmp_path / "nginx"
    folder.mkdir()
    site = folder / "wattgate.conf"
    site.write_text(site_config(https_port=https_port, http_port=http_port,
                                gateway_port=gateway_port, chain=chain, private=private))
    conf = folder / "nginx.conf"
    conf.write_text(main_config(folder, site))
    binary = nginx_binary()
    check = await asyncio.create_subprocess_exec(
        binary, "-t", "-q", "-p", str(folder), "-c", str(conf),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await check.communicate()
    assert check.returncode == 0, out.decode()
    proc = await asyncio.create_subprocess_exec(
        binary, "-p", str(folder), "-c", str(conf),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await wait_listening(https_port, proc, folder / "error.log")
        yield Proxied(url, f"http://127.0.0.1:{http_port}", demo,
                      ssl.create_default_context(cafile=str(ca)))
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        await demo.close()


def access(records: list[logging.LogRecord], route: str) -> list[dict]:
    return [line for line in (json.loads(JSONFormatter().format(r)) for r in records
                              if r.name == "wattgate.access") if line["route"] == route]


# ---- through the proxy ------------------------------------------------------------------------
async def test_health_metrics_and_the_log_through_the_proxy(proxied: Proxied, caplog) -> None:
    caplog.set_level(logging.INFO, logger="wattgate.access")
    async with aiohttp.ClientSession() as http:
        # A certificate checked against the local CA, not a disabled check.
        async with http.get(proxied.url + "/readyz", ssl=proxied.ssl) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["ready"] is True
            assert r.headers["Strict-Transport-Security"].startswith("max-age=")
        # /metrics: the scraper is on loopback; nginx says so and wattgate believes it.
        async with http.get(proxied.url + "/metrics", ssl=proxied.ssl) as r:
            assert r.status == 200
            assert "wattgate_" in await r.text()
        # A client's own X-Forwarded-For is replaced by nginx: it cannot pose as loopback.
        async with http.get(proxied.url + "/healthz", ssl=proxied.ssl,
                            headers={"X-Forwarded-For": "198.51.100.7"}) as r:
            assert r.status == 200
        # Plain http is sent to https.
        async with http.get(proxied.http_url + "/connect", allow_redirects=False) as r:
            assert r.status == 301
            assert r.headers["Location"].startswith("https://127.0.0.1")
    [metrics] = access(caplog.records, "/metrics")
    assert metrics["client"] == "127.0.0.1" and metrics["scheme"] == "https"
    [health] = access(caplog.records, "/healthz")
    assert health["client"] == "127.0.0.1"


async def test_a_streamed_answer_is_not_buffered_by_the_proxy(proxied: Proxied) -> None:
    demo = proxied.demo
    demo.fake.record_calls = True
    demo.fake.chunk_delay = 0.2  # ~5 s of answer: plenty of time to see it arrive in pieces
    secret = {"Authorization": f"Bearer {demo.secret_key}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(proxied.url + "/api/v1/sessions", ssl=proxied.ssl, headers=secret,
                             json={"appUserId": "streamer"}) as r:
            token = (await r.json())["token"]
        async with http.post(proxied.url + "/api/v1/connections", ssl=proxied.ssl,
                             json={"monthlyUsd": 5, "fundingKey": KEY},
                             headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200, await r.text()
        async with http.post(proxied.url + "/api/v1/chat/completions", ssl=proxied.ssl,
                             headers={**secret, "x-wattfare-user": "streamer"},
                             json={"model": "wattgate/demo-chat", "stream": True,
                                   "max_tokens": 64, "messages": [
                                       {"role": "user", "content": "count these four words"}]}
                             ) as r:
            assert r.status == 200, await r.text()
            first = None
            async for raw in r.content:
                line = raw.decode().strip()
                if line.startswith("data: {") and '"content"' in line:
                    first = json.loads(line[6:])["choices"][0]["delta"]["content"]
                    break
            assert first
            [call] = demo.fake.calls
            # The first words reached the client through nginx while the model still wrote.
            assert not call.finished
            rest = (await r.read()).decode()
            assert rest.rstrip().endswith("data: [DONE]") and call.finished


@pytest.mark.browser
async def test_the_consent_popup_sets_the_host_cookie_through_the_proxy(proxied: Proxied,
                                                                         browser) -> None:
    from chromium import shot
    from playwright.async_api import expect
    from test_browser_functional import click_closing, open_popup, status_of

    demo = proxied.demo
    context = await browser.new_context(viewport={"width": 1100, "height": 760},
                                        ignore_https_errors=True)  # the local CA is not Chromium's
    context.set_default_timeout(10_000)
    try:
        page = await context.new_page()
        # What the app's page itself read from the gateway (wf.status(): a cross-origin GET
        # with Authorization, so after a CORS preflight).
        read: list[tuple[int, str | None]] = []
        page.on("response", lambda r: read.append(
            (r.status, r.headers.get("access-control-allow-origin")))
            if r.url == proxied.url + "/api/v1/connections" else None)
        await page.goto(demo.app_url)  # the app, on another origin, loads the SDK from the proxy
        popup = await open_popup(page, "#connect")
        assert popup.url.startswith(proxied.url + "/connect")
        assert await popup.evaluate("window.isSecureContext") is True
        await expect(popup.locator("#origin-text")).to_contain_text("verified")
        await popup.fill("#cap", "0.30")
        await popup.fill("#key", KEY)
        await shot(popup, "deploy-consent-behind-nginx.png")
        async with popup.expect_event("close"):
            await click_closing(popup, "#approve")
        await expect(page.locator("#status")).to_contain_text("$0.30 / month")
        cookies = {c["name"]: c for c in await context.cookies(proxied.url)}
        cookie = cookies[f"__Host-{PRESENCE_COOKIE}"]
        assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert cookie["path"] == "/" and PRESENCE_COOKIE not in cookies
        # The app's page read the gateway's answers across origins: CORS passed the proxy.
        user = (await page.text_content("#user") or "").strip()
        assert (await status_of(demo, user))["limits"] == {"monthlyUsd": 0.3}
        assert read and all(got == (200, demo.app_url) for got in read), read
        # The dashboard, through the proxy, knows this browser by its cookie.
        dash = await context.new_page()
        await dash.goto(proxied.url + "/account")
        await expect(dash.locator("article.conn")).to_have_count(1)
    finally:
        await context.close()


async def test_cors_preflight_through_the_proxy(proxied: Proxied) -> None:
    origin = proxied.demo.app_url
    async with aiohttp.ClientSession() as http:
        async with http.options(proxied.url + "/api/v1/connections", ssl=proxied.ssl, headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"}) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == origin
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
        async with http.options(proxied.url + "/api/v1/connections", ssl=proxied.ssl, headers={
                "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}) as r:
            assert "Access-Control-Allow-Origin" not in r.headers
