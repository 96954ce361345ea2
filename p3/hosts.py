"""`p3 cluster up|down|status|keys HOSTS_FILE`: one cluster over several hosts, from a TOML file.

    [cluster]                         # all optional
    name = "prod"                     # default: the file's stem (names the state file)
    keys = "keys"                     # the key directory here (made if empty), or insecure = true
    run_dir = "~/.p3/cluster"         # on each host: logs (NAME.out/.err) and keys/
    python = "/opt/p3/bin/python"     # on remote hosts (default python3; local: this one)
    ssh = ["-o", "BatchMode=yes"]     # ssh and scp options (-o/-i style: scp reads them too)
    user = "p3"                       # ssh user when a host names none
    tp = 1  pp = 1  api_key = "..."  ready_timeout = 300  stop_timeout = 45
    mode = "process"                  # or "systemd": drive the units of deploy/systemd
    [coordinator]
    host = "10.0.0.1"                 # [user@]host reached by ssh, or "local": this machine
    port = 5555                       # address = "..." (dialled; default: host), bind = "..."
    [[node]]
    id = "node-0"  host = "10.0.0.2"  model = "/models/m"  threads = 8  args = ["--dtype", "..."]
    [[edge]]
    id = "edge-0"  host = "10.0.0.1"  port = 8000

`up` starts each process detached on its host (`nohup setsid`, stdout and stderr in
run_dir/NAME.out and .err) and watches its logs through p3.nodes.actor.launch's Child and
wait_ready, as `p3 serve` does its children: the coordinator until its P3_READY address, then
the nodes and the edges with that address until the edge's GET /ready is 200. The pids go to a
state file (P3_HOME/clusters/NAME.json) that `status` and `down` read, from any shell. `down`
sends SIGTERM (drain) to edges, then nodes, then the coordinator, and SIGKILL to what is left
after stop_timeout; a pid is signalled only while its /proc cmdline is still `python -m p3`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from p3.nodes.actor.launch import Child, LaunchError, dialable, wait_ready
from p3.paths import p3_home
from p3.protocol import security

LOCAL = "local"
ROLES = ("coordinator", "node", "edge")
STOP_ORDER = ("edge", "node", "coordinator")  # the edge stops taking requests first
MODES = ("process", "systemd")


class HostsFileError(ValueError):
    """A malformed hosts file: the message names the file and the field."""


@dataclass(frozen=True)
class Member:
    """One process of the cluster: where it runs and the p3 flags that are its own."""

    role: str
    name: str
    host: str  # "local" or [user@]host
    address: str  # how the others dial this host
    bind: str  # the interface it listens on
    port: int
    run_dir: str
    flags: tuple[str, ...] = ()

    @property
    def is_local(self) -> bool:
        return self.host == LOCAL

    @property
    def keys_dir(self) -> str:
        return f"{self.run_dir}/keys"

    @property
    def unit(self) -> str:
        """Its systemd unit (deploy/systemd)."""
        return "p3-coordinator" if self.role == "coordinator" else f"p3-{self.role}@{self.name}"


@dataclass(frozen=True)
class Cluster:
    name: str
    path: Path
    members: list[Member]
    keys: Path | None = None  # the key directory on this machine; None: insecure
    python: str = "python3"
    ssh: tuple[str, ...] = ()
    mode: str = "process"
    tp: int = 1
    pp: int = 1
    api_key: str | None = None
    log_level: str = "warning"
    ready_timeout_s: float = 300.0
    stop_timeout_s: float = 45.0

    def of(self, role: str) -> list[Member]:
        return [m for m in self.members if m.role == role]

    @property
    def state_file(self) -> Path:
        return p3_home() / "clusters" / f"{self.name}.json"


# -- the hosts file ------------------------------------------------------------------------

FIELDS = {  # table -> field -> type
    "cluster": {"name": str, "keys": str, "insecure": bool, "run_dir": str, "python": str,
                "ssh": list, "user": str, "mode": str, "tp": int, "pp": int, "api_key": str,
                "log_level": str, "ready_timeout": float, "stop_timeout": float},
    "coordinator": {"host": str, "address": str, "bind": str, "port": int, "run_dir": str,
                    "args": list},
    "node": {"id": str, "host": str, "address": str, "bind": str, "port": int, "run_dir": str,
             "model": str, "threads": int, "max_threads": int, "args": list},
    "edge": {"id": str, "host": str, "address": str, "bind": str, "port": int, "run_dir": str,
             "args": list},
}  # fmt: skip
DEFAULT_PORTS = {"coordinator": 5555, "node": 0, "edge": 8000}


def load(path: str | os.PathLike) -> Cluster:
    """The hosts file read and checked: HostsFileError names the first bad field."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise HostsFileError(f"{path}: not TOML: {exc}") from None
    return parse(doc, path)


