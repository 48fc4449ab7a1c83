"""The dialog's form without a screen: where values and passwords go, what a problem marks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sbs_core.config import load_config
from sbs_winsvc.cfg.form import GENERAL, ConfigForm

BASE = """\
[node]
local_address = "127.0.0.1"
remote_address = "127.0.0.2"
secret_file = "secret"
state_dir = "state"
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "secret").write_text("f" * 32)
    return tmp_path


def test_an_unchanged_form_saves_the_file_byte_for_byte(folder: Path) -> None:
    path = folder / "sbs.toml"
    path.write_text(BASE + "# keep me\n[[folders]]\npath = 'x'  # and me\nfilter = '*.lab'\n")
    before = path.read_bytes()
    form = ConfigForm(path)
    assert form.save(form.values()) == {}
    assert path.read_bytes() == before


def test_a_new_password_goes_to_the_password_file_when_one_is_configured(folder: Path) -> None:
    (folder / "mail.pw").write_text("old\n")
    path = folder / "sbs.toml"
    path.write_text(
        BASE + "[email]\nusername = 'sbs'\npassword_file = 'mail.pw'\n"
        "sender = 's@x.example'\nrecipients = ['r@x.example']\n"
    )
    form = ConfigForm(path)
    values = form.values()
    values.email_password = "n3w secret"
    assert form.save(values) == {}
    assert (folder / "mail.pw").read_text() == "n3w secret\n"
    assert (folder / "mail.pw").stat().st_mode & 0o077 == 0
    assert "password =" not in path.read_text()


def test_without_a_password_file_the_password_is_written_in_the_file(folder: Path) -> None:
    path = folder / "sbs.toml"
    path.write_text(BASE)
    form = ConfigForm(path)
    values = form.values()
    values.text["email_username"] = "sbs"
    values.email_password = "pw"
    assert form.save(values) == {}
    config = load_config(path)
    password = config.email.password
    assert password is not None
    assert password.get_secret_value() == "pw"
    # An empty password field keeps the one there.
    assert form.save(form.values()) == {}
    assert load_config(path).email.password is not None


def test_problems_are_keyed_by_the_field_that_shows_them(folder: Path) -> None:
    path = folder / "sbs.toml"
    path.write_text(BASE)
    form = ConfigForm(path)
    values = form.values()
    values.primary_only = values.backup_only = True
    values.folders = [("*", ""), ("*", str(folder))]
    problems = form.save(values)
    assert problems == {
        "primary_only": "choose primary-only or backup-only, not both",
        "folder0": "needs a path",
    }
    assert ConfigForm.field_for("folders[3].filter") == "folder3"
    assert ConfigForm.field_for("node.mode") == "primary_only"
    assert ConfigForm.field_for("email.password_file") == "email_password"
    assert ConfigForm.field_for("node.secret_file") == GENERAL
    (folder / "secret").write_text("short")
    problems = form.save(form.values())
    assert "node.secret_file: " in problems[GENERAL]
    assert "is too short" in problems[GENERAL]


@pytest.mark.skipif(sys.platform == "win32", reason="there the installed service has one")
def test_the_dialog_needs_a_configuration_file_off_windows(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sbs_winsvc.cli import main  # noqa: PLC0415

    assert main(["-cfg"]) == 1
    assert "give the node's configuration file: -cfg --config FILE" in capsys.readouterr().err
    assert main(["-cfg", "--config", str(folder / "none.toml")]) == 1
    assert "there is no such configuration file" in capsys.readouterr().err


def test_pywin32_is_imported_only_inside_the_shell_and_only_where_windows_is_needed() -> None:
    import re  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    src = Path(__file__).resolve().parents[2] / "src"
    pattern = re.compile(
        r"^\s*(import|from)\s+(win32\w*|servicemanager|pywintypes|ntsecuritycon)\b"
    )
    outside = [
        f"{path.relative_to(src)}:{number}"
        for path in (src / "sbs_core").rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.match(line)
    ]
    assert outside == []
    # Everything a Linux or macOS user runs imports without pywin32.
    modules = "sbs_winsvc, sbs_winsvc.cli, sbs_winsvc.runner, sbs_winsvc.licence_tool, "
    modules += "sbs_winsvc.cfg.form, sbs_winsvc.cfg.backend, sbs_winsvc.cfg.dialog"
    probe = subprocess.run(
        [sys.executable, "-c", f"import {modules}; import sys; "
         "print(sorted(m for m in sys.modules if m.startswith(('win32', 'servicemanager'))))"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"
