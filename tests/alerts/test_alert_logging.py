"""The log of ``sbs run``: a line per alert with node, role and epoch; levels; a file; no secret."""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from alertkit import HOST, PASSWORD, closed_port, port_of, write_config

from sbs_core.cli import log_handlers
from sbs_core.lab import free_port


@contextlib.contextmanager
def sbs_run(config: Path, *options: str) -> Iterator[subprocess.Popen[bytes]]:
    """``sbs run`` as a child process; stopped (SIGTERM, then SIGKILL) on the way out."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sbs_core", "run", "--config", str(config), *options],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # the same lines go to the log file
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def wait_for_text(path: Path, text: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        content = path.read_text(encoding="utf-8") if path.exists() else ""
        if text in content:
            return content
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} not in {path} within {timeout} s:\n{content}")
        time.sleep(0.05)


@pytest.mark.skipif(sys.platform == "win32", reason="a planned stop is SIGTERM here")
@pytest.mark.parametrize("level", ["debug", "warning"])
def test_a_node_logs_each_alert_on_one_line_to_the_file(tmp_path: Path, level: str) -> None:
    log_file = tmp_path / "sbs.log"
    with closed_port() as sock:
        smtp_port = port_of(sock)
        # Mail that cannot leave and a login password: the log must tell one, never the other.
        config = write_config(
            tmp_path / "node",
            port=smtp_port,
            username="sbs",
            node_port=free_port(HOST, "127.0.0.2"),  # the node really listens
        )
        with sbs_run(config, "--log-level", level, "--log-file", str(log_file)) as proc:
            wait_for_text(log_file, "mail not sent (")
            proc.terminate()
            assert proc.wait(20) == 0
    text = log_file.read_text(encoding="utf-8")

    assert PASSWORD not in text
    assert "s" * 32 not in text  # the node's shared secret
    alerts = [line for line in text.splitlines() if "] promoted: " in line]
    if level == "debug":
        assert len(alerts) == 1, text
        assert "[print-1 primary epoch=1] promoted: primary (epoch 1): nobody answered" in alerts[0]
        assert "[print-1 stopped epoch=1] stopped: stopped" in text
        assert " DEBUG " in text
    else:
        assert alerts == []  # an info line
        assert " INFO " not in text
        assert " DEBUG " not in text
    assert f"cannot connect to {HOST}:{smtp_port}" in text


def test_the_log_file_is_rotated(tmp_path: Path) -> None:
    handlers = log_handlers(tmp_path / "sbs.log")
    try:
        (rotating,) = [h for h in handlers if isinstance(h, logging.handlers.RotatingFileHandler)]
        assert rotating.baseFilename == str(tmp_path / "sbs.log")
        assert (rotating.maxBytes, rotating.backupCount) == (10 * 1024 * 1024, 5)
        assert any(type(h) is logging.StreamHandler for h in handlers)  # and standard error
    finally:
        for handler in handlers:
            handler.close()
