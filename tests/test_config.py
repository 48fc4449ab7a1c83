"""Loading and checking the configuration file."""

from __future__ import annotations

import os
import socket
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from sbs_core.config import (
    AppConfig,
    Config,
    ControllerConfig,
    EmailConfig,
    FolderConfig,
    NodeConfig,
    SentinelConfig,
    _state_dir_for,
    default_state_dir,
    load_config,
)
from sbs_core.errors import ConfigError

SECRET = "0123456789abcdef-a-shared-secret"
PASSWORD = "correct-horse-battery-staple"

NODE = """
[node]
local_address = "10.0.0.1"
remote_address = "10.0.0.2"
secret_file = "secret.key"
"""

# Tests that need a secret file and a clean setup use this and a [controller] so
# that warnings() has nothing to say about a minimal config.
QUIET = (
    NODE
    + """
[controller]
application = ["server"]
"""
)

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")


def private_file(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A folder holding a valid secret file, for configs to be written into."""
    private_file(tmp_path / "secret.key", f"  {SECRET}\n")
    return tmp_path


def write(folder: Path, text: str, name: str = "sbs.toml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_error(path: Path | str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value


def assert_problem(error: ConfigError, file: Path | str, key: str | None, words: str) -> None:
    """``error`` reports ``words`` for ``key``, in its attributes and in its message."""
    reasons = [reason for found, reason in error.problems if found == key]
    assert any(words in reason for reason in reasons), error.problems
    where = f"{file}: {key}: " if key else f"{file}: "
    assert any(line.startswith(where) and words in line for line in str(error).splitlines()), str(
        error
    )


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string."""
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


# --- valid files ----------------------------------------------------------------------


def test_every_key_round_trip(folder: Path) -> None:
    private_file(folder / "keys" / "secret.key", SECRET)
    private_file(folder / "smtp.pass", PASSWORD + "\n")
    forms = folder / "elsewhere" / "forms"
    path = write(
        folder,
        f"""
        [node]
        name = "alpha"
        local_address = "10.0.0.1"
        remote_address = "10.0.0.2"
        port = 5000
        period = 12.5
        mode = "backup"
        strict_sync = true
        preserve_timestamps = true
        heartbeat_interval = 0.5
        dead_time = 2
        probe_interval = 3
        connect_timeout = 1.5
        final_cycle_timeout = 45
        secret_file = "keys/secret.key"
        state_dir = "state"

        [app]
        settings_folder = "settings"
        update_scripts = [["export", "--all"], "backup.sh --quick 'two words'"]
        update_script_timeout = 20

        [[folders]]
        path = "labels"
        filter = "*.lab"

        [[folders]]
        path = '{forms}'

        [email]
        enabled = true
        host = "smtp.example.com"
        port = 587
        security = "starttls"
        username = "sbs"
        password_file = "smtp.pass"
        sender = "SBS <sbs@example.com>"
        recipients = ["ops@example.com", "Night Shift <night@example.com>"]
        timeout = 10

        [controller]
        kind = "process"
        stop_timeout = 8
        application = ["labelserver", "--port", "9100"]

        [[controller.sentinels]]
        name = "print-queue.1"
        command = ["python", "-m", "queue"]

        [[controller.sentinels]]
        name = "archive"
        command = ["archiver"]
        autostart = false
        """,
    )

    config = load_config(path)

    assert config.config_file == path
    assert config.node == NodeConfig(
        name="alpha",
        local_address="10.0.0.1",
        remote_address="10.0.0.2",
        port=5000,
        period=12.5,
        mode="backup",
        strict_sync=True,
        preserve_timestamps=True,
        heartbeat_interval=0.5,
        dead_time=2.0,
        probe_interval=3.0,
        connect_timeout=1.5,
        final_cycle_timeout=45.0,
        secret_file=folder / "keys" / "secret.key",
        state_dir=folder / "state",
    )
    assert config.app == AppConfig(
        settings_folder=folder / "settings",
        update_scripts=(("export", "--all"), ("backup.sh", "--quick", "two words")),
        update_script_timeout=20.0,
    )
    assert config.folders == (
        FolderConfig(path=folder / "labels", filter="*.lab"),
        FolderConfig(path=forms, filter="*"),
    )
    assert config.email == EmailConfig(
        enabled=True,
        host="smtp.example.com",
        port=587,
        security="starttls",
        username="sbs",
        password_file=folder / "smtp.pass",
        sender="SBS <sbs@example.com>",
        recipients=("ops@example.com", "Night Shift <night@example.com>"),
        timeout=10.0,
    )
    assert config.controller == ControllerConfig(
        kind="process",
        stop_timeout=8.0,
        application=("labelserver", "--port", "9100"),
        sentinels=(
            SentinelConfig(name="print-queue.1", command=("python", "-m", "queue")),
            SentinelConfig(name="archive", command=("archiver",), autostart=False),
        ),
    )
    assert isinstance(config.node.period, float)
    assert isinstance(config.node.dead_time, float)
    assert config.node.read_secret() == SECRET.encode()
    password = config.email.read_password()
    assert password is not None
    assert password.get_secret_value() == PASSWORD
    assert config.warnings() == []
    assert Config.model_validate(config.model_dump()) == config


def test_defaults(folder: Path) -> None:
    config = load_config(write(folder, NODE))

    node = config.node
    assert node.name == socket.gethostname()
    assert node.port == 4445
    assert node.period == 30.0
    assert node.mode == "auto"
    assert node.strict_sync is False
    assert node.preserve_timestamps is False
    assert node.heartbeat_interval == 1.0
    assert node.dead_time == 3.0
    assert node.probe_interval == 1.0
    assert node.connect_timeout == 2.0
    assert node.final_cycle_timeout == 30.0
    assert node.state_dir == default_state_dir()
    assert node.state_dir.is_absolute()
    assert config.app == AppConfig(
        settings_folder=None, update_scripts=(), update_script_timeout=60
    )
    assert config.folders == ()
    assert config.email == EmailConfig(
        enabled=False,
        host=None,
        port=25,
        security="none",
        username=None,
        password=None,
        password_file=None,
        sender=None,
        recipients=(),
        timeout=30,
    )
    assert config.controller == ControllerConfig(
        kind="process", stop_timeout=5, application=None, sentinels=()
    )
    assert SentinelConfig(name="s", command=("x",)).autostart is True
    assert FolderConfig(path=Path("/x")).filter == "*"


def test_relative_paths_resolve_against_the_config_folder(
    folder: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    private_file(folder / "conf" / "secret.key", SECRET)
    private_file(folder / "conf" / "smtp.pass", PASSWORD)
    path = write(
        folder / "conf",
        """
        [node]
        local_address = "a"
        remote_address = "b"
        secret_file = "secret.key"
        state_dir = "../state"
        [app]
        settings_folder = "./settings"
        [[folders]]
        path = "data/labels"
        [email]
        password_file = "smtp.pass"
        """,
    )
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))

    config = load_config(os.path.relpath(path))

    conf = folder / "conf"
    assert config.config_file == path
    assert config.node.secret_file == conf / "secret.key"
    assert config.node.state_dir == folder / "state"
    assert config.app.settings_folder == conf / "settings"
    assert config.folders[0].path == conf / "data" / "labels"
    assert config.email.password_file == conf / "smtp.pass"


