"""Fixtures that start real servers: the local cluster, MinIO, namespaces.

The unit tests need none of them. ``e2e``-marked tests get a session-wide
``LocalCluster`` (etcd, kube-apiserver, kube-controller-manager, MinIO and the node
agent) or MinIO alone; each test gets its own namespace and its own bucket.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.cluster.stack import LocalCluster, MinioServer


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """The whole local stack, started once per test session and stopped at its end."""
    with LocalCluster(keep=os.environ.get("IMAGEBATCH_KEEP_CLUSTER") == "1") as running:
        yield running


@pytest.fixture(scope="session")
def minio_server(request: pytest.FixtureRequest) -> Iterator[MinioServer]:
    """A real MinIO server: the cluster's if the session has one, else MinIO alone."""
    if any("cluster" in getattr(item, "fixturenames", ()) for item in request.session.items):
        running: LocalCluster = request.getfixturevalue("cluster")
        assert running.minio is not None
        yield running.minio
        return
    with LocalCluster(kubernetes=False) as alone:
        assert alone.minio is not None
        yield alone.minio


@pytest.fixture
def bucket(minio_server: MinioServer) -> Iterator[str]:
    """A fresh, empty bucket for one test."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    client = minio_server.client()
    client.make_bucket(name)
    yield name


@pytest.fixture
def namespace(cluster: LocalCluster) -> Iterator[str]:
    """A namespace of its own for one test, with its default ServiceAccount ready."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    cluster.kubectl("create", "namespace", name)
    cluster.wait_for(
        lambda: cluster.kubectl_ok("get", "serviceaccount", "default", "-n", name),
        f"default ServiceAccount in {name}",
    )
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
