"""compose.yaml against what `gateway cluster-layout` writes (issue 11 item 4). No Docker engine
runs here, so the file is checked the way compose would resolve it: every mounted file exists in a
generated layout, every node's configuration is valid to nats-server itself (`-t`), and every
worker's command and settings are ones the gateway accepts."""

from __future__ import annotations

import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import yaml
from enclave_gateway import cli, cluster_layout, nats_auth
from enclave_gateway.broker import binary
from enclave_gateway.services.settings import WorkerSettings
from enclave_gateway.services import fact_signatures

ROOT = Path(__file__).resolve().parent.parent
LAYOUT = "./deploy/cluster"


def _layout(tmp: Path) -> Path:
    folder = tmp / "deploy" / "cluster"
    cluster_layout.write(folder, ROOT / "policies", {"gpu-pool-a": "http://gpu-a:8000"}, [])
    return folder


def test_every_file_compose_mounts_is_one_the_layout_writes(tmp_path: Path) -> None:
    folder = _layout(tmp_path)
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith(LAYOUT):
                assert (folder / source.removeprefix(LAYOUT).lstrip("/")).exists(), (name, source)
    nats = sorted(n for n in compose["services"] if n.startswith("nats-"))
    assert nats == cluster_layout.node_names(3)
    for node in nats:
        conf = compose["services"][node]["command"][-1]
        assert (folder / Path(conf).name).is_file(), conf


def test_each_generated_node_configuration_is_valid_to_nats_server(tmp_path: Path) -> None:
    folder = _layout(tmp_path)
    names = cluster_layout.node_names(3)
    for name in names:  # the same text, with the container's mount point at this folder
        text = cluster_layout.node_config(name, [n for n in names if n != name], str(folder))
        assert 'handshake_first: true' in text and "verify: true" in text
        (folder / f"check-{name}.conf").write_text(text.replace('store_dir: "/data"',
                                                                f'store_dir: "{tmp_path / name}"'))
        checked = subprocess.run([str(binary()), "-t", "-c", str(folder / f"check-{name}.conf")],
                                 capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    auth = (folder / nats_auth.AUTH_FILE).read_text()
    assert "gpu-pool-a" in auth or "gpu-pool-a" in (folder / "creds" / nats_auth.ENDPOINTS_FILE).read_text()
    assert oct((folder / "tls" / "broker-key.pem").stat().st_mode & 0o777) == "0o600"


def test_every_worker_command_and_its_settings_are_accepted_by_the_gateway(tmp_path: Path) -> None:
    folder = _layout(tmp_path)
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    settings = msgspec.json.decode((folder / "worker-settings.json").read_bytes(), type=WorkerSettings)
    hosts = {urlsplit(u).hostname for u in settings.nats_url.split(",")}
    assert hosts == set(cluster_layout.node_names(3)) and settings.nats_url.startswith("tls://")
    assert settings.policy_signers and not settings.trust_dev_issuer
    parser = cli.parser()
    for name, service in compose["services"].items():
        command = service.get("command", [])
        if command[:1] != ["gateway"]:
            continue
        args = parser.parse_args(command[1:])
        mounts = {v.split(":")[1] for v in service.get("volumes", []) if v.count(":") >= 1}
        if getattr(args, "settings", None):
            assert args.settings in mounts, (name, args.settings)
            assert settings.nats_ca_file in mounts, name
            identity = "admin" if args.command == "bus-setup" else args.name
            seeds = sorted(m for m in mounts if m.startswith(settings.creds_dir))
            # its own NKey seed and no other (a compromised container holds one identity), and the
            # public keys every fact is checked against: without them a worker signs and checks nothing
            assert seeds == sorted([f"{settings.creds_dir}/{identity}.nk",
                                    f"{settings.creds_dir}/{fact_signatures.PINS_FILE}"]), (name, seeds)


def test_a_nats_node_mounts_its_config_users_and_tls_and_no_seed(tmp_path: Path) -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    for node in cluster_layout.node_names(3):
        sources = [v.split(":")[0] for v in compose["services"][node]["volumes"]]
        assert not any("creds" in src or "keys" in src for src in sources), (node, sources)
        assert f"{LAYOUT}/{node}.conf" in sources and f"{LAYOUT}/{nats_auth.AUTH_FILE}" in sources
