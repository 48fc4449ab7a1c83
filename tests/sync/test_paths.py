"""Paths from the peer: one case per rule, then properties over generated paths."""

from __future__ import annotations

import os
import string
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sbs_core.errors import RemoteProtocolError
from sbs_core.sync.paths import (
    MAX_COMPONENT_BYTES,
    MAX_PATH_BYTES,
    TEMP_PREFIX,
    UnsafePathError,
    _broken_component_rule,
    _broken_path_rule,
    _path_problem,
    check_wire_path,
    component_problem,
    resolve_inside,
)

ACCEPTED = [
    "a",
    "a/b/c.txt",
    "settings.ini",
    ".hidden",
    "..dots-first",
    "a..b",
    "name with spaces/x y.lab",
    "Ünïcödé/日本語.txt",
    "emoji-\U0001f600",
    "CONSOLE",
    "con-fig.txt",
    "COM10",
    "LPT0",
    "xcon",
    "aux_files/a",
    "a/.sbs-tmp-folder/file",
    f"x{TEMP_PREFIX}",
    "é" * 127,
    "a" * 255,
    "/".join(["a" * 255] * 16),
]

# (path, a word of the reason the message must give)
REFUSED = [
    ("", "empty"),
    ("/etc/passwd", "absolute"),
    ("/", "absolute"),
    ("a\\b", "backslash"),
    ("..\\x", "backslash"),
    ("a//b", "empty component"),
    ("a/", "empty component"),
    ("./a", "'.'"),
    ("a/.", "'.'"),
    ("..", "'..'"),
    ("a/../b", "'..'"),
    ("a/..", "'..'"),
    ("a\x00b", "control"),
    ("a\nb", "control"),
    ("a\x1fb", "control"),
    ("a\x7fb", "control"),
    ("C:", "drive letter"),
    ("C:/Windows", "drive letter"),
    ("c:x", "drive letter"),
    ("file.txt:secret", "stream"),
    ("CON", "device"),
    ("con", "device"),
    ("a/Nul", "device"),
    ("con.txt", "device"),
    ("COM1.tar.gz", "device"),
    ("lpt9.x", "device"),
    ("COM\u00b9", "device"),
    ("lpt\u00b3.txt", "device"),
    ("AUX", "device"),
    ("prn.log", "device"),
    ("con .txt", "device"),
    ("conin$", "device"),
    ("a.", "dot or a space"),
    ("a/b ", "dot or a space"),
    ("dir./x", "dot or a space"),
    ("a" * 256, "longer than 255"),
    ("é" * 128, "longer than 255"),
    ("/".join(["a" * 255] * 17), "longer than 4096"),
    ("a\udc80b", "surrogate"),
    ("\ud800", "surrogate"),
    (f"a/{TEMP_PREFIX}123", "temporary"),
    (TEMP_PREFIX, "temporary"),
]

WINDOWS_ONLY = ["a<b", "a>b", 'a"b', "a|b", "a?b", "a*b"]


@pytest.mark.parametrize("path", ACCEPTED)
@pytest.mark.parametrize("windows", [False, True])
def test_accepted(path: str, windows: bool) -> None:
    assert check_wire_path(path, windows=windows) == PurePosixPath(path)
    assert check_wire_path(path, windows=windows).as_posix() == path


@pytest.mark.parametrize(("path", "reason"), REFUSED)
@pytest.mark.parametrize("windows", [False, True])
def test_refused_with_reason(path: str, reason: str, windows: bool) -> None:
    with pytest.raises(UnsafePathError) as caught:
        check_wire_path(path, windows=windows)
    assert reason in str(caught.value)
    assert caught.value.path == path
    assert caught.value.reason is not None
    assert reason in caught.value.reason


@pytest.mark.parametrize("path", WINDOWS_ONLY)
def test_windows_characters(path: str) -> None:
    assert check_wire_path(path, windows=False).as_posix() == path
    with pytest.raises(UnsafePathError, match="Windows does not allow"):
        check_wire_path(path, windows=True)


def test_error_kinds_and_message() -> None:
    with pytest.raises(UnsafePathError) as caught:
        check_wire_path("a/../" + "x" * 10_000)
    error = caught.value
    assert isinstance(error, RemoteProtocolError)
    assert isinstance(error, ValueError)
    # The path is quoted and cut: a hostile path cannot flood a log.
    assert str(error).startswith("unsafe path 'a/../xxx")
    assert len(str(error)) < 300
    assert "10005 characters" in str(error)


