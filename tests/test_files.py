"""The atomic folder writer: a folder is swapped in whole or not at all, and concurrent cache builds agree."""

import threading

import pytest

from modelrecon.errors import BadInputError
from modelrecon.files import atomic_folder


def _siblings(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


def test_success_swaps_the_folder_in(tmp_path):
    target = tmp_path / "out"
    with atomic_folder(target) as temp:
        assert temp.parent == tmp_path and temp != target and not target.exists()  # built beside, not in place
        (temp / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new"
    assert _siblings(tmp_path) == ["out"]  # no temporary or old folder left


def test_an_existing_folder_is_replaced(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with atomic_folder(target) as temp:
        assert (target / "stale.txt").read_text() == "old"  # the old folder stays until the new one is complete
        (temp / "a.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert _siblings(tmp_path) == ["out"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_error_leaves_the_old_folder_and_no_temp(tmp_path, error):
    target = tmp_path / "out"
    target.mkdir()
    (target / "kept.txt").write_text("old")
    with pytest.raises(type(error)), atomic_folder(target) as temp:
        (temp / "half.txt").write_text("half")
        raise error
    assert sorted(p.name for p in target.iterdir()) == ["kept.txt"]
    assert (target / "kept.txt").read_text() == "old"
    assert _siblings(tmp_path) == ["out"]


def test_an_error_with_no_old_folder_leaves_nothing(tmp_path):
    with pytest.raises(ValueError), atomic_folder(tmp_path / "out") as temp:
        (temp / "half.txt").write_text("half")
        raise ValueError
    assert _siblings(tmp_path) == []


def test_an_unwritable_parent_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInputError, match=r"cannot write '.*file/out': .*; choose a writable folder"):
        with atomic_folder(tmp_path / "file" / "out"):
            pass


def test_shared_cache_keeps_the_finished_folder_of_another_process(tmp_path):
    target = tmp_path / "cache"
    with atomic_folder(target, shared="done") as temp:
        (temp / "done").write_text("ours")
        target.mkdir()  # another process finishes first
        (target / "done").write_text("theirs")
    assert (target / "done").read_text() == "theirs"
    assert _siblings(tmp_path) == ["cache"]


def test_shared_cache_replaces_an_unfinished_folder(tmp_path):
    target = tmp_path / "cache"
    target.mkdir()
    (target / "partial").write_text("left by a killed process")
    with atomic_folder(target, shared="done") as temp:
        (temp / "done").write_text("ours")
    assert sorted(p.name for p in target.iterdir()) == ["done"]
    assert _siblings(tmp_path) == ["cache"]


def test_concurrent_builds_of_one_shared_folder_all_succeed(tmp_path):
    target, n = tmp_path / "cache", 8
    barrier, errors, seen = threading.Barrier(n), [], []

    def build(i: int) -> None:
        try:
            with atomic_folder(target, shared="done") as temp:
                (temp / "weights").write_text("same content")
                (temp / "done").write_text(str(i))
                barrier.wait()  # every builder reaches the swap at once
            seen.append((target / "weights").read_text())  # each one can read the folder right after
        except Exception as exc:  # reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and seen == ["same content"] * n
    assert sorted(p.name for p in target.iterdir()) == ["done", "weights"]
    assert _siblings(tmp_path) == ["cache"]
