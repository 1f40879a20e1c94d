"""Settings, read from environment variables with safe defaults: THE settings table.

Every setting and its default is defined here once, with one comment; code reads
``settings.NAME`` and never carries a default of its own (tests/ops/test_settings_table.py).
Every knob is documented in the README ("Configuration") or docs/operations.md ("Settings").
Nothing here has a default
credential: the secret key is generated per checkout for development (see ``_secret_key``)
and the registration token must be set explicitly.
"""

import os
import secrets
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from core.logs import logging_config
from proto.client import DEFAULT_TIMEOUTS

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("CONTROLPLANE_VAR_DIR", BASE_DIR / "var"))


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def env_optional_float(name: str) -> float | None:
    """A number of seconds, or None when unset: the reader derives the value from other
    settings (each such setting's comment says how)."""
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else None


def _secret_key() -> str:
    """DJANGO_SECRET_KEY, else a random key kept in var/ so sessions survive a restart.

    A random per-checkout key is safe (nothing guessable ships in the repository); production
    deployments set DJANGO_SECRET_KEY so that every web process shares it.
    """
    configured = os.environ.get("DJANGO_SECRET_KEY")
    if configured:
        return configured
    key_file = VAR_DIR / "secret_key"
    try:
        return key_file.read_text().strip()
    except FileNotFoundError:
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(50)
        key_file.write_text(key)
        key_file.chmod(0o600)
        return key


SECRET_KEY = _secret_key()
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = [
    h for h in os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver").split(",") if h
]
CSRF_TRUSTED_ORIGINS = [o for o in os.environ.get("DJANGO_CSRF_TRUSTED_ORIGINS", "").split(",") if o]

# --- HTTPS behind the reverse proxy (docs/tls.md) ----------------------------------------------
# All off by default (``make run`` serves plain HTTP on loopback); the README's production
# section sets every one, and ``manage.py check --deploy`` is then clean
# (tests/security/test_deploy_check.py).
# The header the proxy sets to "https" on requests it received over TLS (e.g. X-Forwarded-Proto);
# empty: none is trusted. Set it only when the proxy overwrites the header on every request.
_PROXY_SSL_HEADER = os.environ.get("DJANGO_SECURE_PROXY_SSL_HEADER", "").strip()
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_" + _PROXY_SSL_HEADER.upper().replace("-", "_"), "https") if _PROXY_SSL_HEADER else None
)
# Redirect plain-HTTP requests (those without the proxy's header) to HTTPS.
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", False)
# Paths (regular expressions, without the leading slash) answered over plain HTTP even with the
# redirect on: the probes and scrapes a load balancer or Prometheus sends to each web process
# directly, not through the proxy.
SECURE_REDIRECT_EXEMPT = [
    p for p in os.environ.get("DJANGO_SECURE_REDIRECT_EXEMPT", r"^livez$,^readyz$,^metrics$").split(",") if p
]
# Strict-Transport-Security max-age (seconds; 0 sends no header), and its two flags.
SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("DJANGO_SECURE_HSTS_PRELOAD", False)
# The admin's session and CSRF cookies are sent over HTTPS only.
SESSION_COOKIE_SECURE = env_bool("DJANGO_SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = env_bool("DJANGO_CSRF_COOKIE_SECURE", False)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "django_filters",
    "core.apps.CoreConfig",
    "registry",
    "reconciler",
    # The OpenAI-compatible gateway (its own ASGI process: ``manage.py gateway``).
    "gateway",
    # After reconciler: its ``manage.py qcluster`` (bounded stop) replaces django-q2's.
    "django_q",
]

