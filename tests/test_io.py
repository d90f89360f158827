import os
import stat

import pytest

from standin.io import atomic_write, check_writable, save_image, save_text


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    save_text("old", target)

    def fail(temporary):
        open(temporary, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_new_files_get_the_permissions_of_a_plain_open(tmp_path):
    previous = os.umask(0o027)
    try:
        save_text("x", tmp_path / "new.txt")
    finally:
        os.umask(previous)
    assert mode(tmp_path / "new.txt") == 0o640  # not mkstemp's private 0o600


def test_replacing_a_file_keeps_its_permissions(tmp_path):
    target = tmp_path / "shared.txt"
    target.write_text("old")
    os.chmod(target, 0o664)
    save_text("new", target)
    assert target.read_text() == "new" and mode(target) == 0o664


def test_unwritable_destinations_are_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(IsADirectoryError):
        check_writable(tmp_path)
    with pytest.raises(NotADirectoryError):
        check_writable(tmp_path / "file" / "out.png")
    with pytest.raises(ValueError, match="unknown image extension"):
        save_image(None, tmp_path / "out.xyz")
