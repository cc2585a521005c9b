"""The OpenAPI 3.1 document of wattgate's whole ``/api/v1``, built as plain data.

``document(server_url)`` returns the dict served at ``GET /api/v1/openapi.json``.
Every operation lists its error rows with the one error body of
``wattgate.errors``; the ``code`` enum is read from that hierarchy, so a new
error class appears here by itself. A test checks that the document validates
and that every route the app mounts under ``/api/v1`` is described, and a
schemathesis run fuzzes a live gateway from it.

Not here: serving it (``views.apidoc``), the HTML pages (not an API).
"""

from __future__ import annotations

from typing import Any

from . import errors
from .consent import PRESENCE_COOKIE

Schema = dict[str, Any]
MAX_TOKENS = 10_000_000  # estimate.MAX_TOKENS (a test keeps them equal)

SECRET: list[dict[str, list[str]]] = [{"secretKey": []}]
SESSION: list[dict[str, list[str]]] = [{"sessionToken": []}]
PRESENCE: list[dict[str, list[str]]] = [{"presenceCookie": []}]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _error_classes() -> list[type[errors.WattgateError]]:
    seen, todo = [], [errors.WattgateError]
    while todo:
        cls = todo.pop(0)
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in seen if "code" in vars(c)]  # abstract ones (PaymentError) carry none


def _error_rows() -> dict[int, list[type[errors.WattgateError]]]:
    rows: dict[int, list[type[errors.WattgateError]]] = {}
    for cls in _error_classes():
        rows.setdefault(cls.status, []).append(cls)
    return rows


ERROR_HEADERS: dict[int, dict[str, Any]] = {
    402: {"x-should-retry": {"description": "Always `false`: retrying a 402 never helps.",
                             "schema": {"type": "string", "enum": ["false"]}}},
    405: {"Allow": {"description": "The methods this path answers.",
                    "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "Seconds until a retry can succeed.",
                          "schema": {"type": "integer", "minimum": 1}}},
}


def _errors(*statuses: int) -> dict[str, Any]:
    rows = _error_rows()
    out = {}
    for status in (*statuses, 405, 500):
        classes = rows[status]
        text = "; ".join(f"`{c.code}`: {c.default_message}" for c in classes)
        response: dict[str, Any] = {
            "description": text,
            "content": {"application/json": {"schema": {
                "allOf": [_ref("Error"), {"properties": {"error": {"properties": {
                    "code": {"enum": [c.code for c in classes]}}}}}]}}}}
        if status in ERROR_HEADERS:
            response["headers"] = ERROR_HEADERS[status]
        out[str(status)] = response
    return out


def _json(schema: Schema, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema: Schema, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _op(summary: str, security: list[Any], responses: dict[str, Any], *,
        body: dict[str, Any] | None = None, parameters: list[Any] | None = None,
        op_id: str) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "security": security,
                          "responses": responses}
    if body is not None:
        op["requestBody"] = body
    if parameters:
        op["parameters"] = parameters
    return op


def _preflight(op_id: str) -> dict[str, Any]:
    return {"operationId": op_id, "summary": "CORS preflight: only an app's registered "
            "origins are allowed.", "security": [],
            "parameters": [{"name": "Origin", "in": "header", "schema": {"type": "string"}}],
            "responses": {"204": {"description": "Preflight answer (CORS headers when the "
                                                 "origin is registered)."}}}


USD = {"type": "number", "minimum": 0, "description": "US dollars."}
USD_OR_NULL = {"type": ["number", "null"], "minimum": 0,
               "description": "US dollars; null means unlimited (development mode only)."}
MODEL_ID = {"type": "string", "minLength": 1, "examples": ["openai/gpt-4o-mini"]}
OUTPUT_LIMIT = {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS}
USER_ID = {"type": "string", "minLength": 1, "maxLength": 256,
           "description": "The app's own id for its end user (printable characters)."}