def test_tilde_is_the_home_folder(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = folder / "home"
    private_file(home / ".sbs" / "secret.key", SECRET)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("USERPROFILE", str(home))
    path = write(folder, NODE.replace('"secret.key"', '"~/.sbs/secret.key"'))

    assert load_config(path).node.secret_file == home / ".sbs" / "secret.key"


@pytest.mark.parametrize(
    ("platform", "environ", "is_root", "expected"),
    [
        ("linux", {}, True, "/var/lib/sbs"),
        ("freebsd14", {"XDG_STATE_HOME": "/x"}, True, "/var/lib/sbs"),
        ("linux", {"XDG_STATE_HOME": "/xdg/state"}, False, "/xdg/state/sbs"),
        ("linux", {"XDG_STATE_HOME": "relative"}, False, "/home/ann/.local/state/sbs"),
        ("linux", {}, False, "/home/ann/.local/state/sbs"),
        ("darwin", {}, False, "/home/ann/Library/Application Support/sbs"),
        ("win32", {"PROGRAMDATA": "D:\\Data"}, False, "D:\\Data\\sbs"),
        ("win32", {}, True, "C:\\ProgramData\\sbs"),
    ],
)
def test_state_dir_default_per_os(
    platform: str, environ: dict[str, str], is_root: bool, expected: str
) -> None:
    assert _state_dir_for(platform, environ, is_root, "/home/ann") == expected


def test_commands_as_strings_are_split_like_a_shell(folder: Path) -> None:
    path = write(
        folder,
        QUIET
        + """
        [app]
        update_scripts = ['dump --to "/var/my data"', ["a b"]]
        """,
    )

    scripts = load_config(path).app.update_scripts

    assert scripts == (("dump", "--to", "/var/my data"), ("a b",))


def test_config_is_immutable(folder: Path) -> None:
    config = load_config(write(folder, NODE))

    with pytest.raises(ValidationError):
        config.node.port = 1
    assert isinstance(config.folders, tuple)
    assert isinstance(config.email.recipients, tuple)


def test_bom_at_the_start_is_accepted(folder: Path) -> None:
    path = folder / "sbs.toml"
    path.write_bytes(b"\xef\xbb\xbf" + textwrap.dedent(NODE).encode())

    assert load_config(path).node.remote_address == "10.0.0.2"


# --- file-level errors ----------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"

    error = load_error(path)

    assert error.file == str(path)
    assert error.key is None
    assert_problem(error, path, None, "cannot be found")


def test_folder_instead_of_file(tmp_path: Path) -> None:
    assert_problem(load_error(tmp_path), tmp_path, None, "is a folder")


def test_unreadable_file(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(folder, NODE)
    real_read_bytes = Path.read_bytes

    # Root reads a mode-0 file anyway, so the refusal is simulated where it happens.
    def refuse(self: Path) -> bytes:
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)

    assert_problem(load_error(path), path, None, "cannot be read")


def test_invalid_toml_names_line_and_column(folder: Path) -> None:
    path = write(folder, '[node]\nlocal_address = "a"\nport = = 3\n')

    error = load_error(path)

    assert error.key is None
    assert_problem(error, path, None, "is not valid TOML")
    assert "line 3" in error.reason
    assert "column" in error.reason


def test_not_utf8(folder: Path) -> None:
    path = folder / "sbs.toml"
    path.write_bytes(b'[node]\nname = "caf\xe9"\n')

    assert_problem(load_error(path), path, None, "is not UTF-8 text")


# --- value errors ---------------------------------------------------------------------


def test_missing_node_table(folder: Path) -> None:
    path = write(folder, "[app]\n")

    assert_problem(load_error(path), path, "node", "is required: the [node] table")


def test_unknown_key_with_a_suggestion(folder: Path) -> None:
    path = write(folder, NODE + "prot = 4446\n")

    assert_problem(load_error(path), path, "node.prot", "unknown key (did you mean 'port'?)")


def test_key_below_the_wrong_table(folder: Path) -> None:
    path = write(folder, NODE + '[[folders]]\npath = "x"\nperiod = 5\n')

    assert_problem(load_error(path), path, "folders[0].period", "did you mean node.period?")


def test_unknown_top_level_key(folder: Path) -> None:
    path = write(folder, "colour = 1\n" + NODE)

    assert_problem(load_error(path), path, "colour", "unknown key")


def test_config_file_is_not_a_key(folder: Path) -> None:
    path = write(folder, 'config_file = "/etc/other.toml"\n' + NODE)

    assert_problem(load_error(path), path, "config_file", "unknown key")


def test_missing_remote_address(folder: Path) -> None:
    path = write(folder, NODE.replace('remote_address = "10.0.0.2"', ""))

    error = load_error(path)

    assert error.key == "node.remote_address"
    assert error.reason.startswith(
        "is required: the address of the other node; sbs refuses to start without it"
    )
    assert_problem(error, path, "node.remote_address", "sbs refuses to start without it")


@pytest.mark.parametrize("blank", ["", "   ", "\t"])
def test_empty_remote_address(folder: Path, blank: str) -> None:
    path = write(folder, NODE.replace('"10.0.0.2"', toml_string(blank)))

    error = load_error(path)

    assert error.key == "node.remote_address"
    assert error.reason.startswith(
        "is required: the address of the other node; sbs refuses to start without it"
    )
    assert_problem(error, path, "node.remote_address", "empty")


def test_empty_local_address(folder: Path) -> None:
    path = write(folder, NODE.replace('"10.0.0.1"', '""'))

    assert_problem(load_error(path), path, "node.local_address", "is required")


def test_remote_address_same_as_local(folder: Path) -> None:
    path = write(folder, NODE.replace('"10.0.0.2"', '"10.0.0.1"'))

    assert_problem(load_error(path), path, "node.remote_address", "must differ from local_address")


def test_address_with_spaces(folder: Path) -> None:
    path = write(folder, NODE.replace('"10.0.0.2"', '"10.0.0.2 10.0.0.3"'))

    assert_problem(load_error(path), path, "node.remote_address", "is not an address")


@pytest.mark.parametrize(
    ("line", "key", "words"),
    [
        ('port = "4445"', "node.port", "must be a whole number"),
        ("port = true", "node.port", "must be a whole number"),
        ("port = 4445.0", "node.port", "must be a whole number"),
        ('period = "30"', "node.period", "must be a number"),
        ("period = inf", "node.period", "must be a finite number"),
        ("period = 0", "node.period", "must be greater than 0"),
        ("connect_timeout = -1.5", "node.connect_timeout", "must be greater than 0"),
        ('strict_sync = "yes"', "node.strict_sync", "must be true or false"),
        ("strict_sync = 1", "node.strict_sync", "must be true or false"),
        ("name = 7", "node.name", "must be a string"),
        ('name = " "', "node.name", "must not be empty"),
        ('mode = "master"', "node.mode", "must be one of 'auto', 'primary' or 'backup'"),
        ('state_dir = ""', "node.state_dir", "must not be empty"),
    ],
)
def test_wrong_values_in_node(folder: Path, line: str, key: str, words: str) -> None:
    path = write(folder, NODE + line + "\n")

    assert_problem(load_error(path), path, key, words)


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_port_out_of_range(folder: Path, port: int) -> None:
    path = write(folder, NODE + f"port = {port}\n")

    assert_problem(load_error(path), path, "node.port", "from 1 to 65535")


def test_table_expected(folder: Path) -> None:
    path = write(folder, "email = 3\n" + NODE)

    assert_problem(load_error(path), path, "email", "must be a table")


def test_path_expected(folder: Path) -> None:
    path = write(folder, NODE.replace('"secret.key"', "3"))

    assert_problem(load_error(path), path, "node.secret_file", "must be a path")


def test_table_key_below_another_table(folder: Path) -> None:
    path = write(folder, NODE + "email = 3\n")

    assert_problem(load_error(path), path, "node.email", "belongs at the top level")


def test_dead_time_too_small_names_both_values(folder: Path) -> None:
    path = write(folder, NODE + "heartbeat_interval = 1.5\ndead_time = 2.5\n")

    error = load_error(path)

    assert_problem(error, path, "node.dead_time", "at least twice heartbeat_interval (1.5)")
    assert "2.5" in error.reason


def test_missing_secret_file(folder: Path) -> None:
    (folder / "secret.key").unlink()
    path = write(folder, NODE)

    error = load_error(path)

    assert_problem(error, path, "node.secret_file", "does not exist")
    assert str(folder / "secret.key") in error.reason


def test_secret_file_not_given(folder: Path) -> None:
    path = write(folder, NODE.replace('secret_file = "secret.key"', ""))

    assert_problem(load_error(path), path, "node.secret_file", "is required")


def test_short_secret_file(folder: Path) -> None:
    private_file(folder / "secret.key", "   short secret \n\n")
    path = write(folder, NODE)

    error = load_error(path)

    assert_problem(error, path, "node.secret_file", "is too short")
    assert "12 bytes" in error.reason
    assert "16" in error.reason


def test_secret_file_is_a_folder(folder: Path) -> None:
    (folder / "keys").mkdir()
    path = write(folder, NODE.replace('"secret.key"', '"keys"'))

    assert_problem(load_error(path), path, "node.secret_file", "is a folder")


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ('[app]\nupdate_scripts = ["unbalanced \'quote"]', "app.update_scripts[0]", "split"),
        ("[app]\nupdate_scripts = [[]]", "app.update_scripts[0]", "must not be empty"),
        ('[app]\nupdate_scripts = [""]', "app.update_scripts[0]", "must not be empty"),
        ('[app]\nupdate_scripts = [["", "x"]]', "app.update_scripts[0]", "program name"),
        ('[app]\nupdate_scripts = [["a", 2]]', "app.update_scripts[0][1]", "must be a string"),
        ('[app]\nupdate_scripts = "x.sh"', "app.update_scripts", "must be a list"),
        ("[[folders]]\nfilter = '*'", "folders[0].path", "is required: the folder"),
        ("[[folders]]\npath = 'a'\nfilter = ''", "folders[0].filter", "must not be empty"),
        ("[[folders]]\npath = 'a'\nfilter = 'x/*.lab'", "folders[0].filter", "without '/'"),
        ("[[folders]]\npath = 'a'\nfilter = 'x\\*'", "folders[0].filter", "without '/'"),
        ("[controller]\nkind = 'scm'", "controller.kind", "must be one of 'process' or 'windows'"),
        (
            "[controller]\napplication_service = 'Spooler'",
            "controller.application_service",
            "needs controller.kind = 'windows'",
        ),
        (
            "[controller]\nkind = 'windows'\napplication = ['a']\napplication_service = 'A'",
            "controller.application_service",
            "cannot be used together with controller.application",
        ),
        (
            "[[controller.sentinels]]\nname = 'a'\nservice = 'LabelJob'",
            "controller.sentinels[0].service",
            "needs controller.kind = 'windows'",
        ),
        (
            "[controller]\nkind = 'windows'\n[[controller.sentinels]]\nname = 'a'",
            "controller.sentinels[0]",
            "needs exactly one of command (a child process) and service",
        ),
        (
            "[controller]\nkind = 'windows'\n[[controller.sentinels]]\nname = 'a'\n"
            "service = 'S'\ncommand = ['x']",
            "controller.sentinels[0]",
            "needs exactly one of command (a child process) and service",
        ),
        (
            "[[controller.sentinels]]\nname = 'a'\nservice = 'a\\\\b'",
            "controller.sentinels[0].service",
            "is not a Windows service name",
        ),
        ("[licence]\nfile = 'x.lic'", "licence.public_key", "is required when licence.file"),
        (
            "[licence]\npublic_key = 'ed25519:" + "A" * 43 + "='",
            "licence.file",
            "is required when licence.public_key",
        ),
        ("[licence]\nfile = 'x'\npublic_key = 'abc'", "licence.public_key", "'ed25519:'"),
        ("[licence]\nfile = 'x'\npublic_key = 'ed25519:AAAA'", "licence.public_key", "32 bytes"),
        ("[controller]\napplication = []", "controller.application", "must not be empty"),
        ("[controller]\nstop_timeout = 0", "controller.stop_timeout", "greater than 0"),
        ("[email]\nsecurity = 'tls'", "email.security", "'none', 'starttls' or 'ssl'"),
        ("[email]\nrecipients = 'a@b.c'", "email.recipients", "must be a list"),
    ],
)
def test_wrong_values_in_other_tables(folder: Path, text: str, key: str, words: str) -> None:
    path = write(folder, NODE + text + "\n")

    assert_problem(load_error(path), path, key, words)


