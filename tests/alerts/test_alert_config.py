"""The configuration keys of the alerts: email.ca_file, repeat_interval, max_age, [notify]."""

from __future__ import annotations

from pathlib import Path

import pytest
from alertkit import write_ca_file, write_config

from sbs_core.config import NotifyConfig, load_config
from sbs_core.errors import ConfigError


def test_defaults(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, port=25))
    assert config.email.ca_file is None
    assert config.email.repeat_interval == 3600.0
    assert config.email.max_age == 86400.0
    assert config.notify == NotifyConfig(command=None, timeout=10.0)


def test_values(tmp_path: Path) -> None:
    ca_file = write_ca_file(tmp_path)
    path = write_config(
        tmp_path,
        port=25,
        ca_file=ca_file,
        email={"repeat_interval": 600.0, "max_age": 3600.0},
        notify={"command": "notify-chat --channel 'ops room'", "timeout": 3.5},
    )
    config = load_config(path)
    assert config.email.ca_file == ca_file
    assert config.email.repeat_interval == 600.0
    assert config.email.max_age == 3600.0
    assert config.notify.command == ("notify-chat", "--channel", "ops room")
    assert config.notify.timeout == 3.5


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("", "holds no PEM certificate"),
        ("not a certificate", "holds no PEM certificate"),
        ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "no PEM certificate"),
    ],
)
def test_a_ca_file_without_certificates_is_refused(
    tmp_path: Path, content: str, reason: str
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(content, encoding="ascii")
    path = write_config(tmp_path, port=25, ca_file=ca_file)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "email.ca_file"
    assert reason in caught.value.reason


def test_a_missing_ca_file_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, port=25, ca_file=tmp_path / "nowhere.pem")
    with pytest.raises(ConfigError, match=r"email\.ca_file: .*nowhere\.pem does not exist"):
        load_config(path)


@pytest.mark.parametrize(
    ("table", "values", "key"),
    [
        ("email", {"repeat_interval": 0}, "email.repeat_interval"),
        ("email", {"max_age": -1.0}, "email.max_age"),
        ("notify", {"command": []}, "notify.command"),
        ("notify", {"timeout": "10"}, "notify.timeout"),
        ("notify", {"comand": ["x"]}, "notify.comand"),
    ],
)
def test_bad_values_are_refused_with_the_key(
    tmp_path: Path, table: str, values: dict[str, object], key: str
) -> None:
    options: dict[str, object] = {table: values}
    path = write_config(tmp_path, port=25, **options)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == key
