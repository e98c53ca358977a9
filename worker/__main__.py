"""`python -m worker`: run a Celery worker on the configured queue (extra arguments go to Celery)."""

from __future__ import annotations

import logging
import sys

from modelpress.settings import get_settings
from worker.celery_app import create_celery


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    app = create_celery(settings)
    app.worker_main(["worker", "--queues", settings.queue, *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
