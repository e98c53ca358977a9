"""`python -m worker`: run a Celery worker on the configured queue (extra arguments go to Celery)."""

from __future__ import annotations

import sys

from modelpress.logs import configure_logging
from modelpress.settings import get_settings
from worker.celery_app import create_celery


def main(argv: list[str]) -> None:
    settings = get_settings()
    configure_logging(settings.log_format)
    app = create_celery(settings)
    app.worker_main(["worker", "--queues", settings.queue, *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