def test_duplicate_sentinel_names(folder: Path) -> None:
    path = write(
        folder,
        NODE
        + """
        [[controller.sentinels]]
        name = "printer"
        command = ["a"]
        [[controller.sentinels]]
        name = "other"
        command = ["b"]
        [[controller.sentinels]]
        name = "Printer"
        command = ["c"]
        """,
    )

    error = load_error(path)

    assert_problem(error, path, "controller.sentinels[2].name", "duplicate sentinel name")
    assert "'Printer'" in error.reason
    assert "controller.sentinels[0]" in error.reason


@pytest.mark.parametrize("name", ["", "-dash-first", "has space", "a" * 65, "é"])
def test_bad_sentinel_name(folder: Path, name: str) -> None:
    path = write(
        folder, NODE + f"[[controller.sentinels]]\nname = {toml_string(name)}\ncommand = ['x']\n"
    )

    assert_problem(
        load_error(path), path, "controller.sentinels[0].name", "is not a valid sentinel name"
    )


def test_sentinel_without_command(folder: Path) -> None:
    path = write(
        folder,
        NODE + "[[controller.sentinels]]\nname = 'a'\ncommand = ['x']\n"
        "[[controller.sentinels]]\nname = 'b'\n",
    )

    assert_problem(load_error(path), path, "controller.sentinels[1].command", "is required")


