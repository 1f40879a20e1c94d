"""The reconciler's admin: the pages of what it records (``records``: events, conditions,
passes), the model page with conditions, events and "Reconcile now" (``scheduling``, which
registers ``ModelSchedulingConfig``'s admin on top of the registry's page), and the fleet
dashboard (``dashboard``, ``/admin/fleet/``)."""

from . import dashboard, records, scheduling

__all__ = ["dashboard", "records", "scheduling"]
