"""Running the managed application and the sentinels while this node is primary."""

from __future__ import annotations

from sbs_core.controller.base import ServiceController
from sbs_core.controller.process import ProcessController

__all__ = ("ProcessController", "ServiceController")
