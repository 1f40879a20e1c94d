"""The fleet's tables.

Columns, statuses and states follow LocalAI's distributed mode so that its
operators recognise them; the registry verbs that change these rows live in ``managers.py``.
"""

import uuid

from django.db import models
from django.db.models import F, Q
from django.utils import timezone

from . import rules
from .managers import (
    LeaseManager,
    LoadFailureManager,
    LoadJobManager,
    ModelLoadInfoManager,
    ModelRevisionManager,
    ModelSchedulingConfigManager,
    NodeLabelManager,
    NodeManager,
    NodeModelManager,
)


class Node(models.Model):
    """A worker machine. ``name`` is the re-registration key; the id survives restarts."""

    class Status(models.TextChoices):
        PENDING = "pending", "pending approval"
        HEALTHY = "healthy", "healthy"
        UNHEALTHY = "unhealthy", "unhealthy"
        OFFLINE = "offline", "offline"
        DRAINING = "draining", "draining"

    # Statuses whose heartbeat going stale is not news (the stale sweep skips them). An
    # unhealthy node (heartbeating, its worker silent) whose heartbeat stops as well is news.
    NOT_SWEPT_STATUSES = (Status.OFFLINE, Status.PENDING)
    # Statuses a heartbeat only timestamps: their reported capacity is not trusted for placement.
    HEARTBEAT_TIMESTAMP_ONLY_STATUSES = (Status.PENDING, Status.OFFLINE)

    class NodeType(models.TextChoices):
        BACKEND = "backend", "backend"
        AGENT = "agent", "agent (never scheduled)"

    # Healthy backend nodes are the only ones routed to and placed on; only their replicas
    # count as ready. One definition, read by the querysets (``schedulable_filter``) and the
    # reconciler's snapshot and ``is_schedulable`` (``schedulable_with``).
    SCHEDULABLE = {"status": Status.HEALTHY, "node_type": NodeType.BACKEND}

    class GpuVendor(models.TextChoices):
        """Vendors the control plane knows by name. Not enforced: LocalAI's workers report
        others (``apple``, ...), and any short string is stored as sent."""

        NVIDIA = "nvidia", "NVIDIA"
        AMD = "amd", "AMD"
        INTEL = "intel", "Intel"
        VULKAN = "vulkan", "Vulkan"
        UNKNOWN = "unknown", "unknown"

    class AuthMode(models.TextChoices):
        """How a node authenticates its own calls (heartbeat, drain, deregister, models).

        ``node_token``: the per-node token handed out at registration; the fleet token is
        refused for this node. ``fleet_token``: the node registered without asking for a
        per-node token and keeps using the fleet registration token (LocalAI's own worker
        trust model); ``CONTROLPLANE_ALLOW_FLEET_TOKEN_NODES=false`` refuses such nodes.
        """

        NODE_TOKEN = "node_token", "per-node token"
        FLEET_TOKEN = "fleet_token", "fleet registration token (LocalAI worker)"

    class DrainedBy(models.TextChoices):
        """Who drained the node: a drain is lifted by its owner's side only. A node's own drain
        (graceful shutdown) is lifted by its ``/resume`` or a restart; an operator's drain only
        by an operator's resume, and it survives the worker's restarts and outages."""

        NONE = "", "not drained"
        NODE = "node", "the node itself"
        OPERATOR = "operator", "an operator"

    class WorkerApi(models.TextChoices):
        """Whether the node answers the worker gRPC service (StartBackend/StopBackend/
        ListBackends). Only ``available`` nodes are placed on: a LocalAI worker takes its
        backend commands over NATS, which the control plane does not speak."""

        UNKNOWN = "unknown", "not checked yet"
        AVAILABLE = "available", "answers the worker service"
        MISSING = "missing", "does not answer the worker service"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=255, unique=True)
    node_type = models.CharField(max_length=16, choices=NodeType.choices, default=NodeType.BACKEND)
    address = models.CharField(max_length=512, blank=True, help_text="gRPC host:port of the worker")
    http_address = models.CharField(max_length=512, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    # Who set the current drain; kept while an operator-drained node is offline, so the drain
    # comes back with it.
    drained_by = models.CharField(max_length=16, choices=DrainedBy.choices, default=DrainedBy.NONE, blank=True)
    # sha256 of the per-node token handed out at registration; the token itself is never stored.
    token_hash = models.CharField(max_length=64, blank=True, editable=False)

    total_vram = models.PositiveBigIntegerField(default=0)
    available_vram = models.PositiveBigIntegerField(default=0)
    # Soft reservations of in-progress loads; a heartbeat that reports VRAM resets it to 0.
    reserved_vram = models.PositiveBigIntegerField(default=0)
    total_ram = models.PositiveBigIntegerField(default=0)
    available_ram = models.PositiveBigIntegerField(default=0)
    gpu_vendor = models.CharField(max_length=32, default=GpuVendor.UNKNOWN)
    # Disk figures from heartbeats (LocalAI's workers send them); stored and shown for placement.
    total_disk = models.PositiveBigIntegerField(default=0)
    available_disk = models.PositiveBigIntegerField(default=0)
    # Operator cap on the VRAM our replicas may reserve here (null = none): placement sees
    # min(available - reserved, vram_budget - the node's replica reservations).
    vram_budget = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="bytes our replicas may reserve on this node; empty = no cap"
    )
    auth_mode = models.CharField(max_length=16, choices=AuthMode.choices, default=AuthMode.NODE_TOKEN)
    worker_api = models.CharField(max_length=16, choices=WorkerApi.choices, default=WorkerApi.UNKNOWN)
    worker_api_detail = models.CharField(max_length=255, blank=True)
    worker_api_checked_at = models.DateTimeField(null=True, blank=True)

    max_replicas_per_model = models.PositiveIntegerField(default=1)
    reported_max_replicas_per_model = models.PositiveIntegerField(default=1, editable=False)
    # Set when an operator chose max_replicas_per_model; re-registration then keeps it.
    max_replicas_per_model_manual = models.BooleanField(default=False)

    last_heartbeat = models.DateTimeField(null=True, blank=True)
    # The reconciler's own observation of heartbeats (one clock decides staleness, as in the
    # Kubernetes node lifecycle controller): the ``last_heartbeat`` value it last saw, and when,
    # on the reconciler's clock, it saw that value change (or observation resumed after a gap).
    heartbeat_seen = models.DateTimeField(null=True, blank=True, editable=False)
    heartbeat_seen_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = NodeManager()

    class Meta:
        ordering = ["name"]
        indexes = [
            models.Index(fields=["status", "node_type"], name="node_status_type_idx"),
            models.Index(fields=["last_heartbeat"], name="node_last_heartbeat_idx"),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(max_replicas_per_model__gte=1), name="node_slots_at_least_one"),
        ]

    def __str__(self):
        return self.name

    @property
    def free_vram(self) -> int:
        """VRAM a new load may reserve: reported available minus in-progress reservations."""
        return max(0, self.available_vram - self.reserved_vram)

    @classmethod
    def schedulable_with(cls, status: str, node_type: str) -> bool:
        return status == cls.SCHEDULABLE["status"] and node_type == cls.SCHEDULABLE["node_type"]

    @classmethod
    def schedulable_filter(cls, via: str = "") -> Q:
        """``SCHEDULABLE`` as a filter on nodes, or on rows reaching a node through ``via``
        (``"node__"`` for replica rows)."""
        return Q(**{f"{via}{field}": value for field, value in cls.SCHEDULABLE.items()})

    @property
    def is_schedulable(self) -> bool:
        return self.schedulable_with(self.status, self.node_type)


