#!/usr/bin/env python
"""Start a p3 cluster listed in a hosts file, over ssh; Ctrl-C stops it.

    python scripts/launch_cluster.py scripts/cluster.hosts.example --dry-run

Each line of the hosts file is `ROLE HOST [flags for p3 ROLE]` (ROLE: coordinator, node or
edge; # starts a comment). One coordinator; its address is tcp://HOST:PORT with the port of
its --bind (default 5555). Nodes bind every interface on an ephemeral port and advertise
their host. The processes start in order (coordinator, nodes, edges), each awaited on its
`P3_READY` line; they run under `ssh -tt`, so ending the session (Ctrl-C here) ends them.

Every process gets --keys DIR (the same path on every host; `--keys-for` prints the
`p3 keys generate` command that makes a key for every member the file lists, node i named
HOST-i): copy DIR's *.key files to every host and each member's *.key_secret only to its own.
--insecure instead runs the cluster on plain sockets.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p3.nodes.actor.launch import Child, LaunchError, stop_all, wait_ready  # noqa: E402

ROLES = ("coordinator", "node", "edge")
DEFAULT_COORDINATOR_PORT = 5555


@dataclass(frozen=True)
class Entry:
    role: str
    host: str
    flags: tuple[str, ...]


def parse_hosts(text: str) -> list[Entry]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if len(words) < 2 or words[0] not in ROLES:
            raise ValueError(f"line {number}: expected `ROLE HOST [flags]`, ROLE in {ROLES}")
        entries.append(Entry(words[0], words[1], tuple(words[2:])))
    if [e.role for e in entries].count("coordinator") != 1:
        raise ValueError("the hosts file must list exactly one coordinator")
    return entries


def coordinator_address(entry: Entry) -> str:
    flags = list(entry.flags)
    bind = flags[flags.index("--bind") + 1] if "--bind" in flags else None
    port = urlsplit(bind).port if bind else DEFAULT_COORDINATOR_PORT
    return f"tcp://{entry.host}:{port}"


def p3_argv(entry: Entry, index: int, address: str, args: argparse.Namespace) -> list[str]:
    argv = [args.python, "-m", "p3", "--log-level", args.log_level]
    argv += ["--log-json"] if args.log_json else []
    keys = ["--insecure"] if args.insecure else ["--keys", args.keys]
    if entry.role == "coordinator":
        bind = [] if "--bind" in entry.flags else ["--bind", address.replace(entry.host, "0.0.0.0")]
        return [*argv, "coordinator", *bind, *keys, *entry.flags]
    defaults = ["--coordinator", address, *keys]
    if entry.role == "node":
        defaults += ["--node-id", node_name(entry, index), "--bind", "tcp://0.0.0.0:0"]
        defaults += ["--advertise-host", entry.host]
    elif entry.role == "edge":
        defaults += ["--edge-id", f"edge-{entry.host}-{index}"]
    return [*argv, entry.role, *defaults, *entry.flags]


def node_name(entry: Entry, index: int) -> str:
    return f"{entry.host}-{index}"


def keys_command(entries: list[Entry], directory: str) -> list[str]:
    """The `p3 keys generate` that makes a key for every member of the hosts file."""
    ordered = sorted(entries, key=lambda e: ROLES.index(e.role))
    argv = ["python3", "-m", "p3", "keys", "generate", directory, "--nodes", "0", "--edges", "0"]
    for i, e in enumerate(ordered):
        if e.role == "node":
            argv += ["--node", node_name(e, i)]
        elif e.role == "edge":
            argv += ["--edge", f"edge-{e.host}-{i}"]
    return argv


def ssh_argv(entry: Entry, command: list[str], args: argparse.Namespace) -> list[str]:
    remote = f"cd {shlex.quote(args.workdir)} && exec {shlex.join(command)}"
    return [*shlex.split(args.ssh), "-tt", entry.host, remote]


def plan(entries: list[Entry], args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(name, argv) for every process, in start order."""
    coordinator = next(e for e in entries if e.role == "coordinator")
    address = coordinator_address(coordinator)
    ordered = sorted(entries, key=lambda e: ROLES.index(e.role))
    return [
        (f"{e.role}-{i}@{e.host}", ssh_argv(e, p3_argv(e, i, address, args), args))
        for i, e in enumerate(ordered)
    ]


def launch(steps: list[tuple[str, list[str]]], timeout_s: float) -> int:
    children: list[Child] = []
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        for role in ROLES:
            batch = [Child(name, argv) for name, argv in steps if name.startswith(role)]
            children += batch
            wait_ready(batch, timeout_s)
        print("cluster ready; Ctrl-C stops it", flush=True)
        stop.wait()
        return 0
    except LaunchError as exc:
        print(f"launch_cluster: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_all(list(reversed(children)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("hosts", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--ssh", default="ssh -o BatchMode=yes", help="ssh command")
    parser.add_argument("--python", default="python3", help="python on the hosts, with p3")
    parser.add_argument("--workdir", default=".", help="directory on the hosts (from home)")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-json", action="store_true")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--keys", help="the cluster's key directory, the same path on each host")
    parser.add_argument("--insecure", action="store_true", help="plain sockets, no keys")
    parser.add_argument("--keys-for", metavar="DIR", help="print the keys command and exit")
    args = parser.parse_args(argv)
    entries = parse_hosts(args.hosts.read_text())
    if args.keys_for:
        print(shlex.join(keys_command(entries, args.keys_for)))
        return 0
    if bool(args.keys) == args.insecure:
        parser.error("give --keys DIR (see --keys-for) or --insecure")
    steps = plan(entries, args)
    if args.dry_run:
        for name, command in steps:
            print(f"# {name}\n{shlex.join(command)}")
        return 0
    return launch(steps, args.ready_timeout)


if __name__ == "__main__":
    sys.exit(main())
