"""``python -m worker run ...``: the command line of the reference worker agent."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from worker.config import GPU_VENDORS, WorkerConfig, parse_backends, parse_bytes, parse_labels, parse_port_range

log = logging.getLogger("worker")

TOKEN_ENV = "CONTROLPLANE_REGISTRATION_TOKEN"
SERVICE_TOKEN_ENV = "WORKER_SERVICE_TOKEN"
BACKEND_TOKEN_ENV = "WORKER_BACKEND_TOKEN"
STATE_DIR_ENV = "WORKER_STATE_DIR"
TLS_CERT_ENV = "WORKER_TLS_CERT"
TLS_KEY_ENV = "WORKER_TLS_KEY"
TLS_CLIENT_CA_ENV = "WORKER_TLS_CLIENT_CA"
TLS_CA_ENV = "WORKER_TLS_CA"


def default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "controlplane-worker")


def _arg(parser_fn):
    """Wrap a parser so argparse reports its ValueError as a usage error."""

    def parse(text):
        try:
            return parser_fn(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = parser_fn.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker",
        description="Reference worker agent: registers with the control plane, heartbeats, and "
        "starts one backend process per (model, replica) on request.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run the worker",
        description="Serve the Worker gRPC service, register with the control plane and "
        "heartbeat until SIGTERM/SIGINT, then drain, deregister and stop every backend.",
    )
    run.add_argument("--control-plane", metavar="URL", help="control plane base URL, e.g. http://cp:8000")
    run.add_argument(
        "--registration-token",
        metavar="TOKEN",
        default=None,
        help=f"fleet registration token (default: env {TOKEN_ENV}); used only to register: the "
        "worker service and the backends accept the tokens the registration answer hands over",
    )
    run.add_argument(
        "--state-dir",
        metavar="DIR",
        default=None,
        help=f"where the node token is kept (mode 0600) so a restarted worker can re-register its "
        f"name (default: env {STATE_DIR_ENV}, else $XDG_STATE_HOME or ~/.local/state, /controlplane-worker)",
    )
    run.add_argument("--name", help="node name, the re-registration key (default: host name)")
    run.add_argument(
        "--advertise", default="127.0.0.1", metavar="HOST", help="host the control plane dials (default: %(default)s)"
    )
    run.add_argument("--port", type=int, default=50051, help="port of the Worker gRPC service (default: %(default)s)")
    run.add_argument(
        "--bind-host", metavar="HOST", help="host to listen on for the service and backends (default: --advertise)"
    )
    memory = run.add_mutually_exclusive_group()
    memory.add_argument("--vram", type=_arg(parse_bytes), metavar="BYTES", help="total VRAM (e.g. 25769803776, 24GiB)")
    memory.add_argument("--ram", type=_arg(parse_bytes), metavar="BYTES", help="total RAM, for a worker without GPU")
    run.add_argument("--gpu-vendor", choices=GPU_VENDORS, default="unknown", help="(default: %(default)s)")
    run.add_argument(
        "--backend",
        action="append",
        default=[],
        metavar="NAME=COMMAND",
        help="backend_type name and the command that starts it (repeatable); 'echo' is built in",
    )
    run.add_argument("--labels", action="append", default=[], metavar="k=v,...", help="node labels (repeatable)")
    run.add_argument(
        "--max-replicas-per-model",
        type=int,
        default=1,
        metavar="N",
        help="replica slots per model on this node (default: %(default)s)",
    )
    run.add_argument(
        "--heartbeat-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="(default: %(default)s)",
    )
    run.add_argument(
        "--backend-port-range",
        type=_arg(parse_port_range),
        default="50100-50199",
        metavar="LOW-HIGH",
        help="ports handed to backend processes (default: %(default)s)",
    )
    run.add_argument(
        "--backend-health-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long a new backend may take to answer Health (default: %(default)s)",
    )
    run.add_argument(
        "--backend-stop-grace",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="time between SIGTERM and SIGKILL when stopping a backend (default: %(default)s)",
    )
    run.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="at shutdown, how long to wait for in-flight requests (default: %(default)s)",
    )
    tls = run.add_argument_group("TLS (docs/tls.md)")
    tls.add_argument(
        "--tls-cert",
        metavar="FILE",
        help=f"PEM certificate (chain) the worker service and its TLS backends serve; with it the "
        f"worker advertises grpcs://HOST:PORT (default: env {TLS_CERT_ENV}; unset: plaintext)",
    )
    tls.add_argument("--tls-key", metavar="FILE", help=f"PEM private key of --tls-cert (default: env {TLS_KEY_ENV})")
    tls.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help=f"require a client certificate signed by this CA on every call (mutual TLS; default: env "
        f"{TLS_CLIENT_CA_ENV})",
    )
    tls.add_argument(
        "--tls-ca",
        metavar="FILE",
        help=f"CA the worker verifies its TLS backends with, also trusted for an https control plane "
        f"(default: env {TLS_CA_ENV}; unset: the default roots)",
    )
    tls.add_argument(
        "--tls-backend",
        action="append",
        default=[],
        metavar="NAME",
        help="a --backend that serves TLS from the BACKEND_TLS_CERT/_KEY/_CLIENT_CA environment "
        "(repeatable; the built-in echo always does; LocalAI's backends cannot and stay plaintext)",
    )
    run.add_argument(
        "--no-register",
        dest="register",
        action="store_false",
        help="do not talk to a control plane; only serve the Worker gRPC service (then the tokens "
        f"of env {SERVICE_TOKEN_ENV} and {BACKEND_TOKEN_ENV} are required)",
    )
    run.add_argument(
        "--log-level",
        default=os.environ.get("WORKER_LOG_LEVEL", "INFO"),
        help="DEBUG also logs every line backends print (default: %(default)s, env WORKER_LOG_LEVEL)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    """Raises ValueError with a message fit for the user."""
    token = args.registration_token or os.environ.get(TOKEN_ENV) or ""
    service_token = backend_token = None
    if args.register and not token:
        raise ValueError(f"a registration token is required (--registration-token or {TOKEN_ENV})")
    if not args.register:
        service_token, backend_token = os.environ.get(SERVICE_TOKEN_ENV), os.environ.get(BACKEND_TOKEN_ENV)
        if not service_token or not backend_token:
            raise ValueError(f"--no-register needs {SERVICE_TOKEN_ENV} and {BACKEND_TOKEN_ENV} in the environment")
        if token and token in (service_token, backend_token):
            raise ValueError("the worker service and backend tokens must differ from the registration token")
    if args.register and not args.control_plane:
        raise ValueError("--control-plane is required (or --no-register)")
    if args.max_replicas_per_model < 0:
        raise ValueError("--max-replicas-per-model must be >= 0")
    if args.heartbeat_interval <= 0:
        raise ValueError("--heartbeat-interval must be > 0")
    tls_cert = args.tls_cert or os.environ.get(TLS_CERT_ENV) or None
    tls_key = args.tls_key or os.environ.get(TLS_KEY_ENV) or None
    tls_client_ca = args.tls_client_ca or os.environ.get(TLS_CLIENT_CA_ENV) or None
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if tls_client_ca and not tls_cert:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
    backends = parse_backends(args.backend)
    unknown = sorted(set(args.tls_backend) - set(backends))
    if unknown:
        raise ValueError(f"--tls-backend names no --backend: {', '.join(unknown)}")
    tls_ca = args.tls_ca or os.environ.get(TLS_CA_ENV) or None
    files = ((tls_cert, "--tls-cert"), (tls_key, "--tls-key"), (tls_client_ca, "--tls-client-ca"), (tls_ca, "--tls-ca"))
    for path, flag in files:
        if path and not os.access(path, os.R_OK):
            raise ValueError(f"{flag}: cannot read {path!r}")
    return WorkerConfig(
        registration_token=token,
        name=args.name or os.uname().nodename,
        advertise_host=args.advertise,
        port=args.port,
        control_plane=args.control_plane,
        bind_host=args.bind_host,
        total_vram=args.vram,
        total_ram=args.ram,
        gpu_vendor=args.gpu_vendor,
        backends=backends,
        labels=parse_labels(args.labels),
        max_replicas_per_model=args.max_replicas_per_model,
        heartbeat_interval=args.heartbeat_interval,
        backend_port_range=args.backend_port_range,
        backend_health_timeout=args.backend_health_timeout,
        backend_stop_grace=args.backend_stop_grace,
        drain_timeout=args.drain_timeout,
        register=args.register,
        state_dir=args.state_dir or os.environ.get(STATE_DIR_ENV) or default_state_dir(),
        service_token=service_token,
        backend_token=backend_token,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
        tls_ca=tls_ca,
        tls_backends=frozenset(args.tls_backend),
    )


class _NodeIdFilter(logging.Filter):
    """Puts the node id (``-`` until registered) on every log record."""

    def __init__(self, agent=None):
        super().__init__()
        self.agent = agent

    def filter(self, record):
        record.node_id = (self.agent and self.agent.node_id) or "-"
        return True


def _setup_logging(level: str) -> _NodeIdFilter:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s node=%(node_id)s %(name)s: %(message)s"))
    node_filter = _NodeIdFilter()
    handler.addFilter(node_filter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return node_filter


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    node_filter = _setup_logging(args.log_level)

    from worker.agent import WorkerAgent  # after logging: importing grpc may log
    from worker.service import BindError

    agent = WorkerAgent(config)
    node_filter.agent = agent
    signals: list[int] = []
    # The handler only records the signal; the main thread acts on it outside the handler, so
    # no lock is ever taken from signal context.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: signals.append(signum))

    result: list[int] = []

    def run_agent():
        try:
            result.append(agent.run())
        except BindError as exc:
            log.error("%s", exc)
            result.append(1)
        except Exception:
            log.exception("worker failed")
            result.append(1)

    thread = threading.Thread(target=run_agent, name="agent")
    thread.start()
    handled = 0
    while thread.is_alive():
        thread.join(0.2)
        while handled < len(signals):
            log.info("received %s", signal.Signals(signals[handled]).name)
            handled += 1
            agent.request_stop()
    return result[0] if result else 1
