"""Environment switches of the model's fast paths (`OPENK2_ONEDNN`, `OPENK2_FEW_ROWS`, `OPENK2_COMPILE`,
`OPENK2_HUGE_PAGES`, `OPENK2_BLOCK_CACHE`)."""

from __future__ import annotations

import os


def env_switch(name: str) -> bool:
    """On unless the variable is set to 0, false, off or no (any case, surrounding spaces ignored)."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "off", "no")
