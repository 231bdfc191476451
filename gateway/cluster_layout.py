"""What compose.yaml mounts (issue 11 item 4): `gateway cluster-layout DIR` writes a 3-node
cluster's secrets and configuration from the registry, never by hand. Each NATS node gets its
config: TLS for clients with the handshake first, routes whose TLS both sides verify, R3 JetStream,
and the registry's NKey users (auth.conf). Every worker gets settings that pin the CA and the
policy signers. The seeds (creds/) and the broker key are 0600 and are never committed: the folder
is made on the machine that deploys.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import nats_auth, policy_admin, tls
from .services import catalog
from .services.policy import load_bundle

NATS_MOUNT = "/etc/nats"  # where compose.yaml mounts DIR in a NATS container
WORKER_MOUNT = "/etc/gateway"  # and in a worker's
CLIENT_PORT, ROUTE_PORT = 4222, 6222


def node_names(nodes: int) -> list[str]:
    """The NATS services of compose.yaml: nats-1 .. nats-N."""
    return [f"nats-{i + 1}" for i in range(nodes)]


def node_config(name: str, peers: list[str], mount: str) -> str:
    """One node's nats-server configuration; `mount` is where DIR is inside its container."""
    certs = tls.BusCerts(Path(mount) / "tls" / "ca.pem", Path(mount) / "tls" / "broker.pem",
                         Path(mount) / "tls" / "broker-key.pem")
    routes = ", ".join(f'"nats-route://{p}:{ROUTE_PORT}"' for p in peers)
    return (f'server_name: "{name}"\n'
            f'listen: "0.0.0.0:{CLIENT_PORT}"\n'
            "max_payload: 1MB\n"
            'jetstream { store_dir: "/data" }\n'
            + tls.server_block(certs, verify=False)
            + f'cluster {{ name: "gw", listen: "0.0.0.0:{ROUTE_PORT}", routes: [{routes}]\n'
            + tls.server_block(certs, verify=True) + "}\n"
            f'include "{nats_auth.AUTH_FILE}"\n')


def write(folder: Path, policy_dir: Path, endpoints: dict[str, str], signers: list[Path],
          nodes: int = 3) -> list[Path]:
    """Lay out DIR for compose.yaml; returns the files written. Existing seeds and certificates
    are kept (re-running it must not lock out the running workers)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o750)
    names = node_names(nodes)
    creds = folder / "creds"
    nats_auth.ensure_creds(creds)
    nats_auth.record_endpoints(creds, catalog.all_endpoints(load_bundle(policy_dir).catalog) | set(endpoints))
    certs = tls.make(folder / "tls", (*names, "localhost", "127.0.0.1"))
    written = [nats_auth.write_authorization(creds, folder), certs.ca_file, certs.cert_file, certs.key_file]
    for name in names:
        path = folder / f"{name}.conf"
        path.write_text(node_config(name, [n for n in names if n != name], NATS_MOUNT))
        written.append(path)
    if signers:
        pinned = policy_admin.trusted(signers)
    else:  # a dev signer of the layout's own, said out loud by the command
        _, public, _ = policy_admin.dev_signer(folder / "keys")
        pinned = {public.kid: public.public_key}
    settings = {
        "nats_url": ",".join(f"tls://{n}:{CLIENT_PORT}" for n in names),
        "data_dir": "/var/lib/gateway",
        "policy_dir": "/app/policies",
        "endpoints": endpoints,
        "http_host": "0.0.0.0",
        "http_port": 8080,
        "creds_dir": f"{WORKER_MOUNT}/creds",
        "nats_ca_file": f"{WORKER_MOUNT}/tls/ca.pem",
        "policy_signers": pinned,
        "trust_dev_issuer": False,  # only the bundle's issuers.jwks.json: the enclave's identity service
    }
    path = folder / "worker-settings.json"
    path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    written.append(path)
    return written