MIDDLEWARE = [
    # Outermost: X-Request-ID in and out, and the log context of the request (core/logs.py).
    "core.logs.RequestIdMiddleware",
    # Counts every answer, by URL pattern name (controlplane/metrics.py).
    "core.metrics.RequestMetricsMiddleware",
    # Turns any HTML error page on /api/ paths into a problem document.
    "core.problems.ProblemResponseMiddleware",
    # A path that is not UTF-8 once percent-decoded is a 400 (controlplane/httpserver.py).
    "controlplane.httpserver.InvalidPathMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "controlplane.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "controlplane" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "controlplane.wsgi.application"

# --- Database -------------------------------------------------------------------------------
# SQLite is the embedded default for a one-machine start; PostgreSQL is the production
# database. SQLite runs in WAL mode with IMMEDIATE transactions (a writer takes the write lock
# at BEGIN instead of failing with "database is locked" on upgrade) and a busy timeout.
DEFAULT_SQLITE_PATH = VAR_DIR / "controlplane.sqlite3"
DATABASE_URL = os.environ.get("DATABASE_URL") or f"sqlite:///{DEFAULT_SQLITE_PATH}"
# Persistent connections by default: opening a PostgreSQL connection per request cost more than
# the request itself (heartbeats: 118/s against 308/s persistent, bench/bench_heartbeat.py).
# Each thread of a web process keeps at most one connection (gthread: WEB_WORKERS x WEB_THREADS
# per host, README "Production"), closed once idle for DATABASE_CONN_MAX_AGE seconds at the
# start or end of a request. CONN_HEALTH_CHECKS: before a kept connection's first use in a
# request Django checks it is still alive and reconnects if not, so a PostgreSQL restart costs
# no failed request. django-q2 closes expired or broken connections before each task the same
# way, and closes all of them before it forks. SQLite holds its file lock per transaction, not
# per connection, so a kept idle connection blocks no writer. DATABASE_CONN_MAX_AGE=0 restores
# a connection per request.
DATABASES = {
    "default": dj_database_url.parse(
        DATABASE_URL, conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60), conn_health_checks=True
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": env_float("SQLITE_BUSY_TIMEOUT", 20.0),
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;",
    }
else:
    # A short connect timeout keeps requests from hanging when the database is unreachable
    # (they fail fast with a 503 problem instead).
    DATABASES["default"].setdefault("OPTIONS", {})
    DATABASES["default"]["OPTIONS"].setdefault("connect_timeout", env_int("DATABASE_CONNECT_TIMEOUT", 5))
    # Prepared statements allowed on the connection (Django turns them off: prepare_threshold
    # None). Django's own cursors bind client-side and never prepare; the hot path's fixed
    # statements (a warm route's grant, a release) run on core.statements' preparing cursor.
    # Off again behind a transaction pooler (below).
    DATABASES["default"]["OPTIONS"].setdefault("prepare_threshold", 5)
    DATABASES["default"]["TEST"] = {"NAME": os.environ.get("DATABASE_TEST_NAME") or None}

# Behind PgBouncer in transaction mode (DATABASE_POOLER=pgbouncer-transaction), each transaction
# may run on another server connection, so nothing may rely on session state:
# - session-level advisory locks (the reconcile leader and pass locks, migrate_locked) would be
#   taken on one server connection and released, or not, on another: they go to a second alias,
#   "direct", a plain connection to PostgreSQL itself (DATABASE_DIRECT_URL), as registry/locks.py
#   routes them; transaction-level locks stay on "default" (they live inside the transaction);
# - server-side prepared statements (PgBouncer 1.18 does not carry them across server
#   connections): Django's psycopg cursors bind client-side and prepare nothing, and
#   prepare_threshold=None makes sure psycopg never prepares on its own;
# - server-side cursors (QuerySet.iterator() declares one WITH HOLD outside a transaction).
# Django sets only the time zone on its connections, a parameter PgBouncer tracks per client.
# Nothing uses LISTEN/NOTIFY. docs/operations.md, "PostgreSQL past one server: PgBouncer".
DATABASE_POOLER = os.environ.get("DATABASE_POOLER", "").strip()
DIRECT_DATABASE_ALIAS = "direct"
if DATABASE_POOLER:
    if DATABASE_POOLER != "pgbouncer-transaction":
        raise ImproperlyConfigured(f"DATABASE_POOLER={DATABASE_POOLER!r}: the one supported value is pgbouncer-transaction")
    if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
        raise ImproperlyConfigured("DATABASE_POOLER needs a PostgreSQL DATABASE_URL")
    if not os.environ.get("DATABASE_DIRECT_URL"):
        raise ImproperlyConfigured(
            "DATABASE_POOLER=pgbouncer-transaction needs DATABASE_DIRECT_URL: PostgreSQL itself, not "
            "the pooler, for the session-level advisory locks"
        )
    DATABASES["default"]["OPTIONS"]["prepare_threshold"] = None
    DATABASES["default"]["DISABLE_SERVER_SIDE_CURSORS"] = True
    DATABASES[DIRECT_DATABASE_ALIAS] = dj_database_url.parse(
        os.environ["DATABASE_DIRECT_URL"], conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60), conn_health_checks=True
    )
    DATABASES[DIRECT_DATABASE_ALIAS]["OPTIONS"] = {"connect_timeout": env_int("DATABASE_CONNECT_TIMEOUT", 5)}
    # The same database as "default": a test run creates no second test database for it.
    DATABASES[DIRECT_DATABASE_ALIAS]["TEST"] = {"MIRROR": "default"}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
