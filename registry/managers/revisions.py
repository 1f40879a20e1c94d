"""Config revisions: every change of a model's load info or scheduling config, numbered.

A revision is a snapshot of what a replica of the model is loaded from (backend type, options
blob) and of its scheduling config, taken after the change that created it. The model's
*current* revision is the one with ``is_current`` (the highest number). Two digests are kept
per revision:

- ``load_digest``: backend type and options blob only; a frontend's repeated upsert of the
  same recipe compares against it and writes no revision (the common path costs one read);
- ``template_digest``: what makes a replica what it is (the load recipe and the node
  selector). Replicas whose revision has another template than the current one are replaced
  by the reconciler's rollout; a change of ``min_replicas`` makes a revision (history,
  rollback) but replaces nothing, as a Kubernetes Deployment's replica count is not part of
  its pod template.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from django.db import models, transaction

from .shared import registry_model

if TYPE_CHECKING:  # pragma: no cover
    from ..models import ModelRevision


logger = logging.getLogger(__name__)

# Scheduling-config fields a revision snapshots (and a rollback restores): everything an
# operator sets, the autoscaling settings included. The circuit breaker and autoscaler state
# columns are the reconciler's bookkeeping, not configuration.
SCHEDULING_FIELDS = (
    "min_replicas",
    "max_replicas",
    "node_selector",
    "placement",
    "disk_bytes",
    "spread_by",
    "target_in_flight_per_replica",
    "upscale_delay_s",
    "downscale_delay_s",
    "floor_schedule",
)


def load_digest(backend_type: str, opts_blob: bytes) -> str:
    h = hashlib.sha256()
    h.update((backend_type or "").encode())
    h.update(b"\0")
    h.update(bytes(opts_blob or b""))
    return h.hexdigest()


def template_digest(backend_type: str, opts_blob: bytes, scheduling: dict | None) -> str:
    selector = (scheduling or {}).get("node_selector") or {}
    h = hashlib.sha256()
    h.update(load_digest(backend_type, opts_blob).encode())
    h.update(json.dumps(selector, sort_keys=True).encode())
    return h.hexdigest()


class ModelRevisionManager(models.Manager):
    def head(self, model_name: str) -> ModelRevision | None:
        """The model's current revision, or None when it has none yet."""
        return self.filter(model_name=model_name, is_current=True).first()

    def head_numbers(self, model_names: Iterable[str]) -> dict[str, int]:
        """``{model: current revision number}`` for the given models (one query)."""
        return dict(
            self.filter(model_name__in=list(model_names), is_current=True).values_list("model_name", "number")
        )

    def head_load_digest(self, model_name: str) -> str | None:
        return self.filter(model_name=model_name, is_current=True).values_list("load_digest", flat=True).first()

    def state_of(self, model_name: str) -> tuple[str, bytes, dict | None, bool]:
        """What the model's rows say now: ``(backend_type, opts_blob, scheduling snapshot or
        None, whether a load-info row exists)``."""
        info = registry_model("ModelLoadInfo").objects.filter(model_name=model_name).first()
        config = (
            registry_model("ModelSchedulingConfig")
            .objects.filter(model_name=model_name)
            .values(*SCHEDULING_FIELDS)
            .first()
        )
        if info is None:
            return "", b"", config, False
        return info.backend_type, bytes(info.model_opts_blob), config, True

    def change(
        self,
        model_name: str,
        write: Callable[[], object],
        *,
        reason: str,
        created_by: str = "",
        now=None,
    ):
        """Run ``write`` (an upsert of the load info or the scheduling config) and record the
        model's new state as its next revision if it differs from the current one. Returns
        ``(write's result, the new revision or None)``.

        Idiom: a per-model transaction-level advisory lock (``locks.xact_model_lock``), then an
        insert guarded by a unique constraint, in one short ``atomic()``: concurrent changes of
        one model run one after the other, each snapshots the rows as the previous one left
        them and takes number ``head + 1``. The advisory lock, not a row lock on the current
        revision, because a model's first change has no row to lock, and a row lock released
        by a commit that cleared ``is_current`` would let the waiter read no head at all. The
        unique ``(model_name, number)`` and one-current constraints are the backstop.
        """
        from django.utils import timezone

        from ..locks import MODEL_REVISIONS, xact_model_lock

        now = now or timezone.now()
        with transaction.atomic():
            xact_model_lock(MODEL_REVISIONS, model_name)
            head = self.filter(model_name=model_name, is_current=True).first()
            result = write()
            return result, self._next(model_name, head, reason=reason, created_by=created_by, now=now)

    def _next(self, model_name: str, head, *, reason: str, created_by: str, now) -> ModelRevision | None:
        """Inside ``change``'s transaction: insert the next revision if the state changed."""
        backend_type, blob, scheduling, has_load_info = self.state_of(model_name)
        if head is not None and (
            head.backend_type == backend_type
            and bytes(head.model_opts_blob) == blob
            and head.scheduling == scheduling
            and head.has_load_info == has_load_info
        ):
            return None
        row = self.model(
            model_name=model_name,
            number=(head.number + 1) if head is not None else 1,
            backend_type=backend_type,
            model_opts_blob=blob,
            has_load_info=has_load_info,
            scheduling=scheduling,
            load_digest=load_digest(backend_type, blob),
            template_digest=template_digest(backend_type, blob, scheduling),
            reason=reason[:255],
            created_by=created_by[:255],
            created_at=now,
            is_current=True,
        )
        if head is not None:
            self.filter(pk=head.pk).update(is_current=False)
        row.save(force_insert=True)
        return row

    def rollback(self, model_name: str, number: int, *, created_by: str = "", now=None) -> ModelRevision:
        """Make revision ``number``'s load info and scheduling config current again, as a NEW
        revision (``head + 1``, reason ``rollback to N``), as ``kubectl rollout undo`` does:
        the history only grows, and replicas still at revision ``number`` (same template) are
        not replaced. Raises ``DoesNotExist`` for an unknown revision and ``ValueError`` when
        ``number`` is already current. A revision taken before the model had load info (or a
        scheduling config) leaves that row as it is. Idiom: ``change`` (per-model advisory lock)."""
        target = self.get(model_name=model_name, number=number)
        LoadInfo = registry_model("ModelLoadInfo")
        Config = registry_model("ModelSchedulingConfig")

        def write():
            head = self.filter(model_name=model_name, is_current=True).values_list("number", flat=True).first()
            if head == number:
                raise ValueError(f"revision {number} is already current")
            if target.has_load_info:
                LoadInfo.objects.write_row(model_name, target.backend_type, bytes(target.model_opts_blob), now=now)
            if target.scheduling is not None:
                Config.objects.write_row(model_name, **target.scheduling)

        _, revision = self.change(
            model_name, write, reason=f"rollback to revision {number}", created_by=created_by, now=now
        )
        if revision is None:  # same state as the head (e.g. the head re-did this revision)
            raise ValueError(f"revision {number} has the current load info and config already")
        return revision
