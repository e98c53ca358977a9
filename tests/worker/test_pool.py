"""The worker's pool reaps an exiting child before it forks the next one (worker/pool.py)."""

from __future__ import annotations

import multiprocessing
import time

from worker.pool import reap


def test_a_child_whose_sentinel_closed_is_reaped_at_once():
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(0.2,))
    child.start()
    started = time.monotonic()
    assert reap(child, wait_s=5.0) == 0
    assert time.monotonic() - started < 4.0, "reaped when it exited, not at the end of the wait"


def test_a_child_still_running_is_left_to_the_pool_after_the_wait():
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
    child.start()
    try:
        started = time.monotonic()
        assert reap(child, wait_s=0.1) is None
        assert time.monotonic() - started < 5.0
    finally:
        child.kill()
        child.join()
