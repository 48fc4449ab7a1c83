"""What the ``-cfg`` dialog edits, without Tk: the TOML file as fields, checked, saved.

:class:`ConfigForm` reads the configuration with tomlkit, so that saving keeps
the administrator's comments, key order and every key the dialog does not show.
:meth:`ConfigForm.save` writes the fields into a copy of the document, checks
that copy with the very loader the node uses (:func:`sbs_core.config.load_config`,
on a temporary file beside the real one, so relative paths mean the same), and
replaces the file only if nothing is wrong. Problems come back keyed by field,
so the dialog shows each next to its field; nothing invalid is ever written.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import tomlkit
from tomlkit.items import AoT

from sbs_core.config import Config, load_config
from sbs_core.errors import ConfigError
from sbs_core.state import write_atomically

__all__ = ("GENERAL", "TEXT_FIELDS", "ConfigForm", "FormValues")

GENERAL: Final = "general"
"""The key of problems that belong to no field of the dialog."""

# Field id -> dotted TOML key and what kind of value it holds.
TEXT_FIELDS: Final[dict[str, tuple[str, str]]] = {
    "local_address": ("node.local_address", "text"),
    "remote_address": ("node.remote_address", "text"),
    "port": ("node.port", "int"),
    "period": ("node.period", "float"),
    "email_host": ("email.host", "text"),
    "email_port": ("email.port", "int"),
    "email_security": ("email.security", "text"),
    "email_username": ("email.username", "text"),
    "email_sender": ("email.sender", "text"),
    "email_recipients": ("email.recipients", "list"),
}
FLAG_FIELDS: Final[dict[str, str]] = {
    "strict_sync": "node.strict_sync",
    "preserve_timestamps": "node.preserve_timestamps",
    "email_enabled": "email.enabled",
}
_DEFAULTS: Final[dict[str, str]] = {
    "port": "4445",
    "period": "30",
    "email_port": "25",
    "email_security": "none",
}
# Keys the loader may name that are shown by a field with another id.
_KEY_TO_FIELD: Final[dict[str, str]] = {
    **{key: name for name, (key, _) in TEXT_FIELDS.items()},
    **{key: name for name, key in FLAG_FIELDS.items()},
    "node.mode": "primary_only",
    "email.password": "email_password",
    "email.password_file": "email_password",
}
_FOLDER_KEY: Final = re.compile(r"folders\[(\d+)\](?:\.(path|filter))?")


@dataclass
class FormValues:
    """Every value the dialog shows: text as typed, flags, and the folder rows."""

    text: dict[str, str] = field(default_factory=dict)
    flags: dict[str, bool] = field(default_factory=dict)
    primary_only: bool = False
    backup_only: bool = False
    email_password: str = ""
    """A new password; empty keeps the one configured."""
    folders: list[tuple[str, str]] = field(default_factory=list)
    """(filter, path) rows."""


class ConfigForm:
    """One configuration file, as the dialog edits it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(os.path.abspath(path))
        self._doc = tomlkit.document()
        self.reload()

    def reload(self) -> FormValues:
        """Read the file again; the values it holds now."""
        self._doc = tomlkit.parse(self.path.read_text(encoding="utf-8-sig"))
        return self.values()

    def values(self) -> FormValues:
        doc = self._doc.unwrap()
        values = FormValues()
        for name, (key, kind) in TEXT_FIELDS.items():
            value = _get(doc, key)
            if value is None:
                values.text[name] = _DEFAULTS.get(name, "")
            elif kind == "list":
                values.text[name] = ", ".join(str(v) for v in value)
            elif isinstance(value, float) and value.is_integer():
                values.text[name] = str(int(value))
            else:
                values.text[name] = str(value)
        for name, key in FLAG_FIELDS.items():
            values.flags[name] = bool(_get(doc, key) is True)
        mode = _get(doc, "node.mode")
        values.primary_only = mode == "primary"
        values.backup_only = mode == "backup"
        for folder in doc.get("folders") or ():
            if isinstance(folder, dict):
                values.folders.append((str(folder.get("filter", "*")), str(folder.get("path", ""))))
        return values

    @property
    def password_file(self) -> Path | None:
        """Where the password is kept, when the file keeps it out of itself."""
        value = _get(self._doc.unwrap(), "email.password_file")
        if not isinstance(value, str) or not value.strip():
            return None
        return (self.path.parent / Path(value).expanduser()).absolute()

    # ------------------------------------------------------------------ checking

    def check(self, values: FormValues) -> tuple[Config | None, dict[str, str], str]:
        """The configuration ``values`` would make, or the problems, by field id; and its text.

        Nothing is written but a temporary file, removed again.
        """
        problems: dict[str, str] = {}
        doc = tomlkit.parse(tomlkit.dumps(self._doc))
        self._apply(doc, values, problems)
        text = tomlkit.dumps(doc)
        if problems:
            return None, problems, text
        probe = self.path.with_name(f".{self.path.stem}.check-{secrets.token_hex(4)}.toml")
        try:
            probe.write_text(text, encoding="utf-8")
            return load_config(probe), {}, text
        except ConfigError as exc:
            return None, self._by_field(exc), text
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()

    def save(self, values: FormValues) -> dict[str, str]:
        """Write ``values`` to the file if they make a valid configuration; the problems."""
        config, problems, text = self.check(values)
        if config is None:
            return problems
        password_file = self.password_file
        if values.email_password and password_file is not None:
            write_atomically(password_file, (values.email_password + "\n").encode("utf-8"))
            if os.name == "posix":
                password_file.chmod(0o600)
        write_atomically(self.path, text.encode("utf-8"))
        self.reload()
        return {}

    def _by_field(self, error: ConfigError) -> dict[str, str]:
        found: dict[str, str] = {}
        for key, reason in error.problems:
            name = self.field_for(key)
            line = reason if name != GENERAL or not key else f"{key}: {reason}"
            found[name] = f"{found[name]}\n{line}" if name in found else line
        return found

    @staticmethod
    def field_for(key: str | None) -> str:
        """The field that shows the loader's ``key`` (``folders[1].path`` -> ``folder1``)."""
        if key is None:
            return GENERAL
        if key in _KEY_TO_FIELD:
            return _KEY_TO_FIELD[key]
        match = _FOLDER_KEY.fullmatch(key)
        if match:
            return f"folder{match.group(1)}"
        return GENERAL

    # ------------------------------------------------------------------ writing

    def _apply(self, doc: Any, values: FormValues, problems: dict[str, str]) -> None:
        for name, (key, kind) in TEXT_FIELDS.items():
            raw = values.text.get(name, "").strip()
            try:
                value = _parse(raw, kind)
            except ValueError as exc:
                problems[name] = str(exc)
                continue
            if _get(doc.unwrap(), key) is None and raw == _DEFAULTS.get(name):
                continue  # a default the file does not spell out stays unwritten
            _set(doc, key, value)
        for name, key in FLAG_FIELDS.items():
            flag = values.flags.get(name, False)
            # Defaults stay unwritten, so a file keeps its shape where nothing changed.
            _set(doc, key, flag if flag or _get(doc.unwrap(), key) is not None else None)
        if values.primary_only and values.backup_only:
            problems["primary_only"] = "choose primary-only or backup-only, not both"
        mode = "primary" if values.primary_only else "backup" if values.backup_only else None
        if mode is None and _get(doc.unwrap(), "node.mode") not in (None, "auto"):
            mode = "auto"
        if mode is not None:
            _set(doc, "node.mode", mode)
        if values.email_password and self.password_file is None:
            _set(doc, "email.password", values.email_password)
        self._apply_folders(doc, values.folders, problems)

    @staticmethod
    def _apply_folders(doc: Any, rows: list[tuple[str, str]], problems: dict[str, str]) -> None:
        for index, (_, path) in enumerate(rows):
            if not path.strip():
                problems[f"folder{index}"] = "needs a path"
        existing = doc.get("folders")
        if not rows:
            if existing is not None:
                del doc["folders"]
            return
        tables: AoT = existing if isinstance(existing, AoT) else tomlkit.aot()
        # Rows edited in place keep their comments and any other keys.
        while len(tables) > len(rows):
            tables.pop()
        for index, (pattern, path) in enumerate(rows):
            if index < len(tables):
                table = tables[index]
            else:
                table = tomlkit.table()
                tables.append(table)
            for key, value in (("path", path.strip()), ("filter", pattern.strip() or "*")):
                if table.get(key) != value:  # an equal value keeps its spelling
                    table[key] = value
        if existing is None:
            doc["folders"] = tables


def _parse(raw: str, kind: str) -> object | None:
    if not raw:
        return None
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise ValueError("must be a whole number") from None
    if kind == "float":
        try:
            number = float(raw)
        except ValueError:
            raise ValueError("must be a number of seconds") from None
        return int(number) if number.is_integer() else number
    if kind == "list":
        return [part.strip() for part in re.split(r"[,;]", raw) if part.strip()]
    return raw


def _parts(key: str) -> tuple[list[str], str]:
    *tables, name = key.split(".")
    return tables, name


def _get(doc: dict[str, Any], key: str) -> Any:
    tables, name = _parts(key)
    node: Any = doc
    for table in tables:
        node = node.get(table) if isinstance(node, dict) else None
    return node.get(name) if isinstance(node, dict) else None


def _set(doc: Any, key: str, value: object | None) -> None:
    tables, name = _parts(key)
    node = doc
    for table in tables:
        if table not in node:
            if value is None:
                return
            node[table] = tomlkit.table()
        node = node[table]
    if value is None:
        if name in node:
            del node[name]
    elif name not in node or node[name] != value:
        node[name] = value