def parse(doc: dict[str, Any], path: Path) -> Cluster:
    def fail(where: str, what: str) -> HostsFileError:
        return HostsFileError(f"{path}: {where}: {what}")

    unknown = set(doc) - set(FIELDS)
    if unknown:
        raise fail(sorted(unknown)[0], f"unknown table (tables: {', '.join(FIELDS)})")
    tables = {"cluster": [doc.get("cluster", {})], "coordinator": [doc.get("coordinator")]}
    tables |= {"node": doc.get("node", []), "edge": doc.get("edge", [])}
    if tables["coordinator"][0] is None:
        raise fail("coordinator", "missing: [coordinator] host = ... names where it runs")
    for role in ("node", "edge"):
        if not isinstance(tables[role], list) or not tables[role]:
            raise fail(role, f"missing: at least one [[{role}]] table")
    for table, entries in tables.items():
        for i, entry in enumerate(entries):
            where = table if table in ("cluster", "coordinator") else f"{table}[{i}]"
            _check_fields(entry, FIELDS[table], where, fail)
    top = tables["cluster"][0]
    if top.get("mode", "process") not in MODES:
        raise fail("cluster.mode", f"{top['mode']!r} is not one of {list(MODES)}")
    if "keys" in top and top.get("insecure"):
        raise fail("cluster.keys", "and cluster.insecure contradict each other")
    if "keys" not in top and not top.get("insecure"):
        raise fail("cluster.keys", "missing: a key directory, or insecure = true (plain sockets)")
    run_dir = top.get("run_dir", "~/.p3/cluster")
    members = [
        _member(role, entry, i, top, run_dir, fail)
        for role in ROLES
        for i, entry in enumerate(tables[role])
    ]
    names = [m.name for m in members]
    for member in members:
        if names.count(member.name) > 1:
            raise fail(f"{member.role}.id", f"{member.name!r} is given twice")
    keys = top.get("keys")
    return Cluster(
        name=top.get("name", path.stem),
        path=path,
        members=members,
        keys=(path.parent / keys).resolve() if keys else None,
        python=top.get("python", "python3"),
        ssh=tuple(top.get("ssh", ())),
        mode=top.get("mode", "process"),
        tp=top.get("tp", 1),
        pp=top.get("pp", 1),
        api_key=top.get("api_key"),
        log_level=top.get("log_level", "warning"),
        ready_timeout_s=float(top.get("ready_timeout", 300.0)),
        stop_timeout_s=float(top.get("stop_timeout", 45.0)),
    )


def _check_fields(entry: Any, fields: dict[str, type], where: str, fail) -> None:
    if not isinstance(entry, dict):
        raise fail(where, "must be a table")
    for key, value in entry.items():
        want = fields.get(key)
        if want is None:
            raise fail(f"{where}.{key}", f"unknown field (fields: {', '.join(fields)})")
        ok = isinstance(value, int | float) if want is float else isinstance(value, want)
        ok = ok and isinstance(value, bool) == (want is bool)  # TOML's true is no integer
        ok = ok and (want is not list or all(isinstance(v, str) for v in value))
        if not ok:
            kind = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
                    list: "a list of strings"}[want]  # fmt: skip
            raise fail(f"{where}.{key}", f"expected {kind}, got {value!r}")


def _member(role: str, entry: dict, i: int, top: dict, run_dir: str, fail) -> Member:
    where = role if role == "coordinator" else f"{role}[{i}]"
    if "host" not in entry:
        raise fail(f"{where}.host", 'missing: [user@]host, or "local"')
    host = entry["host"]
    if host != LOCAL and "@" not in host and "user" in top:
        host = f"{top['user']}@{host}"
    name = entry.get("id", {"coordinator": "coordinator", "edge": f"edge-{i}"}.get(role))
    if name is None:
        raise fail(f"{where}.id", "missing: the node's id (its key's name)")
    try:
        security._check_name(role, name)
    except ValueError as exc:
        raise fail(f"{where}.id", str(exc)) from None
    dialled = "127.0.0.1" if host == LOCAL else host.rpartition("@")[2]
    flags = [*_role_flags(role, entry), *entry.get("args", ())]
    _check_flags(role, flags, f"{where}.args", fail)
    return Member(
        role=role,
        name=name,
        host=host,
        address=entry.get("address", dialled),
        bind=entry.get("bind", "127.0.0.1" if host == LOCAL else "0.0.0.0"),
        port=entry.get("port", DEFAULT_PORTS[role]),
        run_dir=entry.get("run_dir", run_dir),
        flags=tuple(flags),
    )


