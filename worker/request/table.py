"""The README's request table, generated from the schema's declarations (a test keeps the README equal to it).

python -m worker.request.table --write README.md
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel

from worker.request.schema import GenerationRequest, field_names


def _kind(annotation: Any) -> str:
    """A JSON reader's name for a field's type: string, integer, number, true/false, a list of values, list."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{value}`" for value in args)
    if args and type(None) in args:
        inner = [arg for arg in args if arg is not type(None)]
        return f"{_kind(inner[0])}, or null"
    if origin is list:
        return "list"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "object"
    return {str: "string", int: "integer", float: "number", bool: "`true` / `false`"}.get(annotation, str(annotation))


def _number(value: float) -> str:
    if isinstance(value, int) and value >= 2**32 and (value + 1) & value == 0:
        return f"2^{value.bit_length()}-1"
    return str(value) if isinstance(value, int) else f"{value:g}"


def _bounds(metadata: list[Any], unit: str) -> str:
    """'LOW..HIGH; multiple of N; at most N unit' from a field's constraints (> and < mark open ends)."""
    low = high = ""
    parts = []
    for item in metadata:
        if getattr(item, "ge", None) is not None:
            low = _number(item.ge)
        if getattr(item, "gt", None) is not None:
            low = ">" + _number(item.gt)
        if getattr(item, "le", None) is not None:
            high = _number(item.le)
        if getattr(item, "lt", None) is not None:
            high = "<" + _number(item.lt)
        if getattr(item, "multiple_of", None) is not None:
            parts.append(f"multiple of {item.multiple_of}")
        if getattr(item, "max_length", None) is not None:
            parts.append(f"at most {item.max_length:,} {unit}")
    if low or high:
        parts.insert(0, f"{low}..{high}")
    return "; ".join(parts)


def request_table() -> str:
    """The README's request table, generated from :class:`GenerationRequest`'s declarations."""
    rows = ["| field | type, bounds | default | meaning |", "| --- | --- | --- | --- |"]
    for name in field_names():
        spec = GenerationRequest.model_fields[name]
        kinds = (spec.annotation, *get_args(spec.annotation))  # list[...] or list[...] | None
        bounds = _bounds(spec.metadata, "items" if any(get_origin(kind) is list for kind in kinds) else "characters")
        kind = _kind(spec.annotation) + (f" ({bounds})" if bounds else "")
        default = json.dumps(spec.default) if spec.default is not None else "null"
        rows.append(f"| `{name}` | {kind} | `{default}` | {spec.description} |")
    return "\n".join(rows)


TABLE_START, TABLE_END = "<!-- request-table:start -->", "<!-- request-table:end -->"


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--write"]:  # python -m worker.request.table --write README.md
        readme = Path(sys.argv[2])
        text = readme.read_text()
        head, _, rest = text.partition(TABLE_START)
        _, _, tail = rest.partition(TABLE_END)
        readme.write_text(f"{head}{TABLE_START}\n{request_table()}\n{TABLE_END}{tail}")
    else:
        print(request_table())
