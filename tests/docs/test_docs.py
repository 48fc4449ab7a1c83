"""The documentation says what the code does."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from sbs_core.cli import _parser
from sbs_core.reference import render_reference

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_generated_from_the_models() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page == render_reference(), (
        "docs/configuration.md is stale: run python -m sbs_core.reference > docs/configuration.md"
    )


def test_every_config_key_is_in_the_reference() -> None:
    page = render_reference()
    for key in ("local_address", "remote_address", "dead_time", "secret_file", "autostart"):
        assert f"| `{key}` |" in page


def test_readme_quick_start_is_two_commands_and_ci_runs_the_test_one() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"```sh\n(python3 -m venv[^\n]*)\n```", readme)
    assert len(commands) == 2
    demo, tests = commands
    assert demo.endswith("sbs demo")
    assert tests.endswith("pytest")
    assert tests in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_docs_link_to_pages_that_exist() -> None:
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#]+\.md)\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


# --- the mkdocs site ---------------------------------------------------------------------


def _nav_pages(nav: object) -> list[str]:
    """The page files of an mkdocs ``nav`` (nested sections included)."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _nav_pages(value)]
    if isinstance(nav, list):
        return [page for item in nav for page in _nav_pages(item)]
    return []


def test_every_docs_page_is_in_the_mkdocs_nav() -> None:
    pytest.importorskip("mkdocs")
    from mkdocs.config import load_config  # noqa: PLC0415 - only with the docs extra

    config = load_config(str(ROOT / "mkdocs.yml"))
    pages = _nav_pages(config.nav)
    on_disk = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert sorted(set(pages)) == on_disk, "add the page to the nav in mkdocs.yml"
    assert len(pages) == len(set(pages)), pages
    for page in ("getting-started.md", "operations.md", "alerts.md", "benchmarks.md"):
        assert page in pages


def test_the_docs_build_without_warnings(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    assert (site / "operations" / "index.html").is_file()


# --- the commands the docs tell an administrator to type ---------------------------------


def _sbs_commands(text: str) -> list[str]:
    """Every ``sbs ...`` command of a page: in code spans, and in ``sh``/``console`` blocks."""
    spans = re.findall(r"`(sbs [^`]+)`", text)
    lines = []
    shell = False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            shell = not shell and line.strip() in ("```sh", "```console")
        elif shell and line.strip().removeprefix("$ ").startswith("sbs "):
            lines.append(line.strip().removeprefix("$ "))
    # A comment after a command, as in README's list, is not part of it.
    return [command.split("  #")[0].strip() for command in spans + lines]


@pytest.mark.parametrize(
    "page", ["docs/operations.md", "docs/getting-started.md", "docs/alerts.md", "README.md"]
)
def test_every_sbs_command_in_the_docs_exists(page: str) -> None:
    commands = _sbs_commands((ROOT / page).read_text(encoding="utf-8"))
    assert commands
    parser = _parser()

    def valid(words: list[str]) -> bool:
        try:
            parser.parse_args(words)
        except SystemExit:  # argparse's way of refusing
            return False
        return True

    for command in commands:
        words = shlex.split(command.replace("...", "FILE"))[1:]
        # A mention of a command (`sbs status`) may leave out its file.
        mention = "--config" not in words and valid([*words, "--config", "FILE"])
        assert valid(words) or mention, f"{page}: `{command}` is not a valid sbs command"