# WhiteNoise serves the admin's static files from the apps directly (no collectstatic step
# needed in development; `make run` collects them anyway).
WHITENOISE_USE_FINDERS = True
STATIC_ROOT.mkdir(parents=True, exist_ok=True)

# Request bodies are small JSON documents; anything larger is refused before parsing.
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("CONTROLPLANE_MAX_BODY_BYTES", 1024 * 1024)

# --- REST API -------------------------------------------------------------------------------
# Deny by default: a view that declares no permission is operator-only. Errors are RFC 9457
# problem documents (core/problems.py). See core/auth.py and registry/api/auth.py for the credentials.
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "core.auth.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["core.auth.IsOperator"],
    "DEFAULT_PARSER_CLASSES": ["core.parsers.StrictJSONParser"],
    # JSON only: a client that accepts nothing but text/html gets a 406 problem (browsers send
    # */* as well and get JSON). The admin is the HTML interface.
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PAGINATION_CLASS": "core.pagination.LimitOffset",
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "PAGE_SIZE": 100,
    "EXCEPTION_HANDLER": "core.problems.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "core.schema.ProblemAutoSchema",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Control plane API",
    "DESCRIPTION": (
        "Control plane for fleets of model-serving workers (LocalAI distributed mode). "
        "Workers use /api/node/ with their node token; frontends and operators use /api/v1/ "
        "with an API key. Errors are RFC 9457 problem documents (application/problem+json) "
        "with a stable `code`.\n\n"
        "Input limits (docs/security.md): request bodies are JSON (UTF-8, other media types are a "
        "415) of at most 1 MiB (413 `payload_too_large`), nested at most 32 levels, with finite "
        "numbers and integers within 64 bits (400 `parse_error` otherwise). Model names, node names "
        "and label keys are 1-255 characters without control characters or leading/trailing "
        "whitespace; label values at most 255 characters without control characters; at most 64 "
        "labels per request. Model names may contain `/` but not at either end, and no segment may "
        "be empty, `.` or `..`; in a path, percent-encode non-ASCII characters as UTF-8. Refused "
        "names are a 400 `validation_error`. The request line is at most 4094 bytes (414 "
        "`uri_too_long`), headers at most 100 fields of 8190 bytes (431). Only JSON is served: "
        "`Accept` without `application/json` or `*/*` is a 406 `not_acceptable`."
    ),
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    "COMPONENT_SPLIT_REQUEST": True,
    "SCHEMA_PATH_PREFIX": r"/api/(v1/)?",
    "ENUM_NAME_OVERRIDES": {
        "NodeStatusEnum": "registry.models.Node.Status",
        "NodeTypeEnum": "registry.models.Node.NodeType",
        "GpuVendorEnum": "registry.models.Node.GpuVendor",
        "ReplicaStateEnum": "registry.models.NodeModel.State",
        "LoadInfoSourceEnum": "registry.models.ModelLoadInfo.Source",
    },
}