def _role_flags(role: str, entry: dict) -> list[str]:
    if role != "node":
        return []
    flags = ["--model", entry["model"]] if "model" in entry else []
    for key in ("threads", "max_threads"):
        if key in entry:
            flags += [f"--{key.replace('_', '-')}", str(entry[key])]
    return flags


def _check_flags(role: str, flags: list[str], where: str, fail) -> None:
    """A flag p3 would refuse on the host is refused here, before anything starts."""
    import argparse

    from p3.cli import build_parser
    from p3.nodes.edge import edge

    argv = [role, "--insecure", *(["--coordinator", "tcp://x:1"] if role != "coordinator" else [])]
    try:
        if role == "edge":
            parser = argparse.ArgumentParser(prog="p3 edge", exit_on_error=False)
            edge.add_arguments(parser)
            parser.parse_args([*argv[1:], *flags])
        else:
            _, rest = build_parser().parse_known_args([*argv, *flags])
            if rest:
                raise fail(where, f"p3 {role} does not take {rest}")
    except (SystemExit, argparse.ArgumentError) as exc:
        raise fail(where, f"p3 {role} refuses {flags}: {exc}") from None


# -- commands on a host ----------------------------------------------------------------------


def on_host(cluster: Cluster, member: Member, script: str) -> list[str]:
    """argv running a POSIX sh script on member's host: here, or over ssh."""
    if member.is_local:
        return ["sh", "-c", script]
    return ["ssh", *cluster.ssh, member.host, script]


def run_on(cluster: Cluster, member: Member, script: str, timeout_s: float = 60.0) -> str:
    done = subprocess.run(
        on_host(cluster, member, script), capture_output=True, text=True, timeout=timeout_s
    )
    if done.returncode != 0:
        raise LaunchError(f"on {member.host}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done.stdout


def sh_path(path: str) -> str:
    """A path for sh, ~/ expanded by the host's own shell."""
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def p3_argv(cluster: Cluster, member: Member, coordinator: str | None) -> list[str]:
    """The p3 command line member runs on its host."""
    python = sys.executable if member.is_local else cluster.python
    keys = ["--keys", member.keys_dir] if cluster.keys else ["--insecure"]
    argv = [python, "-m", "p3", "--log-level", cluster.log_level, member.role]
    if member.role == "coordinator":
        argv += ["--bind", f"tcp://{member.bind}:{member.port}"]
        argv += ["--tp", str(cluster.tp), "--pp", str(cluster.pp)]
    elif member.role == "node":
        argv += ["--coordinator", coordinator, "--node-id", member.name]
        argv += ["--bind", f"tcp://{member.bind}:{member.port}", "--advertise-host", member.address]
    else:
        argv += ["--coordinator", coordinator, "--edge-id", member.name]
        argv += ["--host", member.bind, "--port", str(member.port)]
        argv += ["--api-key", cluster.api_key] if cluster.api_key else []
    return [*argv, *keys, *member.flags]


def _quoted(argv: Iterable[str]) -> str:
    return " ".join(sh_path(a) if a.startswith("~/") else shlex.quote(a) for a in argv)


def start(cluster: Cluster, member: Member, coordinator: str | None) -> int:
    """Start member detached from this command (its own session, immune to the ssh session's
    hangup); its pid."""
    log = f"{sh_path(member.run_dir)}/{shlex.quote(member.name)}"
    script = (
        f"mkdir -p {sh_path(member.run_dir)} && nohup setsid "
        f"{_quoted(p3_argv(cluster, member, coordinator))} >{log}.out 2>{log}.err </dev/null & "
        "echo $!"
    )
    return int(run_on(cluster, member, script).split()[-1])


class Watch(Child):
    """A started member's logs, followed (by tail, here or over ssh) until it is ready: its
    P3_READY line arrives on stdout, its stderr is the tail a failure shows. Ends when the
    member's process does, or when stopped."""

    def __init__(self, cluster: Cluster, member: Member, pid: int):
        log = f"{sh_path(member.run_dir)}/{shlex.quote(member.name)}"
        follow = f"tail -s 0.2 --pid={pid} -n +1 -f"
        script = (
            f"timeout {cluster.ready_timeout_s + 5:g} sh -c "
            + shlex.quote(f"{follow} {log}.err >&2 & {follow} {log}.out; wait")
            + f"; echo '(pid {pid} on {member.host} ended; its log: {member.run_dir}/"
            f"{member.name}.err)' >&2; exit 1"
        )
        self.member = member
        self.member_pid = pid
        super().__init__(
            f"{member.name}@{member.host}",
            on_host(cluster, member, script),
            output=open(os.devnull, "w"),  # noqa: SIM115 (the pumps write to it until the end)
            ready_path="/ready" if member.role == "edge" else None,
        )

    @property
    def pid(self) -> int:
        return self.member_pid

    def probe(self) -> None:
        if self.info and "url" in self.info:  # an edge on 0.0.0.0: dial the host's address
            self.info["url"] = dialable(self.info["url"], self.member.address)
        super().probe()

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait()


# -- up, down, status ------------------------------------------------------------------------


@dataclass
class State:
    """What `up` started, for `down` and `status` from any shell."""

    hosts_file: str
    coordinator: str = ""
    url: str = ""
    pids: dict[str, int] = field(default_factory=dict)  # member name -> pid on its host

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2))
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> State | None:
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))


