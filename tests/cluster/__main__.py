"""``make cluster``: build what is missing, start the local stack, wait for Ctrl-C."""

from __future__ import annotations

import signal
import sys
import threading

from tests.cluster.stack import LocalCluster


def main() -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with LocalCluster() as cluster:
        assert cluster.minio is not None
        print(f"cluster ready in {cluster.startup_seconds:.1f}s", flush=True)
        print(f"export KUBECONFIG={cluster.kubeconfig}")
        print(f"export PATH={cluster.workdir / 'tools'}:$PATH   # kubectl, helm")
        print(
            f"MinIO: {cluster.minio.url} (user {cluster.minio.access_key}, "
            f"password {cluster.minio.secret_key})"
        )
        print(f"pod logs: {cluster.pod_logs}")
        print("Ctrl-C stops everything.", flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    print("stopped; nothing left running.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
