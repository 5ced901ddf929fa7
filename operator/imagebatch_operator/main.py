"""``imagebatch-operator``: run the kopf operator with ImageBatch's handlers.

One replica, standalone (no peering): the chart runs it with the Recreate strategy, so
two operators never act on the same batch. ``IMAGEBATCH_WATCH_NAMESPACES`` (comma
separated) limits it to some namespaces; empty watches the whole cluster.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import kopf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="imagebatch-operator", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--namespace",
        action="append",
        default=[
            n.strip()
            for n in os.environ.get("IMAGEBATCH_WATCH_NAMESPACES", "").split(",")
            if n.strip()
        ],
        help="watch only this namespace (repeatable); default: every namespace",
    )
    parser.add_argument(
        "--liveness",
        default=os.environ.get("IMAGEBATCH_LIVENESS_ENDPOINT", "http://0.0.0.0:8080/healthz"),
        help="kopf's liveness endpoint (the chart's livenessProbe)",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    from imagebatch_operator import handlers  # noqa: F401  (registers the handlers)

    namespaces: list[str] = list(args.namespace)
    # The controller's own watch of shard pods reads the same list (settings).
    os.environ["IMAGEBATCH_WATCH_NAMESPACES"] = ",".join(namespaces)
    kopf.run(
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=args.liveness or None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
