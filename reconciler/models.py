"""What the reconciler remembers: an event history, per-model conditions, and its passes.

None of these drives the reconciler (each pass recomputes desired vs observed from the registry
tables); they answer the operator's "why is my model not scheduled?" and "what did the
reconciler do?". They are written only through the verbs in ``managers.py``.
"""

from django.db import models
from django.utils import timezone

from .managers import (
    EventManager,
    ModelConditionManager,
    ReconcilePassManager,
    ReplicaSampleManager,
    UnansweredListingManager,
)


class Event(models.Model):
    """One thing that happened to the fleet, appended once and never updated.

    ``node_id``/``node_name`` are copies rather than a foreign key, so the history of a node
    survives its deletion (admin deregister).
    """

    class Kind(models.TextChoices):
        NODE_OFFLINE = "node_offline", "node marked offline (stale heartbeat)"
        NODE_RECOVERED = "node_recovered", "node healthy again (fresh heartbeat, or its worker answers again)"
        NODE_UNHEALTHY = "node_unhealthy", "node unhealthy (heartbeating, its worker not answering)"
        MASS_STALENESS_GUARD = "mass_staleness_guard", "reaping paused: most nodes stale at once"
        MASS_STALENESS_CLEARED = "mass_staleness_cleared", "reaping resumed"
        REPLICA_ADDED = "replica_added", "replica added"
        REPLICA_REMOVED = "replica_removed", "replica removed"
        SCALE_UP_FAILED = "scale_up_failed", "scale-up failed"
        ORPHAN_BACKEND_STOPPED = "orphan_backend_stopped", "backend without a replica row stopped"
        COOLDOWN_ENTERED = "cooldown_entered", "unsatisfiable: cooldown started"
        COOLDOWN_LEFT = "cooldown_left", "cooldown over"
        NO_LOAD_INFO = "no_load_info", "no load info: cannot schedule"
        LOAD_INFO_FOUND = "load_info_found", "load info present again"
        MODEL_AVAILABLE = "model_available", "model available"
        MODEL_UNAVAILABLE = "model_unavailable", "model below its floor"
        VRAM_RESERVATION_RELEASED = "vram_reservation_released", "leaked VRAM reservation released"
        CONDITION_CHANGED = "condition_changed", "condition changed"
        AUTOSCALED = "autoscaled", "load-aware autoscaling changed the replica count"
        ROLLOUT_STARTED = "rollout_started", "rollout to a new revision started"
        REPLICA_DRAINING = "replica_draining", "replica of an older revision draining"
        ROLLOUT_COMPLETE = "rollout_complete", "every replica at the current revision"

    created_at = models.DateTimeField(default=timezone.now)
    kind = models.CharField(max_length=32, choices=Kind.choices)
    model_name = models.CharField(max_length=255, blank=True)
    node_id = models.UUIDField(null=True, blank=True)
    node_name = models.CharField(max_length=255, blank=True)
    message = models.TextField(blank=True)
    details = models.JSONField(default=dict, blank=True)

    objects = EventManager()

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["created_at"], name="event_created_idx"),
            models.Index(fields=["model_name", "created_at"], name="event_model_created_idx"),
            models.Index(fields=["node_id", "created_at"], name="event_node_created_idx"),
        ]

    def __str__(self):
        subject = self.model_name or self.node_name or "cluster"
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.kind} {subject}"


