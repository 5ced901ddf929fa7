"""``kubectl imagebatch``: submit a CSV, follow it, fetch its results, retry what failed.

Installed as the console script ``kubectl-imagebatch``; kubectl finds it on PATH and
runs it for ``kubectl imagebatch ...`` (kubectl's plugin mechanism). It follows krew's
conventions: ``-n/--namespace``, ``--context`` and ``--kubeconfig`` mean what they mean
to kubectl (they are handed to the kubectl it runs, see ``kubectl.py``), every command
has ``--help``, and the exit codes in ``errors.py`` are the contract with scripts.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections.abc import Sequence
from importlib import metadata

from imagebatch_cli import commands
from imagebatch_cli.errors import CliError, ExitCode
from imagebatch_cli.kubectl import Kubectl

PROG = "kubectl imagebatch"

EXIT_CODES = """\
exit codes:
  0    done (the batch succeeded, or the command did what it was asked)
  1    the batch failed, or the CSV is invalid (nothing was created)
  2    usage: a wrong argument, or a request that does not fit the batch's state
  3    not found, or the cluster or the object store refused or could not be reached
  4    gave up waiting (--timeout)
  130  interrupted
"""

_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``1h30m`` -> seconds (argparse type)."""
    match = _DURATION.match(text.strip())
    if not text.strip() or match is None or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (examples: 90s, 10m, 1h)")
    hours, minutes, seconds = match.groups()
    total = int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0)
    if total <= 0:
        raise argparse.ArgumentTypeError("the timeout must be positive")
    return total


def _quality(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError("quality is 1 (smallest) to 100 (best)")
    return value


def _shard(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a shard is a number from 0: {text!r}")
    return int(text)


def _wrap(text: str) -> str:
    # The raw formatter keeps the exit-code table as written; prose is wrapped here.
    return textwrap.fill(text, width=78)


def _cluster_flags(parser: argparse.ArgumentParser, default: object) -> None:
    group = parser.add_argument_group("cluster (as for kubectl)")
    group.add_argument(
        "-n", "--namespace", default=default, help="the namespace (default: the context's)"
    )
    group.add_argument("--context", default=default, help="the kubeconfig context to use")
    group.add_argument("--kubeconfig", default=default, help="path to the kubeconfig file")


def _wait_flags(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--wait",
        action="store_true",
        help=f"show progress until {what} is over; exit 1 if the batch fails",
    )
    parser.add_argument(
        "--timeout",
        type=parse_duration,
        metavar="DURATION",
        help="with --wait: give up after this long (90s, 10m, 1h); exit 4, the batch goes on",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=_wrap(
            "Run ImageBatches from the command line: submit a CSV of product "
            "images, follow it, fetch its results, retry the images that failed."
        ),
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _cluster_flags(parser, None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        child = sub.add_parser(
            name,
            help=summary,
            description=_wrap(description),
            epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        # SUPPRESS: a flag given before the command is not reset by the command's default.
        _cluster_flags(child, argparse.SUPPRESS)
        return child

    p = command(
        "submit",
        "validate a CSV here, then create an ImageBatch for it",
        "Validate FILE with the operator's own CSV rules (nothing is created when it is "
        "invalid), then create the ImageBatch: the CSV inline when it is at most 32 KiB, "
        "else in a ConfigMap owned by the batch (at most 1 MiB).",
    )
    p.add_argument("file", metavar="FILE.csv", help="the products CSV")
    p.add_argument("--name", help="the ImageBatch's name (default: from the file name)")
    p.add_argument("--quality", type=_quality, help="encoder quality 1-100 (default 50)")
    p.add_argument(
        "--format",
        choices=("jpeg", "webp", "avif", "original"),
        help="output format (default jpeg)",
    )
    p.add_argument("--webhook", metavar="URL", help="called once when the batch is done")
    _wait_flags(p, "the batch")

    p = command(
        "status",
        "a batch's state, or a table of the namespace's batches",
        "With NAME: phase, conditions, counters, outputs, the webhook's state and the "
        "first errors. Without: one line per batch. Exit 1 when the named batch failed.",
    )
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument(
        "-A", "--all-namespaces", action="store_true", help="without NAME: every namespace"
    )

    p = command(
        "results",
        "download output.csv and errors.csv",
        "Download the batch's output.csv and errors.csv into DIR: from the operator's "
        "public URLs when it has them, else from the object store with your own "
        "credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN; "
        "AWS_ENDPOINT_URL for MinIO).",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("-o", "--output-dir", metavar="DIR", help="where to write (default: ./NAME)")
    p.add_argument(
        "--via",
        choices=("auto", "url", "s3"),
        default="auto",
        help="auto: the public URL, else S3; url or s3: only that way (default auto)",
    )

    p = command(
        "retry",
        "run again the images that failed",
        "Set spec.retry to a fresh token: the operator starts a new run of the batch for "
        "the images that have no output yet (the failed ones) and writes output.csv "
        "whole again. The token is a spec field, so the change shows in a git diff.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "--force",
        action="store_true",
        help="retry even while a run is in progress, when nothing failed, or when a "
        "GitOps tool applies the batch",
    )
    _wait_flags(p, "the new run")

    p = command(
        "logs",
        "the worker's lines of the current run, by shard",
        "Print what the worker pods of the batch's current run wrote (one JSON line per "
        "image and a summary per shard), shard by shard, through kubectl logs. Headers "
        "naming each pod go to stderr, so stdout stays JSON lines.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--shard", type=_shard, metavar="I", help="only shard I (from 0)")
    p.add_argument(
        "-f", "--follow", action="store_true", help="with --shard: follow its latest pod"
    )
    return parser


def _version() -> str:
    try:
        return metadata.version("imagebatch")
    except metadata.PackageNotFoundError:
        return "unknown"


def run(argv: Sequence[str], console: commands.Console) -> ExitCode:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if getattr(args, "follow", False) and args.shard is None:
        parser.error("--follow needs --shard")
    if getattr(args, "timeout", None) is not None and not args.wait:
        parser.error("--timeout needs --wait")
    kubectl = Kubectl(kubeconfig=args.kubeconfig, context=args.context, namespace=args.namespace)
    if args.command == "submit":
        options = commands.SubmitOptions(
            file=args.file,
            name=args.name,
            quality=args.quality,
            format=args.format,
            webhook=args.webhook,
            wait=args.wait,
            timeout=args.timeout,
        )
        return commands.run_submit(kubectl, options, console)
    if args.command == "status":
        if args.name and args.all_namespaces:
            parser.error("NAME and --all-namespaces do not go together")
        return commands.run_status(kubectl, args.name, args.all_namespaces, console)
    if args.command == "results":
        return commands.run_results(kubectl, args.name, args.output_dir, args.via, console)
    if args.command == "retry":
        return commands.run_retry(kubectl, args.name, args.wait, args.timeout, args.force, console)
    return commands.run_logs(kubectl, args.name, args.shard, args.follow, console)


def main(argv: Sequence[str] | None = None) -> int:
    console = commands.Console.system()
    try:
        return int(run(sys.argv[1:] if argv is None else argv, console))
    except CliError as error:
        console.note(f"error: {error.message}")
        return int(error.code)
    except KeyboardInterrupt:
        console.note("interrupted")
        return int(ExitCode.INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