class NodeLabel(models.Model):
    """One key=value label of a node; selectors match on these with AND semantics.

    ``source`` says who wrote it, so that re-registration replaces the worker's own labels
    instead of accumulating them, and never touches an operator's."""

    class Source(models.TextChoices):
        WORKER = "worker", "sent by the worker at registration"
        OPERATOR = "operator", "set by an operator"
        AUTO = "auto", "derived by the control plane"

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="labels")
    key = models.CharField(max_length=255)
    value = models.CharField(max_length=255, blank=True)
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.OPERATOR)

    objects = NodeLabelManager()

    class Meta:
        ordering = ["node", "key"]
        constraints = [models.UniqueConstraint(fields=["node", "key"], name="node_label_unique_key")]
        indexes = [models.Index(fields=["key", "value"], name="node_label_key_value_idx")]

    def __str__(self):
        return f"{self.key}={self.value}"


class NodeModel(models.Model):
    """One replica of a model on a node (LocalAI's ``node_models`` row).

    Removing these rows is routine (restart, offline, probe failure, scale-down, eviction);
    that is why the load recipe is also kept per model in ``ModelLoadInfo``.
    """

    class State(models.TextChoices):
        LOADING = "loading", "loading"
        LOADED = "loaded", "loaded"

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="replicas")
    model_name = models.CharField(max_length=255)
    replica_index = models.PositiveIntegerField(default=0)
    address = models.CharField(max_length=512, blank=True, help_text="host:port of this replica's backend")
    state = models.CharField(max_length=16, choices=State.choices, default=State.LOADING)
    in_flight = models.IntegerField(default=0)
    last_used = models.DateTimeField(null=True, blank=True)
    # Per-replica copy of the load recipe (LocalAI keeps it for diagnostics and old rows).
    backend_type = models.CharField(max_length=255, blank=True)
    model_opts_blob = models.BinaryField(null=True, blank=True)
    # VRAM this replica's load reserved on its node (released if the load fails).
    reserved_vram = models.PositiveBigIntegerField(default=0)
    # Health probing: consecutive "unreachable" answers and when the row was last confirmed.
    probe_failures = models.PositiveIntegerField(default=0)
    last_probe_at = models.DateTimeField(null=True, blank=True)
    # The model's config revision this replica was loaded from (``ModelRevision.number``),
    # read before its recipe was; None for rows whose loader did not know it (the reconciler's
    # rollout leaves those alone).
    revision = models.PositiveIntegerField(null=True, blank=True)
    # Set when the rollout drains this replica: no new route picks it; it is stopped once
    # nothing is in flight on it or the drain timeout has passed.
    draining_since = models.DateTimeField(null=True, blank=True)
    # When the row last changed state (inserted, loading -> loaded, re-recorded), written by
    # every verb from its ``now=``; "written after the worker's listing" is decided on this,
    # never on ``updated_at`` (``auto_now`` is skipped by ``.update()``).
    state_changed_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = NodeModelManager()

    class Meta:
        ordering = ["model_name", "node", "replica_index"]
        constraints = [
            models.UniqueConstraint(fields=["node", "model_name", "replica_index"], name="node_model_unique_replica"),
            models.CheckConstraint(condition=Q(in_flight__gte=0), name="node_model_in_flight_non_negative"),
        ]
        indexes = [models.Index(fields=["model_name", "state"], name="node_model_model_state_idx")]

    def __str__(self):
        return f"{self.model_name}#{self.replica_index}@{self.node_id}"