class ModelCondition(models.Model):
    """The current answer to one question about a model (Kubernetes-style condition).

    ``since`` is the last time ``status`` or ``reason`` changed; ``updated_at`` the last write.
    Cluster-level conditions (``ReapingPaused``) use the empty model name.
    """

    class Type(models.TextChoices):
        AVAILABLE = "Available", "at least max(min_replicas, 1) replicas ready"
        PROGRESSING = "Progressing", "replicas loading or a scale-up issued"
        UNSATISFIABLE = "Unsatisfiable", "no capacity: in cooldown"
        NO_LOAD_INFO = "NoLoadInfo", "no load recipe: cannot be scheduled"
        REAPING_PAUSED = "ReapingPaused", "cluster: stale nodes not reaped (mass staleness)"

    CLUSTER = ""  # model_name of cluster-level conditions

    model_name = models.CharField(max_length=255, blank=True)
    type = models.CharField(max_length=32, choices=Type.choices)
    status = models.BooleanField()
    reason = models.CharField(max_length=64, help_text="stable machine-readable code")
    message = models.TextField(blank=True)
    since = models.DateTimeField(help_text="last change of status or reason")
    updated_at = models.DateTimeField()

    objects = ModelConditionManager()

    class Meta:
        ordering = ["model_name", "type"]
        constraints = [models.UniqueConstraint(fields=["model_name", "type"], name="model_condition_unique_type")]

    def __str__(self):
        return f"{self.model_name or 'cluster'} {self.type}={self.status} ({self.reason})"


class ReconcilePass(models.Model):
    """One reconcile pass (or one skipped attempt) and its summary; only the newest
    ``RECONCILE_PASSES_KEPT`` rows are kept."""

    class Outcome(models.TextChoices):
        OK = "ok", "ok"
        SKIPPED = "skipped", "skipped"
        ERROR = "error", "error"

    started_at = models.DateTimeField()
    finished_at = models.DateTimeField()
    duration = models.DurationField()
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    summary = models.JSONField(default=dict, blank=True)
    holder_host = models.CharField(max_length=255, blank=True)
    holder_pid = models.PositiveIntegerField(null=True, blank=True)

    objects = ReconcilePassManager()

    class Meta:
        ordering = ["-started_at", "-id"]
        verbose_name_plural = "reconcile passes"
        indexes = [models.Index(fields=["started_at"], name="reconcile_pass_started_idx")]

    def __str__(self):
        return f"{self.started_at:%Y-%m-%d %H:%M:%S} {self.outcome}"


class ReplicaSample(models.Model):
    """A model's ready and desired replica counts when either changed (written by the pass that
    saw the change, pruned after two hours): the fleet dashboard's "desired vs ready" chart."""

    model_name = models.CharField(max_length=255)
    at = models.DateTimeField()
    ready = models.PositiveIntegerField()
    desired = models.PositiveIntegerField()

    objects = ReplicaSampleManager()

    class Meta:
        ordering = ["model_name", "at", "id"]
        indexes = [models.Index(fields=["model_name", "at"], name="replica_sample_model_at_idx")]

    def __str__(self):
        return f"{self.model_name} at {self.at:%H:%M:%S}: {self.ready} ready of {self.desired}"


class UnansweredListing(models.Model):
    """A node whose worker, known to serve the worker gRPC service, has not answered the
    reconciler's ``ListBackends`` for ``failures`` consecutive passes (since ``since``), each
    after a new heartbeat of the node (``counted_heartbeat``: a node whose heartbeats stopped
    too is not sick but gone, and is left to the stale sweep).

    The row exists only during such a streak: the first answer deletes it. At
    ``RECONCILE_WORKER_FAILURES_BEFORE_UNHEALTHY`` failures the node is marked ``unhealthy``;
    it is ``healthy`` again when its worker answers.
    """

    node = models.OneToOneField(
        "registry.Node", on_delete=models.CASCADE, primary_key=True, related_name="unanswered_listing"
    )
    failures = models.PositiveIntegerField()
    since = models.DateTimeField(help_text="the first unanswered listing of this streak")
    counted_heartbeat = models.DateTimeField(
        null=True, blank=True, help_text="the node's last_heartbeat when the streak last counted a pass"
    )
    last_error = models.TextField(blank=True)
    updated_at = models.DateTimeField()

    objects = UnansweredListingManager()

    def __str__(self):
        return f"{self.node_id}: {self.failures} unanswered listing(s) since {self.since:%Y-%m-%d %H:%M:%S}"
