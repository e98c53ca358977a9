"""`python -m worker`: run a Celery worker on the queues its GPUs can serve (extra arguments go to Celery).

`python -m worker --per-gpu` runs one such worker per GPU instead, each pinned to its device (worker/per_gpu.py).
"""

from __future__ import annotations

import sys

from modelpress.logs import configure_logging
from modelpress.settings import get_settings
from worker.celery_app import create_celery
from worker.registration import consumed_queues, detect_gpus


def main(argv: list[str]) -> None:
    settings = get_settings()
    configure_logging(settings.log_format)
    if "--per-gpu" in argv:
        from worker.per_gpu import supervise

        sys.exit(supervise(settings, [arg for arg in argv if arg != "--per-gpu"]))
    queues = consumed_queues(settings, detect_gpus(settings))
    app = create_celery(settings)
    name = ["--hostname", settings.worker_name] if settings.worker_name else []
    app.worker_main(["worker", "--queues", ",".join(queues), *name, *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
