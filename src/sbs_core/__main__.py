"""``python -m sbs_core`` is the ``sbs`` command."""

from sbs_core.cli import main

raise SystemExit(main())
