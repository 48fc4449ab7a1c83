"""Scanning a replicated folder and hashing its files."""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from sbs_core.sync import scan
from sbs_core.sync.paths import TEMP_PREFIX, check_wire_path
from sbs_core.sync.scan import (
    HASH_NAME,
    FileDigest,
    FileStat,
    ScanResult,
    hash_file,
    matches,
    new_hasher,
    scan_root,
)


def _tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


# -- matches ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("*", "anything.txt", True),
        ("*", "README", True),
        ("*.lab", "A.LAB", True),
        ("*.LAB", "a.lab", True),
        ("*.lab", "a.lab.bak", False),
        ("*.lab", "lab", False),
        ("*.*", "README", True),
        ("*.*", "a.b", True),
        ("*.*", ".profile", True),
        ("README.*", "readme", True),
        ("README.*", "README.md", True),
        ("README.*", "READMEX", False),
        ("report?.csv", "Report1.CSV", True),
        ("report?.csv", "report12.csv", False),
        ("[ab]*.ini", "B-settings.INI", True),
        ("[ab]*.ini", "c.ini", False),
        ("ÉTÉ.txt", "été.TXT", True),
    ],
)
def test_matches(pattern: str, name: str, expected: bool) -> None:
    assert matches(pattern, name) is expected


def test_filter_applies_to_the_name_not_the_folder() -> None:
    assert not matches("sub*", "file.txt")
    assert not matches("*/x.txt", "x.txt")


# -- scan_root --------------------------------------------------------------------


def test_each_folder_is_handed_over_as_soon_as_it_is_listed(tmp_path: Path) -> None:
    _tree(
        tmp_path,
        {
            "top.lab": b"1",
            "a/one.lab": b"22",
            "a/two.lab": b"333",
            "a/deeper/three.lab": b"4444",
            "b/four.lab": b"5",
            "b/skipped.txt": b"6",
        },
    )
    (tmp_path / "empty").mkdir()
    handed: list[list[str]] = []

    def on_folder(files: list[FileStat]) -> None:
        if not handed:
            # Called before the subfolders are listed: a file made now is found.
            (tmp_path / "b" / "late.lab").write_bytes(b"7")
        handed.append(sorted(f.path for f in files))

    result = scan_root(tmp_path, "*.lab", on_folder=on_folder)

    # One call per folder with files to replicate, each file exactly once.
    assert handed[0] == ["top.lab"]  # the root's own files, before any subfolder
    assert sorted(handed) == [
        ["a/deeper/three.lab"],
        ["a/one.lab", "a/two.lab"],
        ["b/four.lab", "b/late.lab"],
        ["top.lab"],
    ]
    assert sorted(p for folder in handed for p in folder) == sorted(result.files)


def test_scan_finds_nested_files(tmp_path: Path) -> None:
    _tree(
        tmp_path,
        {
            "top.lab": b"1",
            "README": b"22",
            "sub/A.LAB": b"333",
            "sub/deeper/more.Lab": b"4444",
            "sub/deeper/notes.txt": b"5",
        },
    )
    (tmp_path / "empty").mkdir()

    everything = scan_root(tmp_path, "*")
    assert set(everything.files) == {
        "top.lab",
        "README",
        "sub/A.LAB",
        "sub/deeper/more.Lab",
        "sub/deeper/notes.txt",
    }
    assert everything.complete
    assert everything.errors == []
    assert everything.unsendable == []
    stat = everything.files["sub/A.LAB"]
    on_disk = (tmp_path / "sub" / "A.LAB").stat()
    assert stat.path == "sub/A.LAB"
    assert (stat.size, stat.mtime_ns, stat.ino) == (3, on_disk.st_mtime_ns, on_disk.st_ino)

    labs = scan_root(tmp_path, "*.lab")
    assert set(labs.files) == {"top.lab", "sub/A.LAB", "sub/deeper/more.Lab"}

    dotted = scan_root(tmp_path, "*.*")
    assert set(dotted.files) == set(everything.files)


