"""Per-model load info (the fix of LocalAI PR #9981)."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING

from django.db import models
from django.db.models.functions import Length

from ..clock import resolve_now
from .revisions import load_digest
from .shared import registry_model

if TYPE_CHECKING:  # pragma: no cover
    from ..models import ModelLoadInfo


logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Per-model load info (LocalAI PR #9981)
# --------------------------------------------------------------------------------------------


class ModelLoadInfoManager(models.Manager):
    def upsert(
        self,
        model_name: str,
        backend_type: str,
        opts_blob: bytes,
        *,
        now: datetime | None = None,
        created_by: str = "",
    ) -> ModelLoadInfo:
        """Store the load recipe of a model: one ``INSERT ... ON CONFLICT (model_name) DO UPDATE``.

        Last write wins under concurrent frontends (the row converges to whichever statement
        commits last); ``updated_at`` is refreshed. The blob is stored as the exact bytes given.
        A recipe other than the current revision's makes a new revision
        (``ModelRevision.objects.change``); the same recipe again (every frontend load) costs
        one read of the current revision's digest and writes none.
        Raises ValueError for an empty model name.
        Idiom: upsert (a changed recipe: row lock on the current revision, see ``change``).
        Returns the row as written (unsaved instance carrying the values).
        """
        if not model_name or not model_name.strip():
            raise ValueError("model name must not be empty")
        revisions = registry_model("ModelRevision").objects
        if revisions.head_load_digest(model_name) == load_digest(backend_type or "", bytes(opts_blob or b"")):
            return self.write_row(model_name, backend_type, opts_blob, now=now)
        row, _ = revisions.change(
            model_name,
            lambda: self.write_row(model_name, backend_type, opts_blob, now=now),
            reason="load info changed",
            created_by=created_by,
            now=now,
        )
        return row

    def write_row(
        self, model_name: str, backend_type: str, opts_blob: bytes, *, now: datetime | None = None
    ) -> ModelLoadInfo:
        """The upsert itself, without revision bookkeeping (``upsert`` and a rollback call it).
        Idiom: upsert."""
        row = self.model(
            model_name=model_name,
            backend_type=backend_type or "",
            model_opts_blob=bytes(opts_blob or b""),
            updated_at=resolve_now(now),
        )
        self.bulk_create(
            [row],
            update_conflicts=True,
            unique_fields=["model_name"],
            update_fields=["backend_type", "model_opts_blob", "updated_at"],
        )
        return row

    def for_model(self, model_name: str) -> ModelLoadInfo:
        """The load recipe of a model.

        The per-model row first; only if there is none, an unsaved ``ModelLoadInfo`` built from
        the first loaded replica row that carries a blob (rows written before the per-model
        table existed). ``source`` says which. Raises ``ModelLoadInfo.DoesNotExist`` when
        neither exists.
        """
        row = self.filter(model_name=model_name).first()
        if row is not None:
            row.model_opts_blob = bytes(row.model_opts_blob)
            return row
        replica = (
            registry_model("NodeModel")
            .objects.for_model(model_name)
            .loaded()
            .annotate(blob_length=Length("model_opts_blob"))
            .filter(blob_length__gt=0)
            .order_by("created_at", "pk")
            .first()
        )
        if replica is None:
            raise self.model.DoesNotExist(f"no load info for model {model_name!r}")
        return self.model(
            model_name=model_name,
            backend_type=replica.backend_type,
            model_opts_blob=bytes(replica.model_opts_blob),
            updated_at=replica.updated_at,
            source=self.model.Source.REPLICA,
        )
