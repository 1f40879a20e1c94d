"""``manage.py reconcile``: run the reconciler without django-q2.

``--once`` (the default) runs one pass and prints its summary as JSON. ``--loop`` is a leader
loop like the scheduled task, but as a standby: while another process holds the reconcile lock
it keeps retrying every interval, so several ``--loop`` processes give one active reconciler
and hot spares. ``--budget`` ends the loop after that many seconds (default: never).

A database outage does not end ``--loop``: a leader run that lost its connection (or could not
reach the database at all) is retried every interval, on a fresh connection, until the budget
ends; the advisory lock died with the old connection, so whichever loop reconnects first leads.
"""

import json
import logging
import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError, connections

from reconciler.reconcile import reconcile_once, run_leader

logger = logging.getLogger(__name__)
LOST = "database connection lost"


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
        pause = float(settings.RECONCILE_INTERVAL if interval is None else interval)
        began = time.monotonic()
        result = {"outcome": "error", "reason": LOST}
        while True:
            remaining = None if budget is None else budget - (time.monotonic() - began)
            if remaining is not None and remaining <= 0:
                return result
            try:
                summary = run_leader(budget=remaining, interval=interval, standby=True)
            except DatabaseError as exc:
                logger.warning("reconcile loop: database unavailable (%s); retrying in %gs", exc, pause)
                result = {"outcome": "error", "reason": f"{LOST}: {exc}"}
            else:
                result = summary.as_dict()
                if summary.reason != LOST:
                    return result
                logger.warning("reconcile loop: %s; retrying in %gs", LOST, pause)
            for connection in connections.all():
                try:
                    connection.close()
                except DatabaseError:
                    pass
            time.sleep(pause)
