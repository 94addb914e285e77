"""common.durable: a file is replaced whole or not at all, and no temp file is left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.durable import file_chunks, write_atomically


def test_write_replaces_the_file_whole_with_the_mode_asked(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("old")
    write_atomically(path, '{"new": true}', mode=0o644)
    assert path.read_text() == '{"new": true}'
    assert path.stat().st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == ["state.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        write_atomically(path, 42)  # type: ignore[arg-type]
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.json"]


async def test_chunks_read_back_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "big"
    data = os.urandom(2500)
    path.write_bytes(data)
    assert [len(chunk) async for chunk in file_chunks(path, chunk_size=1000)] == [1000, 1000, 500]
    assert b"".join([chunk async for chunk in file_chunks(path)]) == data
