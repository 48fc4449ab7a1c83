"""The -cfg dialog in a real Tk window on a virtual screen (Xvfb).

Fields are filled through the widgets and buttons pressed with ``invoke`` (and,
once, with real mouse and keyboard events from xdotool); the file on disk, the
error labels and the node behind the Status tab are what the tests check. A
screenshot of each state the tests reach is saved under ``build/test-artifacts``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sbs_core.config import load_config
from sbs_core.lab import HOSTS, SLEEPER, free_port

tk = pytest.importorskip("tkinter", reason="Python has no Tk here")

pytestmark = [
    pytest.mark.skipif(shutil.which("Xvfb") is None, reason="Xvfb is not installed"),
    pytest.mark.skipif(sys.platform != "linux", reason="the virtual screen is Xvfb's"),
]

ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts"

COMMENTED = """\
# The label server pair: this is node A.
[node]
local_address = "127.0.0.1"   # the LAN address of this machine
remote_address = "127.0.0.2"
secret_file = "secret"
state_dir = "state"
port = {port}

# Mail goes to the night shift.
[email]
enabled = false

[[controller.sentinels]]
name = "labels"
command = {command}
"""


@pytest.fixture(scope="module")
def display() -> Iterator[str]:
    for number in range(91, 140):
        if not Path(f"/tmp/.X11-unix/X{number}").exists():
            break
    name = f":{number}"
    xvfb = subprocess.Popen(
        ["Xvfb", name, "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not Path(f"/tmp/.X11-unix/X{number}").exists():
            if xvfb.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"Xvfb did not start on display {name}")
            time.sleep(0.05)
        yield name
    finally:
        xvfb.terminate()
        try:
            xvfb.wait(10)
        except subprocess.TimeoutExpired:
            xvfb.kill()
            xvfb.wait(10)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    (tmp_path / "secret").write_text("d" * 32)
    (tmp_path / "secret").chmod(0o600)
    path = tmp_path / "sbs.toml"
    command = f"['{sys.executable}', '-c', '''{SLEEPER}''']"
    path.write_text(COMMENTED.format(port=free_port(*HOSTS), command=command))
    return path


class StoppedService:
    """A backend for tests that only edit: the service is stopped."""

    name = "sbs (test)"

    def __init__(self) -> None:
        self.state_now = "stopped"

    def state(self) -> Any:
        return self.state_now

    def start(self) -> None:
        self.state_now = "running"

    def stop(self) -> None:
        self.state_now = "stopped"


@pytest.fixture
def open_dialog(display: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    monkeypatch.setenv("DISPLAY", display)
    from sbs_winsvc.cfg.dialog import ConfigDialog  # noqa: PLC0415

    roots: list[Any] = []

    def open_it(path: Path, backend: Any = None) -> Any:
        root = tk.Tk()
        roots.append(root)
        dialog = ConfigDialog(root, path, backend or StoppedService(), poll_ms=200)
        pump(root)
        return dialog

    yield open_it
    for root in roots:
        with contextlib.suppress(tk.TclError):
            root.destroy()
    # Tk objects caught in reference cycles must be freed here, in Tk's own
    # thread: a later collection in another test's thread aborts Tcl.
    roots.clear()
    gc.collect()


def pump(root: Any, until: Callable[[], bool] | None = None, timeout: float = 15.0) -> None:
    """Run Tk's event loop until ``until`` holds (or briefly, without one)."""
    deadline = time.monotonic() + (timeout if until else 0.2)
    while True:
        root.update()
        if until is not None and until():
            return
        if time.monotonic() > deadline:
            if until is None:
                return
            raise TimeoutError(f"the dialog did not get there within {timeout} s")
        time.sleep(0.02)


def screenshot(display: str, name: str) -> Path:
    from PIL import ImageGrab  # noqa: PLC0415

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    ImageGrab.grab(xdisplay=display).save(path)
    print(f"screenshot: {path}")
    return path


def set_text(dialog: Any, field: str, value: str) -> None:
    dialog.text_vars[field].set(value)


# --------------------------------------------------------------------------- editing


