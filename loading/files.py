"""The one writer (a temp file beside the target, flushed, renamed over it: readers never see half a file)
and the check of an output path before any work, so a long run never ends in a refused write."""
import errno
import os


class OutputError(ValueError):
    """An output path that cannot or must not be written; scripts print it on one line and exit 2."""


def check_output(path, option, overwrite=False, ours=None):
    """`path` (given as `option`), unless a folder, in a missing or read-only folder, or an existing file that
    is not this tool's output (ours(path) is False) while not `overwrite`: then an OutputError."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise OutputError(f"{option} {path} is a folder; name a file in it")
    if not os.path.isdir(folder):
        raise OutputError(f"{option} {path}: the folder {folder} does not exist; create it or pass another {option}")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{option} {path}: the folder {folder} is not writable; pass another {option}")
    if os.path.exists(path) and not overwrite and not (ours is not None and ours(path)):
        raise OutputError(f"{option} {path} already exists and was not written by this tool; pass another {option} "
                          "or add --overwrite to replace it")
    return path


def read_error(path):
    """Why `path` could not be opened for reading, in words (not errno's): for the one line naming it."""
    return "is a folder" if os.path.isdir(path) else "does not exist" if not os.path.exists(path) else "cannot be read"


def write_error(path, e):
    """The OutputError for an OSError `e` met while writing `path` (a file or a folder), which is kept."""
    why = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
           errno.EACCES: "permission denied"}.get(e.errno, e.strerror or str(e))
    kept = f"the previous {'folder' if os.path.isdir(path) else 'file'} is unchanged" if os.path.exists(path) \
        else "nothing was written"
    return OutputError(f"cannot write {path}: {why}; {kept}")


def write_atomic(path, write):
    """write(f) to a temp file beside `path`, synced, renamed over `path`; on an error the old file is kept."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the file
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise
