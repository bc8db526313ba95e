"""The OpenAPI document says what the server enforces: the rules pydantic's schema generation
leaves out are added here, once the app's settings are known."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from server.config import Settings
from server.schemas import EpochBatch

NON_FINITE = {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}
READ_METHODS = frozenset({"get", "head", "options"})


def _walk(node: Any, visit: Callable[[dict[str, Any]], None]) -> None:
    if isinstance(node, dict):
        visit(node)
        for value in node.values():
            _walk(value, visit)
    elif isinstance(node, list):
        for value in node:
            _walk(value, visit)


def _non_finite(node: dict[str, Any]) -> None:
    """Metric fields (`float | None`) also take and give "NaN"/"Infinity"/"-Infinity"."""
    if node.get("anyOf") == [{"type": "number"}, {"type": "null"}]:
        node["anyOf"] = [{"type": "number"}, NON_FINITE, {"type": "null"}]


def _key_rules(node: dict[str, Any]) -> None:
    """pydantic writes a constrained dict key's pattern as `patternProperties`, which leaves
    other keys open; the server refuses them, so: the pattern goes to `propertyNames`."""
    patterns = node.get("patternProperties")
    if node.get("type") == "object" and isinstance(patterns, dict) and len(patterns) == 1:
        ((pattern, value),) = patterns.items()
        del node["patternProperties"]
        node["additionalProperties"] = value
        node.setdefault("propertyNames", {})["pattern"] = pattern


def _add_models(spec: dict[str, Any], *models: type[BaseModel]) -> None:
    """Put models that no route parameter names into components/schemas."""
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in schema.pop("$defs", {}).items():
            components.setdefault(name, definition)
        components[model.__name__] = schema


def _auth(spec: dict[str, Any], settings: Settings) -> None:
    """Bearer auth is declared where the server asks for it: writes when a token is set, reads
    only with GRADWATCH_PROTECT_READS as well; without a token, nowhere."""
    for operations in spec.get("paths", {}).values():
        for method, op in operations.items():
            needed = bool(settings.token) and (method not in READ_METHODS or settings.protect_reads)
            if not needed:
                op.pop("security", None)
                op.get("responses", {}).pop("401", None)
    if not settings.token:
        spec.get("components", {}).pop("securitySchemes", None)


def _limits(spec: dict[str, Any], settings: Settings) -> None:
    tasks = spec["components"]["schemas"]["RunCreate"]["properties"]["tasks"]
    tasks["maxItems"] = settings.max_tasks


def install(app: FastAPI, settings: Settings) -> None:
    """Replace `app.openapi` with one that adds the rules above (built once, then cached)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = generate()
            _add_models(spec, EpochBatch)  # the ingest route parses its body itself (speed)
            _walk(spec, _non_finite)
            _walk(spec, _key_rules)
            _auth(spec, settings)
            _limits(spec, settings)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]