SCHEMAS: dict[str, Schema] = {
    "Error": {
        "type": "object", "required": ["error"], "additionalProperties": False,
        "properties": {"error": {
            "type": "object", "required": ["code", "message"], "additionalProperties": False,
            "properties": {"code": {"type": "string",
                                    "enum": [c.code for c in _error_classes()]},
                           "message": {"type": "string"}}}},
    },
    "ConnectionStatus": {
        "type": "object", "required": ["connected", "limits", "usage", "remainingUsd"],
        "properties": {
            "connected": {"type": "boolean"},
            "limits": {"type": ["object", "null"], "required": ["monthlyUsd"],
                       "properties": {"monthlyUsd": USD_OR_NULL}},
            "usage": {"type": "object", "required": ["monthlyUsd"],
                      "properties": {"monthlyUsd": USD}},
            "remainingUsd": {**USD_OR_NULL, "description": "limits − usage; null when "
                                                           "unlimited."},
            "heldUsd": {**USD, "description": "wattgate extension: held at their worst case "
                                              "by this month's calls in flight; a new call "
                                              "fits in remainingUsd − heldUsd."},
        },
    },
    "SessionRequest": {
        "type": "object", "required": ["appUserId"],
        "properties": {"appUserId": USER_ID,
                       "requestLimit": {"type": "object",
                                        "properties": {"monthlyUsd": USD_OR_NULL}}},
    },
    "SessionToken": {
        "type": "object", "required": ["token", "expiresAt"],
        "properties": {"token": {"type": "string", "description": "HS256 JWT, 10-minute TTL."},
                       "expiresAt": {"type": "integer", "description": "Unix seconds."}},
    },
    "ConnectionRequest": {
        "type": "object",
        "properties": {"monthlyUsd": USD_OR_NULL,
                       "fundingKey": {"type": "string", "maxLength": 512,
                                      "description": "The user's OpenRouter key; only the "
                                      "consent popup sends it. Never stored in clear."}},
    },
    "ChatCompletionRequest": {
        "type": "object", "required": ["model", "messages"],
        "description": "OpenAI chat-completion request. A field that can raise the "
                       "bill is priced into the budget hold or refused (400 naming it); "
                       "fields that cannot pass through; fields not in "
                       "docs/request-fields.md are refused.",
        "properties": {
            "model": MODEL_ID,
            "messages": {"type": "array", "items": {"type": "object"}},
            "stream": {"type": "boolean"},
            "max_tokens": OUTPUT_LIMIT,
            "max_completion_tokens": OUTPUT_LIMIT,
            "stream_options": {"type": "object"},
        },
    },
    "ChatCompletion": {"type": "object", "description": "OpenAI chat completion, as the "
                       "provider sent it (with its usage object)."},
    "ChatCompletionEvent": {
        "type": "object", "required": ["data"],
        "description": "One server-sent event of a streamed answer, as the provider sent it "
                       "(keep-alive comments are not events).",
        "properties": {"data": {"type": "string", "description": "A chat.completion.chunk "
                                "JSON object (the last one carries usage), or [DONE]."},
                       "event": {"type": "string"}, "id": {"type": "string"}},
    },
    "ResponseRequest": {
        "type": "object", "required": ["model"],
        "description": "OpenRouter's Responses API request (beta). Metered by the rule of "
                       "chat completions with its own fields: max_output_tokens (injected "
                       "when absent), reasoning, function tools; previous_response_id and "
                       "other fields that pull in unseen text are refused "
                       "(docs/request-fields.md).",
        "properties": {
            "model": MODEL_ID,
            "input": {"type": ["string", "array"], "items": {"type": "object"}},
            "instructions": {"type": ["string", "null"]},
            "stream": {"type": "boolean"},
            "max_output_tokens": OUTPUT_LIMIT,
            "tools": {"type": "array", "items": {"type": "object"}},
            "reasoning": {"type": "object"},
        },
    },
    "Response": {"type": "object", "description": "A Responses API response object (the "
                 "one the provider's response.completed event carried), usage included."},
    "ResponseEvent": {
        "type": "object", "required": ["data"],
        "description": "One server-sent event of a streamed response, as the provider sent "
                       "it: response.created, response.output_text.delta, …, "
                       "response.completed (carrying the final response and its usage).",
        "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    },
    "EmbeddingRequest": {
        "type": "object", "required": ["model", "input"],
        "description": "OpenAI-compatible embeddings request: text or token ids; other "
                       "inputs are refused.",
        "properties": {
            "model": {"type": "string", "minLength": 1,
                      "examples": ["openai/text-embedding-3-small"]},
            "input": {"type": ["string", "array"]},
            "encoding_format": {"type": "string", "enum": ["float", "base64"]},
            "dimensions": {"type": "integer", "minimum": 1},
        },
    },
    "EmbeddingList": {"type": "object", "description": "The provider's embeddings "
                      "(object \"list\", data[].embedding) with its usage and cost."},
    "ModelList": {"type": "object", "properties": {"data": {"type": "array", "items": {
        "type": "object"}}}},
    "GrantRequest": {
        "type": "object", "required": ["requests"],
        "properties": {"requests": {"type": "integer", "minimum": 1},
                       "maxUsd": {"type": ["number", "null"], "exclusiveMinimum": 0},
                       "fundingKey": {"type": "string", "maxLength": 512}},
    },
    "Grant": {
        "type": "object", "required": ["grantToken", "expiresAt", "requests"],
        "properties": {"grantToken": {"type": "string", "pattern": "^wfg_"},
                       "expiresAt": {"type": "integer"}, "requests": {"type": "integer"}},
    },
    "GrantState": {
        "type": "object",
        "required": ["requests", "used", "remaining", "maxUsd", "spentUsd", "expiresAt",
                     "valid"],
        "properties": {"requests": {"type": "integer"}, "used": {"type": "integer"},
                       "remaining": {"type": "integer"},
                       "maxUsd": {"type": ["number", "null"]}, "spentUsd": USD,
                       "expiresAt": {"type": "integer"}, "valid": {"type": "boolean"}},
    },
    "ConsentContext": {
        "type": "object", "required": ["app", "requestedLimit", "status", "returning"],
        "properties": {
            "app": {"type": "object", "properties": {"appId": {"type": "string"},
                                                     "name": {"type": "string"},
                                                     "origins": {"type": "array"},
                                                     "policy": _ref("AppPolicy")}},
            "requestedLimit": {"type": ["object", "null"]},
            "status": _ref("ConnectionStatus"),
            "returning": {"type": "boolean"},
            "allowUnlimited": {"type": "boolean"},
        },
    },
    "AppPolicy": {
        "type": "object", "description": (
            "The app's policy (docs/operations.md): allowed model patterns (empty: any), "
            "the largest monthly cap a user may approve, the largest output bound of a "
            "call, the cap the popup suggests; null: no limit."),
        "properties": {"models": {"type": "array", "items": {"type": "string"}},
                       "maxCapUsd": {"type": ["number", "null"]},
                       "maxTokens": {"type": ["integer", "null"]},
                       "suggestedCapUsd": {"type": ["number", "null"]}},
    },
    "OAuthExchange": {
        "type": "object", "required": ["code", "codeVerifier"],
        "properties": {"code": {"type": "string", "minLength": 1, "maxLength": 512},
                       "codeVerifier": {"type": "string", "minLength": 43, "maxLength": 128}},
    },
    "Account": {
        "type": "object", "required": ["recognized", "connections"],
        "properties": {"recognized": {"type": "boolean"},
                       "connections": {"type": "array", "items": _ref("AccountConnection")}},
    },
    "AccountConnection": {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "app": {"type": "object"},
                       "state": {"type": "string"}, "connectedAt": {"type": "integer"},
                       "status": _ref("ConnectionStatus"), "period": {"type": "string"},
                       "calls": {"type": "array", "items": {"type": "object"}},
                       "keyLimit": {**_ref("KeyLimit"),
                                    "description": "Answers to a cap change only."}},
    },
    "KeyLimit": {
        "description": "The funding key's own credit limit at OpenRouter (GET /key), which "
                       "the gateway reads but cannot change; null when it could not be read.",
        "type": ["object", "null"], "required": ["limitUsd", "reset", "label"],
        "properties": {"limitUsd": {"type": ["number", "null"]},
                       "reset": {"type": ["string", "null"]},
                       "label": {"type": ["string", "null"]}},
    },
}

