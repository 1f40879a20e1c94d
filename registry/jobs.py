"""Hand a load job to whatever runs load jobs in this deployment (``CONTROLPLANE_LOAD_JOB_RUNNER``):

* ``qcluster`` (default): ``django_q.tasks.async_task`` -> a qcluster process;
* ``thread``: a daemon thread of the process that created the job (one-machine setups
  without a qcluster);
* ``inline``: synchronously in the creating call (tests; the claiming thread does the load).

The runner is named by its dotted path (``RUN_LOAD_JOB``), as django-q2 names every task, so the
router (which enqueues) never imports ``registry.tasks`` (which imports the router).
"""

from __future__ import annotations

import logging
import threading

from django.conf import settings
from django.db import connections
from django.utils.module_loading import import_string
from django_q.tasks import async_task

logger = logging.getLogger(__name__)

RUN_LOAD_JOB = "registry.tasks.run_load_job"


def enqueue_load_job(job_id) -> None:
    """Hand a pending job to the configured runner. A lost message is harmless:
    ``registry.tasks.reap_load_jobs`` requeues pending jobs nobody started."""
    mode = settings.CONTROLPLANE_LOAD_JOB_RUNNER
    if mode == "inline":
        import_string(RUN_LOAD_JOB)(job_id)
    elif mode == "thread":
        threading.Thread(target=_run_in_thread, args=(job_id,), name=f"load-job-{job_id}", daemon=True).start()
    else:
        async_task(RUN_LOAD_JOB, str(job_id), task_name=f"load-{job_id}")


def _run_in_thread(job_id) -> None:
    try:
        import_string(RUN_LOAD_JOB)(job_id)
    except Exception:
        logger.exception("load job %s crashed", job_id)
    finally:
        connections.close_all()
