"""The configuration reference, generated from the pydantic models so it cannot drift.

``python -m sbs_core.reference > docs/configuration.md`` rewrites the page; a
test fails when the page and the models disagree.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from sbs_core.config import (
    AppConfig,
    ControllerConfig,
    EmailConfig,
    FolderConfig,
    LicenceConfig,
    NodeConfig,
    NotifyConfig,
    SentinelConfig,
)

__all__ = ("render_reference",)

_SECTIONS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("[node]", NodeConfig),
    ("[app]", AppConfig),
    ("[[folders]]", FolderConfig),
    ("[email]", EmailConfig),
    ("[controller]", ControllerConfig),
    ("[[controller.sentinels]]", SentinelConfig),
    ("[notify]", NotifyConfig),
    ("[licence]", LicenceConfig),
)

_INTRO = """\
# Configuration reference

One TOML file per node. Only `[node]` is required. Every value is checked when
the file is loaded (`sbs check --config FILE`, and at the start of `sbs run`):
an unknown key, a wrong type or an out-of-range value is refused with the file,
the dotted key and the reason, and nothing starts half-configured. Relative
paths are resolved against the folder of the configuration file.

This page is generated from the code (`python -m sbs_core.reference`).
"""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " \\| ".join(f'`"{a}"`' for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [_type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(parts) + (" (optional)" if type(None) in args else "")
    if origin is tuple:
        inner = _type_name(args[0]) if args else "value"
        return f"list of {inner}"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "table"
        return {
            "str": "string",
            "float": "number",
            "int": "integer",
            "bool": "boolean",
            "Path": "path",
            "PosixPath": "path",
            "SecretStr": "string (secret)",
        }.get(annotation.__name__, annotation.__name__)
    return str(annotation)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return "computed"
    value = field.default
    if value is PydanticUndefined or value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, tuple) and not value:
        return "`[]`"
    return f"`{value}`"


def _one_line(text: str | None) -> str:
    cleaned = re.sub(r"\s+", " ", text or "").strip()
    return cleaned.replace("|", "\\|")


def render_reference() -> str:
    out = [_INTRO]
    for header, model in _SECTIONS:
        out.append(f"## `{header}`\n")
        doc = _one_line(model.__doc__)
        if doc:
            doc = doc.replace(f"``{header}``: ", "").replace("``", "`")
            out.append(doc[:1].upper() + doc[1:] + "\n")
        out.append("| key | type | default | meaning |")
        out.append("|---|---|---|---|")
        for name, field in model.model_fields.items():
            if header == "[controller]" and name == "sentinels":
                continue
            meaning = _one_line(field.description).replace("``", "`")
            out.append(
                f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {meaning} |"
            )
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render_reference(), end="")
