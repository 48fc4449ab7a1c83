"""A folder's listing kept current from the paths file events name (sync.listing)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sbs_core.messages import RootSpec
from sbs_core.sync import listing as listing_module
from sbs_core.sync.listing import FolderListing, look, still_absent
from sbs_core.sync.paths import STAGING_PREFIX, TEMP_PREFIX
from sbs_core.sync.roots import LocalRoot
from sbs_core.sync.scan import ScanResult, scan_root


def make_root(tmp_path: Path, pattern: str = "*") -> LocalRoot:
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    return LocalRoot(spec=RootSpec(id="data", path="data", filter=pattern), path=folder)


def write(root: LocalRoot, *names: str, data: bytes = b"x") -> None:
    for name in names:
        path = root.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def listed(root: LocalRoot) -> FolderListing:
    kept = FolderListing(root)
    kept.list()
    return kept


def current(kept: FolderListing) -> ScanResult:
    scan = kept.refresh()
    assert scan is not None, kept.broken
    return scan


def test_the_noted_paths_bring_the_listing_to_what_a_scan_finds(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    write(root, "a.txt", "b.txt", "old/x.txt", "old/deep/y.txt", "swap")
    kept = listed(root)
    assert set(current(kept).files) == {"a.txt", "b.txt", "old/x.txt", "old/deep/y.txt", "swap"}

    write(root, "a.txt", data=b"longer now")  # changed
    (root.path / "b.txt").unlink()  # deleted
    (root.path / "old").rename(tmp_path / "old")  # a folder moved away: one event, no more
    (root.path / "swap").unlink()  # a file become a folder
    write(root, "swap/inside.txt", "new/deep/z.txt", "c.txt")
    assert kept.note(["a.txt", "b.txt", "old", "swap", "new", "c.txt"]) == 6
    assert kept.pending

    scan = current(kept)
    assert not kept.pending
    found = scan_root(root.path, "*").files
    assert scan.files == found
    assert scan.files["a.txt"].size == len(b"longer now")


def test_paths_no_scan_would_list_stay_out(tmp_path: Path) -> None:
    root = make_root(tmp_path, "*.lab")
    kept = listed(root)
    write(root, "label.lab", "note.txt", f"{TEMP_PREFIX}label.lab", f"{STAGING_PREFIX}x/in.lab")
    write(root, "bad:name.lab")  # a name Windows cannot store
    os.symlink(root.path / "label.lab", root.path / "link.lab")
    os.mkfifo(root.path / "pipe.lab")
    names = ["label.lab", "note.txt", f"{TEMP_PREFIX}label.lab", f"{STAGING_PREFIX}x"]
    kept.note([*names, f"{STAGING_PREFIX}x/in.lab", "bad:name.lab", "link.lab", "pipe.lab"])

    scan = current(kept)
    assert set(scan.files) == {"label.lab"}
    assert sorted(scan.unsendable) == sorted(scan_root(root.path, "*.lab").unsendable)
    assert len(scan.unsendable) == 2  # the name and the FIFO


def test_a_path_noted_again_and_again_is_looked_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_root(tmp_path)
    kept = listed(root)
    write(root, "a.txt")
    looked: list[str] = []

    def counted(at: LocalRoot, name: str) -> listing_module.Look:
        looked.append(name)
        return look(at, name)

    monkeypatch.setattr(listing_module, "look", counted)
    for _ in range(3):
        kept.note(["a.txt"])
    assert set(current(kept).files) == {"a.txt"}
    assert looked == ["a.txt"]
    assert set(current(kept).files) == {"a.txt"}  # nothing noted since: nothing looked at
    assert looked == ["a.txt"]


def test_a_folder_replaced_is_no_longer_trusted(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    write(root, "a.txt")
    kept = listed(root)
    root.path.rename(tmp_path / "away")
    root.path.mkdir()
    assert kept.refresh() is None
    assert kept.broken == f"{root.path} is no longer the folder listed"
    assert kept.refresh() is None  # and never again


def test_a_missing_folder_is_never_trusted(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    root.path.rmdir()
    kept = listed(root)
    assert kept.listed
    assert kept.refresh() is None
    assert kept.broken == f"{root.path} is missing"


def test_a_listing_never_made_gives_nothing(tmp_path: Path) -> None:
    kept = FolderListing(make_root(tmp_path))
    assert not kept.listed
    assert kept.refresh() is None
    assert kept.broken is None


def test_a_changed_path_that_cannot_be_read_breaks_the_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_root(tmp_path)
    write(root, "a.txt", "sub/b.txt")
    kept = listed(root)

    def unreadable(folder: Path, pattern: str, **kw: object) -> ScanResult:
        return ScanResult(errors=[f"cannot list folder {folder}: permission denied"])

    monkeypatch.setattr(listing_module, "scan_root", unreadable)
    kept.note(["sub"])
    assert kept.refresh() is None
    assert kept.broken == f"cannot list folder {root.path / 'sub'}: permission denied"


def test_still_absent_looks_at_the_disk(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    write(root, "here.txt", "folder/inside.txt")
    absent, present = still_absent(root, ["here.txt", "gone.txt", "folder", "here.txt/under"])
    assert absent == ["gone.txt", "here.txt/under"]
    assert present == ["here.txt", "folder"]
