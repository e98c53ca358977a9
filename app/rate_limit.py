"""Per-key rate limits, counted in Redis so that every API process shares one counter per key.

A fixed window per key and bucket: the first request of a window creates a counter that expires when the
window ends (INCR and PEXPIRE in one Lua script, so it is atomic across processes); each request adds one;
past the limit the request answers 429 with `Retry-After` set to the seconds left in the window. Every
authenticated /v1 request counts in the `requests` bucket (`MODELPRESS_RATE_LIMIT_PER_MINUTE`); uploads also
count in the lower `uploads` bucket (`MODELPRESS_UPLOAD_RATE_LIMIT_PER_MINUTE`). A limit of 0 disables its
bucket. The window is `MODELPRESS_RATE_LIMIT_WINDOW_S` (60 s; tests shorten it).

Counters are keyed by the sha256 of the API key (never the key itself), so two keys of one tenant have their
own limits.

Redis down: the limiter fails open. The request is let through and a warning is logged (at most once per
`WARN_EVERY_S` per process); /healthz reports the broker as down anyway. After a failure the limiter leaves
Redis alone for `PAUSE_AFTER_FAILURE_S`, so a Redis that does not answer adds no timeout to each request.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

import redis
from fastapi import HTTPException, status

logger = logging.getLogger(__name__)

KEY_PREFIX = "modelpress:ratelimit"
TIMEOUT_S = 0.25
PAUSE_AFTER_FAILURE_S = 5.0
WARN_EVERY_S = 60.0

_HIT = """
local count = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {count, ttl}
"""
"""Count one request; returns (count in this window, milliseconds until the window ends)."""


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after_s: int


class RateLimiter:
    """The counters of one Redis, with the fail-open bookkeeping of this process."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, socket_connect_timeout=TIMEOUT_S, socket_timeout=TIMEOUT_S)
        self.hit = self.client.register_script(_HIT)
        self._lock = threading.Lock()
        self._paused_until = 0.0
        self._warned_at = -math.inf

    def check(self, bucket: str, key_hash: str, limit: int, window_s: float) -> Verdict:
        """Count this request in `bucket`; allowed unless the window's count passes `limit` (or Redis fails)."""
        now = time.monotonic()
        if now < self._paused_until:
            return Verdict(True, 0)
        window_ms = max(1, int(window_s * 1000))
        try:
            count, ttl_ms = self.hit(keys=[f"{KEY_PREFIX}:{bucket}:{key_hash}"], args=[window_ms])
        except (redis.RedisError, OSError) as exc:
            self._failed(now, exc)
            return Verdict(True, 0)
        if int(count) <= limit:
            return Verdict(True, 0)
        return Verdict(False, max(1, math.ceil(int(ttl_ms) / 1000)))

    def _failed(self, now: float, exc: Exception) -> None:
        with self._lock:
            self._paused_until = now + PAUSE_AFTER_FAILURE_S
            if now - self._warned_at >= WARN_EVERY_S:
                self._warned_at = now
                logger.warning("rate limits are not enforced: Redis is unreachable (%s); letting requests through", exc)


@lru_cache
def limiter_for(url: str) -> RateLimiter:
    return RateLimiter(url)


def enforce(redis_url: str | None, bucket: str, key_hash: str, limit: int, window_s: float) -> None:
    """Raise 429 with `Retry-After` when this key is over `limit` in `bucket`; no-op when disabled or no Redis."""
    if limit <= 0 or not redis_url:
        return
    verdict = limiter_for(redis_url).check(bucket, key_hash, limit, window_s)
    if verdict.allowed:
        return
    raise HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS,
        f"rate limit exceeded: this API key may make {limit} {bucket} per {window_s:g} s; "
        f"retry in {verdict.retry_after_s} s",
        headers={"Retry-After": str(verdict.retry_after_s)},
    )