def test_email_enabled_without_host_sender_or_recipients(folder: Path) -> None:
    path = write(folder, NODE + "[email]\nenabled = true\n")

    error = load_error(path)

    assert_problem(error, path, "email.host", "is required when email is enabled")
    assert_problem(error, path, "email.sender", "is required when email is enabled")
    assert_problem(error, path, "email.recipients", "at least one address")


def test_email_disabled_requires_nothing(folder: Path) -> None:
    path = write(folder, NODE + "[email]\nusername = 'u'\nport = 465\n")

    assert load_config(path).email.username == "u"


ENABLED_EMAIL = """
[email]
enabled = true
host = "smtp.example.com"
sender = "sbs@example.com"
recipients = ["ops@example.com"]
"""


@pytest.mark.parametrize(
    "address",
    ["no-at-sign", "two@@example.com", "a b@example.com", "a@", "@example.com", "a@b..c",
     "a@b.c, d@e.f", "Name <a@b.c", "<>", "Name <a b@c.d>"],
)  # fmt: skip
def test_bad_email_address(folder: Path, address: str) -> None:
    path = write(folder, NODE + ENABLED_EMAIL.replace('"ops@example.com"', toml_string(address)))

    error = load_error(path)

    assert_problem(error, path, "email.recipients[0]", "is not an email address")
    assert repr(address) in error.reason


