"""The OpenAPI 3.1 document of the consent API: served at ``/openapi.json`` and committed as
docs/openapi.json (``python -m proxy.api.openapi > docs/openapi.json``; a test keeps the two equal
and checks that every route of the server is in it).

Built here rather than written by hand as JSON so that the event fields and their allowed
values come from the event model itself (``CSV_COLUMNS``, ``EVENT_KINDS``, ``METHODS``).
"""

from __future__ import annotations

import sys
from typing import Any

from proxy import __version__
from proxy.stores.consent import CSV_COLUMNS, EVENT_KINDS, METHODS

__all__ = ("openapi_document",)

_DESCRIPTIONS = {
    "address": "user@example.com, or @example.com for a whole domain",
    "event": "what happened",
    "at": "when it happened in the world (ISO 8601 with a time zone, or a date); default now",
    "topic": "the topic it concerns (newsletter, offers.shoes), or * for every topic",
    "sender": "the sender holding the relation (its From domain), or * for any",
    "method": "how it came about; a closed list per event (see the README)",
    "source": "where the proof lives: form URL, system, file, archive reference",
    "ip": "IP address of the person when consenting",
    "user_agent": "browser of the person when consenting",
    "text_version": "version of the consent text agreed to",
    "confirmed_at": "double opt-in: when the confirmation link was followed",
    "relation": "customer: order or customer number",
    "product_category": "customer: what was bought",
    "objection_offered": "customer: was the chance to object given at collection",
    "reason": "opt-out or suppression: why (required for suppressions)",
    "upstream_reply": "suppression after a bounce: the reply that caused it",
    "note": "free text",
}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(schema: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


_COMMON = {
    "401": _error("no token, or an unknown one"),
    "403": _error("the token lacks the scope"),
    "429": _error("the token's rate limit is reached; see Retry-After"),
    "503": _error("the consent store cannot answer now; retry later"),
}
_WRITE = {
    "400": _error("the body is not a JSON object, or a bad Idempotency-Key"),
    "409": _error("the first request with this Idempotency-Key is still being answered"),
    "413": _error("the body is too large"),
    "422": _error("the event breaks a rule (every problem named), or the key was used with another body"),
}
_IDEMPOTENCY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "any unique string per logical request; a retry with the same key and body records once and "
    "gets the first answer (header Idempotent-Replayed: true); after the address was erased that answer names "
    "its tombstone (erased:...) instead, without IP, user agent or source",
    "schema": {"type": "string", "minLength": 1, "maxLength": 200},
}


def _parameter(name: str, where: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    required = where == "path"
    return {
        "name": name,
        "in": where,
        "required": required,
        "description": description,
        "schema": schema or {"type": "string"},
    }


_ADDRESS = _parameter("address", "path", "user@example.com")
_AT = _parameter("at", "query", "as the store knew it then (ISO 8601)")


def _record(summary: str, kind: str | None) -> dict[str, Any]:
    schema = "EventInput" if kind is None else "FixedEventInput"
    return {
        "summary": summary,
        "security": [{"bearer": ["write"]}],
        "parameters": [_IDEMPOTENCY],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        },
        "responses": {"201": _json("Recorded", "recorded; the stored event with its id")} | _WRITE | _COMMON,
    }


