"""Local path or Hugging Face hub id: told apart before anything is loaded, so a mistyped path never goes to the hub.

A value is a local path when it exists, or when it looks like one: it ends in a data file's suffix,
starts with `.` or `~`, or holds a path separator. The one exception is a hub id's own separator:
`namespace/name` in the hub's characters is a hub id, unless `namespace` is a local directory
(there, a typo in a local path is far likelier than a hub id).
"""

from __future__ import annotations

import re
from pathlib import Path

DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def looks_like_path(value: str) -> bool:
    """True when `value` is to be read from the local disk rather than the hub (see the module's rules)."""
    if value.lower().endswith(DATA_SUFFIXES) or value.startswith((".", "~")):
        return True
    if "/" not in value and "\\" not in value:
        return False
    if _HUB_ID.fullmatch(value) and ".." not in value:
        return Path(value.partition("/")[0]).is_dir()
    return True


def check_source(value: str, key: str) -> str:
    """`value`, unless it looks like a local path that does not exist: then a one-line error naming `key`."""
    if value and looks_like_path(value) and not Path(value).exists():
        raise ValueError(f"{key}: no such file or directory: {value}")
    return value
