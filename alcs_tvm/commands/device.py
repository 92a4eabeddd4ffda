"""``alcs device setup|start|stop|status``: the emulated ARM64 device, the RPC tracker and RPC servers."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from .. import device
from .common import INTERRUPTS


def register(subparsers) -> None:
    parser = subparsers.add_parser("device", help="the emulated ARM64 device, the RPC tracker and RPC servers",
                                   description=device.__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="device_command", metavar="ACTION", required=True)
    state_help = "state file (default: $ALCS_TVM_CACHE/device-state.json or ~/.cache/alcs_tvm/device-state.json)"

    p = sub.add_parser("setup", help="install packages, build the arm64 userland and unpack the wheels (cached)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=_one_line(_cli_setup))

    p = sub.add_parser("start", help="start the tracker, the emulated ARM64 server(s) and the x86 server")
    p.add_argument("--tracker-port", type=int, default=device.DEFAULT_TRACKER_PORT)
    p.add_argument("--key", default=device.DEFAULT_KEY,
                   help=f"key of the emulated devices (default {device.DEFAULT_KEY})")
    p.add_argument("--num-devices", type=int, default=1, help="number of emulated ARM64 servers (default 1)")
    p.add_argument("--qemu-cpu", default=device.DEFAULT_QEMU_CPU,
                   help="emulated core: a53, a72, a76 or any qemu CPU name (default cortex-a76)")
    p.add_argument("--no-x86", dest="x86", action="store_false", help=f"don't start the {device.X86_KEY} server")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for servers to register")
    p.add_argument("--state", help=state_help)
    p.set_defaults(func=_one_line(_cli_start))

    p = sub.add_parser("stop", help="stop everything started by `alcs device start`")
    p.add_argument("--state", help=state_help)
    p.set_defaults(func=_cli_stop)

    p = sub.add_parser("status", help="show the tracker, the servers and the tracker's keys")
    p.add_argument("--state", help=state_help)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cli_status)


def _one_line(func):
    """Set-up failures (apt, mmdebstrap, pip, a server that exits) as ``alcs device: error: ...`` (exit 2)."""
    def wrapper(args):
        try:
            return func(args)
        except (RuntimeError, PermissionError, subprocess.SubprocessError) as err:
            if INTERRUPTS.fired.is_set():  # a child process that Ctrl-C ended too: the interrupt is the news
                raise
            text = str(err).strip()
            print(f"alcs device: error: {text.splitlines()[0] if text else type(err).__name__}", file=sys.stderr)
            if "\n" in text:
                print(text.split("\n", 1)[1], file=sys.stderr)  # the log tail, for diagnosis
            return 2
    return wrapper


def _cli_setup(args):
    t0 = time.time()
    image = device.setup(force=args.force)
    print(f"device image: {image.root} ({time.time() - t0:.1f} s)")
    print(f"device python: {image.python}")
    return 0


def _cli_start(args):
    if args.num_devices < 0:
        raise ValueError("--num-devices must be >= 0")
    device.start(tracker_port=args.tracker_port, key=args.key, num_devices=args.num_devices,
                 qemu_cpu=args.qemu_cpu, x86=args.x86, state_path=args.state, timeout=args.timeout)
    info = device.status(args.state)
    _print_status(info)
    return 0 if _healthy(info) else 1


def _cli_stop(args):
    stopped = device.stop(args.state)
    print(f"stopped {len(stopped)} process(es)")
    return 0


def _cli_status(args):
    info = device.status(args.state)
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        _print_status(info)
    return 0 if _healthy(info) else 1


def _healthy(info) -> bool:
    """Usable: the tracker answers and every server is registered with it (a running server that is not has
    lost its server loop and serves nobody)."""
    tracker = info["tracker"]
    return bool(tracker and tracker["alive"] and tracker["answering"]) and all(s["registered"] for s in info["servers"])


def _print_status(info):
    tracker = info["tracker"]
    if not tracker:
        print("tracker: not started (alcs device start)")
        return
    if not tracker["alive"]:
        state = "DEAD"
    elif tracker["answering"]:
        state = "running"
    else:
        stopped = " (process stopped)" if tracker["stopped"] else ""
        state = f"NOT ANSWERING within {device.PROBE_TIMEOUT:g} s{stopped}: `alcs device start` restarts it"
    print(f"tracker: {device.tracker_addr(tracker)} pid {tracker['pid']} {state}")
    for s in info["servers"]:
        if not s["alive"]:
            state = "DEAD"
        elif s["registered"]:
            state = "registered"
        elif s["registered"] is None:
            state = "running, registration unknown (the tracker does not answer)"
        else:
            state = "running, NOT REGISTERED (serves nobody): `alcs device start` restarts it"
        extra = f" {s['qemu_cpu']}" if s.get("qemu_cpu") else ""
        print(f"server: {s['key']:<12} 127.0.0.1:{s['port']} pid {s['pid']} {s['kind']}{extra} {state}")
    if info["keys"]:
        print("tracker keys: " + ", ".join(f"{k} ({n} server{'s' if n > 1 else ''})" for k, n in sorted(info["keys"].items())))
