"""Checking paths that come from the peer before anything touches the disk.

A path on the wire names a file relative to one of the configured folders
("roots"). The peer may be buggy or hostile, so :func:`check_wire_path` accepts
only a small, portable form: a relative path with ``/`` separators whose every
component is a plain name that Linux, macOS and Windows all store as written.
Names that Windows would alias (``con.txt``, ``a.``, ``a ``) or read as
something else (``C:x``, ``a:stream``) are refused on every OS, so a pair with
one node on each OS behaves the same both ways.

:func:`resolve_inside` then turns a checked path into the absolute target under
a root, refusing to go through anything on the disk that could lead elsewhere.

sbs never follows or replicates symbolic links (nor, on Windows, directory
junctions): the scanner skips them and the receiver refuses to write through
them. A link inside a replicated folder is a local decision of that node; the
pair does not copy it, and a link on the secondary can never redirect a write
from the primary outside the configured folders.

The checks guard against the peer, not against local users who can already
write inside the folders: a folder swapped for a link between the check and the
write is not detected.

Names starting with :data:`TEMP_PREFIX` are sbs's own temporary files (written
next to their target, then renamed over it). The scanner ignores them, and the
peer may not name one as a file to write or delete. Folders starting with
:data:`STAGING_PREFIX` are sbs's own too: a new folder's files are written
under such a hidden name and the folder is renamed into place whole. The
scanner skips them, and no path from the peer may pass through one.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path, PurePosixPath

from sbs_core.errors import RemoteProtocolError

__all__ = (
    "MAX_COMPONENT_BYTES",
    "MAX_PATH_BYTES",
    "STAGING_PREFIX",
    "TEMP_PREFIX",
    "UnsafePathError",
    "check_wire_name",
    "check_wire_path",
    "component_problem",
    "quoted",
    "resolve_inside",
)

TEMP_PREFIX = ".sbs-tmp-"
STAGING_PREFIX = ".sbs-new-"
MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4096

# Shown paths are cut so that a hostile multi-megabyte path cannot flood a log.
_SHOWN_CHARS = 120

_ON_WINDOWS = sys.platform == "win32"

_DEVICE_NAMES = frozenset(
    {
        "CON",
        "PRN",
        "AUX",
        "NUL",
        # Consoles since Windows 8: opening them also reaches a device.
        "CONIN$",
        "CONOUT$",
        *(f"{port}{digit}" for port in ("COM", "LPT") for digit in "123456789\u00b9\u00b2\u00b3"),
    }
)

_FORBIDDEN = re.compile(r'[\x00-\x1f\x7f\\:<>"|?*]')
_FORBIDDEN_EVERYWHERE = re.compile(r"[\x00-\x1f\x7f\\:]")

# The common case in one match, checked before the rules one by one (which also
# name the broken rule): ASCII components of characters allowed everywhere, not
# ending in a dot or a space (so neither "." nor ".."), at most
# MAX_COMPONENT_BYTES long, and not a device name. Thousands of files per batch
# pay for a check each; anything this does not match takes the full road.
_PLAIN_CHARS = r"A-Za-z0-9_\-+=~!#$%&'(),;@\[\]^`{}"
_ASCII_DEVICES = "|".join(
    re.escape(name) for name in sorted(_DEVICE_NAMES, key=len, reverse=True) if name.isascii()
)
_PLAIN_NAME = (
    rf"(?!(?i:{_ASCII_DEVICES}) *(?:\.|/|\Z))"
    rf"[{_PLAIN_CHARS} .]{{0,{MAX_COMPONENT_BYTES - 1}}}[{_PLAIN_CHARS}]"
)
_PLAIN_COMPONENT = re.compile(_PLAIN_NAME)
_PLAIN_PATH = re.compile(rf"{_PLAIN_NAME}(?:/{_PLAIN_NAME})*")


class UnsafePathError(RemoteProtocolError, ValueError):
    """A path from the peer may not be used: it could reach outside its folder.

    Raised by :func:`check_wire_path` and :func:`resolve_inside` with ``path``
    (the offending path) and ``reason`` (the rule it broke) set; ``str()`` shows
    both, with the path quoted and cut to a readable length. Other code may
    raise it with a message only, leaving both attributes None.
    """

    def __init__(self, message: str, *, path: str | None = None, reason: str | None = None) -> None:
        self.path = path
        self.reason = reason
        super().__init__(message)

    @classmethod
    def broken_rule(cls, path: str, reason: str) -> UnsafePathError:
        """The error for ``path`` breaking the rule described by ``reason``."""
        return cls(f"unsafe path {quoted(path)}: {reason}", path=path, reason=reason)


def check_wire_path(path: str, *, windows: bool = _ON_WINDOWS) -> PurePosixPath:
    """Return ``path`` as a :class:`PurePosixPath` if it is a safe relative path.

    Raise :class:`UnsafePathError` naming the broken rule otherwise. Accepted:
    a non-empty relative path with ``/`` separators, at most
    :data:`MAX_PATH_BYTES` bytes in UTF-8, made of components of at most
    :data:`MAX_COMPONENT_BYTES` bytes that are not empty, ``.`` or ``..``, do
    not end in ``.`` or a space, are not a Windows device name (``CON``,
    ``com1.txt``, ``LPT²``...), and contain no control character, ``\\`` or
    ``:``. The last component may not start with :data:`TEMP_PREFIX`, and no
    component with :data:`STAGING_PREFIX`.

    With ``windows=True`` the characters ``< > " | ? *`` are refused too; it is
    the default on Windows, where such names cannot be created.
    """
    reason = _path_problem(path, windows=windows)
    if reason is not None:
        raise UnsafePathError.broken_rule(path, reason)
    return PurePosixPath(path)


def check_wire_name(path: str, *, windows: bool = _ON_WINDOWS) -> None:
    """:func:`check_wire_path` without building the path object (the checks only)."""
    reason = _path_problem(path, windows=windows)
    if reason is not None:
        raise UnsafePathError.broken_rule(path, reason)


def resolve_inside(root: Path, rel: PurePosixPath) -> Path:
    """Return the absolute target of ``rel`` under ``root``, or raise.

    ``rel`` must pass :func:`check_wire_path` (checked again here, since a
    :class:`PurePosixPath` built elsewhere may hold ``..`` or, read by Windows,
    a backslash). Every folder between ``root`` and the target that already
    exists must be a real folder, not a symbolic link, junction or file; folders
    that do not exist yet are fine (the caller creates them). ``root`` itself
    may be a link: the user configured it. The target itself is not checked:
    writers replace it by renaming, which never follows a link.

    Raise :class:`UnsafePathError` if a rule is broken; an :class:`OSError`
    other than a missing folder (a permission error, say) propagates, since it
    is not the peer's fault.
    """
    text = rel.as_posix()
    reason = _path_problem(text, windows=_ON_WINDOWS)
    if reason is not None:
        raise UnsafePathError.broken_rule(text, reason)
    parts = rel.parts
    real_root = Path(os.path.realpath(root))
    folder = real_root
    for part in parts[:-1]:
        folder = folder / part
        try:
            info = os.lstat(folder)
        except FileNotFoundError:
            break
        except NotADirectoryError:
            # Only reachable if a component vanished and came back as a file
            # since the previous step; same verdict as finding a file.
            raise UnsafePathError.broken_rule(text, f"{quoted(part)} is not a folder") from None
        if _is_link(info):
            raise UnsafePathError.broken_rule(text, f"folder {quoted(part)} is a symbolic link")
        if not stat.S_ISDIR(info.st_mode):
            raise UnsafePathError.broken_rule(text, f"{quoted(part)} is not a folder")
    real_parent = Path(os.path.realpath(real_root.joinpath(*parts[:-1])))
    if real_parent != real_root and real_root not in real_parent.parents:
        raise UnsafePathError.broken_rule(text, "leads outside its folder")
    return real_parent / parts[-1]


def _path_problem(path: str, *, windows: bool) -> str | None:
    """The rule ``path`` breaks, or None; shared with the scanner."""
    if (
        isinstance(path, str)
        and len(path) <= MAX_PATH_BYTES
        and _PLAIN_PATH.fullmatch(path) is not None
        # Either prefix anywhere: the rules below tell whether it is a broken one.
        and TEMP_PREFIX not in path
        and STAGING_PREFIX not in path
    ):
        return None
    return _broken_path_rule(path, windows=windows)


def _broken_path_rule(path: str, *, windows: bool) -> str | None:
    """:func:`_path_problem` rule by rule, without the plain-path shortcut."""
    if not isinstance(path, str):
        return f"is a {type(path).__name__}, not text"
    if not path:
        return "is empty"
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid Unicode (lone surrogate)"
    if size > MAX_PATH_BYTES:
        return f"is longer than {MAX_PATH_BYTES} bytes"
    char_reason = _char_problem(path, windows=windows)
    if char_reason is not None:
        return char_reason
    if path.startswith("/"):
        return "is absolute"
    components = path.split("/")
    for component in components:
        reason = _name_problem(component)
        if reason is not None:
            return reason
    if components[-1].startswith(TEMP_PREFIX):
        return f"names a temporary file of sbs ({TEMP_PREFIX}*)"
    if any(component.startswith(STAGING_PREFIX) for component in components):
        return f"passes through a folder sbs is still filling ({STAGING_PREFIX}*)"
    return None


def component_problem(name: str, *, windows: bool) -> str | None:
    """The rule a single name (a file or folder name found on disk) breaks, or None."""
    if _PLAIN_COMPONENT.fullmatch(name) is not None:
        return None
    return _broken_component_rule(name, windows=windows)


def _broken_component_rule(name: str, *, windows: bool) -> str | None:
    """:func:`component_problem` rule by rule, without the plain-name shortcut."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (lone surrogate)"
    reason = _char_problem(name, windows=windows)
    if reason is None and "/" in name:
        reason = "has a '/' inside a name"
    return reason if reason is not None else _name_problem(name)


