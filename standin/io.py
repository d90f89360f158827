"""Files that are either complete or absent: every output of the project goes through atomic_write."""

import os
import tempfile
from pathlib import Path


def check_writable(path: str | os.PathLike) -> Path:
    """Fail before any long work if `path` cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"output path is a folder: {path}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"output folder is not writable: {folder}")
    return path


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call write(temporary_path) then move it onto `path`: readers never see a half-written file, and a failure
    leaves whatever was at `path` before untouched."""
    path = check_writable(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path