def up(cluster: Cluster) -> int:
    if cluster.mode == "systemd":
        return _up_systemd(cluster)
    previous = State.read(cluster.state_file)
    if previous is not None and any(alive(cluster, previous).values()):
        raise LaunchError(f"{cluster.name} is up already ({cluster.state_file}): p3 cluster down")
    if cluster.keys:
        distribute_keys(cluster)
    state = State(str(cluster.path))
    watches: list[Watch] = []
    try:
        (coordinator,) = cluster.of("coordinator")
        watches.append(_started(cluster, coordinator, None, state))
        wait_ready(watches, cluster.ready_timeout_s)
        state.coordinator = dialable(watches[0].info["address"], coordinator.address)
        nodes = [_started(cluster, m, state.coordinator, state) for m in cluster.of("node")]
        edges = [_started(cluster, m, state.coordinator, state) for m in cluster.of("edge")]
        watches += nodes + edges
        spares = len(nodes) % (cluster.tp * cluster.pp)  # announce nothing until placed
        wait_ready(nodes, cluster.ready_timeout_s, num_spare=spares)
        wait_ready(edges, cluster.ready_timeout_s)
        state.url = edges[0].info["url"]
        state.save(cluster.state_file)
    except (LaunchError, OSError, subprocess.SubprocessError) as exc:
        print(f"p3 cluster up: {exc}", file=sys.stderr)
        down(cluster)
        return 1
    finally:
        for watch in watches:
            watch.close()
    print(f"p3 cluster {cluster.name} serving at {state.url}/v1")
    return 0


def _started(cluster: Cluster, member: Member, coordinator: str | None, state: State) -> Watch:
    state.pids[member.name] = start(cluster, member, coordinator)
    state.save(cluster.state_file)  # saved at once: a failed up is still stopped by down
    return Watch(cluster, member, state.pids[member.name])


OURS = """ours() { tr '\\0' ' ' </proc/"$1"/cmdline 2>/dev/null | grep -q -- '-m p3 '; }"""


def by_host(members: Iterable[Member]) -> dict[str, list[Member]]:
    hosts: dict[str, list[Member]] = {}
    for member in members:
        hosts.setdefault(member.host, []).append(member)
    return hosts


def _started_of(cluster: Cluster, state: State, roles: Iterable[str]) -> list[list[Member]]:
    """Per host, its members of roles that up started."""
    chosen = [m for m in cluster.members if m.role in roles and m.name in state.pids]
    return list(by_host(chosen).values())


def alive(cluster: Cluster, state: State) -> dict[str, bool]:
    """Member name -> whether its pid is still a p3 process on its host."""
    found: dict[str, bool] = {}
    for members in _started_of(cluster, state, ROLES):
        pids = " ".join(str(state.pids[m.name]) for m in members)
        script = f'{OURS}; for p in {pids}; do ours $p && echo "$p"; done; true'
        up_pids = set(run_on(cluster, members[0], script).split())
        found |= {m.name: str(state.pids[m.name]) in up_pids for m in members}
    return found


