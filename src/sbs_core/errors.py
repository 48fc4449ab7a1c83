"""The exceptions sbs raises.

One root, :class:`SbsError`. Leaf errors also inherit the built-in that fits, so a
caller can catch what it already knows (``ValueError``, ``ConnectionError``...).
As in h11, protocol errors say whose fault they are: :class:`LocalProtocolError`
means this program misused the API, :class:`RemoteProtocolError` means the peer
broke the protocol.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

__all__ = (
    "AuthenticationError",
    "ConfigError",
    "ControlError",
    "ForgedFrameError",
    "LocalProtocolError",
    "NotPrimaryError",
    "ProtocolError",
    "RemoteProtocolError",
    "SbsError",
    "UnknownSentinelError",
    "os_reason",
)


class SbsError(Exception):
    """Root of every error sbs raises on purpose."""


class ConfigError(SbsError, ValueError):
    """A configuration file is missing, unreadable or invalid.

    ``str()`` names the file, the key and the reason, one line per problem; the
    parts are kept as attributes for tools that want them. ``key`` and ``reason``
    are those of the first problem, ``problems`` holds every ``(key, reason)``.
    """

    def __init__(
        self,
        file: str,
        key: str | None,
        reason: str,
        *,
        more: Iterable[tuple[str | None, str]] = (),
    ) -> None:
        self.file = file
        self.key = key
        self.reason = reason
        self.problems: tuple[tuple[str | None, str], ...] = ((key, reason), *more)
        super().__init__("\n".join(_config_line(file, k, r) for k, r in self.problems))

    @classmethod
    def from_problems(cls, file: str, problems: Iterable[tuple[str | None, str]]) -> ConfigError:
        """One error for every problem found in ``file`` (at least one)."""
        found = tuple(problems)
        if not found:
            raise ValueError("a ConfigError needs at least one problem")
        (key, reason), *more = found
        return cls(file, key, reason, more=more)


def _config_line(file: str, key: str | None, reason: str) -> str:
    where = f"{file}: {key}" if key else file
    return f"{where}: {reason}"


class ProtocolError(SbsError):
    """Something went wrong in the peer protocol."""


class LocalProtocolError(ProtocolError, RuntimeError):
    """This program used the protocol API in a way it does not allow."""


class RemoteProtocolError(ProtocolError, ConnectionError):
    """The peer sent something the protocol does not allow; drop the connection."""


class AuthenticationError(RemoteProtocolError):
    """The peer could not prove that it knows the shared secret."""


class ForgedFrameError(RemoteProtocolError):
    """A frame failed its integrity check: changed, replayed, moved or dropped on the way."""


class ControlError(SbsError, ConnectionError):
    """The local control channel of a node could not be reached or answered badly."""


class NotPrimaryError(SbsError, RuntimeError):
    """An operation that only a primary can do was asked of a node that is not primary."""


class UnknownSentinelError(SbsError, KeyError):
    """A sentinel name that the configuration does not define."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown sentinel"


def os_reason(exc: OSError) -> str:
    """Why a system call failed, as an operator reads it: "Permission denied"."""
    if exc.strerror:
        return exc.strerror
    if exc.errno is not None:
        return errno.errorcode.get(exc.errno, f"error {exc.errno}")
    return str(exc) or type(exc).__name__
