"""chronosd.methodcache: dataclass methods compiled once, read back on later starts."""

from __future__ import annotations

import dataclasses
import inspect
import marshal
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from chronosd.methodcache import (
    HEADER,
    cache_path,
    generated_methods_cached,
    read_cache,
    write_cache,
)


@pytest.fixture(autouse=True)
def writes_bytecode(monkeypatch: pytest.MonkeyPatch) -> None:
    """As a production start does (the test runner may run with PYTHONDONTWRITEBYTECODE)."""
    monkeypatch.setattr(sys, "dont_write_bytecode", False)


def make_value(field_name: str = "when") -> type[Any]:
    """A frozen dataclass exercising every generated method (built fresh on each call)."""
    namespace: dict[str, Any] = {
        "__annotations__": {
            "name": "str",
            field_name: "int",
            "tags": "tuple[str, ...]",
            "notes": "list[str]",
        },
        field_name: 0,
        "tags": (),
        "notes": dataclasses.field(default_factory=list, compare=False),
        "__doc__": "A value.",
        "__module__": __name__,
    }
    cls = type("Value", (), namespace)
    return dataclasses.dataclass(frozen=True)(cls)


def check_behaves_like_a_frozen_dataclass(cls: type[Any], field_name: str = "when") -> None:
    a = cls("backup", 3, ("x",))
    b = cls(name="backup", **{field_name: 3}, tags=("x",), notes=["ignored by eq"])
    assert a == b and hash(a) == hash(b)
    assert a != cls("backup", 4)
    assert getattr(cls("n"), field_name) == 0 and cls("n").notes == []
    assert cls("n").notes is not cls("n").notes  # default_factory runs per instance
    assert repr(a) == f"Value(name='backup', {field_name}=3, tags=('x',), notes=[])"
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.name = "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        del a.name
    assert dataclasses.replace(a, name="other").name == "other"
    assert [f.name for f in dataclasses.fields(cls)] == ["name", field_name, "tags", "notes"]
    with pytest.raises(TypeError):
        cls()


def test_a_second_block_runs_the_cached_code_and_writes_nothing(tmp_path: Path) -> None:
    with generated_methods_cached(tmp_path) as first:
        cls = make_value()
    assert not cache_path(tmp_path).exists()  # written by save(), not by the block
    assert first.save() and not first.save()  # once
    check_behaves_like_a_frozen_dataclass(cls)
    assert first.compiled >= 6 and first.hits == 0 and first.written
    stamp = cache_path(tmp_path).stat().st_mtime_ns

    with generated_methods_cached(tmp_path) as second:
        cached_cls = make_value()
    check_behaves_like_a_frozen_dataclass(cached_cls)
    assert not second.save()
    assert (second.compiled, second.hits, second.written) == (0, first.compiled, False)
    assert cache_path(tmp_path).stat().st_mtime_ns == stamp
    assert cache_path(tmp_path).stat().st_mode & 0o777 == 0o600


def test_cached_methods_equal_freshly_compiled_ones(tmp_path: Path) -> None:
    plain = make_value()
    with generated_methods_cached(tmp_path) as first:
        make_value()
    first.save()
    with generated_methods_cached(tmp_path) as stats:
        cached = make_value()
    assert stats.hits and not stats.compiled
    for name in ("__init__", "__repr__", "__eq__", "__hash__", "__setattr__", "__delattr__"):
        # __repr__ is wrapped (a guard against recursion); compare what it wraps.
        ours = inspect.unwrap(getattr(cached, name))
        theirs = inspect.unwrap(getattr(plain, name))
        assert ours.__code__.co_code == theirs.__code__.co_code, name
        assert ours.__code__.co_filename == theirs.__code__.co_filename == "<string>"
        assert ours.__qualname__ == theirs.__qualname__, name
    # No future flags leak in: the annotations are the objects, as exec(source) makes them.
    assert inspect.signature(cached.__init__) == inspect.signature(plain.__init__)
    assert cached.__init__.__annotations__["name"] == "str"  # the class's own string
    assert cached.__init__.__annotations__["return"] is None


