"""``python -m cpclient``: the operator CLI, with the habits of ``kubectl``.

Configuration: ``CONTROLPLANE_URL`` (default ``http://127.0.0.1:8000``) and
``CONTROLPLANE_API_KEY`` (an ``operator`` key), overridden by ``--url`` and ``--api-key``.
Global options may come before or after the command.

Exit codes (``EXIT_*``): 0 done; 1 the control plane refused (the problem's title, detail and
code on standard error); 2 usage (a bad flag or argument, no URL); 3 not found (model, node);
4 authentication or permission (no key, an invalid or revoked key, a frontend key); 5 the
control plane cannot be reached. Ctrl-C stops ``events --follow`` with 0, anything else with 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import commands
from .client import ControlPlaneClient
from .errors import AuthenticationError, ControlPlaneError, NotFoundError, PermissionError_, TransportError

EXIT_OK = 0
EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_AUTH = 4
EXIT_UNREACHABLE = 5
EXIT_INTERRUPTED = 130

DEFAULT_URL = "http://127.0.0.1:8000"
PROG = "python -m cpclient"

EPILOG = """\
environment:
  CONTROLPLANE_URL      the control plane's base URL (default http://127.0.0.1:8000)
  CONTROLPLANE_API_KEY  an operator API key (manage.py create_api_key NAME --role operator)

exit codes:
  0 ok, 1 API error, 2 usage error, 3 not found, 4 authentication/permission, 5 cannot connect
