"""Validate response objects against the official OpenAI OpenAPI spec.

The spec (../shared/openai-openapi/openapi.json, beside the repository) says OpenAPI 3.1,
whose schema dialect is JSON Schema 2020-12, but it still holds OpenAPI-3.0 `nullable: true`
keywords that a 2020-12 validator ignores (for example on a stream chunk's `finish_reason`).
They are rewritten into 2020-12 form once, when the spec is loaded; `$ref`s resolve into the
whole document through a `referencing` registry.

    assert_valid("CreateChatCompletionResponse", body)
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parents[2] / "shared" / "openai-openapi" / "openapi.json"
_URI = "urn:openai-openapi"


_COMPOSITION = ("$ref", "allOf", "anyOf", "oneOf", "not", "if")


def fix_nullable(node: Any) -> Any:
    """Returns a copy of `node` with every OpenAPI-3.0 `nullable: true` rewritten into 2020-12:
    a plain typed schema gains "null" in its `type` (and None in its `enum`); any other one
    ($ref, allOf, anyOf, ..., or no type at all) becomes `anyOf: [<schema>, {"type": "null"}]`,
    since a null would still fail its subschemas."""
    if isinstance(node, list):
        return [fix_nullable(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: fix_nullable(v) for k, v in node.items()}
    # Only the boolean keyword: a `properties` mapping may have a property named "nullable".
    if not isinstance(node.get("nullable"), bool) or not node.pop("nullable"):
        return node
    if "type" not in node or any(k in node for k in _COMPOSITION):
        return {"anyOf": [node, {"type": "null"}]}
    types = node["type"] if isinstance(node["type"], list) else [node["type"]]
    if "null" not in types:
        node["type"] = [*types, "null"]
    if "enum" in node and None not in node["enum"]:
        node["enum"] = [*node["enum"], None]
    return node


@cache
def _registry() -> Registry:
    if not SPEC_PATH.is_file():
        # CI always has shared/ beside the repository: a missing spec is a broken checkout,
        # not a reason to skip the schema checks silently.
        raise FileNotFoundError(f"the OpenAI OpenAPI spec is missing: {SPEC_PATH}")
    spec = fix_nullable(json.loads(SPEC_PATH.read_bytes()))
    resource = Resource.from_contents(spec, default_specification=DRAFT202012)
    return Registry().with_resource(_URI, resource)


@cache
def validator(schema_name: str) -> Draft202012Validator:
    schemas = _registry().contents(_URI)["components"]["schemas"]
    if schema_name not in schemas:
        raise KeyError(f"no schema {schema_name!r} in {SPEC_PATH}")
    return Draft202012Validator({"$ref": f"{_URI}#/components/schemas/{schema_name}"}, registry=_registry())


def assert_valid(schema_name: str, obj: Any) -> None:
    """Fails with every violation listed (path: message) when `obj` does not match the schema."""
    errors = sorted(validator(schema_name).iter_errors(obj), key=lambda e: list(e.absolute_path))
    assert not errors, f"not a valid {schema_name}:\n" + "\n".join(
        f"  {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors
    ) + f"\nobject: {json.dumps(obj, ensure_ascii=False)[:2000]}"
