"""The process fault tests of test_faults.py, on the 3-node local cluster (issue 11, "each fault
test passes, on one node and on the 3-node local cluster"): every worker and the model server a
process under the supervisor, as `gateway up` runs them, on an R3 stream over three TLS
nats-servers routed on loopback. The nodes are the cluster's, not the gateway's: it neither
starts nor restarts them (a node killed during traffic is test_cluster.py's, with two replicas
of every worker; the broker frozen or full is one node's, in test_faults.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from enclave_gateway.cluster import LocalCluster, stream_leader
from enclave_gateway.runtime import Gateway
from enclave_gateway.services import bus
from nats.aio.client import Client

from .test_faults import (
    _supervised,
    fault_bundle,
    kill_each_worker_in_turn,
    kill_the_model_server,
    let_the_budget_fall_behind,
    restart_the_whole_gateway_during_traffic,
    slow_model,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")
__all__ = ["slow_model"]  # the module fixture, shared


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, slow_model: str) -> Iterator[Gateway]:
    policies = fault_bundle(tmp_path_factory.mktemp("cluster-fault-policies"))
    data = tmp_path_factory.mktemp("cluster-fault-data")
    cluster = LocalCluster(data / "bus", data / "creds", endpoints=("slow", "local-llama"))
    cluster.start()
    try:
        assert cluster.certs is not None
        gw = Gateway(data, policies, nats_port=-1, http_port=0, endpoints={"slow": slow_model},
                     serve_tiny="local-llama", request_timeout_s=30.0, bus_url=cluster.url,
                     bus_ca_file=str(cluster.certs.ca_file), stream_replicas=3)
        gw.say = lambda line: None
        with gw:
            done = _supervised(gw)
            yield gw
            done.set()
    finally:
        cluster.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def admin(gateway: Gateway) -> AsyncIterator[Client]:
    nc = await bus.connect(gateway.settings, "admin")
    yield nc
    await nc.close()


async def test_the_gateway_runs_on_the_clusters_r3_stream_with_no_broker_of_its_own(gateway: Gateway) -> None:
    assert gateway.broker is None and gateway.nats_url.count(",") == 2
    leader, replicas = await stream_leader(gateway.settings)
    assert leader and len(replicas) == 2  # the leader and two followers


async def test_kill_9_of_each_worker_mid_request_on_the_cluster_is_restarted_and_nothing_lost(
        gateway: Gateway, admin: Client, tmp_path: Path) -> None:
    await kill_each_worker_in_turn(gateway, admin, tmp_path)


async def test_the_whole_gateway_restarted_during_traffic_on_the_cluster_records_every_request(
        gateway: Gateway, admin: Client, tmp_path: Path) -> None:
    await restart_the_whole_gateway_during_traffic(gateway, admin, tmp_path)


async def test_a_model_server_that_dies_on_the_cluster_is_restarted_and_its_callers_told_the_truth(
        gateway: Gateway, admin: Client) -> None:
    await kill_the_model_server(gateway, admin)


async def test_a_stage_that_falls_behind_on_the_cluster_catches_up_and_nothing_is_lost_or_charged_twice(
        gateway: Gateway, admin: Client) -> None:
    await let_the_budget_fall_behind(gateway, admin)
