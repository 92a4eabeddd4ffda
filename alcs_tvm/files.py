"""Safe on-disk state, shared by everything that caches or records measurements: the cache directory, an exclusive
advisory file lock (device image, tuning caches) and atomic JSON writes and checked reads (latency tables, tuning
records), and where a compiled library's sidecar goes."""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import stat
import tempfile
from pathlib import Path

__all__ = ["cache_dir", "file_lock", "directory_lock", "write_json_atomic", "read_json_file", "merge_entries",
           "save_merged", "json_copy", "json_kind", "require_object", "checked_number", "checked_numbers",
           "TableMismatchError", "check_same_device", "check_measured_for", "sidecar_path"]


def sidecar_path(lib_path) -> Path:
    """The JSON beside a compiled library that names its inputs and outputs (:mod:`alcs_tvm.run` reads and writes
    it): ``lib_path + ".json"``."""
    return Path(str(lib_path) + ".json")


def cache_dir() -> Path:
    """Where the device image and the default state file live (``$ALCS_TVM_CACHE`` or ``~/.cache/alcs_tvm``)."""
    path = Path(os.environ.get("ALCS_TVM_CACHE") or Path.home() / ".cache" / "alcs_tvm")
    path.mkdir(parents=True, exist_ok=True)
    return path


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


@contextlib.contextmanager
def directory_lock(path):
    """Hold an exclusive ``flock`` on the directory of ``path`` for the block: the lock of a file that is replaced
    by a rename (:func:`write_json_atomic`), since a lock on the file itself would stay with the replaced inode,
    and a lock file beside it would be left behind in the user's directory."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _new_file_mode(path) -> int:
    """The mode ``open(path, "w")`` gives: an existing file keeps its own, a new one gets 0666 less the umask
    (``mkstemp`` alone would make every table and record 0600, unreadable to the user's group whatever the
    umask says)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_json_atomic(path, data, prefix=".alcs-"):
    """Write ``data`` as JSON to ``path`` through a temp file and a rename: an interrupted write never leaves a
    torn file, and what was there before stays until the new content is complete. The file gets the mode
    ``open(path, "w")`` would give it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".json", dir=directory)
    try:
        os.fchmod(fd, _new_file_mode(path))
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
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a directory, not a file")
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {what} at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path} is not valid JSON ({err})") from None
    except OSError as err:
        raise ValueError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if not isinstance(data, dict) or data.get("format") != format_tag:
        raise ValueError(f"{path} is not an alcs {what} file (expected format {format_tag!r})")
    return data


def json_kind(value) -> str:
    """What a JSON value is, in JSON's words (for errors about a file's content)."""
    if value is None:
        return "null"
    for kind, name in ((bool, "a boolean"), (str, "a string"), ((int, float), "a number"), (list, "a list"),
                       (dict, "an object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def require_object(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be an object, got {json_kind(value)}")
    return value


def checked_number(value, what: str, low: float | None = 0.0, high: float | None = None,
                   integer: bool = False):
    """``value`` if it is a finite JSON number (not a string or a boolean) in ``[low, high]`` (an integer when
    ``integer``); else a one-line ``ValueError`` naming ``what``. A measurement file's numbers are checked so
    on load: a NaN or negative latency would otherwise drive decisions silently, a string fail later in numpy
    without naming the file."""
    bounds = (f" >= {low:g}" if low is not None else "") + (f" and <= {high:g}" if high is not None else "")
    wanted = ("an integer" if integer else "a finite number") + bounds
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (integer and not float(value).is_integer()) or not math.isfinite(value) or \
            (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{what} must be {wanted}, got {value!r}")
    return int(value) if integer else value


def checked_numbers(values, what: str, length: int | None = None, **bounds) -> list:
    """A list of :func:`checked_number` (``length`` of them when given)."""
    if not isinstance(values, list):
        raise ValueError(f"{what} must be a list of numbers, got {json_kind(values)}")
    if length is not None and len(values) != length:
        raise ValueError(f"{what} has {len(values)} values, the sparsity grid {length}")
    return [checked_number(v, f"{what}[{i}]", **bounds) for i, v in enumerate(values)]


_ABSENT = object()


def json_copy(data):
    """``data`` as it reads back from a JSON file (tuples become lists, keys strings): what saved entries are
    compared in."""
    return json.loads(json.dumps(data))


def merge_entries(ours: dict, base: dict, theirs: dict) -> dict:
    """Three-way merge of one JSON object of a measurement file, entry by entry: an entry this process added or
    changed since ``base`` (the entries as it last read or wrote the file) is ours; every other entry is the
    file's as it is now (``theirs``), so what another process saved meanwhile - new entries and new values of
    old ones - is kept. All three in :func:`json_copy` form."""
    merged = dict(theirs)
    for key, value in ours.items():
        if key not in theirs or base.get(key, _ABSENT) != value:
            merged[key] = value
    return merged


def save_merged(path, ours: dict, merge, prefix: str, what: str) -> dict:
    """Save a measurement file that other processes may be writing too: under :func:`directory_lock`, re-read the
    file, ``merge(on_disk)`` it with ``ours`` (``on_disk`` None when there is no file yet; ``merge`` raises
    :class:`TableMismatchError` when the file now holds measurements of another kind) and write the result
    atomically. Returns what was written.

    Nothing measured is lost: when the file cannot take ``ours`` (another target, a corrupted file), ``ours`` is
    written beside it and the error names that file."""
    with directory_lock(path):
        try:
            on_disk = read_json_file(path, what, ours["format"]) if os.path.exists(path) else None
            data = ours if on_disk is None else merge(on_disk)
        except ValueError as err:
            aside = _aside_path(path)
            write_json_atomic(aside, ours, prefix=prefix)
            raise type(err)(f"{err}; this run's measurements are saved in {aside}") from None
        write_json_atomic(path, data, prefix=prefix)
    return data


def _aside_path(path) -> str:
    stem, ext = os.path.splitext(os.path.abspath(path))
    for n in range(1, 1000):
        candidate = f"{stem}.unsaved-{os.getpid()}-{n}{ext or '.json'}"
        if not os.path.exists(candidate):
            return candidate
    raise FileExistsError(f"no free name beside {path}")


class TableMismatchError(ValueError):
    """A measurement file was made for another target, TVM version, device or layer set than the one asked about."""


def check_same_device(path, measured_on: str, device_key: str, what: str = "measured"):
    """Resuming a table or records measured on another device would mix two devices' numbers."""
    if measured_on != device_key:
        raise TableMismatchError(f"{path} was {what} on device {measured_on!r}, not {device_key!r}: write a new "
                                 f"file (-o)")