def test_the_source_text_is_the_key(tmp_path: Path) -> None:
    with generated_methods_cached(tmp_path) as first:
        make_value("when")
    first.save()
    with generated_methods_cached(tmp_path) as stats:
        other = make_value("until")  # other field, other text: compiled, not served
    assert stats.compiled >= 3 and stats.save()
    check_behaves_like_a_frozen_dataclass(other, "until")
    assert len(read_cache(cache_path(tmp_path))) > stats.compiled  # both kept


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage",
        HEADER[:-1] + b"\x00",  # another interpreter's bytecode
        HEADER + b"\xff\x00",  # damaged body
        HEADER + marshal.dumps(["not", "a", "dict"]),
        HEADER + marshal.dumps({"def f(): pass": "not code", 3: compile("x", "s", "eval")}),
    ],
)
def test_a_foreign_or_damaged_file_is_ignored_and_replaced(tmp_path: Path, content: bytes) -> None:
    path = cache_path(tmp_path)
    path.write_bytes(content)
    path.chmod(0o600)
    assert read_cache(path) == {}
    with generated_methods_cached(tmp_path) as stats:
        cls = make_value()
    check_behaves_like_a_frozen_dataclass(cls)
    assert stats.hits == 0 and stats.compiled and stats.save()
    assert len(read_cache(path)) == stats.compiled


def test_a_file_others_could_write_is_not_read(tmp_path: Path) -> None:
    with generated_methods_cached(tmp_path) as methods:
        make_value()
    methods.save()
    path = cache_path(tmp_path)
    assert read_cache(path)
    path.chmod(0o620)
    assert read_cache(path) == {}
    path.chmod(0o602)
    assert read_cache(path) == {}
    path.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(path)
    assert read_cache(link) == {}
    hard = tmp_path / "hard"
    os.link(path, hard)
    assert read_cache(path) == {} and read_cache(hard) == {}
    hard.unlink()
    assert read_cache(path)
    tmp_path.chmod(0o770)  # a directory others can write: they could have put it there
    try:
        assert read_cache(path) == {}
    finally:
        tmp_path.chmod(0o700)
    assert read_cache(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_a_file_of_another_user_is_not_read(tmp_path: Path) -> None:
    with generated_methods_cached(tmp_path) as methods:
        make_value()
    methods.save()
    path = cache_path(tmp_path)
    os.chown(path, 12345, 12345)
    assert read_cache(path) == {}


def test_nothing_is_written_under_dont_write_bytecode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    with generated_methods_cached(tmp_path) as stats:
        check_behaves_like_a_frozen_dataclass(make_value())
    assert stats.compiled and not stats.save() and not stats.written
    assert not cache_path(tmp_path).exists()


def test_an_unwritable_place_is_no_error(tmp_path: Path) -> None:
    missing = tmp_path / "not-yet"
    with generated_methods_cached(missing) as stats:
        check_behaves_like_a_frozen_dataclass(make_value())
    assert stats.compiled and not stats.save() and not stats.written
    assert list(tmp_path.iterdir()) == []
    assert not write_cache(missing / "x", {})


def test_dataclasses_is_left_as_it_was_even_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), generated_methods_cached(tmp_path) as failed:
        assert "exec" in vars(dataclasses)
        make_value()
        raise RuntimeError("boom")
    assert "exec" not in vars(dataclasses)
    assert failed.save()  # what was compiled before the error can still be kept
    with generated_methods_cached(tmp_path) as outer:
        with generated_methods_cached(tmp_path / "elsewhere") as inner:
            make_value()
        assert "exec" in vars(dataclasses)  # the inner block left the outer one's hook alone
    assert "exec" not in vars(dataclasses)
    assert (inner.hits, inner.compiled) == (0, 0) and outer.hits


def test_other_exec_calls_pass_through(tmp_path: Path) -> None:
    with generated_methods_cached(tmp_path):
        hook = vars(dataclasses)["exec"]
        namespace: dict[str, Any] = {}
        hook(compile("x = 1", "<test>", "exec"), namespace)
        hook("y = 2", namespace, None, closure=None)
        assert namespace["x"] == 1 and namespace["y"] == 2
