"""manifest.json's JSON Schema (onnx/manifest.schema.json) held to the exporter's manifests and to the
shared cases of onnx/manifest-examples/, whose runtime verdicts runtime/src/manifest.rs checks
(`schema_cases_are_accepted_or_refused_as_listed`): one contract, tested from both sides."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest

REPO = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((REPO / "onnx" / "manifest.schema.json").read_text())
EXAMPLES = REPO / "onnx" / "manifest-examples"
BASE = json.loads((EXAMPLES / "valid.json").read_text())
CASES = json.loads((EXAMPLES / "cases.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def _parent(doc: dict, pointer: str) -> tuple[dict | list, str]:
    *path, key = pointer.split("/")[1:]
    node = doc
    for part in path:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node, key


def apply(case: dict) -> dict:
    """The example manifest with the case's JSON-pointer removals and sets (an index one past the end of a
    list appends), as the Rust test applies them."""
    doc = copy.deepcopy(BASE)
    for pointer in case.get("remove", []):
        node, key = _parent(doc, pointer)
        del node[key]
    for pointer, value in case.get("set", {}).items():
        node, key = _parent(doc, pointer)
        if isinstance(node, list):
            index = int(key)
            if index == len(node):
                node.append(value)
            else:
                node[index] = value
        else:
            node[key] = value
    return doc


def test_the_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_schema_verdict_matches_the_case(case: dict) -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(apply(case))]
    print(
        f"{case['name']}: schema {'accepts' if not errors else 'refuses'}; runtime "
        f"{'accepts' if case['runtime'] else 'refuses'} ({case.get('message', '')}); {errors}"
    )
    assert (not errors) == case["schema"], errors
    # The runtime refuses every document the schema refuses; it may refuse more (cross-field rules).
    assert case["runtime"] <= case["schema"]


def test_exported_manifest_follows_the_schema(exports) -> None:
    manifest = json.loads((exports.model_dir("tiny-a") / "manifest.json").read_text())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(manifest)]
    assert not errors, errors