def test_fields_are_saved_to_the_file_with_its_comments_kept(
    open_dialog: Callable[..., Any], config_file: Path, display: str
) -> None:
    dialog = open_dialog(config_file)
    assert [dialog.notebook.tab(i, "text") for i in range(4)] == [
        "Status",
        "Configure",
        "Email",
        "Folders",
    ]
    assert dialog.text_vars["local_address"].get() == "127.0.0.1"
    assert dialog.text_vars["period"].get() == "30"  # the default, shown

    dialog.notebook.select(1)
    set_text(dialog, "period", "12.5")
    dialog.flag_vars["backup_only"].set(True)
    dialog.flag_vars["strict_sync"].set(True)
    dialog.flag_vars["preserve_timestamps"].set(True)
    dialog.notebook.select(3)
    dialog.folder_filter.set("*.lab")
    dialog.folder_path.set(str(config_file.parent / "labels"))
    dialog.add_button.invoke()
    dialog.folder_filter.set("*.*")
    dialog.folder_path.set(str(config_file.parent / "spool"))
    dialog.add_button.invoke()
    dialog.folder_tree.selection_set(dialog.folder_tree.get_children()[1])
    dialog.remove_button.invoke()
    pump(dialog.root)
    screenshot(display, "cfg-folders")

    dialog.save_button.invoke()
    assert dialog.message.cget("text") == "saved sbs.toml", dialog.message.cget("text")
    text = config_file.read_text()
    assert "# The label server pair: this is node A." in text
    assert "# the LAN address of this machine" in text
    assert "# Mail goes to the night shift." in text
    config = load_config(config_file)
    assert config.node.period == 12.5
    assert config.node.mode == "backup"
    assert config.node.strict_sync
    assert config.node.preserve_timestamps
    assert [(f.filter, f.path.name) for f in config.folders] == [("*.lab", "labels")]
    assert "[email]\nenabled = false\n" in text  # untouched tables keep their shape

    # Primary-only and backup-only exclude each other, as in the base product.
    dialog.notebook.select(1)
    dialog.flag_vars["primary_only"].set(True)
    dialog._exclusive("primary_only")
    assert not dialog.flag_vars["backup_only"].get()
    dialog.reload_button.invoke()
    assert dialog.flag_vars["backup_only"].get()
    assert dialog.text_vars["period"].get() == "12.5"
    assert [dialog.folder_tree.item(i, "values")[0] for i in dialog.folder_tree.get_children()] == [
        "*.lab"
    ]


def test_invalid_input_is_shown_next_to_its_field_and_nothing_is_saved(
    open_dialog: Callable[..., Any], config_file: Path, display: str
) -> None:
    before = config_file.read_bytes()
    dialog = open_dialog(config_file)
    dialog.notebook.select(1)
    set_text(dialog, "port", "seventy")
    set_text(dialog, "remote_address", "127.0.0.1")
    assert not dialog.save()
    assert dialog.error_labels["port"].cget("text") == "must be a whole number"
    assert config_file.read_bytes() == before

    set_text(dialog, "port", "70000")
    assert not dialog.save()
    assert "from 1 to 65535" in dialog.error_labels["port"].cget("text")
    assert "must differ from local_address" in dialog.error_labels["remote_address"].cget("text")
    assert dialog.message.cget("text") == "not saved: correct the marked fields"
    pump(dialog.root)
    screenshot(display, "cfg-invalid")
    assert config_file.read_bytes() == before

    dialog.notebook.select(2)
    set_text(dialog, "port", "4446")
    set_text(dialog, "remote_address", "127.0.0.2")
    dialog.flag_vars["email_enabled"].set(True)
    set_text(dialog, "email_sender", "not an address")
    assert not dialog.save()
    assert "is not an email address" in dialog.error_labels["email_sender"].cget("text")
    assert dialog.error_labels["port"].cget("text") == ""
    assert config_file.read_bytes() == before

    dialog.notebook.select(3)
    dialog.folder_filter.set("a/b")
    dialog.folder_path.set(str(config_file.parent))
    dialog.add_button.invoke()
    dialog.flag_vars["email_enabled"].set(False)
    set_text(dialog, "email_sender", "")
    assert not dialog.save()
    assert "row 1:" in dialog.folder_error.cget("text")
    assert "without '/'" in dialog.folder_error.cget("text")
    assert config_file.read_bytes() == before


# --------------------------------------------------------------------------- status