# --- Control plane --------------------------------------------------------------------------
# The fleet's registration token: workers present it to register (and LocalAI's fleet-token
# nodes on their own REST calls). The control plane never sends it anywhere: gRPC calls carry
# the per-node credentials of core.credentials. No default: the web process refuses to
# start without it unless CONTROLPLANE_ALLOW_OPEN_REGISTRATION is set for development.
CONTROLPLANE_REGISTRATION_TOKEN = os.environ.get("CONTROLPLANE_REGISTRATION_TOKEN", "")
# Key of the per-node gRPC credentials (core.credentials); empty = SECRET_KEY. Every
# web and qcluster process must share it; changing it rotates every node's backend and worker
# command tokens (workers get the new ones when they re-register).
CONTROLPLANE_CREDENTIAL_KEY = os.environ.get("CONTROLPLANE_CREDENTIAL_KEY", "")
CONTROLPLANE_ALLOW_OPEN_REGISTRATION = env_bool("CONTROLPLANE_ALLOW_OPEN_REGISTRATION", False)
CONTROLPLANE_AUTO_APPROVE = env_bool("CONTROLPLANE_AUTO_APPROVE", True)
# Labels one node may carry, every source counted (worker, operator, auto-labels): a worker
# sends at most 64 per registration and re-registration replaces them, so this bounds what an
# operator may add on top. A write past it is a 409 ``too_many_labels``.
CONTROLPLANE_MAX_LABELS_PER_NODE = env_int("CONTROLPLANE_MAX_LABELS_PER_NODE", 128)
# LocalAI's own workers never ask for a per-node token: they present the fleet registration
# token on every call. True (the default, for LocalAI interoperability) accepts such nodes, bound
# to the fleet token (``Node.auth_mode = fleet_token``); False refuses their registration and
# every fleet-token call of an existing one (403 ``fleet_token_nodes_refused``).
CONTROLPLANE_ALLOW_FLEET_TOKEN_NODES = env_bool("CONTROLPLANE_ALLOW_FLEET_TOKEN_NODES", True)

# --- Timing (seconds; defaults are architecture.md's) ----------------------------------------
# Seconds between worker heartbeats (told to workers at registration).
HEARTBEAT_INTERVAL = env_float("CONTROLPLANE_HEARTBEAT_INTERVAL", 10.0)
# Seconds the reconciler has not seen a node's heartbeat change before the node is stale.
STALE_AFTER = env_float("CONTROLPLANE_STALE_AFTER", 30.0)
# Coalesced heartbeats (registry/heartbeat_flush.py): a web process acknowledges a steady
# heartbeat into its buffer and writes the buffer every this many seconds, one statement for
# every node; it must stay far below HEARTBEAT_INTERVAL and STALE_AFTER. 0: every heartbeat
# is written before it is answered.
CONTROLPLANE_HEARTBEAT_FLUSH_SECONDS = env_float("CONTROLPLANE_HEARTBEAT_FLUSH_SECONDS", 0.2)
# Seconds a web process trusts a node token the database last accepted (registry/
# heartbeat_cache.py) without asking it again; every flush re-confirms the entries it writes.
# Above HEARTBEAT_INTERVAL, or no real heartbeat is ever coalesced. A change made through
# another process (token rotated, node deleted, status) is learnt by the next flush carrying
# that node's heartbeat; this bounds it in any case. 0: no cache, nothing is coalesced.
CONTROLPLANE_NODE_AUTH_CACHE_SECONDS = env_float("CONTROLPLANE_NODE_AUTH_CACHE_SECONDS", 30.0)
# Seconds between reconcile passes.
RECONCILE_INTERVAL = env_float("CONTROLPLANE_RECONCILE_INTERVAL", 10.0)
# Idle seconds before a replica above its model's floor is removed.
SCALE_DOWN_IDLE_AFTER = env_float("CONTROLPLANE_SCALE_DOWN_IDLE_AFTER", 300.0)
# Look-back window (seconds) of the in-flight average load-aware autoscaling scales on.
AUTOSCALE_WINDOW_SECONDS = env_float("CONTROLPLANE_AUTOSCALE_WINDOW_SECONDS", 60.0)