def test_scan_skips_symlinks(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    _tree(root, {"real.txt": b"x", "sub/inner.txt": b"y"})
    _tree(outside, {"secret.txt": b"s"})
    (root / "to-file").symlink_to(root / "real.txt")
    (root / "to-outside").symlink_to(outside, target_is_directory=True)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    (root / "dangling").symlink_to(tmp_path / "nowhere")

    result = scan_root(root, "*")
    assert set(result.files) == {"real.txt", "sub/inner.txt"}
    assert result.skipped_symlinks == 4
    assert result.complete


def test_scan_follows_a_linked_root(tmp_path: Path) -> None:
    _tree(tmp_path / "real", {"a.txt": b"x"})
    (tmp_path / "configured").symlink_to(tmp_path / "real", target_is_directory=True)
    assert set(scan_root(tmp_path / "configured", "*").files) == {"a.txt"}


def test_scan_ignores_temporary_files(tmp_path: Path) -> None:
    _tree(
        tmp_path,
        {
            f"{TEMP_PREFIX}abc": b"half",
            f"sub/{TEMP_PREFIX}settings.ini": b"half",
            "sub/settings.ini": b"whole",
        },
    )
    result = scan_root(tmp_path, "*")
    assert set(result.files) == {"sub/settings.ini"}
    assert result.unsendable == []
    assert result.complete


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_scan_reports_a_missing_root(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "share"
    if kind == "file":
        root.write_text("not a folder")
    result = scan_root(root, "*")
    assert result.missing
    assert not result.complete
    assert result.files == {}


def test_scan_empty_root_is_complete(tmp_path: Path) -> None:
    result = scan_root(tmp_path, "*")
    assert result == ScanResult()
    assert result.complete


def _failing_scandir(monkeypatch: pytest.MonkeyPatch, target: Path, error: OSError) -> None:
    real_scandir = os.scandir

    def scandir(path: Any) -> Any:
        if os.fspath(path) == os.fspath(target):
            raise error
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_scan_records_a_permission_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tree(tmp_path, {"ok/a.txt": b"a", "locked/b.txt": b"b", "c.txt": b"c"})
    locked = tmp_path / "locked"
    _failing_scandir(
        monkeypatch, locked, PermissionError(errno.EACCES, "Permission denied", str(locked))
    )

    result = scan_root(tmp_path, "*")
    assert set(result.files) == {"ok/a.txt", "c.txt"}
    assert not result.complete
    assert not result.missing
    [error] = result.errors
    assert str(locked) in error
    assert "Permission denied" in error


def test_scan_records_a_folder_vanishing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tree(tmp_path, {"gone/a.txt": b"a", "b.txt": b"b"})
    gone = tmp_path / "gone"
    _failing_scandir(monkeypatch, gone, FileNotFoundError(errno.ENOENT, "No such file", str(gone)))
    result = scan_root(tmp_path, "*")
    assert set(result.files) == {"b.txt"}
    assert not result.complete
    [error] = result.errors
    assert str(gone) in error
    assert "vanished" in error


class _BrokenListing:
    """A listing that yields its first entries, then fails like a dying disk."""

    def __init__(self, entries: list[os.DirEntry[str]]) -> None:
        self._entries = entries

    def __enter__(self) -> Iterator[os.DirEntry[str]]:
        yield from self._entries
        raise OSError(errno.EIO, "Input/output error")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


def test_scan_records_an_io_error_mid_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tree(tmp_path, {"a.txt": b"a"})
    real_scandir = os.scandir

    def scandir(path: Any) -> Any:
        with real_scandir(path) as entries:
            return _BrokenListing(list(entries))

    monkeypatch.setattr(os, "scandir", scandir)
    result = scan_root(tmp_path, "*")
    assert set(result.files) == {"a.txt"}
    assert not result.complete
    [error] = result.errors
    assert "Input/output error" in error


def test_scan_records_a_stat_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A DirEntry cannot be patched, so the scanner is given a folder whose
    # listing yields entries that fail to stat.
    _tree(tmp_path, {"a.txt": b"a", "b.txt": b"b"})
    real_scandir = os.scandir

    class FailingEntry:
        def __init__(self, entry: os.DirEntry[str]) -> None:
            self._entry = entry
            self.name = entry.name
            self.path = entry.path

        def __getattr__(self, name: str) -> Any:
            return getattr(self._entry, name)

        def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
            if self.name == "b.txt":
                raise OSError(errno.EIO, "Input/output error")
            return self._entry.stat(follow_symlinks=follow_symlinks)

    class Listing:
        def __init__(self, path: Any) -> None:
            with real_scandir(path) as entries:
                self._entries = [FailingEntry(e) for e in entries]

        def __enter__(self) -> Iterator[FailingEntry]:
            return iter(self._entries)

        def __exit__(self, *exc: object) -> None:
            return None

    monkeypatch.setattr(os, "scandir", Listing)
    result = scan_root(tmp_path, "*")
    assert set(result.files) == {"a.txt"}
    assert not result.complete
    [error] = result.errors
    assert "b.txt" in error
    assert "Input/output error" in error


@pytest.mark.parametrize(
    "name",
    ["con.txt", "a:b", "ends-with-dot.", "trailing space ", "LPT1", "what?.txt", "tab\tname"],
)
def test_unsendable_names_do_not_make_the_scan_incomplete(tmp_path: Path, name: str) -> None:
    try:
        _tree(tmp_path, {f"sub/{name}": b"x", "good.txt": b"y"})
    except OSError:
        pytest.skip(f"this file system cannot hold {name!r}")
    result = scan_root(tmp_path, "*")
    assert set(result.files) == {"good.txt"}
    [line] = result.unsendable
    assert "not replicated" in line
    assert result.errors == []
    assert result.complete


def test_names_only_windows_refuses_can_be_sent_between_posix_nodes(tmp_path: Path) -> None:
    _tree(tmp_path, {"what?.txt": b"x"})
    assert set(scan_root(tmp_path, "*", windows=False).files) == {"what?.txt"}
    assert set(scan_root(tmp_path, "*").files) == set()


def test_folder_with_unsendable_name_is_not_entered(tmp_path: Path) -> None:
    _tree(tmp_path, {"aux/a.txt": b"x", "b.txt": b"y"})
    result = scan_root(tmp_path, "*")
    assert set(result.files) == {"b.txt"}
    [line] = result.unsendable
    assert "aux" in line
    assert result.complete


@pytest.mark.skipif(sys.platform != "linux", reason="only Linux stores names that are not UTF-8")
def test_undecodable_name_is_unsendable(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_text("x")
    with open(os.path.join(os.fsencode(tmp_path), b"bad\xff.txt"), "wb") as file:
        file.write(b"x")
    result = scan_root(tmp_path, "*")
    assert set(result.files) == {"ok.txt"}
    [line] = result.unsendable
    assert "surrogate" in line
    line.encode("utf-8")  # safe to log
    assert result.complete


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_special_files_are_unsendable(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    os.mkfifo(tmp_path / "pipe.skipped-by-filter")
    result = scan_root(tmp_path, "pipe")
    assert result.files == {}
    [line] = result.unsendable
    assert "not a regular file" in line
    assert result.complete


def test_everything_scanned_passes_the_wire_check(tmp_path: Path) -> None:
    names = ["a.txt", "ü/ß.ini", ".hidden/x", "a b/c d", "x..y/z", "con-fig", "LPT10.txt"]
    _tree(tmp_path, dict.fromkeys(names, b"x"))
    result = scan_root(tmp_path, "*")
    assert set(result.files) == set(names)
    for path in result.files:
        check_wire_path(path, windows=True)


def test_scan_many_files(tmp_path: Path) -> None:
    for folder in range(20):
        sub = tmp_path / f"d{folder}"
        sub.mkdir()
        for index in range(100):
            (sub / f"f{index}.dat").write_bytes(b"")
    result = scan_root(tmp_path, "*.dat")
    assert len(result.files) == 2000
    assert result.complete


# -- hash_file ----------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=5000), chunk_size=st.integers(min_value=1, max_value=2048))
def test_hash_matches_xxh3_128(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, chunk_size: int
) -> None:
    path = tmp_path_factory.mktemp("hash") / "f"
    path.write_bytes(data)
    found = hash_file(path, chunk_size=chunk_size)
    assert found is not None
    assert found.digest == xxhash.xxh3_128(data).hexdigest()
    assert found.size == len(data)
    assert found.mtime_ns == path.stat().st_mtime_ns


def test_hash_big_file_default_chunks(tmp_path: Path) -> None:
    data = os.urandom((1 << 20) * 2 + 12345)
    path = tmp_path / "big"
    path.write_bytes(data)
    assert hash_file(path) == FileDigest(
        xxhash.xxh3_128(data).hexdigest(), len(data), path.stat().st_mtime_ns
    )


def test_hash_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    found = hash_file(path)
    assert found is not None
    assert found.digest == xxhash.xxh3_128(b"").hexdigest()
    assert found.size == 0


class _MeddlingHasher:
    """Hashes like the real one, but lets a test touch the file after the first chunk."""

    def __init__(self, meddle: Any) -> None:
        self._real = xxhash.xxh3_128()
        self._meddle = meddle
        self.updates = 0

    def update(self, data: Any) -> None:
        self.updates += 1
        if self.updates == 1:
            self._meddle()
        self._real.update(data)

    def hexdigest(self) -> str:
        return self._real.hexdigest()


def test_hash_returns_none_when_the_file_grows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "growing"
    path.write_bytes(b"x" * 100)

    def append() -> None:
        with path.open("ab") as file:
            file.write(b"more")

    hasher = _MeddlingHasher(append)
    monkeypatch.setattr(scan, "new_hasher", lambda: hasher)
    assert hash_file(path, chunk_size=10) is None
    assert hasher.updates > 1


def test_hash_returns_none_when_the_mtime_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "touched"
    path.write_bytes(b"x" * 100)
    mtime_ns = path.stat().st_mtime_ns

    def touch() -> None:
        os.utime(path, ns=(mtime_ns, mtime_ns + 1_000_000_000))

    monkeypatch.setattr(scan, "new_hasher", lambda: _MeddlingHasher(touch))
    assert hash_file(path, chunk_size=10) is None


def test_hash_returns_none_when_the_file_shrinks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "shrinking"
    path.write_bytes(b"x" * 100)
    mtime_ns = path.stat().st_mtime_ns

    def truncate_keep_mtime() -> None:
        os.truncate(path, 50)
        os.utime(path, ns=(mtime_ns, mtime_ns))

    monkeypatch.setattr(scan, "new_hasher", lambda: _MeddlingHasher(truncate_keep_mtime))
    assert hash_file(path, chunk_size=10) is None


def test_hash_does_not_follow_symlinks(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    if not hasattr(os, "O_NOFOLLOW"):
        pytest.skip("this OS has no O_NOFOLLOW")
    with pytest.raises(OSError, match=re.escape(os.strerror(errno.ELOOP))) as caught:
        hash_file(tmp_path / "link")
    assert caught.value.errno == errno.ELOOP


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_hash_of_a_fifo_is_none_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    assert hash_file(tmp_path / "pipe") is None


@pytest.mark.skipif(sys.platform == "win32", reason="Windows does not open a folder as a file")
def test_hash_of_a_folder_is_none(tmp_path: Path) -> None:
    # A folder where a file was expected (in the way of a received file) is no
    # file to hash; an error here once failed the receiver's whole cycle.
    (tmp_path / "folder").mkdir()
    assert hash_file(tmp_path / "folder") is None


def test_hash_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        hash_file(tmp_path / "nope")


def test_hash_rejects_bad_chunk_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        hash_file(tmp_path, chunk_size=0)


def test_new_hasher_hashes_streams_like_hash_file(tmp_path: Path) -> None:
    data = b"streamed " * 1000
    path = tmp_path / "f"
    path.write_bytes(data)
    hasher = new_hasher()
    for start in range(0, len(data), 777):
        hasher.update(data[start : start + 777])
    found = hash_file(path)
    assert found is not None
    assert hasher.hexdigest() == found.digest
    assert HASH_NAME == "xxh3-128"
    assert hasher.digest_size == 16
