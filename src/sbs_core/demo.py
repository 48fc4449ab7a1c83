"""``sbs demo``: a real pair on this machine, a real failover, then a clean-up.

Two ``sbs run`` processes on 127.0.0.1 and 127.0.0.2 (same port, as on two
machines), each with its own folder, state directory and two sentinels that are
plain child processes. The demo kills the primary with SIGKILL, shows the
secondary taking over, restarts the killed node (it comes back as secondary),
and stops both with a planned stop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TextIO

from sbs_core.lab import HOSTS, NodeProcess, Pair

__all__ = ("run_demo",)


def run_demo(*, port: int, keep: bool, out: TextIO, clock: Callable[[], float]) -> int:
    def say(text: str) -> None:
        print(text, file=out, flush=True)

    def full_primary(st: dict[str, Any]) -> bool:
        return st["role"] == "primary" and len(st["active_sentinels"]) == 2

    def connected_secondary(st: dict[str, Any]) -> bool:
        return st["role"] == "secondary" and bool(st["peer_connected"])

    with Pair(port=port, keep=keep) as pair:
        a, b = pair.a, pair.b

        def table() -> None:
            say(f"  {'node':5} {'address':11} {'role':10} {'epoch':5}  {'peer':10} running")
            for node, address in zip(pair, HOSTS, strict=True):
                st = node.status() or {"role": "stopped", "epoch": "-"}
                running = ", ".join(st.get("active_sentinels") or []) or "-"
                peer = "connected" if st.get("peer_connected") else "-"
                role, epoch = st["role"], st["epoch"]
                say(f"  {node.name:5} {address:11} {role:10} {epoch!s:5}  {peer:10} {running}")

        def start(node: NodeProcess, what: str, test: Callable[[dict[str, Any]], bool]) -> float:
            node.start()
            return node.wait_for(what, test)

        say(f"sbs demo: a pair on this machine ({HOSTS[0]} and {HOSTS[1]}, port {pair.port})")
        say(f"          files in {pair.root}")
        try:
            took = start(a, "primary", full_primary)
            say(f"node a started: nobody answered, so it is primary ({took:.2f} s)")
            took = start(b, "secondary", connected_secondary)
            say(f"node b started: a answered, so it is secondary ({took:.2f} s)")
            table()
            say("killing node a with SIGKILL (its sentinels die with it) ...")
            began = clock()
            a.kill()
            b.wait_for("primary", full_primary)
            say(f"node b took over in {clock() - began:.3f} s (primary, both sentinels running)")
            took = start(a, "secondary", connected_secondary)
            say(f"node a restarted: b answered, so a is secondary now ({took:.2f} s)")
            table()
        except TimeoutError as exc:
            say(f"demo failed: {exc}")
            return 1
        say("stopping both (a planned stop on each) ...")
    say(f"kept {pair.root}" if keep else "cleaned up.")
    return 0