# Rollout: seconds a replica of an older revision drains (no new routes) before it is stopped
# even with requests still in flight.
ROLLOUT_DRAIN_TIMEOUT = env_float("CONTROLPLANE_ROLLOUT_DRAIN_TIMEOUT", 120.0)
# Circuit breaker: passes without capacity for a model below its floor, then a cooldown.
UNSATISFIABLE_TICKS = env_int("CONTROLPLANE_UNSATISFIABLE_TICKS", 3)
UNSATISFIABLE_COOLDOWN = env_float("CONTROLPLANE_UNSATISFIABLE_COOLDOWN", 300.0)
# Consecutive unreachable probes of a loaded replica before its row is removed.
PROBE_FAILURES_BEFORE_REMOVAL = env_int("CONTROLPLANE_PROBE_FAILURES_BEFORE_REMOVAL", 3)
# How long ``manage.py migrate_locked`` waits for another process's migration.
MIGRATE_LOCK_TIMEOUT = env_float("CONTROLPLANE_MIGRATE_LOCK_TIMEOUT", 120.0)

# gRPC deadlines (seconds). proto/client.py reads the ones it knows (health, load, worker,
# connect) when Django is configured; its DEFAULT_TIMEOUTS are the defaults here too, so a
# script without Django and the control plane agree.
# Health/Status of a backend on the routing path (a slow answer counts as busy).
GRPC_HEALTH_TIMEOUT = env_float("CONTROLPLANE_GRPC_HEALTH_TIMEOUT", DEFAULT_TIMEOUTS["health"])
# Health of a loaded replica probed by the reconciler.
GRPC_PROBE_TIMEOUT = env_float("CONTROLPLANE_GRPC_PROBE_TIMEOUT", 1.0)
# LoadModel: reading weights into (V)RAM.
GRPC_LOAD_TIMEOUT = env_float("CONTROLPLANE_GRPC_LOAD_TIMEOUT", DEFAULT_TIMEOUTS["load"])
# Worker calls without a deadline of their own (StopBackend, UnloadModel, ListBackends outside
# a pass): longer than proto's stand-alone 10 s, as long as StartBackend's wait for a new backend.
GRPC_WORKER_TIMEOUT = env_float("CONTROLPLANE_GRPC_WORKER_TIMEOUT", DEFAULT_TIMEOUTS["worker_start"])
# Worker calls (StartBackend, ListBackends, ...) give up on a worker whose connection does not
# complete the HTTP/2 handshake within this (it accepts TCP and never answers): proto/client.py.
GRPC_CONNECT_TIMEOUT = env_float("CONTROLPLANE_GRPC_CONNECT_TIMEOUT", DEFAULT_TIMEOUTS["connect"])

# --- gRPC TLS (proto/tls.py, docs/tls.md) ---------------------------------------------------
# A worker or backend address ``grpcs://host:port`` is always dialled with TLS; with this set,
# bare ``host:port`` addresses are too (a fleet whose every endpoint serves TLS).
GRPC_TLS = env_bool("CONTROLPLANE_GRPC_TLS", False)
# PEM file of the CA(s) that sign the workers' and backends' certificates; empty: gRPC's roots.
GRPC_TLS_CA = os.environ.get("CONTROLPLANE_GRPC_TLS_CA", "")
# Client certificate (chain) and key presented to workers and backends that require one (mutual
# TLS: a worker started with --tls-client-ca); both or neither.
GRPC_TLS_CERT = os.environ.get("CONTROLPLANE_GRPC_TLS_CERT", "")
GRPC_TLS_KEY = os.environ.get("CONTROLPLANE_GRPC_TLS_KEY", "")

# Seconds a web process answers an API key it verified from memory (no database read). A key
# revoked in another process keeps working here for at most this long (docs/security.md).
API_KEY_CACHE_SECONDS = env_float("CONTROLPLANE_API_KEY_CACHE_SECONDS", 5.0)