def _name_problem(name: str) -> str | None:
    """The rule a component breaks, once its characters are known to be allowed."""
    if not name:
        return "has an empty component"
    if name in (".", ".."):
        return f"has a {name!r} component"
    if len(name.encode("utf-8")) > MAX_COMPONENT_BYTES:
        return f"has a component longer than {MAX_COMPONENT_BYTES} bytes"
    if name[-1] in ". ":
        return f"component {quoted(name)} ends in a dot or a space (Windows drops them)"
    # Windows ignores the extension and trailing spaces when it spots a device.
    if name.split(".", 1)[0].rstrip(" ").upper() in _DEVICE_NAMES:
        return f"component {quoted(name)} is a Windows device name"
    return None


def _char_problem(text: str, *, windows: bool) -> str | None:
    found = (_FORBIDDEN if windows else _FORBIDDEN_EVERYWHERE).search(text)
    if found is None:
        return None
    char = found.group()
    if char == "\\":
        return "contains a backslash"
    if char == ":":
        return "contains ':' (drive letter or alternate data stream)"
    if char < " " or char == "\x7f":
        return f"contains the control character {char!r}"
    return f"contains {char!r}, which Windows does not allow in names"


if sys.platform == "win32":

    def _is_link(info: os.stat_result) -> bool:
        # Junctions are not S_IFLNK but redirect just like a link does.
        return stat.S_ISLNK(info.st_mode) or (
            info.st_reparse_tag == stat.IO_REPARSE_TAG_MOUNT_POINT
        )

else:

    def _is_link(info: os.stat_result) -> bool:
        return stat.S_ISLNK(info.st_mode)


def quoted(text: str) -> str:
    """``text`` quoted for a message: escaped, and cut if it is long."""
    if len(text) <= _SHOWN_CHARS:
        return repr(text)
    return f"{text[:_SHOWN_CHARS]!r}... ({len(text)} characters)"