USER_HEADER = {"name": "x-wattfare-user", "in": "header", "schema": USER_ID,
               "description": "The end user whose connection pays (or send x-wattfare-grant)."}
GRANT_HEADER = {"name": "x-wattfare-grant", "in": "header",
                "schema": {"type": "string", "maxLength": 200},
                "description": "A one-time grant token (wfg_…) that pays instead."}
ANSWER_HEADERS = {"x-wattfare-grant-remaining": {
    "description": "Requests left on the grant (grant-paid calls only).",
    "schema": {"type": "integer"}}, "x-wattfare-max-tokens": {
    "description": "Present when the call was fitted to what is left of its cap "
                   "(metering.fit_to_budget): the answer limit it was sent with "
                   "(max_tokens; max_output_tokens for /responses).",
    "schema": {"type": "integer"}}}


def _metered_op(summary: str, answer: str, schema: str, event: str | None, request: str,
                op_id: str) -> dict[str, Any]:
    """A metered proxy endpoint: the payer's headers, the grant's count, the same errors."""
    content = {"application/json": {"schema": _ref(schema)}}
    if event is not None:
        content["text/event-stream"] = {"schema": _ref(event)}
    return _op(summary, SECRET,
               {"200": {"description": answer, "headers": ANSWER_HEADERS, "content": content},
                **_errors(400, 401, 402, 403, 413, 429, 502, 504)},
               body=_body(_ref(request)), parameters=[USER_HEADER, GRANT_HEADER], op_id=op_id)