# --- Router (frontends' route calls, leases, cold-load jobs) ---------------------------------
# How long a route call waits for a cold load before answering 202.
ROUTE_WAIT_SECONDS = env_float("CONTROLPLANE_ROUTE_WAIT_SECONDS", 30.0)
# ``Retry-After`` of 202 and 503 route answers.
ROUTE_RETRY_AFTER_SECONDS = env_int("CONTROLPLANE_ROUTE_RETRY_AFTER_SECONDS", 2)
# A replica confirmed this recently is routed to without a Health probe.
ROUTE_PROBE_CACHE_SECONDS = env_float("CONTROLPLANE_ROUTE_PROBE_CACHE_SECONDS", 30.0)
# Affinity routing (a route call's affinity_key): a replica takes a key only while its in-flight
# is below ceil(factor x (the model's in-flight + 1) / replicas) + 1; below 1 counts as 1.
ROUTE_AFFINITY_LOAD_FACTOR = env_float("CONTROLPLANE_ROUTE_AFFINITY_LOAD_FACTOR", 1.25)
# Lease lifetime (renewable); a route call may ask for less.
LEASE_TTL_SECONDS = env_float("CONTROLPLANE_LEASE_TTL_SECONDS", 600.0)
# Whether a lease's grant and release (one statement each, on PostgreSQL) wait for their WAL
# flush. Off by default: a PostgreSQL crash can then lose the last fraction of a second of lease
# writes, each whole (a grant with its in-flight increment, a release with its decrement), which
# the registry survives (a lost grant's release finds no lease; a lost release's lease expires).
# Transaction-local (set_config(..., true)), so safe behind PgBouncer in transaction mode.
LEASE_SYNCHRONOUS_COMMIT = env_bool("CONTROLPLANE_LEASE_SYNCHRONOUS_COMMIT", False)
# Add ``X-Control-Plane-Node`` to route answers.
CONTROLPLANE_NODE_HEADER = env_bool("CONTROLPLANE_NODE_HEADER", False)
# Where cold-load jobs run: "qcluster" (django-q2, production), "thread" or "inline" (tests).
CONTROLPLANE_LOAD_JOB_RUNNER = os.environ.get("CONTROLPLANE_LOAD_JOB_RUNNER", "qcluster")
# Load-job progress heartbeat; takeover after that much silence; attempts before failing.
LOAD_JOB_HEARTBEAT_INTERVAL = env_float("CONTROLPLANE_LOAD_JOB_HEARTBEAT_INTERVAL", 5.0)
LOAD_JOB_STALE_AFTER = env_float("CONTROLPLANE_LOAD_JOB_STALE_AFTER", 60.0)
LOAD_JOB_MAX_ATTEMPTS = env_int("CONTROLPLANE_LOAD_JOB_MAX_ATTEMPTS", 3)
# Released leases and finished load jobs are kept this long.
ROUTER_RETENTION_SECONDS = env_float("CONTROLPLANE_ROUTER_RETENTION_SECONDS", 86400.0)

