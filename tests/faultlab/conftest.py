"""The fault lab's fixture: a :class:`NetLab` per test, removed even when the test fails."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab import NetLab, Timings, netlab_unavailable


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "lab(**options): keyword arguments for the test's NetLab (modes, node_extra)"
    )


@pytest.fixture
def lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NetLab]:
    """Two namespaces, one node each, not started yet.

    A test asks for other settings with ``@pytest.mark.lab(node_extra={...})``.
    Skipped, with the reason, where the machine cannot host the lab.
    """
    reason = netlab_unavailable()
    if reason is not None:
        pytest.skip(reason)
    marker = request.node.get_closest_marker("lab")
    options = dict(marker.kwargs) if marker is not None else {}
    with NetLab(tmp_path / "lab", timings=Timings(), **options) as built:
        yield built
