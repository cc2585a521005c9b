"""The served OpenAPI document: valid 3.1, and it describes every /api/v1 route."""

from __future__ import annotations

import re

from openapi_spec_validator import validate

from wattgate import errors
from wattgate.openapi import document


def mounted_api_routes(app) -> set[tuple[str, str]]:  # type: ignore[no-untyped-def]
    routes = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if path and path.startswith("/api/v1/") and route.method != "HEAD":
            routes.add((route.method.lower(), path.removeprefix("/api/v1")))
    return routes


def documented_routes(doc: dict) -> set[tuple[str, str]]:
    methods = {"get", "post", "put", "patch", "delete", "options", "head"}
    return {(m, path) for path, item in doc["paths"].items() for m in item if m in methods}


async def test_served_document_is_valid_openapi_31(harness):
    async with harness.http.get(harness.api + "/openapi.json") as r:
        assert r.status == 200
        assert r.content_type == "application/json"
        doc = await r.json()
    assert doc["openapi"].startswith("3.1")
    validate(doc)  # raises on any violation of the 3.1 schema
    assert doc["servers"] == [{"url": harness.url + "/api/v1"}]


async def test_every_mounted_route_is_documented_and_nothing_else(harness):
    async with harness.http.get(harness.api + "/openapi.json") as r:
        doc = await r.json()
    mounted, documented = mounted_api_routes(harness.app), documented_routes(doc)
    assert mounted - documented == set(), "mounted under /api/v1 but not in openapi.json"
    assert documented - mounted == set(), "in openapi.json but not mounted"


def test_every_operation_documents_its_errors_with_the_one_error_body():
    doc = document("http://gw.test")
    codes = set(doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]
                ["code"]["enum"])
    assert {"invalid_request", "auth", "not_connected", "budget_exceeded", "grant_invalid",
            "funding_invalid", "rate_limited", "upstream", "upstream_timeout"} <= codes
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in ("parameters",) or method == "options" or path == "/openapi.json":
                continue
            assert op["security"] is not None
            for status, response in op["responses"].items():
                if int(status) >= 400:
                    schema = response["content"]["application/json"]["schema"]
                    assert schema["allOf"][0] == {"$ref": "#/components/schemas/Error"}, \
                        (path, method, status)
            assert "500" in op["responses"] and "405" in op["responses"]


def test_error_codes_come_from_the_error_hierarchy():
    doc = document()
    enum = doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]
    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.WattgateError)
               and "code" in vars(c)]
    assert sorted(enum["enum"]) == sorted(c.code for c in classes)
    assert all(re.fullmatch(r"[a-z_]+", code) for code in enum["enum"])


def test_documented_limits_match_the_proxy():
    from wattgate import estimate, openapi

    assert openapi.MAX_TOKENS == estimate.MAX_TOKENS