def down(cluster: Cluster) -> int:
    """SIGTERM by stage (edges, nodes, the coordinator), each host's at once; SIGKILL what
    is still there after stop_timeout."""
    if cluster.mode == "systemd":
        return _systemctl_all(cluster, "stop", STOP_ORDER)
    state = State.read(cluster.state_file)
    if state is None:
        print(f"p3 cluster down: {cluster.name} has no state file ({cluster.state_file})")
        return 0
    unreached = []
    for role in STOP_ORDER:
        stopping = []
        for members in _started_of(cluster, state, [role]):
            pids = " ".join(str(state.pids[m.name]) for m in members)
            script = _stop_script(pids, cluster.stop_timeout_s)
            stopping.append(
                (members[0].host, subprocess.Popen(on_host(cluster, members[0], script)))
            )
        for host, proc in stopping:
            if proc.wait(timeout=cluster.stop_timeout_s + 60) != 0:
                unreached.append(host)
    if unreached:  # the state stays, for another down once they are reachable
        print(f"p3 cluster down: could not stop on {sorted(set(unreached))}", file=sys.stderr)
        return 1
    cluster.state_file.unlink()
    return 0


def _stop_script(pids: str, timeout_s: float) -> str:
    return (
        f"{OURS}; for p in {pids}; do ours $p && kill -CONT $p && kill -TERM $p; done; "
        f"end=$(($(date +%s) + {int(timeout_s) + 1})); "
        f'while :; do left=; for p in {pids}; do ours $p && left="$left $p"; done; '
        '[ -z "$left" ] || [ "$(date +%s)" -ge "$end" ] && break; sleep 0.1; done; '
        'for p in $left; do kill -KILL "$p" && echo "p3 cluster: killed $p (no drain)"; done; true'
    )


def status(cluster: Cluster) -> int:
    """Each member's process, then the cluster as the edge sees it (GET /cluster)."""
    if cluster.mode == "systemd":
        return _systemctl_all(cluster, "is-active", ROLES)
    state = State.read(cluster.state_file) or State(str(cluster.path))
    up_now = alive(cluster, state) if state.pids else {}
    print(f"{'ROLE':12} {'NAME':16} {'HOST':20} {'PID':>8}  STATE")
    for m in cluster.members:
        pid = state.pids.get(m.name)
        what = "not started" if pid is None else "up" if up_now.get(m.name) else "gone"
        print(f"{m.role:12} {m.name:16} {m.host:20} {pid or '-':>8}  {what}")
    if not state.url:
        return 1
    print(f"\n{state.url}/cluster:")
    for node in _cluster_table(cluster, state.url):
        print(f"  {node['id']:16} {node['status']:6} {node.get('address', ''):24} "
              f"replica {node.get('replica', '-')} rank {node.get('replica_rank', '-')} "
              f"{node.get('model', '')}")  # fmt: skip
    return 0 if all(up_now.values()) else 1


