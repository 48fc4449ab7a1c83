"""Close the node's state folder to everyone but administrators, SYSTEM and the service's account.

On Windows the control channel is a TCP socket on 127.0.0.1 whose token is a
file in the state folder, and ``%PROGRAMDATA%`` lets every local user read what
is created in it. Whoever reads the token can ask the node for its status,
start and stop sentinels and let held-back deletions through, so the service
replaces the folder's permissions with its own before the node runs: full
control for the built-in Administrators, SYSTEM and the account the service
runs as, inherited by everything inside, and nothing inherited from above.
"""

from __future__ import annotations

import logging
from pathlib import Path

import ntsecuritycon
import win32api
import win32security

__all__ = ("restrict_to_administrators",)

logger = logging.getLogger("sbs.service")


def _own_account() -> object:
    token = win32security.OpenProcessToken(win32api.GetCurrentProcess(), win32security.TOKEN_QUERY)
    try:
        return win32security.GetTokenInformation(token, win32security.TokenUser)[0]
    finally:
        win32api.CloseHandle(token)


def restrict_to_administrators(folder: Path) -> bool:
    """Set ``folder``'s permissions as the module says; False (logged) if Windows refused."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        accounts = [
            win32security.CreateWellKnownSid(win32security.WinBuiltinAdministratorsSid, None),
            win32security.CreateWellKnownSid(win32security.WinLocalSystemSid, None),
            _own_account(),
        ]
        dacl = win32security.ACL()
        inherit = ntsecuritycon.OBJECT_INHERIT_ACE | ntsecuritycon.CONTAINER_INHERIT_ACE
        for account in accounts:
            dacl.AddAccessAllowedAceEx(
                win32security.ACL_REVISION,
                inherit,
                ntsecuritycon.FILE_ALL_ACCESS,
                account,  # type: ignore[arg-type]
            )
        win32security.SetNamedSecurityInfo(
            str(folder),
            win32security.SE_FILE_OBJECT,
            win32security.DACL_SECURITY_INFORMATION
            | win32security.PROTECTED_DACL_SECURITY_INFORMATION,
            None,
            None,
            dacl,
            None,
        )
    except Exception as exc:
        logger.warning(
            "cannot restrict the permissions of %s to administrators: %s; other local users"
            " may be able to read its control token",
            folder,
            exc,
        )
        return False
    return True