# --- Gateway (the OpenAI-compatible frontend: ``manage.py gateway``, docs/gateway.md) -------
# host:port the gateway's ASGI server (uvicorn) listens on; its OpenAI base URL is http://HOST:PORT/v1.
GATEWAY_BIND = os.environ.get("CONTROLPLANE_GATEWAY_BIND", "127.0.0.1:8080")
# How long a request for a model that is not loaded waits for its load job before a 503 with
# Retry-After (ROUTE_RETRY_AFTER_SECONDS).
GATEWAY_LOAD_WAIT_SECONDS = env_float("CONTROLPLANE_GATEWAY_LOAD_WAIT_SECONDS", 30.0)
# Deadline of one inference call to a backend (Predict, a whole PredictStream, the Embedding
# calls of one request); a request's lease lives this long plus a minute if the gateway dies.
GATEWAY_REQUEST_TIMEOUT = env_float("CONTROLPLANE_GATEWAY_REQUEST_TIMEOUT", 300.0)
# Threads that run the gateway's database work (API-key checks, route, release); each keeps one
# database connection (DATABASE_CONN_MAX_AGE).
GATEWAY_DB_THREADS = env_int("CONTROLPLANE_GATEWAY_DB_THREADS", 8)
# Whether the gateway's PostgreSQL sessions wait for the WAL flush of each commit (lease grant,
# release). Off by default: a crash of PostgreSQL can then lose the last fraction of a second of
# the gateway's lease writes, which the registry survives (leases expire). Set it true behind
# PgBouncer in transaction mode (a session SET would stay on shared server connections): with
# DATABASE_POOLER=pgbouncer-transaction that is the default; docs/gateway.md.
GATEWAY_SYNCHRONOUS_COMMIT = env_bool("CONTROLPLANE_GATEWAY_SYNCHRONOUS_COMMIT", bool(DATABASE_POOLER))
if DATABASE_POOLER and not GATEWAY_SYNCHRONOUS_COMMIT:
    raise ImproperlyConfigured(
        "CONTROLPLANE_GATEWAY_SYNCHRONOUS_COMMIT=false behind DATABASE_POOLER=pgbouncer-transaction would make "
        "other processes' commits asynchronous (a session SET on pooled server connections)"
    )
# A streamed answer's writes are at least this many seconds apart: the tokens that arrive
# meanwhile go out together (each its own server-sent event), so no token waits longer than
# this, and a backend slower than one token per interval sees no delay at all. 0: every batch
# of replies is written as soon as it is read.
GATEWAY_STREAM_INTERVAL = env_float("CONTROLPLANE_GATEWAY_STREAM_INTERVAL", 0.005)
# Affinity (docs/gateway.md, "Affinity"): a chat or completion request routes by the OpenAI
# ``user`` field when it has one, else by a hash of this many leading characters of its
# conversation or prompt, so requests that share a prefix (a session's turns, a shared system
# prompt) prefer one replica and its prompt cache. 0: no prefix affinity (``user`` still counts).
GATEWAY_AFFINITY_PREFIX_CHARS = env_int("CONTROLPLANE_GATEWAY_AFFINITY_PREFIX_CHARS", 512)

# --- Reconciler (read at the start of every pass: reconciler/conf.py) ------------------------
# Reap no node when more than this fraction of the healthy nodes turn stale in one pass (and at
# least two do): the control plane or its network is the likelier culprit.
RECONCILE_MASS_STALE_FRACTION = env_float("CONTROLPLANE_RECONCILE_MASS_STALE_FRACTION", 0.5)
# Parallel gRPC calls (probes, ListBackends) per pass.
RECONCILE_PROBE_CONCURRENCY = env_int("CONTROLPLANE_RECONCILE_PROBE_CONCURRENCY", 16)
# Seconds after which a loaded replica's last confirmation is old enough to probe again
# (unset: RECONCILE_INTERVAL).
RECONCILE_PROBE_AFTER = env_optional_float("CONTROLPLANE_RECONCILE_PROBE_AFTER")
# Deadline (seconds) of the worker calls a pass makes: ListBackends and StopBackend.
RECONCILE_WORKER_TIMEOUT = env_float("CONTROLPLANE_RECONCILE_WORKER_TIMEOUT", 2.0)
# Consecutive passes in which a node's worker, known to serve the worker API, does not answer
# ListBackends (while the node still heartbeats) before the node is marked unhealthy: not
# routed to, not placed on, its replica rows kept. It is healthy again at the first answer.
RECONCILE_WORKER_FAILURES_BEFORE_UNHEALTHY = env_int("CONTROLPLANE_RECONCILE_WORKER_FAILURES_BEFORE_UNHEALTHY", 3)
# Seconds of a pass after which no further scale-up call is started (the rest waits for the next
# pass), so one slow load cannot hold the reconcile lock for every model.
RECONCILE_SCALE_UP_BUDGET = env_float("CONTROLPLANE_RECONCILE_SCALE_UP_BUDGET", 30.0)
# Cold loads (StartBackend + LoadModel) a pass's scale-up runs at once, in a thread pool of the
# pass; each replica slot is claimed in the database (a `loading` row and its VRAM) first.
RECONCILE_LOAD_CONCURRENCY = env_int("CONTROLPLANE_RECONCILE_LOAD_CONCURRENCY", 16)
# How many ReconcilePass rows are kept (older ones are pruned after each pass).
RECONCILE_PASSES_KEPT = env_int("CONTROLPLANE_RECONCILE_PASSES_KEPT", 1000)
# Days of events kept (older ones are pruned by housekeeping); 0 keeps them forever.
RECONCILE_EVENTS_KEPT_DAYS = env_int("CONTROLPLANE_RECONCILE_EVENTS_KEPT_DAYS", 30)
# Seconds after which a `loading` row is a dead loader's leftover and is discarded (with its VRAM
# reservation). Unset: GRPC_WORKER_TIMEOUT + GRPC_LOAD_TIMEOUT + 60, longer than any deadline a
# live load has.
RECONCILE_STALE_LOADING_AFTER = env_optional_float("CONTROLPLANE_RECONCILE_STALE_LOADING_AFTER")
# Seconds without any observed heartbeat change (or without any pass) after which the reconciler
# treats heartbeats as not observable: it reaps nothing while that lasts and counts every node's
# staleness again from when observation resumes. Unset: HEARTBEAT_INTERVAL + 2 x
# RECONCILE_INTERVAL (the longest quiet a live fleet shows, plus one pass of margin), kept
# between STALE_AFTER / 2 and STALE_AFTER.
RECONCILE_OBSERVATION_GAP = env_optional_float("CONTROLPLANE_RECONCILE_OBSERVATION_GAP")

