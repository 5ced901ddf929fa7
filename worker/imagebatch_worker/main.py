"""The ``imagebatch-worker`` command: run one shard of a batch and exit with its verdict.

Everything comes from the environment the Job sets (``IMAGEBATCH_*``, ``MINIO_*``,
``JOB_COMPLETION_INDEX``); ``--shard`` overrides the index for running a shard by hand.
The exit code is the contract with the Job (see ``runner``); a configuration the pod
cannot fix by restarting is ``EXIT_PERMANENT``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from imagebatch_common.contract import EXIT_PERMANENT, EXIT_RETRY
from imagebatch_common.storage import Storage
from imagebatch_common.storage_settings import StorageSettings
from imagebatch_worker.logs import JsonLog
from imagebatch_worker.runner import ShardLocation, ShardRunner
from imagebatch_worker.settings import WorkerSettings


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="imagebatch-worker",
        description="Fetch, compress and store the images of one ImageBatch shard.",
    )
    parser.add_argument(
        "--shard",
        type=int,
        default=None,
        metavar="N",
        help="shard index to run (default: $JOB_COMPLETION_INDEX)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    log = JsonLog()
    try:
        settings = WorkerSettings.from_env()
        storage = Storage(StorageSettings.from_env())
        location = ShardLocation.from_env(index=args.shard)
    except ValueError as error:
        log.emit("shard_failed", reason="configuration", error=str(error), exit=EXIT_PERMANENT)
        return EXIT_PERMANENT
    try:
        return ShardRunner(settings, storage, log=log).run(location)
    except Exception as error:  # unknown trouble: let the Job try the index again
        log.emit(
            "shard_failed",
            run=location.run,
            index=location.index,
            reason="unexpected",
            error=f"{type(error).__name__}: {error}",
            exit=EXIT_RETRY,
        )
        return EXIT_RETRY


if __name__ == "__main__":
    sys.exit(main())