def _cluster_table(cluster: Cluster, url: str) -> list[dict]:
    request = urllib.request.Request(f"{url}/cluster")
    if cluster.api_key:
        request.add_header("Authorization", f"Bearer {cluster.api_key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())["nodes"]
    except (OSError, ValueError) as exc:
        print(f"  (no answer: {exc})")
        return []


# -- systemd mode --------------------------------------------------------------------------


def systemctl_commands(cluster: Cluster, action: str, roles: Iterable[str]) -> list[list[str]]:
    """Per host and role, the systemctl command for its units (deploy/systemd): the units'
    environment files on each host hold the flags."""
    commands = []
    for role in roles:
        for members in by_host(cluster.of(role)).values():
            script = f"sudo systemctl {action} " + " ".join(m.unit for m in members)
            commands.append(on_host(cluster, members[0], script))
    return commands


def _systemctl_all(cluster: Cluster, action: str, roles: Iterable[str]) -> int:
    codes = [subprocess.run(argv).returncode for argv in systemctl_commands(cluster, action, roles)]
    return max(codes, default=0)


def _up_systemd(cluster: Cluster) -> int:
    if cluster.keys:
        distribute_keys(cluster)
    if _systemctl_all(cluster, "start", ROLES):
        return 1
    edge = cluster.of("edge")[0]
    url = f"http://{edge.address}:{edge.port}"
    deadline = time.monotonic() + cluster.ready_timeout_s
    while time.monotonic() < deadline:  # a bounded poll of the edge's own readiness
        with (
            contextlib.suppress(OSError, ValueError),
            urllib.request.urlopen(f"{url}/ready", timeout=2) as response,
        ):
            if response.status == 200:
                print(f"p3 cluster {cluster.name} serving at {url}/v1")
                return 0
        time.sleep(0.5)
    print(f"p3 cluster up: {url}/ready not 200 after {cluster.ready_timeout_s:g}s", file=sys.stderr)
    return 1


# -- keys ------------------------------------------------------------------------------------


def needed_keys(member: Member, cluster: Cluster) -> list[str]:
    """The key files member's process reads (security.Keyring): its own pair, the public key
    of every member it dials (the coordinator; an edge the nodes) and of every member that
    dials it (the coordinator: nodes and edges; a node: edges). Paths in the key directory."""
    knows = {"coordinator": ("node", "edge"), "node": ("coordinator", "edge"),
             "edge": ("coordinator", "node")}[member.role]  # fmt: skip
    own = f"{member.role}/{member.name}"
    others = [f"{m.role}/{m.name}.key" for m in cluster.members if m.role in knows]
    return [f"{own}.key", f"{own}.key_secret", *others]


def distribute_keys(cluster: Cluster) -> None:
    """Generate the cluster's keys if its directory has none (a missing member's key is an
    error naming it), then copy each host only what its members need, files 0600."""
    root = cluster.keys
    if not security.list_keys(root):
        security.generate(root, [m.name for m in cluster.of("node")],
                          [m.name for m in cluster.of("edge")])  # fmt: skip
        print(f"p3 cluster: made the cluster's keys in {root}")
    have = {(k.role, k.name) for k in security.list_keys(root)}
    missing = [m.name for m in cluster.members if (m.role, m.name) not in have]
    if missing:
        raise LaunchError(f"{root} has no key for {missing}: `p3 keys add {root} ROLE NAME`")
    places: dict[tuple[str, str], set[str]] = {}
    for member in cluster.members:
        place = places.setdefault((member.host, member.keys_dir), set())
        place.update(needed_keys(member, cluster))
    for (host, keys_dir), files in places.items():
        member = next(m for m in cluster.members if (m.host, m.keys_dir) == (host, keys_dir))
        _copy_keys(cluster, member, root, sorted(files))


def _copy_keys(cluster: Cluster, member: Member, root: Path, files: list[str]) -> None:
    if member.is_local:
        target = Path(os.path.expanduser(member.keys_dir))
        for name in files:
            (target / name).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            shutil.copyfile(root / name, target / name)
            (target / name).chmod(0o600)
        target.chmod(0o700)
        return
    folders = sorted({name.partition("/")[0] for name in files})
    keys_dir = sh_path(member.keys_dir)
    run_on(cluster, member, "umask 077 && " + " ".join(
        f"mkdir -p {keys_dir}/{folder} &&" for folder in folders) + " true")  # fmt: skip
    for folder in folders:
        mine = [str(root / n) for n in files if n.startswith(f"{folder}/")]
        remote = f"{member.host}:{member.keys_dir}/{folder}/".replace("~/", "", 1)
        subprocess.run(["scp", "-q", *cluster.ssh, *mine, remote], check=True, timeout=120)
    run_on(cluster, member, f"chmod 600 {keys_dir}/*/* && chmod 700 {keys_dir}")


def run_command(action: str, hosts_file: str, keys: str | None = None) -> int:
    """`p3 cluster ACTION HOSTS_FILE` (p3.cli)."""
    cluster = load(hosts_file)
    if keys is not None:
        cluster = replace(cluster, keys=Path(keys).resolve())
    if action == "keys":
        if cluster.keys is None:
            raise HostsFileError(f"{hosts_file}: cluster.keys: missing (or give --keys DIR)")
        distribute_keys(cluster)
        print(f"p3 cluster: keys from {cluster.keys} copied to {len(cluster.members)} members")
        return 0
    try:
        return {"up": up, "down": down, "status": status}[action](cluster)
    except LaunchError as exc:
        print(f"p3 cluster {action}: {exc}", file=sys.stderr)
        return 1