# --- django-q2 ------------------------------------------------------------------------------
# ORM broker by default (no extra service); Redis when REDIS_URL is set.
REDIS_URL = os.environ.get("REDIS_URL", "")
Q_CLUSTER = {
    "name": "controlplane",
    "workers": env_int("Q_WORKERS", 2),
    # A load job can take GRPC_WORKER_TIMEOUT + GRPC_LOAD_TIMEOUT: the task timeout covers it,
    # and the broker's retry is longer than the timeout (django-q2 requires it). The reconciler's
    # passes run in the qcluster's leader process, not as django-q2 tasks (reconciler/leader.py).
    "timeout": env_int("Q_TIMEOUT", 300),
    "retry": env_int("Q_RETRY", 360),
    "max_attempts": 1,
    "catch_up": False,
    "ack_failures": True,
    "sync": env_bool("Q_SYNC", False),
}
if REDIS_URL:
    Q_CLUSTER["redis"] = REDIS_URL
else:
    Q_CLUSTER["orm"] = "default"
# Seconds ``manage.py qcluster`` waits for its processes after SIGTERM/SIGINT before killing them.
Q_STOP_GRACE = env_float("Q_STOP_GRACE", 6.0)

# --- Logging --------------------------------------------------------------------------------
# Readable lines by default, one JSON object per line with LOG_FORMAT=json; request id, pass
# id, node and model on every line where known (core/logs.py, docs/operations.md).
LOG_LEVEL = os.environ.get("CONTROLPLANE_LOG_LEVEL", "INFO")
LOG_FORMAT = os.environ.get("LOG_FORMAT", "readable")
LOGGING = logging_config(level=LOG_LEVEL, fmt=LOG_FORMAT)

# --- Operations: /metrics, /readyz (docs/operations.md) ---------------------------------------
# /metrics answers these peers (comma-separated CIDRs; "" = nobody) or an operator API key.
METRICS_ALLOW = os.environ.get("METRICS_ALLOW", "127.0.0.0/8,::1/128")
READYZ_REQUIRE_RECONCILER = env_bool("READYZ_REQUIRE_RECONCILER", True)
READYZ_STARTUP_GRACE = env_float("READYZ_STARTUP_GRACE", 120.0)
READYZ_DB_TIMEOUT_MS = env_int("READYZ_DB_TIMEOUT_MS", 2000)

SESSION_COOKIE_AGE = int(timedelta(hours=12).total_seconds())