def openapi_document() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name in CSV_COLUMNS:
        field: dict[str, Any] = {"type": "string", "description": _DESCRIPTIONS[name]}
        if name == "event":
            field["enum"] = list(EVENT_KINDS)
        elif name == "method":
            field["enum"] = sorted({m for methods in METHODS.values() for m in methods})
        elif name == "objection_offered":
            field = {"type": ["boolean", "string"], "description": _DESCRIPTIONS[name]}
        fields[name] = field
    stored = {name: {"type": "string"} for name in CSV_COLUMNS} | {
        "id": {"type": "integer"},
        "recorded_at": {"type": "string"},
        "objection_offered": {"type": "boolean"},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sendguard consent API",
            "version": __version__,
            "description": "Record consent events with their evidence, opt-outs and suppressions; read an "
            "address's status and history; import in bulk. Authorization: Bearer <token> (read or write scope).",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "EventInput": {
                    "type": "object",
                    "properties": fields,
                    "required": ["address", "event"],
                    "additionalProperties": False,
                },
                "FixedEventInput": {
                    "type": "object",
                    "description": "as EventInput; event is fixed by the route and method defaults to api",
                    "properties": fields,
                    "required": ["address"],
                    "additionalProperties": False,
                },
                "StoredEvent": {
                    "type": "object",
                    "properties": stored,
                    "required": ["id", "address", "event", "at", "topic", "sender", "method"],
                },
                "Recorded": {
                    "type": "object",
                    "properties": {"event": {"$ref": "#/components/schemas/StoredEvent"}},
                    "required": ["event"],
                },
                "Status": {
                    "type": "object",
                    "properties": {
                        "address": {"type": "string"},
                        "topic": {"type": "string"},
                        "sender": {"type": "string"},
                        "allowed": {
                            "type": "boolean",
                            "description": "may commercial mail of this topic and sender go",
                        },
                        "basis": {
                            "type": "object",
                            "description": "the consent policy's decision: basis (opt_in, soft_opt_in, suppressed, "
                            "opted_out, none), the record it rests on, an explanation",
                            "properties": {
                                "basis": {"enum": ["opt_in", "soft_opt_in", "suppressed", "opted_out", "none"]},
                                "allowed": {"type": "boolean"},
                                "explanation": {"type": "string"},
                                "record": {"type": "object"},
                            },
                            "required": ["basis", "allowed", "explanation"],
                        },
                    },
                    "required": ["address", "allowed", "basis"],
                },
                "History": {
                    "type": "object",
                    "properties": {
                        "address": {"type": "string"},
                        "events": {"type": "array", "items": {"$ref": "#/components/schemas/StoredEvent"}},
                    },
                    "required": ["address", "events"],
                },
                "Imported": {
                    "type": "object",
                    "properties": {"imported": {"type": "integer", "minimum": 0}},
                    "required": ["imported"],
                },
                "Error": {
                    "type": "object",
                    "properties": {
                        "error": {"type": "string"},
                        "problems": {"type": "array", "items": {"type": "string"}},
                    },
                    "required": ["error"],
                },
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/openapi.json": {
                "get": {
                    "summary": "this document",
                    "security": [],
                    "responses": {"200": {"description": "the OpenAPI document", "content": {"application/json": {}}}},
                }
            },
            "/v1/events": {"post": _record("record one consent event with its evidence", None)},
            "/v1/opt-outs": {"post": _record("record an opt-out (event opted_out)", "opted_out")},
            "/v1/suppressions": {
                "post": _record("record a suppression (event suppressed; reason required)", "suppressed")
            },
            "/v1/imports": {
                "post": {
                    "summary": "import many events: all or nothing, every problem with its line",
                    "security": [{"bearer": ["write"]}],
                    "parameters": [_IDEMPOTENCY],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/x-ndjson": {
                                "schema": {"type": "string", "description": "one EventInput a line"}
                            },
                            "text/csv": {
                                "schema": {"type": "string", "description": "the columns of sendguard consent import"}
                            },
                        },
                    },
                    "responses": {
                        "200": _json("Imported", "every event recorded"),
                        "415": _error("neither JSON lines nor CSV"),
                    }
                    | _WRITE
                    | _COMMON,
                }
            },
            "/v1/addresses/{address}/status": {
                "get": {
                    "summary": "what the consent policy would decide for commercial mail to this address",
                    "security": [{"bearer": ["read"]}],
                    "parameters": [
                        _ADDRESS,
                        _parameter("topic", "query", "the message's topic", {"type": "string", "default": "*"}),
                        _parameter("sender", "query", "the From domain", {"type": "string", "default": "*"}),
                        _AT,
                    ],
                    "responses": {"200": _json("Status", "the basis"), "422": _error("not an address")} | _COMMON,
                }
            },
            "/v1/addresses/{address}/history": {
                "get": {
                    "summary": "every event bearing on the address (its domain's too), oldest first",
                    "security": [{"bearer": ["read"]}],
                    "parameters": [_ADDRESS, _AT],
                    "responses": {"200": _json("History", "the events"), "422": _error("not an address")} | _COMMON,
                }
            },
        },
    }


if __name__ == "__main__":
    from proxy.api.server import dumps_document

    sys.stdout.write(dumps_document(openapi_document()))
