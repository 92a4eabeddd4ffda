"""Safe on-disk state, shared by everything that caches or records measurements: an exclusive advisory file lock
(device image, tuning caches) and atomic JSON writes and checked reads (latency tables, tuning records)."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile


@contextlib.contextmanager
def file_lock(path):
    """Hold an exclusive ``flock`` on ``path`` (created, with its directory, if missing) for the block."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_json_atomic(path, data, prefix=".alcs-"):
    """Write ``data`` as JSON to ``path`` through a temp file and a rename: an interrupted write never leaves a
    torn file, and what was there before stays until the new content is complete."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json_file(path, what: str, format_tag: str) -> dict:
    """The JSON object at ``path`` written by :func:`write_json_atomic` with ``{"format": format_tag, ...}``;
    one-line errors naming ``what`` (e.g. "latency table") for a missing file, bad JSON or another format."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {what} at {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != format_tag:
        raise ValueError(f"{path} is not an alcs {what} file (expected format {format_tag!r})")
    return data