@pytest.mark.parametrize(
    "address", ["a@b", "first.last+tag@example.co.uk", "Ops Team <ops@example.com>", "<x@y.z>"]
)
def test_good_email_address(address: str) -> None:
    assert EmailConfig(sender=address).sender == address


@given(st.emails())
def test_generated_email_addresses_are_accepted(address: str) -> None:
    assert EmailConfig(recipients=(address,), sender=f"Me <{address}>").recipients == (address,)


def test_username_without_password(folder: Path) -> None:
    path = write(folder, NODE + ENABLED_EMAIL + "username = 'u'\n")

    assert_problem(load_error(path), path, "email.username", "needs a password")


def test_username_with_both_passwords(folder: Path) -> None:
    private_file(folder / "pass", PASSWORD)
    path = write(
        folder,
        NODE + ENABLED_EMAIL + f"username = 'u'\npassword = '{PASSWORD}'\npassword_file = 'pass'\n",
    )

    error = load_error(path)

    assert_problem(error, path, "email.password_file", "together with email.password")
    assert PASSWORD not in str(error)


def test_missing_password_file(folder: Path) -> None:
    path = write(folder, NODE + ENABLED_EMAIL + "username = 'u'\npassword_file = 'nope'\n")

    assert_problem(load_error(path), path, "email.password_file", "does not exist")


# --- several problems, secrets --------------------------------------------------------


def test_all_problems_are_reported_together(folder: Path) -> None:
    path = write(
        folder,
        """
        [node]
        local_address = "10.0.0.1"
        secret_file = "secret.key"
        port = 0
        mode = "sometimes"
        [[controller.sentinels]]
        name = "a"
        commmand = ["x"]
        """,
    )

    error = load_error(path)

    keys = [key for key, _ in error.problems]
    assert keys == [
        "node.remote_address",
        "node.port",
        "node.mode",
        "controller.sentinels[0].commmand",
    ]
    assert (error.key, error.reason) == error.problems[0]
    lines = str(error).splitlines()
    assert len(lines) == 4
    for line, (key, reason) in zip(lines, error.problems, strict=True):
        assert line == f"{path}: {key}: {reason}"


def test_password_never_shown(folder: Path) -> None:
    path = write(
        folder,
        NODE
        + f"""
        [email]
        enabled = true
        username = "u"
        password = "{PASSWORD}"
        port = "587"
        sender = "not an address"
        """,
    )
    error = load_error(path)
    assert len(error.problems) == 2
    assert PASSWORD not in str(error)
    assert PASSWORD not in repr(error)

    path = write(folder, NODE + ENABLED_EMAIL + f"username = 'u'\npassword = '{PASSWORD}'\n")
    config = load_config(path)
    assert PASSWORD not in repr(config)
    assert PASSWORD not in str(config)
    assert PASSWORD not in str(config.model_dump())
    assert isinstance(config.email.password, SecretStr)
    assert config.email.password.get_secret_value() == PASSWORD


