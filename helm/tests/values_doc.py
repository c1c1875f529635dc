"""Reads the helm-docs style `# --` comments of helm/nerve/values.yaml.

The chart README's values table is kept in helm-docs format by hand (helm-docs is not installed here);
the tests compare it with values.yaml through this module. `python3 values_doc.py` prints the table
as helm-docs would, to paste into helm/nerve/README.md after changing values.yaml.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent.parent / "nerve"
VALUES_FILE = CHART / "values.yaml"

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_]+):")
_DOC_START = re.compile(r"^(?P<indent> *)# -- (?:\((?P<type>[^)]+)\) )?(?P<text>.*)$")
_DOC_MORE = re.compile(r"^ *# ?(?P<text>.*)$")


@dataclass
class Doc:
    key: str  # dotted path, as in the README table
    type: str
    default: Any
    description: str


def _lookup(values: Any, path: list[str]) -> Any:
    for part in path:
        values = values[part]
    return values


def helm_docs_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return "string"


def helm_docs_default(value: Any) -> str:
    if value is None:
        return "`nil`"
    return "`" + json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True) + "`"


def documented(values_file: Path = VALUES_FILE) -> list[Doc]:
    """Every key with a `# --` comment, in file order."""
    text = values_file.read_text()
    values = yaml.safe_load(text)
    docs: list[Doc] = []
    stack: list[tuple[int, str]] = []
    pending: tuple[str | None, list[str]] | None = None
    for line in text.splitlines():
        start = _DOC_START.match(line)
        if start:
            pending = (start.group("type"), [start.group("text")])
            continue
        if pending is not None and line.lstrip().startswith("#"):
            more = _DOC_MORE.match(line)
            if more:
                pending[1].append(more.group("text"))
            continue
        key = _KEY.match(line)
        if not key:
            if line.strip() == "":
                pending = None
            continue
        indent = len(key.group("indent"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key.group("key")))
        if pending is not None:
            path = [k for _, k in stack]
            value = _lookup(values, path)
            type_override, lines = pending
            docs.append(
                Doc(
                    key=".".join(path),
                    type=type_override or helm_docs_type(value),
                    default=value,
                    description=" ".join(line.strip() for line in lines).strip(),
                )
            )
            pending = None
    return docs


def leaves(values: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths of every leaf of the values (an empty map or list counts as a leaf)."""
    if isinstance(values, dict) and values:
        out: list[tuple[str, ...]] = []
        for key, value in values.items():
            out.extend(leaves(value, prefix + (key,)))
        return out
    return [prefix]


def table(docs: list[Doc]) -> str:
    rows = ["| Key | Type | Default | Description |", "|-----|------|---------|-------------|"]
    for doc in sorted(docs, key=lambda d: d.key):
        description = doc.description.replace("|", "\\|")
        rows.append(f"| {doc.key} | {doc.type} | {helm_docs_default(doc.default)} | {description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(table(documented()) + "\n")