class ModelLoadInfo(models.Model):
    """The per-model load recipe: backend type and the serialized ``ModelOptions``.

    This is The per-model load-info fix (LocalAI PR #9981): no replica-removal path touches this table,
    so the reconciler can restore ``min_replicas`` after every replica row is gone.
    ``model_opts_blob`` holds the bytes exactly as received, so fields a newer LocalAI
    declares survive as unknown protobuf fields.
    """

    class Source(models.TextChoices):
        MODEL = "model", "per-model row"
        REPLICA = "replica", "legacy per-replica row"

    model_name = models.CharField(max_length=255, unique=True)
    backend_type = models.CharField(max_length=255, blank=True)
    model_opts_blob = models.BinaryField(blank=True, default=bytes)
    updated_at = models.DateTimeField()

    objects = ModelLoadInfoManager()

    class Meta:
        ordering = ["model_name"]
        verbose_name = "model load info"
        verbose_name_plural = "model load info"

    def __init__(self, *args, source: str = Source.MODEL, **kwargs):
        super().__init__(*args, **kwargs)
        # Where this recipe came from: the per-model row, or (legacy fallback) a replica row.
        self.source = source

    def __str__(self):
        return self.model_name


class ModelSchedulingConfig(models.Model):
    """Desired state of one model: replica floor and ceiling, and where it may run.

    The ``unsatisfiable_*`` columns are the circuit breaker: the reconciler counts passes in
    which the model had no capacity and backs off for a cooldown; an upsert never touches them.
    """

    model_name = models.CharField(max_length=255, unique=True)
    node_selector = models.JSONField(default=dict, blank=True, help_text="label map; every pair must match")
    min_replicas = models.PositiveIntegerField(default=0)
    max_replicas = models.PositiveIntegerField(default=0, help_text="0 = unlimited")
    unsatisfiable_until = models.DateTimeField(null=True, blank=True)
    unsatisfiable_ticks = models.PositiveIntegerField(default=0)
    # Load-aware autoscaling (docs/autoscaling.md): operator settings...
    target_in_flight_per_replica = models.PositiveIntegerField(
        null=True, blank=True, help_text="in-flight requests one replica should carry on average; empty = off"
    )
    upscale_delay_s = models.PositiveIntegerField(default=30, help_text="a higher desire must hold this long")
    downscale_delay_s = models.PositiveIntegerField(default=600, help_text="a lower desire must hold this long")
    # Scheduled floors (``registry.floor_schedule``): windows in which a higher floor applies.
    floor_schedule = models.JSONField(
        default=list,
        blank=True,
        help_text='windows with a higher floor, e.g. [{"days": "mon-fri", "start": "08:00", "end": "18:00", '
        '"min_replicas": 3, "timezone": "Europe/Paris"}]',
    )
    # ...and the autoscaler's state, written only by ``record_autoscale`` / ``record_waiting``
    # (an upsert never touches them): the time-weighted in-flight average over the look-back
    # window, when it was last sampled and last saw a request in flight, the replica count the
    # rule wants and since when it has wanted it, and the routes that found no replica while
    # the model was at zero.
    load_avg = models.FloatField(default=0.0)
    load_sampled_at = models.DateTimeField(null=True, blank=True)
    load_busy_at = models.DateTimeField(null=True, blank=True)  # last pass that saw in-flight > 0
    desired_replicas = models.PositiveIntegerField(null=True, blank=True)
    desired_since = models.DateTimeField(null=True, blank=True)
    waiting_at_zero = models.PositiveIntegerField(default=0)

    class Placement(models.TextChoices):
        SPREAD = "spread", "spread (prefer nodes without the model)"
        BINPACK = "binpack", "binpack (prefer nodes that already hold it)"

    placement = models.CharField(max_length=16, choices=Placement.choices, default=Placement.SPREAD)
    disk_bytes = models.PositiveBigIntegerField(
        default=0, help_text="size of the model on disk; a node reporting less free disk is skipped (0 = unknown)"
    )
    spread_by = models.CharField(
        max_length=63, blank=True, help_text="node label key to spread replicas across (e.g. zone); empty = off"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = ModelSchedulingConfigManager()

    class Meta:
        ordering = ["model_name"]
        verbose_name = "model scheduling config"
        constraints = [
            models.CheckConstraint(
                condition=Q(max_replicas=0) | Q(min_replicas__lte=F("max_replicas")),
                name="scheduling_min_not_above_max",
            ),
        ]

    def __str__(self):
        return self.model_name

    @property
    def is_autoscaled(self) -> bool:
        return rules.is_autoscaled(self.min_replicas, self.max_replicas, self.target_in_flight_per_replica)

    @property
    def floor(self) -> int:
        return rules.replica_floor(self.min_replicas, self.max_replicas, self.target_in_flight_per_replica)


class ModelRevision(models.Model):
    """One numbered revision of a model's configuration: the load info and scheduling config
    as they were right after the change that created it (``managers/revisions.py``).

    Rows are only ever inserted (and the previous head's ``is_current`` cleared); a rollback
    inserts a new revision carrying an old one's values.
    """

    model_name = models.CharField(max_length=255)
    number = models.PositiveIntegerField()
    backend_type = models.CharField(max_length=255, blank=True)
    model_opts_blob = models.BinaryField(blank=True, default=bytes)
    has_load_info = models.BooleanField(default=False)
    scheduling = models.JSONField(null=True, blank=True, help_text="the scheduling config; null = none")
    load_digest = models.CharField(max_length=64)
    template_digest = models.CharField(max_length=64, help_text="load recipe + node selector: what a replica is")
    reason = models.CharField(max_length=255, blank=True)
    created_by = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    is_current = models.BooleanField(default=True)

    objects = ModelRevisionManager()

    class Meta:
        ordering = ["model_name", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["model_name", "number"], name="model_revision_unique_number"),
            models.UniqueConstraint(
                fields=["model_name"], condition=Q(is_current=True), name="model_revision_one_current"
            ),
        ]

    def __str__(self):
        return f"{self.model_name} r{self.number}"


