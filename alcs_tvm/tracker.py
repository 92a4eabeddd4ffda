"""The RPC tracker's control protocol, spoken without TVM: ask a tracker for its summary and keys, or for a device.

The wire format is TVM's (``tvm/rpc/base.py`` and ``tvm/rpc/tracker.py``): the magic number both ways, then
JSON messages each preceded by its length (little-endian int32); a request is ``[code, ...]`` and the answer
``[SUCCESS or FAIL, value]``. Importing TVM for these few lines costs seconds of CPU, so ``alcs device status``
and the device start-up checks talk to the tracker from here; :mod:`alcs_tvm.rpc` opens sessions with what they
return."""
from __future__ import annotations

import contextlib
import json
import socket
import struct

__all__ = ["UnknownKeyError", "parse_address", "open_socket", "tracker_summary", "tracker_keys", "request_device"]

#: TVM's ``base.RPC_TRACKER_MAGIC`` and the ``base.TrackerCode`` values used here
RPC_TRACKER_MAGIC = 0x2F271
SUCCESS = 0
REQUEST = 4
SUMMARY = 6


def _recvall(sock: socket.socket, nbytes: int) -> bytes:
    chunks, read = [], 0
    while read < nbytes:
        chunk = sock.recv(min(nbytes - read, 1024))
        if not chunk:
            raise OSError("connection reset")
        read += len(chunk)
        chunks.append(chunk)
    return b"".join(chunks)


def _sendjson(sock: socket.socket, data) -> None:
    text = json.dumps(data).encode("utf-8")
    sock.sendall(struct.pack("<i", len(text)))
    sock.sendall(text)


def _recvjson(sock: socket.socket):
    size = struct.unpack("<i", _recvall(sock, 4))[0]
    return json.loads(_recvall(sock, size).decode("utf-8"))


class UnknownKeyError(ValueError, LookupError):
    """The tracker has no device registered under the requested key."""


def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    """``"HOST:PORT"`` -> ``(host, port)``."""
    if not isinstance(text, str) or ":" not in text:
        raise ValueError(f"{what} must be HOST:PORT, got {text!r}")
    host, port = text.rsplit(":", 1)
    try:
        return (host.strip("[]") or "127.0.0.1"), int(port)
    except ValueError:
        raise ValueError(f"{what} must be HOST:PORT, got {text!r}") from None


def open_socket(addr: tuple[str, int], what: str, timeout: float) -> socket.socket:
    host, port = addr
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        hint = "; start one with `alcs device start`" if what == "RPC tracker" else ""
        raise ConnectionError(f"no {what} at {host}:{port} (connection refused){hint}") from None
    except (socket.timeout, TimeoutError):
        raise ConnectionError(f"{what} at {host}:{port} did not answer within {timeout:g} s") from None
    except OSError as err:
        raise ConnectionError(f"cannot reach {what} at {host}:{port}: {err.strerror or err}") from None


def _tracker_socket(tracker: str, timeout: float) -> socket.socket:
    addr = parse_address(tracker, "tracker address")
    sock = open_socket(addr, "RPC tracker", timeout)
    try:
        sock.sendall(struct.pack("<i", RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", _recvall(sock, 4))[0]
    except (OSError, TimeoutError) as err:
        sock.close()
        raise ConnectionError(f"RPC tracker at {addr[0]}:{addr[1]} did not answer: {err}") from None
    if magic != RPC_TRACKER_MAGIC:
        sock.close()
        raise ConnectionError(f"{addr[0]}:{addr[1]} is not a TVM RPC tracker")
    return sock


def tracker_summary(tracker: str, timeout: float = 10.0) -> dict:
    """The tracker's summary: ``{"server_info": [{"key": "server:KEY", "addr": [host, port]}, ...],
    "queue_info": {KEY: {"free": n, "pending": n}}}``."""
    with contextlib.closing(_tracker_socket(tracker, timeout)) as sock:
        try:
            _sendjson(sock, [SUMMARY])
            value = _recvjson(sock)
        except (OSError, TimeoutError) as err:
            raise ConnectionError(f"RPC tracker at {tracker} did not answer: {err}") from None
    if value[0] != SUCCESS:
        raise ConnectionError(f"RPC tracker at {tracker} returned {value!r}")
    return value[1]


def tracker_keys(tracker: str, timeout: float = 10.0) -> dict[str, int]:
    """Keys with registered servers at the tracker -> number of servers."""
    keys: dict[str, int] = {}
    for item in tracker_summary(tracker, timeout).get("server_info", []):
        key = str(item.get("key", ""))
        if key.startswith("server:"):
            key = key[len("server:"):]
            keys[key] = keys.get(key, 0) + 1
    return keys


def request_device(tracker: str, key: str, timeout: float, priority: int = 1) -> tuple[str, int, str]:
    keys = tracker_keys(tracker, timeout=min(timeout, 10.0))
    if key not in keys:
        listed = ", ".join(f"{k} ({n})" for k, n in sorted(keys.items())) or "none"
        raise UnknownKeyError(f"RPC tracker at {tracker} has no device with key {key!r}; its keys: {listed}")
    with contextlib.closing(_tracker_socket(tracker, timeout)) as sock:
        try:
            _sendjson(sock, [REQUEST, key, "", priority])
            value = _recvjson(sock)
        except (socket.timeout, TimeoutError):
            raise TimeoutError(f"no free {key!r} device at tracker {tracker} within {timeout:g} s "
                               f"({keys[key]} registered, all busy?)") from None
        except OSError as err:
            raise ConnectionError(f"RPC tracker at {tracker} dropped the request: {err}") from None
    if value[0] != SUCCESS:
        raise ConnectionError(f"RPC tracker at {tracker} returned {value!r}")
    url, port, matchkey = value[1]
    return url, int(port), matchkey