def test_a_password_of_the_wrong_type_is_not_echoed(folder: Path) -> None:
    path = write(folder, NODE + "[email]\npassword = 12345678987654321\n")

    error = load_error(path)

    assert_problem(error, path, "email.password", "must be a string")
    assert "12345678987654321" not in str(error)
    assert error.__cause__ is None
    assert error.__context__ is None


# --- reading secrets later ------------------------------------------------------------


def test_read_secret_strips_whitespace(folder: Path) -> None:
    config = load_config(write(folder, NODE))

    assert config.node.read_secret() == SECRET.encode()


def test_read_secret_after_the_file_went_away(folder: Path) -> None:
    config = load_config(write(folder, NODE))
    (folder / "secret.key").unlink()

    with pytest.raises(ConfigError, match="does not exist") as caught:
        config.node.read_secret()
    assert caught.value.file == str(folder / "secret.key")


def test_inline_password_is_read_as_is(folder: Path) -> None:
    config = load_config(write(folder, NODE + "[email]\npassword = ' p '\n"))

    password = config.email.read_password()

    assert password is not None
    assert password.get_secret_value() == " p "


# --- warnings -------------------------------------------------------------------------


def test_no_warnings_for_a_sensible_config(folder: Path) -> None:
    assert load_config(write(folder, QUIET)).warnings() == []


def test_ssl_on_port_25_is_suspicious(folder: Path) -> None:
    path = write(folder, QUIET + ENABLED_EMAIL + "security = 'ssl'\n")

    (warning,) = load_config(path).warnings()

    assert "email.security" in warning
    assert "465" in warning


def test_starttls_on_port_465_is_suspicious(folder: Path) -> None:
    path = write(folder, QUIET + ENABLED_EMAIL + "security = 'starttls'\nport = 465\n")

    assert any("email.port is 465" in w for w in load_config(path).warnings())


def test_inline_password_without_tls_is_suspicious(folder: Path) -> None:
    path = write(folder, QUIET + ENABLED_EMAIL + "username = 'u'\npassword = 'secret-pw'\n")

    warnings = load_config(path).warnings()

    assert any("unencrypted" in w for w in warnings)
    assert any("email.password is written in the configuration file" in w for w in warnings)
    assert not any("secret-pw" in w for w in warnings)


