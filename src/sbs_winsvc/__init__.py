"""The Windows service shell around :mod:`sbs_core` (Service Control Manager, licences, -cfg).

Every ``win32*`` import stays inside this package; the shell wires, ``sbs_core`` decides.
"""
