"""Who should be primary: the pure rules both nodes apply to the same facts.

Every rule is a deterministic function of the two nodes' announced state, and
each is *antisymmetric* (exactly one side can win), so two nodes that exchange
their states always agree without a further round trip.
"""

from __future__ import annotations

from sbs_core.messages import Hello, Mode, NodeState

__all__ = ("MODE_RANK", "elected", "mismatch", "outranks", "survives_split_brain")

# primary-mode beats auto beats backup: the order in which nodes *want* the role.
MODE_RANK: dict[Mode, int] = {"backup": 0, "auto": 1, "primary": 2}


def mismatch(local: Hello, remote: Hello) -> str | None:
    """Why two nodes must refuse to pair, or None when they agree."""
    peer = remote.state.name or remote.state.node_id
    if local.state.node_id == remote.state.node_id:
        return "connected to itself: node.remote_address points at this node"
    for key in ("heartbeat_interval", "dead_time", "port"):
        ours, theirs = getattr(local, key), getattr(remote, key)
        if ours != theirs:
            return (
                f"node.{key} differs: {ours} on this node, {theirs} on {peer}; they must be equal"
            )
    mode = local.state.mode
    if mode == remote.state.mode and mode in ("primary", "backup"):
        return (
            f'both nodes have node.mode = "{mode}" (this node and {peer}); '
            'at most one node may be "primary" and at most one "backup"'
        )
    return None


def outranks(a: NodeState, b: NodeState) -> bool:
    """True when ``a``'s mode gives it the better claim to be primary than ``b``'s.

    This is the handback rule: an acting primary gives the role back to a
    connected secondary that outranks it (a ``backup`` node always gives it
    back; anyone gives it back to a ``primary``-mode node).
    """
    return MODE_RANK[a.mode] > MODE_RANK[b.mode]


def elected(me: NodeState, peer: NodeState) -> bool:
    """Neither node is primary: should ``me`` take the role?

    Mode first (a backup never elects itself over a willing peer), then the
    higher epoch (the node with the more recent history), then the lower node id.
    """
    if MODE_RANK[me.mode] != MODE_RANK[peer.mode]:
        return MODE_RANK[me.mode] > MODE_RANK[peer.mode]
    if me.mode == "backup":
        return False
    if me.epoch != peer.epoch:
        return me.epoch > peer.epoch
    return me.node_id < peer.node_id


def survives_split_brain(me: NodeState, peer: NodeState) -> bool:
    """Both nodes are primary: does ``me`` stay primary?

    The lower epoch is stale and loses at once (a fenced primary). With equal
    epochs the ``primary``-mode node wins, else the lower node id. A stale
    ``primary``-mode node still ends as primary: it yields first, then gets the
    role back by a handback, so its sentinels never overlap the peer's.
    """
    if me.epoch != peer.epoch:
        return me.epoch > peer.epoch
    if MODE_RANK[me.mode] != MODE_RANK[peer.mode]:
        return MODE_RANK[me.mode] > MODE_RANK[peer.mode]
    return me.node_id < peer.node_id