@posix_only
def test_secret_file_open_to_others_is_suspicious(folder: Path) -> None:
    (folder / "secret.key").chmod(0o644)

    (warning,) = load_config(write(folder, QUIET)).warnings()

    assert "node.secret_file" in warning
    assert "0644" in warning


def test_state_dir_inside_a_replicated_folder_is_suspicious(folder: Path) -> None:
    path = write(folder, QUIET.replace("[controller]", "state_dir = 'data/state'\n[controller]"))
    path.write_text(path.read_text() + "[[folders]]\npath = 'data'\n[[folders]]\npath = 'data'\n")

    warnings = load_config(path).warnings()

    assert any("node.state_dir" in w and "folders[0].path" in w for w in warnings)
    assert any("folders[1] repeats folders[0]" in w for w in warnings)


def test_nothing_to_start_is_suspicious(folder: Path) -> None:
    assert any("starts nothing" in w for w in load_config(write(folder, NODE)).warnings())


# --- properties -----------------------------------------------------------------------

reused_folder = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
seconds = st.floats(min_value=1e-3, max_value=1e4)


@reused_folder
@given(
    port=st.integers(1, 65535),
    heartbeat=seconds,
    factor=st.floats(min_value=2, max_value=100),
    period=seconds | st.integers(1, 10_000),
)
def test_any_valid_timing_loads(
    folder: Path, port: int, heartbeat: float, factor: float, period: float
) -> None:
    dead_time = heartbeat * factor
    path = write(
        folder,
        NODE + f"port = {port}\nheartbeat_interval = {heartbeat!r}\ndead_time = {dead_time!r}\n"
        f"period = {period!r}\n",
    )

    node = load_config(path).node

    assert (node.port, node.heartbeat_interval, node.dead_time) == (port, heartbeat, dead_time)
    assert node.period == period


@reused_folder
@given(heartbeat=seconds, factor=st.floats(min_value=0.01, max_value=1.99))
def test_dead_time_below_two_heartbeats_is_refused(
    folder: Path, heartbeat: float, factor: float
) -> None:
    path = write(
        folder,
        NODE + f"heartbeat_interval = {heartbeat!r}\ndead_time = {heartbeat * factor!r}\n",
    )

    error = load_error(path)

    assert error.key == "node.dead_time"
    assert "heartbeat_interval" in error.reason


@reused_folder
@given(st.text(max_size=20).filter(lambda s: s not in ("auto", "primary", "backup")))
def test_any_other_mode_is_refused(folder: Path, mode: str) -> None:
    path = write(folder, NODE + f"mode = {toml_string(mode)}\n")

    error = load_error(path)

    assert error.problems == ((error.key, error.reason),)
    assert error.key == "node.mode"
    assert error.reason.startswith("must be one of 'auto', 'primary' or 'backup'")


# --- the error type -------------------------------------------------------------------


def test_config_error_keeps_its_simple_form() -> None:
    error = ConfigError("a.toml", "node.port", "must be a whole number")

    assert str(error) == "a.toml: node.port: must be a whole number"
    assert error.problems == (("node.port", "must be a whole number"),)
    assert isinstance(error, ValueError)
    assert str(ConfigError("a.toml", None, "cannot be found")) == "a.toml: cannot be found"


def test_config_error_from_problems() -> None:
    error = ConfigError.from_problems("a.toml", [("x", "one"), (None, "two")])

    assert (error.key, error.reason) == ("x", "one")
    assert str(error) == "a.toml: x: one\na.toml: two"
    with pytest.raises(ValueError, match="at least one"):
        ConfigError.from_problems("a.toml", [])


def test_every_key_is_documented() -> None:
    models = (Config, NodeConfig, AppConfig, FolderConfig, EmailConfig, ControllerConfig)
    for model in (*models, SentinelConfig):
        assert model.__doc__
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"
