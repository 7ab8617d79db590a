"""Token buckets: `burst` requests at once, refilled at `per_minute`; keyed limiters forget the
least recently used keys beyond a bound so memory stays flat whoever calls."""

from __future__ import annotations

import time
from collections import OrderedDict

MAX_KEYS = 10_000


class TokenBucket:
    def __init__(self, burst: int, per_minute: float, clock=time.monotonic):
        self.capacity = float(burst)
        self.rate = per_minute / 60.0
        self.tokens = float(burst)
        self.clock = clock
        self.updated = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class KeyedLimiter:
    def __init__(self, burst: int, per_minute: float, max_keys: int = MAX_KEYS, clock=time.monotonic):
        self.burst, self.per_minute, self.max_keys, self.clock = burst, per_minute, max_keys, clock
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str) -> bool:
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = TokenBucket(self.burst, self.per_minute, self.clock)
            if len(self.buckets) > self.max_keys:
                self.buckets.popitem(last=False)
        else:
            self.buckets.move_to_end(key)
        return bucket.take()


# making a sandbox or an image: the heavy requests
CREATE_ROUTES = {
    ("POST", "/sandboxes"),
    ("POST", "/images/import"),
    ("POST", "/images/build"),
    ("POST", "/sandboxes/{sandbox_id}/save-image"),
}
EXEC_ROUTES = {("POST", "/sandboxes/{sandbox_id}/exec"), ("PUT", "/sandboxes/{sandbox_id}/files")}


def rate_class(method: str, route: str) -> str:
    """bhatti's classes, chosen by the matched route's template (never by what a path contains: a
    sandbox may be called `ws-demo`): POST /sandboxes and image imports, builds and saves create;
    exec, file uploads and WebSockets (method "WEBSOCKET") are "exec"; everything else (reads,
    deletes, stop/start, publish) is "read"."""
    if (method, route) in CREATE_ROUTES:
        return "create"
    if (method, route) in EXEC_ROUTES or method == "WEBSOCKET":
        return "exec"
    return "read"


class UserRateLimits:
    """Per-user token buckets per class; a refused request has changed nothing yet."""

    def __init__(self, create: tuple[int, float], exec_: tuple[int, float], read: tuple[int, float]):
        self.limiters = {"create": KeyedLimiter(*create), "exec": KeyedLimiter(*exec_), "read": KeyedLimiter(*read)}

    def allow(self, user_id: str, method: str, route: str) -> bool:
        return self.allow_class(user_id, rate_class(method, route))

    def allow_class(self, user_id: str, klass: str) -> bool:
        """For surfaces with routes of their own (the E2B API): "create", "exec" or "read"."""
        return self.limiters[klass].take(user_id)