def test_error_with_a_message_only() -> None:
    error = UnsafePathError("root 'x' overlaps the state directory")
    assert str(error) == "root 'x' overlaps the state directory"
    assert error.path is None
    assert error.reason is None


def test_surrogate_is_shown_escaped() -> None:
    with pytest.raises(UnsafePathError) as caught:
        check_wire_path("bad\udcff")
    str(caught.value).encode("utf-8")  # safe to log


# -- properties ---------------------------------------------------------------

ROOT_ENTRIES = ("sub", "sub/deeper", "file")

component = st.one_of(
    st.sampled_from(
        ["sub", "deeper", "file", "link", "inlink", "..", ".", "", "con", "C:", "a\\..", " "]
    ),
    st.text(min_size=0, max_size=12),
)
wire_path = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda lead, parts: lead + "/".join(parts),
        st.sampled_from(["", "", "/"]),
        st.lists(component, min_size=1, max_size=6),
    ),
)


@pytest.fixture(scope="module")
def populated_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with folders, a file, and links that lead outside and inside."""
    base = tmp_path_factory.mktemp("property")
    root = base / "root"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "file").write_text("x")
    (base / "outside").mkdir()
    (root / "link").symlink_to(base / "outside", target_is_directory=True)
    (root / "sub" / "inlink").symlink_to(root / "sub", target_is_directory=True)
    return root


@given(path=wire_path, windows=st.booleans())
@example(path="link/x", windows=False)
@example(path="sub/inlink/x", windows=False)
@example(path="file/x", windows=False)
@example(path="sub/deeper/new/x", windows=False)
def test_accepted_paths_stay_inside_the_root(
    populated_root: Path, path: str, windows: bool
) -> None:
    try:
        rel = check_wire_path(path, windows=windows)
    except UnsafePathError:
        return
    real_root = Path(os.path.realpath(populated_root))
    try:
        target = resolve_inside(populated_root, rel)
    except UnsafePathError:
        # Only what lies on the disk (a link or a file on the way) may refuse it now.
        assert {"link", "inlink", "file"} & set(rel.parts[:-1])
        return
    assert target.is_absolute()
    assert real_root in target.parents
    assert target.relative_to(real_root).as_posix() == path
    assert Path(os.path.realpath(target.parent)).is_relative_to(real_root)


def _device_name() -> st.SearchStrategy[str]:
    base = st.sampled_from(
        ["CON", "PRN", "AUX", "NUL", *(f"{p}{d}" for p in ("COM", "LPT") for d in "123456789¹²³")]
    )
    random_case = st.builds(
        lambda name, flips: "".join(
            c.lower() if flip else c for c, flip in zip(name, flips, strict=False)
        ),
        base,
        st.lists(st.booleans(), min_size=4, max_size=4),
    )
    extension = st.text(alphabet=string.ascii_letters + string.digits + ".", max_size=8).filter(
        lambda ext: not ext.endswith(".")
    )
    return st.builds(lambda name, ext: f"{name}.{ext}" if ext else name, random_case, extension)


def _insert(text: str, at: int, piece: str) -> str:
    at %= len(text) + 1
    return text[:at] + piece + text[at:]


@st.composite
def hostile_path(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.text(max_size=10), min_size=1, max_size=5))
    kind = draw(st.sampled_from(["dotdot", "absolute", "backslash", "nul", "drive", "device"]))
    at = draw(st.integers(min_value=0, max_value=1000))
    joined = "/".join(parts)
    if kind == "dotdot":
        parts.insert(at % (len(parts) + 1), "..")
        return "/".join(parts)
    if kind == "absolute":
        return "/" + joined
    if kind == "backslash":
        return _insert(joined, at, "\\")
    if kind == "nul":
        return _insert(joined, at, "\x00")
    if kind == "drive":
        letter = draw(st.sampled_from(string.ascii_letters))
        separator = draw(st.sampled_from(["", "/", "\\"]))
        return f"{letter}:{separator}{joined}"
    parts.insert(at % (len(parts) + 1), draw(_device_name()))
    return "/".join(parts)


@given(path=hostile_path(), windows=st.booleans())
def test_hostile_paths_are_refused(path: str, windows: bool) -> None:
    with pytest.raises(UnsafePathError):
        check_wire_path(path, windows=windows)


@given(path=st.text(max_size=30))
def test_windows_mode_only_adds_refusals(path: str) -> None:
    try:
        check_wire_path(path, windows=True)
    except UnsafePathError:
        return
    check_wire_path(path, windows=False)


# The one-match shortcut for plain names must agree with the rules one by one.
tricky_piece = st.one_of(
    st.sampled_from(
        [
            "a",
            "Z",
            "0",
            ".",
            "..",
            " ",
            "/",
            "\\",
            ":",
            "$",
            "<",
            "*",
            "\x00",
            "\x7f",
            "é",
            "¹",
            "\u212a",
            "\u017f",
            "CON",
            "con",
            "CONIN$",
            "conout$",
            "Lpt1",
            "COM0",
            "aux",
            "NUL ",
            TEMP_PREFIX,
            "x" * 250,
        ]
    ),
    st.text(max_size=6),
)
tricky_path = st.lists(tricky_piece, max_size=12).map("".join)


@given(path=tricky_path, windows=st.booleans())
@example(path="a" * MAX_COMPONENT_BYTES, windows=False)
@example(path="a" * (MAX_COMPONENT_BYTES + 1), windows=False)
@example(path="/".join(["a" * 200] * 21), windows=False)
@example(path="d/" + TEMP_PREFIX + "x", windows=False)
@example(path="com1 .txt/x", windows=True)
@example(path="a/Con/b", windows=False)
@example(path="LPT9", windows=False)
def test_the_plain_path_shortcut_agrees_with_every_rule(path: str, windows: bool) -> None:
    assert _path_problem(path, windows=windows) == _broken_path_rule(path, windows=windows)
    name = path.rpartition("/")[2]
    assert component_problem(name, windows=windows) == _broken_component_rule(name, windows=windows)
    if len(path) > MAX_PATH_BYTES:
        assert _path_problem(path, windows=windows) is not None


# -- resolve_inside -------------------------------------------------------------


def test_resolve_plain(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    target = resolve_inside(tmp_path, PurePosixPath("a/new/file.txt"))
    assert target == Path(os.path.realpath(tmp_path)) / "a" / "new" / "file.txt"


def test_resolve_refuses_symlinked_parent_pointing_outside(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        resolve_inside(root, PurePosixPath("escape/passwd"))
    with pytest.raises(UnsafePathError, match="symbolic link"):
        resolve_inside(root, PurePosixPath("escape/deeper/passwd"))
    assert not any(outside.iterdir())


def test_resolve_refuses_symlinked_parent_pointing_inside(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        resolve_inside(tmp_path, PurePosixPath("alias/x"))


def test_resolve_refuses_a_file_on_the_way(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("x")
    with pytest.raises(UnsafePathError, match="not a folder"):
        resolve_inside(tmp_path, PurePosixPath("a/b"))


def test_resolve_allows_a_linked_root(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "configured").symlink_to(tmp_path / "real", target_is_directory=True)
    target = resolve_inside(tmp_path / "configured", PurePosixPath("x/y"))
    assert target == Path(os.path.realpath(tmp_path / "real")) / "x" / "y"


def test_resolve_leaves_the_target_itself_alone(tmp_path: Path) -> None:
    # The writer renames over the target, which replaces a link rather than following it.
    (tmp_path / "f").symlink_to("/etc/passwd")
    assert resolve_inside(tmp_path, PurePosixPath("f")) == Path(os.path.realpath(tmp_path)) / "f"


@pytest.mark.parametrize("rel", ["a/../../x", "/etc/passwd", "..", ".sbs-tmp-1", "con"])
def test_resolve_checks_the_path_again(tmp_path: Path, rel: str) -> None:
    with pytest.raises(UnsafePathError):
        resolve_inside(tmp_path, PurePosixPath(rel))


def test_resolve_with_missing_root(tmp_path: Path) -> None:
    target = resolve_inside(tmp_path / "not-yet", PurePosixPath("a/b"))
    assert target == Path(os.path.realpath(tmp_path)) / "not-yet" / "a" / "b"
