"""The one atomic writer: the content lands whole, a failed write changes nothing, it fsyncs."""

from __future__ import annotations

import os

import pytest

from fedmed_components.data import files
from fedmed_components.data.files import atomic_open, atomic_write_text, temp_path


class Boom(RuntimeError):
    pass


def test_content_lands_byte_exact_and_folders_are_made(tmp_path):
    path = tmp_path / "a" / "b" / "note.txt"
    assert atomic_write_text(path, "line 1\r\nline 2\n\u00e9") == path
    assert path.read_bytes() == "line 1\r\nline 2\n\u00e9".encode()  # UTF-8, no newline translation
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    with atomic_open(tmp_path / "blob.bin", "wb") as fh:
        fh.write(b"\x00\xff")
    assert (tmp_path / "blob.bin").read_bytes() == b"\x00\xff"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["blob.bin", "note.txt"]


def test_a_failure_mid_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    with pytest.raises(Boom):
        with atomic_open(path) as fh:
            fh.write("half of the new")
            fh.flush()
            assert temp_path(path).read_text() == "half of the new"  # the write goes to the temp file
            assert path.read_text() == "old"
            raise Boom("disk gone")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failing_fsync_or_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    path.write_text("old")
    for target in ("fsync", "replace"):

        def fail(*args, target=target):
            raise Boom(target)

        with monkeypatch.context() as patch:
            patch.setattr(os, target, fail)
            with pytest.raises(Boom):
                atomic_write_text(path, "new")
        assert path.read_text() == "old", target
        assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"], target


def test_it_fsyncs_the_file_before_the_rename_and_the_folder_when_asked(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_text(path, "new")
    assert [e[0] for e in events] == ["fsync", "replace"]
    assert events[1] == ("replace", str(temp_path(path)), str(path))
    if os.path.exists("/proc/self/fd"):
        assert events[0][1] == str(temp_path(path))  # the temp file's data, before it becomes visible
    events.clear()
    atomic_write_text(path, "newer", sync_dir=True)
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    if os.path.exists("/proc/self/fd"):
        assert events[2][1] == str(tmp_path)
    assert path.read_text() == "newer"


def test_only_whole_file_modes(tmp_path):
    for mode in ("a", "r+", "x", "ab"):
        with pytest.raises(ValueError):
            with atomic_open(tmp_path / "x", mode):
                pass
    assert not list(tmp_path.iterdir())
    assert files.TEMP_SUFFIX == ".tmp" and temp_path(tmp_path / "x.ann").name == "x.ann.tmp"
