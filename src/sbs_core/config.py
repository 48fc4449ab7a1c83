"""Load and check the sbs configuration file.

One TOML file describes a node: ``[node]`` (required), ``[app]``, ``[[folders]]``,
``[email]`` and ``[controller]``. :func:`load_config` reads it into frozen pydantic
models and refuses every invalid value up front, naming the file, the dotted key and
the reason, so that nothing ever starts half-configured. :meth:`Config.warnings`
lists settings that are legal but probably not what the administrator meant.

Relative paths in the file are taken relative to the file's own folder, and ``~``
stands for the home folder.
"""

from __future__ import annotations

import difflib
import ntpath
import os
import posixpath
import re
import shlex
import socket
import ssl
import stat
import sys
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from sbs_core.errors import ConfigError

__all__ = (
    "DEFAULT_PORT",
    "MIN_SECRET_BYTES",
    "AppConfig",
    "Config",
    "ControllerConfig",
    "ControllerKind",
    "EmailConfig",
    "EmailSecurity",
    "FolderConfig",
    "LicenceConfig",
    "Mode",
    "NodeConfig",
    "NotifyConfig",
    "SentinelConfig",
    "default_state_dir",
    "load_config",
)

DEFAULT_PORT: Final = 4445
"""The peer port both nodes use unless ``node.port`` says otherwise."""

MIN_SECRET_BYTES: Final = 16
"""The shortest shared secret accepted, counted after stripping surrounding whitespace."""

Mode = Literal["auto", "primary", "backup"]
"""How a node picks its role at startup (see ``node.mode``)."""

EmailSecurity = Literal["none", "starttls", "ssl"]
"""How the SMTP connection is protected (see ``email.security``)."""

ControllerKind = Literal["process", "windows"]
"""The built-in service controllers; a new kind is one more literal here."""


# --- errors raised from validators ----------------------------------------------------

_PROBLEM: Final = "sbs_config"
_CONTEXT_FILE: Final = "config_file"


def _problems(found: Sequence[tuple[str, str]]) -> PydanticCustomError:
    """An error for one or more keys at or below the value being validated.

    Each entry is ``(relative key, reason)``: ``""`` is the value itself, ``"host"``
    or ``"[1].command"`` a key inside it. pydantic cannot place one validator's
    errors at several locations, so :func:`_explain` expands them.
    """
    return PydanticCustomError(
        _PROBLEM, "{reason}", {"reason": found[0][1], "problems": tuple(found)}
    )


def _problem(reason: str, *, at: str = "") -> PydanticCustomError:
    return _problems([(at, reason)])


def _num(value: float) -> str:
    return f"{value:g}" if float(f"{value:g}") == value else repr(value)


# --- value types ----------------------------------------------------------------------

# TOML values are already typed, so nothing is coerced: "4445" is not a port and 1 is
# not true.
_Text = Annotated[str, Strict()]
_Flag = Annotated[bool, Strict()]
_Seconds = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]


def _check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise _problem(f"must be a TCP port number from 1 to 65535, not {value}")
    return value


_Port = Annotated[int, Strict(), AfterValidator(_check_port)]


def _base_dir(info: ValidationInfo) -> Path:
    context = info.context
    if isinstance(context, Mapping):
        source = context.get(_CONTEXT_FILE)
        if isinstance(source, Path):
            return source.parent
    return Path.cwd()


def _to_path(value: object, info: ValidationInfo) -> object:
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(text, str):
        return value  # the Path schema refuses it with a type error
    if not text.strip():
        raise _problem("must not be empty")
    path = Path(text)
    try:
        path = path.expanduser()
    except RuntimeError:
        raise _problem(
            f"starts with ~ but the home folder of that user is unknown: {text}"
        ) from None
    # The service runs with an arbitrary working folder, so only the config file's
    # own folder gives a relative path a stable meaning.
    return Path(os.path.abspath(_base_dir(info) / path))


_ConfigPath = Annotated[Path, BeforeValidator(_to_path)]


def _split_command(value: object) -> object:
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as exc:
            raise _problem(f"cannot be split into words: {str(exc).lower()}") from None
    return value


def _check_program(argv: tuple[str, ...]) -> tuple[str, ...]:
    if not argv[0].strip():
        raise _problem("must start with a program name, not an empty string")
    return argv


_Argv = Annotated[tuple[_Text, ...], Field(min_length=1), AfterValidator(_check_program)]
_Command = Annotated[_Argv, BeforeValidator(_split_command)]


