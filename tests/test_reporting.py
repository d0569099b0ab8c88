"""Run-directory files: written whole or not at all, with the mode any other file would get."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from florist.reporting.run_directory import write_atomically


def test_written_file_has_the_content_and_the_umask_mode_not_a_private_temp_files(tmp_path: Path):
    previous = os.umask(0o022)
    try:
        write_atomically(tmp_path / "deep" / "metrics.json", "{}\n")
    finally:
        os.umask(previous)
    target = tmp_path / "deep" / "metrics.json"
    assert target.read_text() == "{}\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        write_atomically(target, None)  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