class LoadJob(models.Model):
    """A durable cold load of one model: at most one active (pending/running) job per model.

    Frontends that find no warm replica claim or attach to this row in milliseconds and wait
    on it; a django-q2 task runs it (``registry.tasks.run_load_job``), heartbeating while it
    works so that a dead runner's job is taken over or reaped (``LoadJob.objects.reap_dead``).
    The partial unique constraint, not a lock, makes "one loader per model" hold across every
    process (PostgreSQL and SQLite both support partial indexes).
    """

    class State(models.TextChoices):
        PENDING = "pending", "pending"
        RUNNING = "running", "running"
        SUCCEEDED = "succeeded", "succeeded"
        FAILED = "failed", "failed"

    ACTIVE_STATES = (State.PENDING, State.RUNNING)
    FINISHED_STATES = (State.SUCCEEDED, State.FAILED)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    model_name = models.CharField(max_length=255)
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    # The recipe the job loads with; empty blob = take ModelLoadInfo at run time.
    backend_type = models.CharField(max_length=255, blank=True)
    opts_blob = models.BinaryField(null=True, blank=True)
    candidate_node_ids = models.JSONField(null=True, blank=True, help_text="null = every schedulable node")
    runner = models.CharField(max_length=255, blank=True, help_text="host:pid of the process running it")
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    progress = models.CharField(max_length=255, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    # The replica row this job is creating (set when its `loading` row is inserted, so whoever
    # takes over a dead job can clean that row and its VRAM reservation).
    replica = models.ForeignKey(NodeModel, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    node_id = models.UUIDField(null=True, blank=True)
    replica_index = models.PositiveIntegerField(null=True, blank=True)
    address = models.CharField(max_length=512, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = LoadJobManager()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["model_name"],
                condition=Q(state__in=["pending", "running"]),
                name="load_job_one_active_per_model",
            ),
        ]
        indexes = [
            models.Index(fields=["state", "heartbeat_at"], name="load_job_state_heartbeat_idx"),
            models.Index(fields=["model_name", "created_at"], name="load_job_model_created_idx"),
        ]

    def __str__(self):
        return f"load {self.model_name} ({self.state})"

    @property
    def is_active(self) -> bool:
        return self.state in self.ACTIVE_STATES


class Lease(models.Model):
    """A frontend's hold on one replica for one request (LocalAI's in-flight reservation).

    Granted in the same transaction as the warm pick's ``in_flight`` increment and released
    exactly once (by the caller, or by ``Lease.objects.expire`` when its TTL passes), so a
    replica's ``in_flight`` equals its live leases; ``sweep_in_flight`` repairs drift. The
    replica's coordinates are copied so a lease stays readable after its row is removed.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    replica = models.ForeignKey(NodeModel, null=True, blank=True, on_delete=models.SET_NULL, related_name="leases")
    model_name = models.CharField(max_length=255)
    node_id = models.UUIDField()
    replica_index = models.PositiveIntegerField(default=0)
    address = models.CharField(max_length=512, blank=True)
    expires_at = models.DateTimeField()
    released_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    objects = LeaseManager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["released_at", "expires_at"], name="lease_released_expires_idx")]
        # A staff session calls the frontend API (route, leases, load info, replica reports,
        # model status, events) only with this permission (core.auth.IsFrontend).
        permissions = [("use_frontend_api", "Can call the frontend API with an admin session")]

    def __str__(self):
        return f"lease {self.pk} on {self.model_name}#{self.replica_index}"

    @property
    def is_live(self) -> bool:
        return self.released_at is None


class LoadFailure(models.Model):
    """Recent failed loads of a model on a node, for bounded backoff.

    Placement avoids a node until ``retry_after`` while other nodes fit (10 s doubling to
    5 min, ``placement.failure_backoff``); a successful load there clears the row.
    """

    model_name = models.CharField(max_length=255)
    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="load_failures")
    failures = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    retry_after = models.DateTimeField()
    updated_at = models.DateTimeField(default=timezone.now)

    objects = LoadFailureManager()

    class Meta:
        ordering = ["model_name", "node"]
        constraints = [models.UniqueConstraint(fields=["model_name", "node"], name="load_failure_unique_model_node")]

    def __str__(self):
        return f"{self.model_name}@{self.node_id}: {self.failures} failure(s)"
