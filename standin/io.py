"""Files that are either complete or absent: every output of the project goes through atomic_write."""

import glob
import os
import stat
import tempfile
from pathlib import Path


def regular_file_problem(path: str | os.PathLike, kind: str = "file") -> str | None:
    """Why `path` cannot be read as a `kind` ("no such video file", "is a folder, not a video file", ...), or
    None for a regular file. Checked before opening: a FIFO or a device given as an input would block a reader
    forever or stream without end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"no such {kind}"
    except NotADirectoryError:
        return f"no such {kind} (a parent in the path is a file)"
    except OSError as e:
        return f"cannot access the {kind} ({e.strerror or e})"
    if stat.S_ISDIR(mode):
        return f"is a folder, not a {kind}"
    if stat.S_ISFIFO(mode):
        return f"is a named pipe (FIFO), not a {kind}"
    if not stat.S_ISREG(mode):
        return f"is a device or socket, not a {kind}"
    return None


def loader_error_reason(error: Exception) -> str:
    """The reason in a model or checkpoint loader's error, one line, without torch's advice to retry with
    `weights_only=False`: executing an untrusted pickle is never the fix we tell people about."""
    text = str(error)
    if "WeightsUnpickler error:" in text:  # torch's weights-only refusal: keep only what it refused
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line]
    return " ".join(lines) or type(error).__name__


def check_writable(path: str | os.PathLike) -> Path:
    """Fail before any long work if `path` cannot be written (missing folders will be created)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"output path is a folder: {path}")
    existing = path.absolute().parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot create a folder under {existing}: it is a file")
    if not os.access(existing, os.W_OK):
        raise PermissionError(f"output folder is not writable: {existing}")
    if existing == path.absolute().parent:
        # Permission bits do not tell everything (root, read-only or virtual file systems such as /proc): try it.
        try:
            handle, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=existing)
        except OSError as e:
            raise PermissionError(f"cannot write in {existing}: {e.strerror or e}") from None
        os.close(handle)
        os.unlink(probe)
    return path


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call write(temporary_path) then move it onto `path`: readers never see a half-written file, and a failure
    leaves whatever was at `path` before untouched."""
    path = check_writable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, _final_mode(path))
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """The temporary files atomic_write left beside `path` in a process that was killed before it could remove
    them (SIGKILL, power loss): .NAME.XXXXXXXX.SUFFIX, and what save_video derives from one."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*{glob.escape(path.suffix)}"))


def _final_mode(path: Path) -> int:
    """The permissions a plain open() would have given (mkstemp makes files private): the replaced file's, or
    0o666 less the umask."""
    if path.exists():
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_image(image, path: str | os.PathLike) -> Path:
    """Write a PIL image atomically; the format follows the extension (.png, .jpg, .webp, ...)."""
    from PIL import Image

    extension = Path(path).suffix.lower()
    image_format = Image.registered_extensions().get(extension)
    if image_format is None:
        raise ValueError(f"{path}: unknown image extension {extension!r}; use .png, .jpg or .webp")
    return atomic_write(path, lambda temporary: image.save(temporary, format=image_format))


def save_text(text: str, path: str | os.PathLike) -> Path:
    """Write UTF-8 text atomically."""
    return atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))
