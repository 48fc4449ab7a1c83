"""The Windows service shell around :mod:`sbs_core`.

It wires, ``sbs_core`` decides: :mod:`.service` is the pywin32 service,
:mod:`.runner` what it runs (the node, a licence gate, the controller), :mod:`.scm`
the controller of Windows services, :mod:`.acl` the state folder's permissions,
:mod:`.licence_tool` the vendor's licence tool, :mod:`.cfg` the ``-cfg`` dialog,
:mod:`.cli` the entry point (``python -m sbs_winsvc``). Every ``win32*`` import of
sbs is inside this package: in :mod:`.service`, :mod:`.scm`, :mod:`.acl` and the
Windows backend of the dialog.
"""

from sbs_core import __version__

__all__ = ("__version__",)
