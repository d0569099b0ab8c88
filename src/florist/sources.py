"""Local path or Hugging Face hub id: told apart before anything is loaded, so a mistyped path never goes to the hub.

A hub id is `name` or `namespace/name` in the hub's characters. A value is taken as a local path when
it exists, or when it cannot be a hub id: it starts with `/`, `.` or `~`, holds a backslash, `..`, an
empty part or more than one `/`, or ends in a data file's suffix. `namespace/name` whose namespace is a
local directory is taken as a path too: there, a typo in a local path is far likelier than a hub id.
"""

from __future__ import annotations

import re
from pathlib import Path

DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def looks_like_path(value: str) -> bool:
    """True when `value` is to be read from the local disk rather than the hub (see the module's rules)."""
    if not _HUB_ID.fullmatch(value) or ".." in value or value.lower().endswith(DATA_SUFFIXES):
        return True
    namespace, slash, _ = value.partition("/")
    return bool(slash) and Path(namespace).is_dir()


def check_source(value: str, key: str) -> str:
    """`value`, unless it looks like a local path that does not exist: then a one-line error naming `key`."""
    if value and looks_like_path(value) and not Path(value).exists():
        raise ValueError(f"{key}: no such file or directory: {value}")
    return value
