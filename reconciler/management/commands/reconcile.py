"""``manage.py reconcile``: run the reconciler without django-q2.

``--once`` (the default) runs one pass and prints its summary as JSON. ``--loop`` is what
the qcluster's leader process runs (``reconcile.lead``), on its own: a standby leader loop;
while another process holds the reconcile lock it keeps retrying every interval, so several ``--loop`` processes give one active reconciler
and hot spares. ``--budget`` ends the loop after that many seconds (default: never).

A database outage does not end ``--loop``: a leader run that lost its connection (or could not
reach the database at all) is retried every interval, on a fresh connection, until the budget
ends; the advisory lock died with the old connection, so whichever loop reconnects first leads.
"""

import json

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from reconciler.reconcile import lead, reconcile_once


class Command(BaseCommand):
    help = "Run reconcile passes: one (--once) or a leader loop (--loop)."

    def add_arguments(self, parser):
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument("--once", action="store_true", help="run one pass (default)")
        mode.add_argument("--loop", action="store_true", help="run passes every --interval seconds")
        parser.add_argument(
            "--interval",
            type=float,
            default=None,
            help=f"seconds between passes (default: RECONCILE_INTERVAL = {settings.RECONCILE_INTERVAL})",
        )
        parser.add_argument("--budget", type=float, default=None, help="stop looping after this many seconds")

    def handle(self, *args, once, loop, interval, budget, **options):
        if interval is not None and interval <= 0:
            raise CommandError("--interval must be positive")
        if not loop and (interval is not None or budget is not None):
            raise CommandError("--interval and --budget only apply to --loop")
        if loop:
            result = self.loop(budget, interval)
        else:
            result = reconcile_once().as_dict()
        self.stdout.write(json.dumps(result, indent=2, sort_keys=True))
        if result["outcome"] == "error":
            raise CommandError(f"reconcile pass failed: {result['reason']}")

    def loop(self, budget: float | None, interval: float | None) -> dict:
        return lead(budget=budget, interval=interval).as_dict()
