"""What every benchmark script records beside its figures, and how it writes them.

The machine, its load and the code measured are part of a figure: the scripts in
this folder print them and write them, with the figures, into their own section
of ``docs/benchmarks.md`` (a section of another script is left alone).
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from pathlib import Path

__all__ = ("interpreter", "load_line", "machine_line", "replace_section", "revision")

ROOT = Path(__file__).resolve().parent.parent


def machine_line(extra: str = "") -> str:
    """CPUs, CPU model, Python and platform, plus ``extra`` (e.g. a reference tool's version)."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cpus = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    return (
        f"{usable} CPUs usable ({cpus} online{', ' + cpu if cpu else ''}), "
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.platform()}" + (f", {extra}" if extra else "")
    )


def revision() -> str:
    """The commit measured, and whether the code (src/, bench/) differed from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        # Only the code counts: the Markdown file being rewritten may be pending.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "src", "bench"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "code: unknown commit"
    if not head:
        return "code: unknown commit"
    return f"code: commit {head}" + (" with uncommitted changes" if dirty else "")


def load_line() -> str:
    # Node start-up and transfers are CPU-bound: other work on the machine shows
    # in the figures, so the load is part of the record.
    if not hasattr(os, "getloadavg"):
        return "load average unknown"
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"


def interpreter() -> str:
    """The Python that runs the script, as the reader would type it."""
    exe = Path(sys.executable)
    with contextlib.suppress(ValueError):
        return str(exe.relative_to(Path.cwd()))
    return "python"


def replace_section(
    path: Path, heading: str, text: str, *, intro: str, keep: str | None = None
) -> None:
    """Replace the section ``heading`` of ``path`` (up to the next ``## ``), or add it.

    ``intro`` starts a new file. ``keep``: a subsection heading (``### …``) of the old
    section that is hand-written and survives the rewrite, at its end.
    """
    old = path.read_text(encoding="utf-8") if path.exists() else intro
    lines = old.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == heading), None)
    if start is None:
        body = old.rstrip("\n") + "\n\n" + text
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        kept_at = end
        if keep is not None:
            kept_at = next((i for i in range(start + 1, end) if lines[i].rstrip() == keep), end)
        kept = "".join(lines[kept_at:end]).rstrip("\n")
        tail = "".join(lines[end:])
        body = (
            "".join(lines[:start])
            + text
            + ("\n" + kept + "\n" if kept else "")
            + ("\n" + tail if tail else "")
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(path)