def check_measured_for(what: str, target: dict, family: str, tvm_version: str, target_info=None,
                       current_tvm: str | None = None, remedy: str = "re-measure"):
    """Raise :class:`TableMismatchError` when ``what`` (e.g. "latency table", "tuning records") was measured for
    another target (``target_info.key``) or TVM version than the ones given; measurements of one do not hold for
    the other."""
    was = "were" if what.endswith("s") else "was"  # "tuning records were measured", "latency table was measured"
    if target_info is not None:
        wanted = json.loads(target_info.key)
        if wanted != target:
            raise TableMismatchError(f"{what} {was} measured for target {target} ({family}), not {wanted} "
                                     f"({target_info.family}): {remedy}")
    if current_tvm is not None and current_tvm != tvm_version:
        raise TableMismatchError(f"{what} {was} measured with TVM {tvm_version}, this is TVM {current_tvm}: {remedy}")


def check_header(data: dict):
    """The fields every measurement file (latency table, tuning records) has: target, family, TVM version, layers."""
    for name in ("target", "target_family", "tvm_version", "layers"):
        if name not in data:
            raise ValueError(f"lacks {name!r}")
    require_object(data["target"], "'target'")
    for name in ("target_family", "tvm_version"):
        if not isinstance(data[name], str):
            raise ValueError(f"{name!r} must be a string, got {json_kind(data[name])}")