# local@domain: no spaces, no second "@", none of the characters that separate or
# quote addresses in a header, and a domain without empty labels.
_ADDRESS = r"[^\s@<>,;\"]+@[^\s@<>,;\".]+(?:\.[^\s@<>,;\".]+)*"
_BARE_ADDRESS: Final = re.compile(_ADDRESS)
_NAMED_ADDRESS: Final = re.compile(rf"[^<>@]*<{_ADDRESS}>")


def _check_email_address(value: str) -> str:
    address = value.strip()
    if _BARE_ADDRESS.fullmatch(address) or _NAMED_ADDRESS.fullmatch(address):
        return address
    raise _problem(
        f"{value!r} is not an email address: write local@domain or"
        " 'Name <local@domain>', without spaces in the address"
    )


_EmailAddress = Annotated[_Text, AfterValidator(_check_email_address)]

_SENTINEL_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _check_sentinel_name(value: str) -> str:
    if not _SENTINEL_NAME.fullmatch(value):
        raise _problem(
            f"{value!r} is not a valid sentinel name: use 1 to 64 letters, digits, '_', '.'"
            " or '-', starting with a letter or a digit"
        )
    return value


_SentinelName = Annotated[_Text, AfterValidator(_check_sentinel_name)]


def _check_service_name(value: str) -> str:
    name = value.strip()
    if not name or len(name) > 256 or "/" in name or "\\" in name:
        raise _problem(
            f"{value!r} is not a Windows service name: use its short name (as 'sc query'"
            " shows it), 1 to 256 characters without '/' or '\\'"
        )
    return name


_ServiceName = Annotated[_Text, AfterValidator(_check_service_name)]


def _check_public_key(value: str) -> str:
    from sbs_core.licence import LicenceError, parse_public_key  # noqa: PLC0415 - a cycle

    try:
        parse_public_key(value)
    except LicenceError as exc:
        raise _problem(str(exc)) from None
    return value.strip()


_PublicKey = Annotated[_Text, AfterValidator(_check_public_key)]


# --- files read at load time ----------------------------------------------------------


class _FileProblem(Exception):
    """Why a file named by the configuration cannot be used (no path in the text)."""


def _read_regular_file(path: Path) -> bytes:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise _FileProblem("does not exist") from None
    except OSError as exc:
        raise _FileProblem(f"cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise _FileProblem(f"is {kind}, not a file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _FileProblem(f"cannot be read: {exc.strerror or exc}") from None


def _read_secret(path: Path) -> bytes:
    secret = _read_regular_file(path).strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise _FileProblem(
            f"is too short: it holds {len(secret)} bytes once surrounding whitespace is"
            f" removed, and the shared secret needs at least {MIN_SECRET_BYTES}"
        )
    return secret


def _read_password(path: Path) -> str:
    try:
        text = _read_regular_file(path).decode("utf-8")
    except UnicodeDecodeError:
        raise _FileProblem("is not UTF-8 text") from None
    # Editors add a final newline that is never part of the password; other
    # whitespace may be.
    password = text.rstrip("\r\n")
    if not password:
        raise _FileProblem("is empty")
    return password


def _check_certificates(path: Path) -> None:
    data = _read_regular_file(path)
    problem = _FileProblem("holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise problem
    try:
        ssl.create_default_context(cadata=data.decode("ascii"))
    except (UnicodeDecodeError, ssl.SSLError, ValueError):
        raise problem from None


def _open_to_others(path: Path) -> str | None:
    """The file's permission bits if users other than its owner can use it."""
    if os.name != "posix":
        return None  # Windows ACLs do not map onto mode bits
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"{stat.S_IMODE(mode):04o}"
    return None


# --- default state folder -------------------------------------------------------------


def _state_dir_for(platform: str, environ: Mapping[str, str], is_root: bool, home: str) -> str:
    if platform == "win32":
        return ntpath.join(environ.get("PROGRAMDATA") or "C:\\ProgramData", "sbs")
    if platform == "darwin":
        return posixpath.join(home, "Library", "Application Support", "sbs")
    if is_root:
        return "/var/lib/sbs"
    xdg = environ.get("XDG_STATE_HOME", "")
    # The XDG base directory spec says a relative value is invalid and must be ignored.
    if posixpath.isabs(xdg):
        return posixpath.join(xdg, "sbs")
    return posixpath.join(home, ".local", "state", "sbs")


def default_state_dir() -> Path:
    """Where a node keeps its durable state when ``node.state_dir`` is not set.

    Linux and BSD: ``/var/lib/sbs`` for root, else ``$XDG_STATE_HOME/sbs`` or
    ``~/.local/state/sbs``. macOS: ``~/Library/Application Support/sbs``.
    Windows: ``%PROGRAMDATA%\\sbs``.
    """
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    return Path(_state_dir_for(sys.platform, os.environ, is_root, os.path.expanduser("~")))


# --- the sections ---------------------------------------------------------------------


class _Section(BaseModel):
    # Field docstrings become descriptions, from which the configuration reference
    # is generated. Inputs are hidden so a password never reaches a traceback.
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        use_attribute_docstrings=True,
        hide_input_in_errors=True,
    )


class NodeConfig(_Section):
    """``[node]``: this node, its peer and the timing of the pair (required)."""

    name: _Text = Field(default_factory=socket.gethostname)
    """This node's name, shown in status output and emails. Default: the host name."""

    local_address: _Text
    """Address this node binds and connects from (required)."""

    remote_address: _Text
    """Address of the other node (required): sbs refuses to start without it."""

    port: _Port = DEFAULT_PORT
    """Peer port, the same on both nodes."""

    period: _Seconds = 30.0
    """Seconds between two replication cycles: the update scripts run, then what
    changed is sent. Changes seen by the file watcher are sent at once anyway."""

    rescan_interval: _Seconds = 300.0
    """Seconds between two full scans of the replicated folders while the file
    watcher runs: the safety net for changes it missed. Without a watcher (it
    failed) every cycle scans. Set it to ``period`` for folders on network shares
    that other machines write to, whose changes no local watcher sees."""

    mode: Mode = "auto"
    """``auto``: the first node started is primary. ``primary``: always start as primary,
    taking the role back from the other node. ``backup``: always start as secondary, and
    give the role back when the other node returns after a relay."""

    strict_sync: _Flag = False
    """Also delete on the secondary what no longer exists on the primary."""

    preserve_timestamps: _Flag = False
    """Copies keep the original's modification time (otherwise: the time of the copy)."""

    heartbeat_interval: _Seconds = 1.0
    """Seconds between two heartbeats sent to the peer."""

    dead_time: _Seconds = 3.0
    """Seconds of silence after which the peer counts as dead; at least twice
    ``heartbeat_interval``."""

    probe_interval: _Seconds = 1.0
    """Seconds between two attempts of a lone primary to reach its peer."""

    connect_timeout: _Seconds = 2.0
    """Seconds to wait for a connection to the peer to open."""

    final_cycle_timeout: _Seconds = 30.0
    """Seconds a stopping primary may spend on its last replication cycle."""

    durable_writes: bool = True
    """Flush received files to disk before they replace the old copies (one ``syncfs``
    per batch of more than 256 files on Linux, else an ``fsync`` per file; on macOS
    also one ``F_FULLFSYNC`` per batch, which makes the drive write its cache).
    Turning it off is faster and loses the last files on a power cut; it exists to
    measure what durability costs."""

    max_delete: int | str = "50%"
    """Cap on strict-sync deletions in one folder and one cycle: a count (``100``) or a
    share of the secondary's copy (``"25%"``). Beyond it the deletions wait and an alert
    is sent; ``sbs sync confirm-deletes`` lets them through once."""

    @field_validator("max_delete", mode="before")
    @classmethod
    def _check_max_delete(cls, value: object) -> int | str:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise _problem('must be a count such as 100 or a share such as "25%"')
        if isinstance(value, int):
            if value < 0:
                raise _problem("must not be negative")
            return value
        text = value.strip()
        if not text.endswith("%"):
            raise _problem(f'{value!r} must be a count such as 100 or a share such as "25%"')
        try:
            share = float(text[:-1])
        except ValueError:
            raise _problem(f"{value!r} is not a percentage") from None
        if not 0 <= share <= 100:
            raise _problem(f"{value!r} must be between 0% and 100%")
        return text

    def delete_cap(self) -> tuple[int | None, float | None]:
        """``max_delete`` as (count, share): one of them is None."""
        if isinstance(self.max_delete, int):
            return self.max_delete, None
        return None, float(self.max_delete[:-1]) / 100

    secret_file: _ConfigPath
    """File holding the secret shared by both nodes (required), at least 16 bytes once
    surrounding whitespace is removed. Peers that cannot prove they know it get nothing
    and can write nothing."""

    state_dir: _ConfigPath = Field(default_factory=default_state_dir)
    """Folder where this node keeps its durable state. Default: ``/var/lib/sbs`` for root
    on Linux and BSD, else ``$XDG_STATE_HOME/sbs`` or ``~/.local/state/sbs``;
    ``~/Library/Application Support/sbs`` on macOS; ``%PROGRAMDATA%\\sbs`` on Windows."""

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        name = value.strip()
        if not name:
            raise _problem("must not be empty")
        return name

    @field_validator("local_address", "remote_address")
    @classmethod
    def _check_address(cls, value: str, info: ValidationInfo) -> str:
        address = value.strip()
        if not address:
            why = _REQUIRED_BECAUSE[("node", str(info.field_name))]
            raise _problem(f"is required: {why} (the value is empty)")
        if any(char.isspace() for char in address):
            raise _problem(f"{value!r} is not an address: write a host name or an IP address")
        local = info.data.get("local_address")
        same = local is not None and address.casefold() == local.casefold()
        if info.field_name == "remote_address" and same:
            raise _problem(
                f"must differ from local_address ({local}): both nodes use the same"
                " port, so this node would be its own peer"
            )
        return address

    @field_validator("dead_time")
    @classmethod
    def _check_dead_time(cls, value: float, info: ValidationInfo) -> float:
        heartbeat = info.data.get("heartbeat_interval")
        if heartbeat is not None and value < 2 * heartbeat:
            raise _problem(
                f"must be at least twice heartbeat_interval ({_num(heartbeat)}), that is"
                f" {_num(2 * heartbeat)}, but is {_num(value)}: one late heartbeat would"
                " make the peer look dead"
            )
        return value

    @field_validator("secret_file")
    @classmethod
    def _check_secret_file(cls, value: Path) -> Path:
        try:
            _read_secret(value)
        except _FileProblem as exc:
            raise _problem(f"{value} {exc}") from None
        return value

    def read_secret(self) -> bytes:
        """The shared secret: the secret file's bytes without surrounding whitespace.

        Raises :class:`ConfigError` (naming the secret file) if the file has become
        unusable since the configuration was loaded.
        """
        try:
            return _read_secret(self.secret_file)
        except _FileProblem as exc:
            raise ConfigError(str(self.secret_file), None, str(exc)) from None


class AppConfig(_Section):
    """``[app]``: the managed application's files and update scripts."""

    settings_folder: _ConfigPath | None = None
    """The managed application's settings folder, always replicated."""

    update_scripts: tuple[_Command, ...] = ()
    """Commands run once a period (``node.period``) and at the first cycle after the
    secondary connects, before the cycle's scan, e.g. to export the application's state
    to files; not again for a scan that only catches up. Each is a list of words
    (``["export", "--all"]``) or a string split into words like a POSIX shell would (on
    Windows prefer the list form, where backslashes in paths need no escaping)."""

    update_script_timeout: _Seconds = 60.0
    """Seconds an update script may run before it is stopped."""


class FolderConfig(_Section):
    """``[[folders]]``: one extra folder to replicate.

    Defined on the primary only: the list is sent to the secondary.
    """

    path: _ConfigPath
    """The folder to replicate (required)."""

    filter: _Text = "*"
    """Glob pattern of the file names to replicate, e.g. ``*.lab``; no folder separators."""

    @field_validator("filter")
    @classmethod
    def _check_filter(cls, value: str) -> str:
        if not value.strip():
            raise _problem("must not be empty: use '*' for every file")
        if "/" in value or "\\" in value:
            raise _problem(
                f"{value!r} must be a file-name pattern such as '*.lab', without '/' or '\\'"
            )
        return value


class EmailConfig(_Section):
    """``[email]``: messages on every change of role, split brain and failed cycle.

    An address is ``local@domain`` (no spaces, one ``@``, a domain without empty
    labels) or ``Name <local@domain>``. While ``enabled`` is false the keys are still
    checked for type and form, but none is required.
    """

    enabled: _Flag = False
    """Send emails."""

    host: _Text | None = None
    """SMTP server host name or address (required when enabled)."""

    port: _Port = 25
    """SMTP server port."""

    security: EmailSecurity = "none"
    """``none``: plain SMTP. ``starttls``: upgrade to TLS after connecting (usually port
    587). ``ssl``: TLS from the first byte (usually port 465)."""

    username: _Text | None = None
    """User name to log in with; then exactly one of ``password`` and ``password_file``
    is required."""

    password: SecretStr | None = None
    """Password to log in with. ``password_file`` keeps it out of this file."""

    password_file: _ConfigPath | None = None
    """File holding the password to log in with (a final line break is ignored)."""

    sender: _EmailAddress | None = None
    """Address the emails come from (required when enabled)."""

    recipients: tuple[_EmailAddress, ...] = ()
    """Addresses the emails go to (at least one when enabled)."""

    timeout: _Seconds = 30.0
    """Seconds to wait for the SMTP server before giving up on a message."""

    ca_file: _ConfigPath | None = None
    """PEM file of the certificate authorities trusted to sign the SMTP server's
    certificate, used instead of the system's (for a private CA). The server's
    certificate is always checked when ``security`` is ``starttls`` or ``ssl``."""

    repeat_interval: _Seconds = 3600.0
    """Seconds between two emails about failed replication: further failures within that
    time are counted and reported together in the next email."""

    max_age: _Seconds = 86400.0
    """Seconds an email that could not be sent yet is kept and retried; an older one is
    dropped, with a log line."""

    @model_validator(mode="after")
    def _check_complete(self) -> Self:
        if not self.enabled:
            return self
        found: list[tuple[str, str]] = []
        if self.host is None or not self.host.strip():
            found.append(("host", "is required when email is enabled: the SMTP server"))
        if self.username is not None:
            if self.password is None and self.password_file is None:
                found.append(
                    ("username", "needs a password: set email.password or email.password_file")
                )
            elif self.password is not None and self.password_file is not None:
                found.append(
                    ("password_file", "cannot be used together with email.password: keep one")
                )
        if self.password_file is not None:
            try:
                _read_password(self.password_file)
            except _FileProblem as exc:
                found.append(("password_file", f"{self.password_file} {exc}"))
        if self.ca_file is not None:
            try:
                _check_certificates(self.ca_file)
            except _FileProblem as exc:
                found.append(("ca_file", f"{self.ca_file} {exc}"))
        if self.sender is None:
            found.append(("sender", "is required when email is enabled: the From address"))
        if not self.recipients:
            found.append(("recipients", "needs at least one address when email is enabled"))
        if found:
            raise _problems(found)
        return self

    def read_password(self) -> SecretStr | None:
        """The password to log in with, from ``password`` or ``password_file``.

        Raises :class:`ConfigError` (naming the password file) if that file has become
        unusable since the configuration was loaded.
        """
        if self.password is not None or self.password_file is None:
            return self.password
        try:
            return SecretStr(_read_password(self.password_file))
        except _FileProblem as exc:
            raise ConfigError(str(self.password_file), None, str(exc)) from None


class NotifyConfig(_Section):
    """``[notify]``: a command run on every alert, e.g. to reach a chat or a pager.

    It gets the alert as a JSON object on its standard input and in environment
    variables (``SBS_EVENT``, ``SBS_ROLE``, ``SBS_EPOCH``, ``SBS_NODE``,
    ``SBS_MESSAGE``); see docs/alerts.md. Runs one at a time, in order.
    """

    command: _Command | None = None
    """The program and its arguments, as a list of strings (or a string split like a
    POSIX shell would). Not set: no command is run."""

    timeout: _Seconds = 10.0
    """Seconds the command may run before it is killed."""


class SentinelConfig(_Section):
    """``[[controller.sentinels]]``: one sentinel the controller can start and stop."""

    name: _SentinelName
    """Unique name: 1 to 64 letters, digits, ``_``, ``.`` or ``-``, starting with a letter
    or a digit."""

    command: _Argv | None = None
    """The program and its arguments, as a list of strings (required by the ``process``
    controller; with the ``windows`` controller, set this or ``service``)."""

    service: _ServiceName | None = None
    """``windows`` controller only: the short name of a Windows service that is this
    sentinel, started and stopped through the Service Control Manager instead of
    ``command``."""

    autostart: _Flag = True
    """Start this sentinel when this node becomes primary without having received a list
    of active sentinels from the other node (for instance on the pair's very first
    start)."""


class ControllerConfig(_Section):
    """``[controller]``: what runs the managed application and its sentinels."""

    kind: ControllerKind = "process"
    """Which controller: ``process`` runs the application and each sentinel as a child
    process. ``windows`` (the Windows service shell) runs the application as a Windows
    service (``application_service``) and each sentinel either as a Windows service
    (``service``) or as a child process (``command``)."""

    stop_timeout: _Seconds = 5.0
    """Seconds a stopped process or Windows service gets to exit before it is killed."""

    start_timeout: _Seconds = 30.0
    """``windows`` controller: seconds a started Windows service gets to report that it
    runs before the start counts as failed (and is retried)."""

    application: _Argv | None = None
    """The managed application's program and arguments, as a list of strings."""

    application_service: _ServiceName | None = None
    """``windows`` controller: the short name of the Windows service that is the managed
    application. sbs sets it to manual start, starts it on promotion and stops it on
    demotion."""

    sentinels: tuple[SentinelConfig, ...] = ()
    """The sentinels this controller knows."""

    @model_validator(mode="after")
    def _check_sentinels(self) -> Self:
        found: list[tuple[str, str]] = []
        first_index: dict[str, int] = {}
        for index, sentinel in enumerate(self.sentinels):
            # Names may end up as service or file names on case-insensitive systems.
            folded = sentinel.name.casefold()
            if folded in first_index:
                found.append(
                    (
                        f"sentinels[{index}].name",
                        f"duplicate sentinel name {sentinel.name!r}: already used by"
                        f" controller.sentinels[{first_index[folded]}]",
                    )
                )
            else:
                first_index[folded] = index
            where = f"sentinels[{index}]"
            if self.kind == "process":
                if sentinel.service is not None:
                    found.append(
                        (
                            f"{where}.service",
                            "needs controller.kind = 'windows': the process controller"
                            " runs commands, not Windows services",
                        )
                    )
                elif sentinel.command is None:
                    found.append(
                        (
                            f"{where}.command",
                            "is required: the process controller starts each sentinel by"
                            " running its command",
                        )
                    )
            elif (sentinel.command is None) == (sentinel.service is None):
                found.append(
                    (
                        where,
                        "needs exactly one of command (a child process) and service (a"
                        " Windows service) with the windows controller",
                    )
                )
        if self.kind == "process" and self.application_service is not None:
            found.append(
                (
                    "application_service",
                    "needs controller.kind = 'windows': the process controller runs"
                    " the application from controller.application",
                )
            )
        if self.application is not None and self.application_service is not None:
            found.append(
                (
                    "application_service",
                    "cannot be used together with controller.application: the managed"
                    " application is either a Windows service or a command",
                )
            )
        if found:
            raise _problems(found)
        return self


class LicenceConfig(_Section):
    """``[licence]``: the signed licence file that says whether this node may run
    sentinels (see docs/windows.md).

    Without this table, or with neither key set, no licence is checked (unless the
    installed build carries a vendor key). With a public key, a valid licence file is
    required: the node refuses to start with a missing, tampered, expired or foreign
    one. A ``backup`` licence holds sentinels back while the node is primary since its
    own startup, and lets them run while it relays a primary that failed or stopped.
    """

    file: _ConfigPath | None = None
    """The licence file, as issued by ``python -m sbs_winsvc licence issue``."""

    public_key: _PublicKey | None = None
    """The vendor's public key that licences must be signed with: ``ed25519:`` and
    base64, as ``python -m sbs_winsvc licence keygen`` prints it."""

    def trusted_key(self) -> str | None:
        """The public key licences are checked with: configured, else built in, else None."""
        from sbs_core.licence import BUILTIN_PUBLIC_KEY  # noqa: PLC0415 - a cycle

        return self.public_key or BUILTIN_PUBLIC_KEY

    @model_validator(mode="after")
    def _check_complete(self) -> Self:
        if self.file is not None and self.trusted_key() is None:
            raise _problem(
                "is required when licence.file is set: the vendor's public key that"
                " the licence must be signed with",
                at="public_key",
            )
        if self.public_key is not None and self.file is None:
            raise _problem(
                "is required when licence.public_key is set: the licence file", at="file"
            )
        return self


class Config(_Section):
    """A whole configuration file. Only ``[node]`` is required."""

    config_file: Path
    """Absolute path of the file this configuration came from (set by
    :func:`load_config`; not a key of the file)."""

    node: NodeConfig
    """This node, its peer and the timing of the pair."""

    app: AppConfig = Field(default_factory=AppConfig)
    """The managed application's files and update scripts."""

    folders: tuple[FolderConfig, ...] = ()
    """Extra folders to replicate."""

    email: EmailConfig = Field(default_factory=EmailConfig)
    """Email notifications."""

    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    """What runs the managed application and its sentinels."""

    notify: NotifyConfig = Field(default_factory=NotifyConfig)
    """A command run on every alert."""

    licence: LicenceConfig = Field(default_factory=LicenceConfig)
    """The licence that says whether this node may run sentinels."""

    @field_validator("config_file")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return Path(os.path.abspath(value))

    def warnings(self) -> list[str]:
        """Settings that are legal but probably not what was meant, one sentence each."""
        return [*self._file_warnings(), *self._email_warnings(), *self._layout_warnings()]

    def _file_warnings(self) -> Iterator[str]:
        private = [("node.secret_file", self.node.secret_file)]
        if self.email.password_file is not None:
            private.append(("email.password_file", self.email.password_file))
        for key, path in private:
            mode = _open_to_others(path)
            if mode is not None:
                yield (
                    f"{key}: {path} is open to other users (mode {mode}); make it readable"
                    " by its owner only (chmod 600)"
                )

    def _email_warnings(self) -> Iterator[str]:
        email = self.email
        if not email.enabled:
            return
        if email.security == "ssl" and email.port in (25, 587):
            yield (
                f"email.security is 'ssl' but email.port is {email.port}, where servers"
                " expect plain SMTP or STARTTLS; 'ssl' is usually served on port 465"
            )
        if email.security == "starttls" and email.port == 465:
            yield (
                "email.security is 'starttls' but email.port is 465, where servers expect"
                " TLS from the first byte; use security 'ssl' or port 587"
            )
        if email.security == "none" and email.username is not None:
            yield (
                "email.username is set but email.security is 'none': the password would"
                " cross the network unencrypted"
            )
        if email.password is not None:
            yield (
                "email.password is written in the configuration file; email.password_file"
                " keeps it out of a file that is often copied and shared"
            )

    def _layout_warnings(self) -> Iterator[str]:
        replicated = [(f"folders[{i}].path", folder.path) for i, folder in enumerate(self.folders)]
        if self.app.settings_folder is not None:
            replicated.append(("app.settings_folder", self.app.settings_folder))
        for key, path in replicated:
            if self.node.state_dir.is_relative_to(path):
                yield (
                    f"node.state_dir ({self.node.state_dir}) is inside {key} ({path}):"
                    " this node's own state would be replicated to the other node"
                )
        seen: dict[tuple[Path, str], int] = {}
        for index, folder in enumerate(self.folders):
            earlier = seen.setdefault((folder.path, folder.filter), index)
            if earlier != index:
                yield f"folders[{index}] repeats folders[{earlier}] (same path and filter)"
        controller = self.controller
        if (
            controller.application is None
            and controller.application_service is None
            and not controller.sentinels
        ):
            yield (
                "controller: neither an application nor sentinels are configured, so"
                " becoming primary starts nothing"
            )


# --- loading --------------------------------------------------------------------------

_REQUIRED_BECAUSE: Final[Mapping[tuple[str, ...], str]] = {
    ("node",): "the [node] table, with this node's addresses and the shared secret",
    ("node", "local_address"): "the address this node binds and connects from",
    ("node", "remote_address"): "the address of the other node; sbs refuses to start without it",
    ("node", "secret_file"): "the file holding the secret shared by both nodes",
    ("folders", "path"): "the folder to replicate",
    ("controller", "sentinels", "name"): "the sentinel's name",
}

_TABLES: Final[Mapping[tuple[str, ...], type[BaseModel]]] = {
    (): Config,
    ("node",): NodeConfig,
    ("app",): AppConfig,
    ("folders",): FolderConfig,
    ("email",): EmailConfig,
    ("controller",): ControllerConfig,
    ("notify",): NotifyConfig,
    ("licence",): LicenceConfig,
    ("controller", "sentinels"): SentinelConfig,
}

_PLAIN_REASONS: Final[Mapping[str, str]] = {
    "int_type": "must be a whole number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "tuple_type": "must be a list",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "path_type": "must be a path",
    "string_too_short": "must not be empty",
}


def _dotted(loc: Sequence[int | str]) -> str:
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else part
    return key


def _names(loc: Sequence[int | str]) -> tuple[str, ...]:
    return tuple(part for part in loc if isinstance(part, str))


def _keys_of(model: type[BaseModel]) -> list[str]:
    return [name for name in model.model_fields if not (model is Config and name == "config_file")]


def _unknown_key(loc: Sequence[int | str]) -> str:
    names = _names(loc)
    if not names:
        return "unknown key"
    table, name = names[:-1], names[-1]
    model = _TABLES.get(table)
    if model is not None:
        close = difflib.get_close_matches(name, _keys_of(model), n=1, cutoff=0.75)
        if close:
            return f"unknown key (did you mean {close[0]!r}?)"
    # The usual cause of a key known elsewhere: it was written below a later [table]
    # header, which it then belongs to.
    if table and name in _keys_of(Config):
        return f"unknown key here ({name} belongs at the top level, above every [table] header)"
    for other, other_model in _TABLES.items():
        if other and other != table and name in _keys_of(other_model):
            return (
                f"unknown key here (did you mean {_dotted(other)}.{name}? a key belongs to"
                " the nearest [table] header above it)"
            )
    return "unknown key"


def _reason(error: ErrorDetails) -> str:
    kind = error["type"]
    ctx = error.get("ctx", {})
    loc = error["loc"]
    if kind == "missing":
        why = _REQUIRED_BECAUSE.get(_names(loc))
        return f"is required: {why}" if why else "is required"
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    if kind == "literal_error":
        given = error.get("input")
        shown = f", not {given!r}" if isinstance(given, str) else ""
        return f"must be one of {ctx['expected']}{shown}"
    if kind == "too_short":
        count = ctx.get("min_length", 1)
        return "must not be empty" if count == 1 else f"must have at least {count} items"
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    bounds = {
        "greater_than": ("gt", "greater than"),
        "greater_than_equal": ("ge", "at least"),
        "less_than": ("lt", "less than"),
        "less_than_equal": ("le", "at most"),
    }
    if kind in bounds:
        name, words = bounds[kind]
        return f"must be {words} {ctx[name]}"
    if kind in _PLAIN_REASONS:
        return _PLAIN_REASONS[kind]
    message = error["msg"]
    return message.replace("Input should be", "must be", 1)


def _explain(error: ErrorDetails) -> list[tuple[str | None, str]]:
    key = _dotted(error["loc"])
    if error["type"] != _PROBLEM:
        return [(key or None, _reason(error))]
    explained: list[tuple[str | None, str]] = []
    for at, reason in error.get("ctx", {})["problems"]:
        if not at:
            full = key
        elif at.startswith("[") or not key:
            full = key + at
        else:
            full = f"{key}.{at}"
        explained.append((full or None, reason))
    return explained


def _read_toml(file: str, location: Path) -> dict[str, Any]:
    try:
        data = location.read_bytes()
    except FileNotFoundError:
        raise ConfigError(file, None, "cannot be found: there is no such file") from None
    except OSError as exc:
        if location.is_dir():
            raise ConfigError(file, None, "is a folder, not a configuration file") from None
        raise ConfigError(file, None, f"cannot be read: {exc.strerror or exc}") from None
    try:
        # Windows Notepad may start a UTF-8 file with a byte-order mark.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            file, None, f"is not UTF-8 text (byte {exc.start} cannot be decoded)"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        raise ConfigError(
            file, None, f"is not valid TOML: {message[:1].lower()}{message[1:]}"
        ) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and check a configuration file.

    Raises :class:`~sbs_core.errors.ConfigError` if the file cannot be read, is not
    TOML, or holds any invalid value; every problem found is listed, each with the
    file, the dotted key (``node.remote_address``, ``controller.sentinels[1].command``)
    and the reason. Checks that relate several keys of one table run once each of
    those keys is valid on its own.
    """
    file = os.fspath(path)
    try:
        location = Path(file).expanduser()
    except RuntimeError:
        location = Path(file)
    location = Path(os.path.abspath(location))
    raw = _read_toml(file, location)
    problems: list[tuple[str | None, str]] = []
    if _CONTEXT_FILE in raw:
        # config_file is set from where the file was found, never from its contents.
        del raw[_CONTEXT_FILE]
        problems.append((_CONTEXT_FILE, "unknown key"))
    config: Config | None = None
    try:
        config = Config.model_validate(
            {**raw, "config_file": location}, context={_CONTEXT_FILE: location}
        )
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            problems.extend(_explain(error))
    if problems or config is None:
        raise ConfigError.from_problems(file, problems)
    return config
