"""CurveZMQ with a key pair per member, bound to a role and a name.

    p3 keys generate DIR --nodes 2 --edges 1
        DIR/coordinator/coordinator.key(_secret)
        DIR/node/node-0.key(_secret), DIR/node/node-1.key(_secret)
        DIR/edge/edge-0.key(_secret)
    p3 keys add DIR node node-2        p3 keys revoke DIR node-1        p3 keys list DIR

A member's role is the folder its key is in and its name is the file's. Every process gets
--keys DIR and runs as one member (the coordinator; a node as its --node-id; an edge or a
client as its --edge-id): it needs its own secret file and the public files (`*.key`) of the
others; no host needs another member's secret. Sockets that bind (the coordinator's, a
node's for edges) are CURVE servers with their member's pair; sockets that connect pin the
server's public key, so an impostor at a member's address never completes the handshake.

A binder's ZAP handler (`Gate`) admits a client key only if it is a member's, of a role that
may connect there (nodes and edges to the coordinator, edges to a node), and stamps every
frame of that connection with the User-Id "role:name". `Door` then believes a frame only if
that role may send that message there, and the message and the socket's routing identity
claim that member's own name: a node key cannot speak for another node, submit work, or take
over an edge's identity. Revoking a key (`p3 keys revoke`) moves its public file to
DIR/revoked/: binders reread DIR within a second, refuse new handshakes with it and drop the
frames of connections already open. Without keys (`--insecure`) the wire is plain.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from p3.log import get_logger

log = get_logger(__name__)

ROLES = ("coordinator", "node", "edge")
COORDINATOR = "coordinator"  # the coordinator's name as well as its role
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
RELOAD_EVERY_S = 1.0


@dataclass(frozen=True)
class Member:
    role: str
    name: str

    @property
    def user_id(self) -> str:
        return f"{self.role}:{self.name}"


def _check_name(role: str, name: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {list(ROLES)}, got {role!r}")
    if not NAME.fullmatch(name):
        raise ValueError(f"a member's name is letters, digits, '_', '.', '-': got {name!r}")
    if (role == COORDINATOR) != (name == COORDINATOR):
        raise ValueError(f"the coordinator's key is named {COORDINATOR!r} (and only its key)")


def add_key(directory: str | os.PathLike, role: str, name: str) -> Path:
    """A new key pair for one member (its secret readable by the owner only)."""
    _check_name(role, name)
    root = Path(directory)
    if (found := _find(root, name)) is not None:
        raise ValueError(f"{name!r} already has a key in {root} (as a {found.role})")
    folder = root / role
    folder.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    public, secret = zmq.auth.create_certificates(folder, name)
    Path(secret).chmod(0o600)
    return Path(public)


def generate(
    directory: str | os.PathLike, nodes: list[str] | None = None, edges: list[str] | None = None
) -> Path:
    """A new cluster key set: the coordinator, and the named nodes and edges."""
    root = Path(directory)
    if root.exists() and any(root.glob("*/*.key")):
        raise ValueError(f"{root} holds keys already; `p3 keys add` adds members")
    add_key(root, COORDINATOR, COORDINATOR)
    for name in nodes if nodes is not None else ["node-0"]:
        add_key(root, "node", name)
    for name in edges if edges is not None else ["edge-0"]:
        add_key(root, "edge", name)
    return root


def revoke_key(directory: str | os.PathLike, name: str) -> Path:
    """Move a member's public key to DIR/revoked/ and delete its secret; binders refuse it."""
    root = Path(directory)
    member = _find(root, name)
    if member is None:
        raise ValueError(f"no key named {name!r} in {root}")
    revoked = root / "revoked" / member.role
    revoked.mkdir(parents=True, exist_ok=True)
    public = root / member.role / f"{name}.key"
    target = revoked / f"{name}.key"
    shutil.move(public, target)
    (root / member.role / f"{name}.key_secret").unlink(missing_ok=True)
    os.utime(root)  # binders notice at their next look
    return target


def list_keys(directory: str | os.PathLike) -> list[Member]:
    root = Path(directory)
    return [Member(role, p.stem) for role in ROLES for p in sorted((root / role).glob("*.key"))]


def _find(root: Path, name: str) -> Member | None:
    for role in ROLES:
        if (root / role / f"{name}.key").exists():
            return Member(role, name)
    return None


