"""A fast yes/no check of a document against the rule schema, compiled from rules.schema.json.

jsonschema is the reference validator and produces Warden's error messages, but it costs
~15 µs per rule object: 1.5 s for 100,000 rules. Valid rule files are the common case, so
`compile_schema` turns the same schema into nested closures that only answer "valid?".
When it says no, the caller runs jsonschema for the precise messages; when it says yes,
jsonschema would too (tests compare both on every fixture and on mutated documents).

Supports the keywords rules.schema.json uses; any other keyword makes compile_schema raise,
so a schema change cannot silently weaken validation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

Check = Callable[[Any], bool]

_IGNORED = {"$schema", "$id", "title", "description", "default"}


def _is_type(value: Any, name: str) -> bool:
    if name == "object":
        return isinstance(value, dict)
    if name == "array":
        return isinstance(value, list)
    if name == "string":
        return isinstance(value, str)
    if name == "boolean":
        return isinstance(value, bool)
    if name == "null":
        return value is None
    if isinstance(value, bool):
        return False
    if name == "integer":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if name == "number":
        return isinstance(value, int | float)
    raise ValueError(f"unknown JSON Schema type {name!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _unique(values: list[Any]) -> bool:
    try:
        return len(set(values)) == len(values)
    except TypeError:
        keys = [json.dumps(v, sort_keys=True) for v in values]
        return len(set(keys)) == len(keys)


def _json_equal_in(value: Any, allowed: list[Any]) -> bool:
    # JSON Schema equality: True is not 1.
    return any(type(value) is type(a) and value == a for a in allowed) or (
        not isinstance(value, bool) and isinstance(value, int | float)
        and any(not isinstance(a, bool) and isinstance(a, int | float) and a == value for a in allowed))


def compile_schema(schema: dict[str, Any] | bool) -> Check:
    if schema is True:
        return lambda _v: True
    if schema is False:
        return lambda _v: False
    checks: list[Check] = []
    for key in schema:
        if key in _IGNORED or key in ("properties", "additionalProperties", "required", "propertyNames",
                                      "items", "type", "enum", "const", "pattern", "minLength", "maxLength",
                                      "minimum", "maximum", "exclusiveMinimum", "minItems", "uniqueItems"):
            continue
        raise ValueError(f"fastschema does not support the keyword {key!r}")
    if "type" in schema:
        types: tuple[str, ...] = tuple(schema["type"] if isinstance(schema["type"], list) else [schema["type"]])
        checks.append(lambda v: any(_is_type(v, t) for t in types))
    if "enum" in schema:
        allowed: list[Any] = schema["enum"]
        checks.append(lambda v: _json_equal_in(v, allowed))
    if "const" in schema:
        const: list[Any] = [schema["const"]]
        checks.append(lambda v: _json_equal_in(v, const))
    if "pattern" in schema:
        rx = re.compile(schema["pattern"])
        checks.append(lambda v: not isinstance(v, str) or rx.search(v) is not None)
    if "minLength" in schema:
        min_length: int = schema["minLength"]
        checks.append(lambda v: not isinstance(v, str) or len(v) >= min_length)
    if "maxLength" in schema:
        max_length: int = schema["maxLength"]
        checks.append(lambda v: not isinstance(v, str) or len(v) <= max_length)
    if "minimum" in schema:
        minimum: float = schema["minimum"]
        checks.append(lambda v: not _is_number(v) or v >= minimum)
    if "maximum" in schema:
        maximum: float = schema["maximum"]
        checks.append(lambda v: not _is_number(v) or v <= maximum)
    if "exclusiveMinimum" in schema:
        exclusive_minimum: float = schema["exclusiveMinimum"]
        checks.append(lambda v: not _is_number(v) or v > exclusive_minimum)
    if "minItems" in schema:
        min_items: int = schema["minItems"]
        checks.append(lambda v: not isinstance(v, list) or len(v) >= min_items)
    if schema.get("uniqueItems"):
        checks.append(lambda v: not isinstance(v, list) or _unique(v))
    if "items" in schema:
        item = compile_schema(schema["items"])
        checks.append(lambda v: not isinstance(v, list) or all(item(x) for x in v))
    if any(k in schema for k in ("properties", "additionalProperties", "required", "propertyNames")):
        props = {k: compile_schema(s) for k, s in schema.get("properties", {}).items()}
        extra = schema.get("additionalProperties", True)
        extra_check = compile_schema(extra) if isinstance(extra, dict) else None
        required = tuple(schema.get("required", ()))
        names = compile_schema(schema["propertyNames"]) if "propertyNames" in schema else None

        def check_object(v: Any) -> bool:
            if not isinstance(v, dict):
                return True
            for r in required:
                if r not in v:
                    return False
            for k, x in v.items():
                if names is not None and not names(k):
                    return False
                sub = props.get(k)
                if sub is not None:
                    if not sub(x):
                        return False
                elif extra is False or extra_check is not None and not extra_check(x):
                    return False
            return True

        checks.append(check_object)
    if len(checks) == 1:
        return checks[0]
    return lambda v: all(c(v) for c in checks)
