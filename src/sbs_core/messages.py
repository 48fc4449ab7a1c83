"""The messages two nodes exchange once the secure channel is authenticated.

Each message is a small frozen, keyword-only dataclass with a ``type`` tag. On the
wire a message is one JSON object in a control frame (see ``docs/protocol.md``).
Everything that comes from the peer is validated here, so the role machine only
ever sees well-formed values; anything else is a :class:`RemoteProtocolError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Literal

import pydantic

from sbs_core.errors import RemoteProtocolError

__all__ = (
    "PROTOCOL_VERSION",
    "SYNC_MESSAGES",
    "Credit",
    "CycleAck",
    "CycleEnd",
    "Delete",
    "Goodbye",
    "GoodbyeReason",
    "Handover",
    "HandoverReason",
    "Heartbeat",
    "Hello",
    "Inventory",
    "Message",
    "Mode",
    "NodeState",
    "Put",
    "PutFile",
    "Role",
    "RootSpec",
    "Seal",
    "SyncMessage",
    "SyncStart",
    "decode_message",
    "encode_message",
)

PROTOCOL_VERSION = 1
# An error quotes the peer's input (an unknown type tag, say), which may be megabytes
# long; it ends up in the log and the status, so only its start is kept.
_MAX_ERROR_SHOWN = 200

Role = Literal["stopped", "starting", "primary", "secondary"]
Mode = Literal["auto", "primary", "backup"]
HandoverReason = Literal["stopping", "handback", "yield"]
GoodbyeReason = Literal["stopping", "duplicate", "refused"]

SentinelName = Annotated[
    str, pydantic.StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
]
Epoch = Annotated[int, pydantic.Field(ge=0, lt=2**63)]
Seconds = Annotated[float, pydantic.Field(gt=0, allow_inf_nan=False)]
NodeId = Annotated[str, pydantic.StringConstraints(min_length=1, max_length=64)]
Text = Annotated[str, pydantic.StringConstraints(max_length=1024)]


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeState:
    """What a node says about itself in every Hello and Heartbeat."""

    node_id: NodeId
    name: Text
    mode: Mode
    role: Role
    epoch: Epoch
    # The pair's active sentinels as this node knows them (authoritative on the primary).
    sentinels: Annotated[tuple[SentinelName, ...], pydantic.Field(max_length=4096)]
    handing_over: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class Hello:
    """First message on a fresh authenticated channel, both ways."""

    type: Literal["hello"] = "hello"
    state: NodeState
    # Settings both nodes must agree on; a mismatch is refused, naming both values.
    heartbeat_interval: Seconds
    dead_time: Seconds
    port: Annotated[int, pydantic.Field(ge=1, le=65535)]
    software: Text = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class Heartbeat:
    """Sent every heartbeat interval and at once on any change of state."""

    type: Literal["heartbeat"] = "heartbeat"
    state: NodeState


@dataclass(frozen=True, kw_only=True, slots=True)
class Handover:
    """Tells the peer it is primary now, once the sender stopped its sentinels and synced."""

    type: Literal["handover"] = "handover"
    epoch: Epoch
    sentinels: Annotated[tuple[SentinelName, ...], pydantic.Field(max_length=4096)]
    reason: HandoverReason


@dataclass(frozen=True, kw_only=True, slots=True)
class Goodbye:
    """The sender is about to close this connection on purpose."""

    type: Literal["goodbye"] = "goodbye"
    reason: GoodbyeReason
    detail: Text = ""


# ---------------------------------------------------------------- replication
# A sync session runs on one connection, from the node that has files to push
# (the primary, or a primary handing over) to its peer. Control messages and the
# data frames they announce travel in one ordered lane; see docs/protocol.md.

RootId = Annotated[str, pydantic.StringConstraints(min_length=1, max_length=512)]
WirePath = Annotated[str, pydantic.StringConstraints(min_length=1, max_length=4096)]
Digest = Annotated[str, pydantic.StringConstraints(max_length=128)]
Count = Annotated[int, pydantic.Field(ge=0, lt=2**63)]
Many = pydantic.Field(max_length=100_000)


@dataclass(frozen=True, kw_only=True, slots=True)
class RootSpec:
    """One replicated folder: its id, its path as the sender names it, its file filter."""

    id: RootId
    path: Text
    filter: Text


@dataclass(frozen=True, kw_only=True, slots=True)
class SyncStart:
    """Opens a sync session: the folders, and how files are to be applied."""

    type: Literal["sync_start"] = "sync_start"
    session: Count
    roots: Annotated[tuple[RootSpec, ...], pydantic.Field(max_length=1000)]
    preserve_timestamps: bool
    window: Count


@dataclass(frozen=True, kw_only=True, slots=True)
class Inventory:
    """What the receiver holds in one root: (path, size, mtime_ns, digest) per file."""

    type: Literal["inventory"] = "inventory"
    session: Count
    root: RootId
    entries: Annotated[tuple[tuple[WirePath, Count, int, Digest], ...], Many]
    last: bool  # the last inventory message of the session


@dataclass(frozen=True, kw_only=True, slots=True)
class PutFile:
    root: RootId
    path: WirePath
    size: Count
    mtime_ns: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Put:
    """Announces files whose contents follow, concatenated, in data frames."""

    type: Literal["put"] = "put"
    session: Count
    files: Annotated[tuple[PutFile, ...], pydantic.Field(min_length=1, max_length=4096)]


@dataclass(frozen=True, kw_only=True, slots=True)
class Seal:
    """Ends the data of the last Put: one digest per file, "" for a file torn while read."""

    type: Literal["seal"] = "seal"
    session: Count
    digests: Annotated[tuple[Digest, ...], pydantic.Field(max_length=4096)]


@dataclass(frozen=True, kw_only=True, slots=True)
class Delete:
    type: Literal["delete"] = "delete"
    session: Count
    root: RootId
    paths: Annotated[tuple[WirePath, ...], Many]


@dataclass(frozen=True, kw_only=True, slots=True)
class CycleEnd:
    """Everything of this cycle was sent: make it durable and acknowledge."""

    type: Literal["cycle_end"] = "cycle_end"
    session: Count
    cycle: Count


@dataclass(frozen=True, kw_only=True, slots=True)
class CycleAck:
    """The receiver applied a cycle; ``retry`` lists (root, path, reason) to send again."""

    type: Literal["cycle_ack"] = "cycle_ack"
    session: Count
    cycle: Count
    applied: Count
    retry: Annotated[tuple[tuple[RootId, WirePath, Text], ...], Many] = ()
    refused: Annotated[tuple[tuple[RootId, WirePath, Text], ...], Many] = ()
    error: Text = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class Credit:
    """The receiver has written this many more bytes: the sender may send as many."""

    type: Literal["credit"] = "credit"
    session: Count
    bytes: Count


SyncMessage = SyncStart | Inventory | Put | Seal | Delete | CycleEnd | CycleAck | Credit
SYNC_MESSAGES = (SyncStart, Inventory, Put, Seal, Delete, CycleEnd, CycleAck, Credit)
Message = Hello | Heartbeat | Handover | Goodbye | SyncMessage

_ADAPTER: pydantic.TypeAdapter[Message] = pydantic.TypeAdapter(
    Annotated[Message, pydantic.Field(discriminator="type")]
)


def encode_message(message: Message) -> bytes:
    """Serialise a message to the JSON payload of one control frame."""
    return _ADAPTER.dump_json(message)


def decode_message(payload: bytes) -> Message:
    """Parse and validate a control payload; anything malformed is the peer's fault."""
    try:
        return _ADAPTER.validate_json(payload, strict=False)
    except pydantic.ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "message"
        reason = _shown(f"{where}: {first['msg']}")
        raise RemoteProtocolError(f"invalid message: {reason}") from None
    except (ValueError, json.JSONDecodeError) as exc:  # pragma: no cover - pydantic wraps these
        raise RemoteProtocolError(f"invalid message: {_shown(str(exc))}") from None


def _shown(text: str) -> str:
    return text if len(text) <= _MAX_ERROR_SHOWN else text[:_MAX_ERROR_SHOWN] + "..."