class Keyring:
    """One member's keys: its own pair, and the public keys of the others (reread when DIR
    changes, so keys added or revoked take effect without a restart)."""

    def __init__(self, directory: str | os.PathLike, role: str, name: str):
        _check_name(role, name)
        self.root = Path(directory)
        self.me = Member(role, name)
        secret_file = self.root / role / f"{name}.key_secret"
        try:
            self.public, self.secret = zmq.auth.load_certificate(secret_file)
        except (OSError, ValueError) as exc:
            known = [m.name for m in list_keys(self.root) if m.role == role]
            raise ValueError(
                f"no {role} key {name!r} in {self.root} ({exc}); its {role}s: {known}; "
                f"`p3 keys add {self.root} {role} {name}` makes one"
            ) from None
        if self.secret is None:
            raise ValueError(f"{secret_file} holds no secret key")
        self._by_key: dict[bytes, Member] = {}
        self._by_member: dict[Member, bytes] = {}
        self._read_at = float("-inf")
        self._mtime = None
        self._refresh(force=True)

    def public_key(self, role: str, name: str) -> bytes | None:
        self._refresh()
        return self._by_member.get(Member(role, name))

    def who(self, z85_key: bytes) -> Member | None:
        self._refresh()
        return self._by_key.get(z85_key)

    def is_member(self, member: Member) -> bool:
        self._refresh()
        return member in self._by_member

    def secure_server(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def secure_client(self, sock: zmq.Socket, server: Member) -> None:
        """Dial server only: a peer at its address without its secret key fails the handshake."""
        server_key = self.public_key(server.role, server.name)
        if server_key is None:
            raise ValueError(f"no public key for {server.role} {server.name!r} in {self.root}")
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = server_key

    def _public_file(self, member: Member) -> Path:
        return self.root / member.role / f"{member.name}.key"

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._read_at < RELOAD_EVERY_S:
            return
        self._read_at = now
        mtime = tuple(_mtime(self.root / role) for role in ("", *ROLES))
        if mtime == self._mtime:
            return
        self._mtime = mtime
        by_member = {}
        for member in list_keys(self.root):
            try:
                public, _ = zmq.auth.load_certificate(self._public_file(member))
            except (OSError, ValueError) as exc:
                log.warning("auth.bad_key_file", member=member.user_id, error=str(exc))
                continue
            by_member[member] = public
        self._by_member = by_member
        self._by_key = {key: member for member, key in by_member.items()}


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


class _Authenticator(AsyncioAuthenticator):
    def __init__(self, ctx: zmq.asyncio.Context, keyring: Keyring):
        super().__init__(ctx)
        self.keyring = keyring

    def curve_user_id(self, client_public_key: bytes) -> str:
        member = self.keyring.who(zmq.utils.z85.encode(client_public_key))
        return member.user_id if member is not None else ""


class Gate:
    """The ZAP handler of a process that binds: admits members of the given roles only."""

    def __init__(self, ctx: zmq.asyncio.Context, keyring: Keyring, admits: tuple[str, ...]):
        self.keyring = keyring
        self.admits = admits
        self.num_refused = 0
        self._refused: set[bytes] = set()
        self._auth = _Authenticator(ctx, keyring)
        self._auth.start()
        self._auth.configure_curve_callback("*", credentials_provider=self)

    def callback(self, domain: str, client_key: bytes) -> bool:
        member = self.keyring.who(client_key)
        if member is not None and member.role in self.admits:
            return True
        self.num_refused += 1
        if client_key not in self._refused:  # once per key: a stranger retries forever
            self._refused.add(client_key)
            log.warning(
                "auth.refused",
                owner=self.keyring.me.user_id,
                client_key=client_key.decode(),
                member=member.user_id if member else None,
                reason="a stranger's key" if member is None else f"a {member.role} may not connect",
            )
        return False

    def stop(self) -> None:
        self._auth.stop()


# What each role may send to a bound socket, by the binder's role.
ACCEPTS: dict[str, dict[str, tuple[str, ...]]] = {
    "coordinator": {
        "node": ("Hello", "Ready", "Heartbeat", "Fatal", "Goodbye", "Rendezvous"),
        "edge": ("EdgeHello",),
    },
    "node": {
        "edge": (
            "Submit",
            "Cancel",
            "Ping",
            "GetTokenizer",
            "Adopt",
            "LoadAdapter",
            "UnloadAdapter",
        ),
    },
}


def routing_name(identity: bytes) -> str:
    """The member name a routing identity claims: identities are "name/random" (make_socket)."""
    return identity.decode(errors="replace").partition("/")[0]


def claimed_name(msg: Any) -> str | None:
    """The member a message speaks for (its node_id or edge_id), or None."""
    for field in ("node_id", "edge_id"):
        if (value := getattr(msg, field, None)) is not None:
            return value
    return None


class Door:
    """Whether one bound socket believes a frame: its connection's member (the User-Id the
    Gate stamped) may send this message here, is not revoked, and the routing identity and
    the message name that member. A refused frame is counted and logged once per reason."""

    def __init__(self, keyring: Keyring):
        self.keyring = keyring
        self.accepts = ACCEPTS[keyring.me.role]
        self.num_refused = 0
        self._logged: set[tuple[str, str]] = set()

    def admit(self, user_id: str, identity: bytes, msg: Any) -> bool:
        role, _, name = user_id.partition(":")
        member = Member(role, name)
        kind = type(msg).__name__
        if kind not in self.accepts.get(role, ()):
            return self._refuse(user_id, f"a {role or 'stranger'} may not send {kind} here")
        if not self.keyring.is_member(member):
            return self._refuse(user_id, "its key was revoked")
        if routing_name(identity) != name:
            return self._refuse(user_id, f"routing identity {routing_name(identity)!r}")
        claimed = claimed_name(msg)
        if claimed is not None and claimed != name:
            return self._refuse(user_id, f"{kind} claims to be {claimed!r}")
        return True

    def _refuse(self, user_id: str, reason: str) -> bool:
        self.num_refused += 1
        if (user_id, reason) not in self._logged and len(self._logged) < 10_000:
            self._logged.add((user_id, reason))
            log.warning("auth.frame_refused", member=user_id, reason=reason)
        return False
