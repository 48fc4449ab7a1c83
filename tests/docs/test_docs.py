"""The documentation says what the code does."""

from __future__ import annotations

import re
from pathlib import Path

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