def _paths() -> dict[str, Any]:
    return {
        "/sessions": {"post": _op(
            "Mint a short-lived session token for the app's frontend.", SECRET,
            {"200": _json(_ref("SessionToken")), **_errors(400, 401, 413, 429)},
            body=_body(_ref("SessionRequest")), op_id="createSession")},
        "/status": {"get": _op(
            "Server-side connection status of one end user.", SECRET,
            {"200": _json(_ref("ConnectionStatus")), **_errors(400, 401)},
            parameters=[{"name": "appUserId", "in": "query", "required": True,
                         "schema": USER_ID}], op_id="getStatus")},
        "/connections": {
            "get": _op("Connection status of the token's user.", SESSION,
                       {"200": _json(_ref("ConnectionStatus")), **_errors(401)},
                       op_id="getConnection"),
            "post": _op("Approve or update the connection (cap, funding key). Raising a cap "
                        "or funding needs the user's consent in the popup.", SESSION,
                        {"200": _json(_ref("ConnectionStatus")),
                         **_errors(400, 401, 402, 403, 413, 502)},
                        body=_body(_ref("ConnectionRequest"), required=False),
                        op_id="approveConnection"),
            "delete": _op("Revoke the connection: no new call (nor grant it funds) from now "
                          "on; calls already running finish and are billed exactly; its "
                          "funding key is erased once none of them can still be corrected.",
                          SESSION,
                          {"204": {"description": "Revoked."}, **_errors(401)},
                          op_id="revokeConnection"),
            "options": _preflight("preflightConnections"),
        },
        "/chat/completions": {"post": _metered_op(
            "OpenAI-compatible metered proxy: admitted against the user's cap or the grant, "
            "streamed through, settled from the provider's usage.",
            "The completion, or an SSE stream when stream is true.", "ChatCompletion",
            "ChatCompletionEvent", "ChatCompletionRequest", "createChatCompletion")},
        "/responses": {"post": _metered_op(
            "The Responses API (OpenRouter's beta), metered like chat completions: the "
            "events streamed through, or the final response as one object.",
            "The response, or an SSE stream when stream is true.", "Response",
            "ResponseEvent", "ResponseRequest", "createResponse")},
        "/embeddings": {"post": _metered_op(
            "OpenAI-compatible embeddings, metered: held at the input's worst case, "
            "settled from the provider's usage.", "The embeddings.", "EmbeddingList", None,
            "EmbeddingRequest", "createEmbeddings")},
        "/models": {"get": _op(
            "The provider's model list, passed through.", SECRET,
            {"200": _json(_ref("ModelList")), **_errors(401, 502, 504)}, op_id="listModels")},
        "/grants": {
            "post": _op("Create a one-time grant, funded by a key typed in the grant popup "
                        "or by the user's connection approved in this browser.", SESSION,
                        {"200": _json(_ref("Grant")), **_errors(400, 401, 402, 403, 413, 502)},
                        body=_body(_ref("GrantRequest")), op_id="createGrant"),
            "options": _preflight("preflightGrants"),
        },
        "/grants/current": {"get": _op(
            "State of one grant (requests remaining, dollars spent).", SECRET,
            {"200": _json(_ref("GrantState")), **_errors(400, 401, 402)},
            parameters=[{**GRANT_HEADER, "required": True}], op_id="getGrant")},
        "/consent/session": {"get": _op(
            "What the consent popup shows (same-origin pages only).", SESSION,
            {"200": _json(_ref("ConsentContext")), **_errors(400, 401)},
            parameters=[{"name": "pk", "in": "query", "schema": {"type": "string"}}],
            op_id="getConsentContext")},
        "/consent/oauth": {"post": _op(
            "Trade an OpenRouter PKCE code for the user's key (same-origin pages only).", [],
            {"200": _json({"type": "object", "required": ["key", "keyLimit"], "properties": {
                "key": {"type": "string"},
                "keyLimit": _ref("KeyLimit")}}),
             **_errors(400, 401, 413, 502)},
            body=_body(_ref("OAuthExchange")), op_id="exchangeOAuthCode")},
        "/account": {"get": _op(
            "The connections this browser approved (same-origin pages only).", PRESENCE,
            {"200": _json(_ref("Account")), **_errors(401)}, op_id="getAccount")},
        "/account/connections/{connection_id}": {
            "parameters": [{"name": "connection_id", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "post": _op("Change the cap of a connection this browser approved.", PRESENCE,
                        {"200": _json(_ref("AccountConnection")),
                         **_errors(400, 401, 402, 403, 404, 413)},
                        body=_body({"type": "object", "required": ["monthlyUsd"],
                                    "properties": {"monthlyUsd": USD_OR_NULL}}),
                        op_id="updateAccountConnection"),
            "delete": _op("Revoke a connection this browser approved.", PRESENCE,
                          {"204": {"description": "Revoked."}, **_errors(401, 404)},
                          op_id="revokeAccountConnection"),
        },
        "/openapi.json": {"get": {
            "operationId": "getOpenAPI", "summary": "This document.", "security": [],
            "responses": {"200": _json({"type": "object"})}}},
    }


def document(server_url: str = "") -> dict[str, Any]:
    """The OpenAPI 3.1 document; ``server_url`` is the gateway's public origin."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "wattgate", "version": "1",
                 "summary": "Self-hosted Wattfare gateway: consent, caps and metered "
                            "OpenAI-compatible inference paid by the end user.",
                 "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"}},
        "servers": [{"url": server_url.rstrip("/") + "/api/v1"}],
        "paths": _paths(),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "secretKey": {"type": "http", "scheme": "bearer",
                              "description": "The app's secret key, sk_live_{appId}_{secret}; "
                                             "server to server only."},
                "sessionToken": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                                 "description": "A session token from POST /sessions."},
                "presenceCookie": {"type": "apiKey", "in": "cookie", "name": PRESENCE_COOKIE,
                                   "description": "Set on the gateway's origin when the user "
                                                  "approves in the popup; HttpOnly, "
                                                  "SameSite=Strict; named __Host-wg_presence "
                                                  "when the gateway is served on https."},
            },
        },
    }