"""


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors on exit code 2 (its own default) and the epilog kept."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)


def _global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The global options; on a command's parser without defaults (``SUPPRESS``), so that a
    value given before the command is not reset by the command's parser."""

    def default(value):
        return value if defaults else argparse.SUPPRESS

    group = parser.add_argument_group("global options")
    group.add_argument("--url", default=default(None), help="control plane base URL (env CONTROLPLANE_URL)")
    group.add_argument("--api-key", default=default(None), help="operator API key (env CONTROLPLANE_API_KEY)")
    group.add_argument(
        "-o",
        "--output",
        choices=("table", "wide", "json"),
        default=default("table"),
        help="table (default), wide (more columns) or json",
    )
    group.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=default(10.0),
        metavar="SECONDS",
        help="seconds one HTTP exchange may take (default 10)",
    )


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="Operate the control plane through its operator API (/api/v1/).",
        epilog=EPILOG,
    )
    _global_options(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def command(name: str, help_text: str, *, aliases: Sequence[str] = (), handler=None, parent=None):
        target = parent or sub
        child = target.add_parser(name, help=help_text, description=help_text, aliases=list(aliases), epilog=EPILOG)
        _global_options(child, defaults=False)
        if handler is not None:
            child.set_defaults(handler=handler)
        return child

    nodes = command("nodes", "List nodes: name, status, labels, replicas, heartbeat age.", handler=commands.nodes)
    nodes.add_argument("--status", help="only nodes in this status (healthy, draining, pending, ...)")
    nodes.add_argument("-l", "--selector", dest="label", metavar="LABEL", help="only nodes with label KEY or KEY=VALUE")

    models = command("models", "List models: desired and ready replicas, conditions.", handler=commands.models)
    models.add_argument("--name", help="only models whose name contains this (case-insensitive)")

    describe = command("describe", "Show one model or node in detail.")
    kinds = describe.add_subparsers(dest="kind", metavar="KIND", parser_class=Parser, required=True)
    model = command(
        "model",
        "A model: counts, scheduling, conditions, replicas (node, state, in flight), recent events.",
        handler=commands.describe_model,
        parent=kinds,
    )
    model.add_argument("name", metavar="MODEL")
    model.add_argument("--events", type=_count, default=10, metavar="N", help="recent events to show (default 10)")
    node = command(
        "node",
        "A node: status, resources, labels, its replicas, recent events.",
        handler=commands.describe_node,
        parent=kinds,
    )
    node.add_argument("name", metavar="NODE", help="node name or id")
    node.add_argument("--events", type=_count, default=10, metavar="N", help="recent events to show (default 10)")

    for name, aliases, help_text, handler in (
        ("drain", (), "Drain a node: no new work, in-flight work finishes; only an operator lifts it.", commands.drain),
        ("resume", ("undrain", "uncordon"), "Lift a node's drain, whoever set it.", commands.resume),
        ("approve", (), "Approve a pending node.", commands.approve),
    ):
        action = command(name, help_text, aliases=aliases, handler=handler)
        action.add_argument("name", metavar="NODE", help="node name or id")

    scale = command(
        "scale",
        "Set a model's replica counts (its scheduling config; the node selector is kept).",
        handler=commands.scale,
    )
    scale.add_argument("name", metavar="MODEL")
    scale.add_argument("--min", dest="min_replicas", type=_count, required=True, help="replicas to keep (floor)")
    scale.add_argument(
        "--max", dest="max_replicas", type=_count, help="at most this many (0 = unlimited; default: kept)"
    )

    events = command(
        "events",
        "List events, oldest first (the newest --limit); --follow keeps printing new ones until Ctrl-C.",
        handler=commands.events,
    )
    events.add_argument("--model", help="only events of this model")
    events.add_argument("--node", help="only events of this node (name or id)")
    events.add_argument("--kind", help="only events of this kind (node_offline, replica_added, ...)")
    events.add_argument("--limit", type=_positive_int, default=50, help="newest events to list (default 50, max 1000)")
    events.add_argument(
        "-f", "-w", "--follow", "--watch", dest="follow", action="store_true", help="poll for new events until Ctrl-C"
    )
    events.add_argument(
        "--interval", type=_positive_float, default=2.0, metavar="SECONDS", help="seconds between polls (default 2)"
    )

    command("reconcile", "Run one reconcile pass now and show its summary.", handler=commands.reconcile)
    return parser


def client_for(options: argparse.Namespace) -> ControlPlaneClient:
    return ControlPlaneClient(
        options.url,
        options.api_key,
        timeout=options.request_timeout,
        max_retries=2,  # a read retried twice on a lost connection or a 503, within about a second
        backoff_base=0.2,
        backoff_max=1.0,
    )


def report(error: ControlPlaneError, url: str) -> None:
    if isinstance(error, TransportError):
        print(f"error: cannot connect to the control plane at {url}: {error.detail}", file=sys.stderr)
        return
    title = str(error.problem.get("title") or type(error).__name__)
    detail = error.detail or str(error.problem.get("detail") or "")
    where = f"HTTP {error.status}, code {error.code}" if error.status else f"code {error.code}"
    print(f"error: {title} ({where})" + (f": {detail}" if detail else ""), file=sys.stderr)


def exit_code(error: ControlPlaneError) -> int:
    if isinstance(error, TransportError):
        return EXIT_UNREACHABLE
    if isinstance(error, (AuthenticationError, PermissionError_)):
        return EXIT_AUTH
    if isinstance(error, NotFoundError):
        return EXIT_NOT_FOUND
    return EXIT_API_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    if getattr(options, "handler", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    options.url = (options.url or os.environ.get("CONTROLPLANE_URL") or DEFAULT_URL).rstrip("/")
    options.api_key = options.api_key or os.environ.get("CONTROLPLANE_API_KEY") or ""
    if not options.url.startswith(("http://", "https://")):
        parser.error(f"the control plane URL must start with http:// or https://: {options.url!r}")
    if not options.api_key:
        print("error: no API key: set CONTROLPLANE_API_KEY or pass --api-key (an operator key)", file=sys.stderr)
        return EXIT_AUTH
    try:
        return options.handler(client_for(options), options, commands.Output(options.output, sys.stdout))
    except ControlPlaneError as error:
        report(error, options.url)
        return exit_code(error)
    except ValueError as error:  # an argument no request can carry (an empty model name)
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into `head`: stop quietly (no error at exit either)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
