"""CurveZMQ on the cluster's sockets: authenticated and encrypted when keys are configured.

    p3 keys generate DIR      -> DIR/server.key(_secret), DIR/client.key(_secret)

Every process of a cluster gets the same DIR (--keys). Sockets that bind (the coordinator's,
a node's for edges) are CURVE servers with the server keypair; sockets that connect dial with
the client keypair and the server's public key. A process that binds runs a ZAP handler that
admits only the cluster's client key: a peer without it never completes the handshake, and
the refusal is logged ("auth.refused", with the key it showed). Without --keys, the wire is
plain (for loopback and trusted networks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from p3.log import get_logger

log = get_logger(__name__)


def generate(directory: str | os.PathLike) -> Path:
    """A new cluster key set in directory (created, secrets readable by the owner only)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for name in ("server", "client"):
        zmq.auth.create_certificates(path, name)
        (path / f"{name}.key_secret").chmod(0o600)
    return path


@dataclass(frozen=True)
class ClusterKeys:
    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ClusterKeys:
        path = Path(directory)
        try:
            server_public, server_secret = zmq.auth.load_certificate(path / "server.key_secret")
            client_public, client_secret = zmq.auth.load_certificate(path / "client.key_secret")
        except (OSError, ValueError) as exc:
            raise ValueError(f"no cluster keys in {path} ({exc}); run `p3 keys generate`") from None
        if server_secret is None or client_secret is None:
            raise ValueError(f"{path} lacks a secret key; run `p3 keys generate`")
        return cls(server_public, server_secret, client_public, client_secret)

    def secure(self, sock: zmq.Socket, serving: bool) -> None:
        """Before bind (serving) or connect: make sock a CURVE server or client."""
        if serving:
            sock.curve_secretkey = self.server_secret
            sock.curve_publickey = self.server_public
            sock.curve_server = True
        else:
            sock.curve_secretkey = self.client_secret
            sock.curve_publickey = self.client_public
            sock.curve_serverkey = self.server_public


class Gate:
    """The ZAP handler of a process that binds: admits the cluster's client key only."""

    def __init__(self, ctx: zmq.asyncio.Context, keys: ClusterKeys, owner: str):
        self.keys = keys
        self.owner = owner
        self.num_refused = 0
        self._auth = AsyncioAuthenticator(ctx)
        self._auth.start()
        self._auth.configure_curve_callback("*", credentials_provider=self)

    def callback(self, domain: str, client_key: bytes) -> bool:
        if client_key == self.keys.client_public:
            return True
        self.num_refused += 1
        log.warning("auth.refused", owner=self.owner, client_key=client_key.decode())
        return False

    def stop(self) -> None:
        self._auth.stop()
