"""The GPU worker: a thin Celery layer (`celery_app`, `tasks`, `jobs`) over the pure-PyTorch `engine`."""
