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
    "Goodbye",
    "GoodbyeReason",
    "Handover",
    "HandoverReason",
    "Heartbeat",
    "Hello",
    "Message",
    "Mode",
    "NodeState",
    "Role",
    "decode_message",
    "encode_message",
)

PROTOCOL_VERSION = 1

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


Message = Hello | Heartbeat | Handover | Goodbye

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
        raise RemoteProtocolError(f"invalid message: {where}: {first['msg']}") from None
    except (ValueError, json.JSONDecodeError) as exc:  # pragma: no cover - pydantic wraps these
        raise RemoteProtocolError(f"invalid message: {exc}") from None