def test_start_stop_runs_the_node_and_locks_the_other_tabs_while_it_runs(
    open_dialog: Callable[..., Any], config_file: Path, display: str
) -> None:
    from sbs_winsvc.cfg.backend import ProcessBackend  # noqa: PLC0415
    from sbs_winsvc.cfg.dialog import ROLE_COLOURS  # noqa: PLC0415

    backend = ProcessBackend(config_file)
    dialog = open_dialog(config_file, backend)
    try:
        assert dialog.role == "stopped"
        assert dialog.locked_tabs() == []
        assert dialog.start_stop.cget("text") == "Start"
        dialog.notebook.select(2)
        dialog.start_stop.invoke()
        pump(dialog.root, lambda: dialog.role == "primary", timeout=30)
        assert dialog.service_state == "running"
        assert dialog.locked_tabs() == [1, 2, 3]
        assert dialog.notebook.index("current") == 0
        assert dialog.start_stop.cget("text") == "Stop"
        assert dialog.colour == ROLE_COLOURS["primary"]
        # The window icon has the colour too: its centre pixel.
        assert dialog.icon_image.get(16, 16) == _rgb(ROLE_COLOURS["primary"])
        assert "PRIMARY" in dialog.role_label.cget("text")
        # A node says it is primary a moment before its sentinels run: the
        # status the dialog shows next names them.
        pump(
            dialog.root,
            lambda: "running    labels" in dialog.detail.get("1.0", "end"),
            timeout=30,
        )
        assert not dialog.save()
        assert "stop the service" in dialog.message.cget("text")
        screenshot(display, "cfg-status-primary")

        dialog.start_stop.invoke()
        pump(dialog.root, lambda: dialog.service_state == "stopped", timeout=30)
        assert dialog.role == "stopped"
        assert dialog.locked_tabs() == []
        assert dialog.icon_image.get(16, 16) == _rgb(ROLE_COLOURS["stopped"])
    finally:
        proc = backend._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _rgb(colour: str) -> tuple[int, int, int]:
    return (int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16))


# --------------------------------------------------------------------------- email


def test_the_test_button_sends_a_mail_with_what_is_typed(
    open_dialog: Callable[..., Any], config_file: Path, display: str
) -> None:
    from alertkit import smtp_server_in_thread, wait_mails  # noqa: PLC0415

    before = config_file.read_bytes()
    dialog = open_dialog(config_file)
    dialog.notebook.select(2)
    with smtp_server_in_thread() as server:
        set_text(dialog, "email_host", "127.0.0.1")
        set_text(dialog, "email_port", str(server.port))
        set_text(dialog, "email_sender", "sbs@labels.example")
        set_text(dialog, "email_recipients", "night@labels.example, ops@labels.example")
        dialog.test_button.invoke()
        pump(dialog.root, lambda: dialog.test_result.cget("text").startswith("sent"))
        mails = wait_mails(server, "the test mail", lambda m: len(m) == 1)
        assert mails[0].rcpt_tos == ["night@labels.example", "ops@labels.example"]
        assert "test" in str(mails[0].message["Subject"]).lower()
        assert dialog.test_result.cget("text") == (
            f"sent to night@labels.example, ops@labels.example via 127.0.0.1:{server.port}"
        )
        pump(dialog.root)
        screenshot(display, "cfg-email-test")
    # A test saves nothing.
    assert config_file.read_bytes() == before

    with socket_closed() as port:
        set_text(dialog, "email_port", str(port))
        dialog.test_button.invoke()
        pump(dialog.root, lambda: dialog.test_result.cget("text").startswith("not sent"))

    set_text(dialog, "email_host", "")
    dialog.test_button.invoke()
    assert dialog.test_result.cget("text") == "not sent: correct the marked fields"
    assert "is required" in dialog.error_labels["email_host"].cget("text")


@contextlib.contextmanager
def socket_closed() -> Iterator[int]:
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])  # bound, never listening: refused


# --------------------------------------------------------------------------- real input


@pytest.mark.skipif(shutil.which("xdotool") is None, reason="xdotool is not installed")
def test_typing_and_clicking_for_real_saves_the_port(
    open_dialog: Callable[..., Any], config_file: Path, display: str
) -> None:
    dialog = open_dialog(config_file)
    root = dialog.root
    root.geometry("+0+0")
    dialog.notebook.select(1)
    pump(root, lambda: dialog.entries["port"].winfo_viewable() == 1)
    env = {**os.environ, "DISPLAY": display}

    def xdo(*args: str) -> None:
        subprocess.run(["xdotool", *args], env=env, check=True, timeout=10)
        pump(root)

    def click(widget: Any) -> None:
        x = widget.winfo_rootx() + widget.winfo_width() // 2
        y = widget.winfo_rooty() + widget.winfo_height() // 2
        xdo("mousemove", "--sync", str(x), str(y), "click", "1")

    entry = dialog.entries["port"]
    click(entry)
    pump(root, lambda: root.focus_get() == entry)
    xdo("key", "ctrl+a")
    entry.delete(0, "end")  # Tk's entry has no select-all on ctrl+a everywhere
    xdo("type", "--delay", "20", "4999")
    pump(root, lambda: dialog.text_vars["port"].get() == "4999")
    click(dialog.save_button)
    pump(root, lambda: dialog.message.cget("text") == "saved sbs.toml")
    assert load_config(config_file).node.port == 4999
