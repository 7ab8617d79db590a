"""Pure rules of publishing and proxying: aliases, hosts, rate buckets, path and query rewriting."""

import re

import pytest

from kiln.api.proxy import Target, path_after_port
from kiln.config import Config
from kiln.core.errors import BadRequest
from kiln.core.publish import PublishService, auto_alias, validate_alias
from kiln.core.ratelimit import KeyedLimiter, TokenBucket


def test_auto_alias_sanitises_the_name_and_adds_six_hex():
    assert re.fullmatch(r"my-app-[0-9a-f]{6}", auto_alias("My_App"))
    assert re.fullmatch(r"sandbox-[0-9a-f]{6}", auto_alias("___"))
    long = auto_alias("x" * 63)
    assert len(long) == 63 and long.startswith("x" * 56 + "-")
    assert auto_alias("a") != auto_alias("a")


@pytest.mark.parametrize("alias", ["a", "0", "my-app", "a" * 63, "x-1-2"])
def test_valid_aliases(alias):
    validate_alias(alias)


@pytest.mark.parametrize("alias", ["", "-a", "A", "a.b", "a_b", "a" * 64, "é", "www", "api", "_acme-challenge"])
def test_invalid_aliases(alias):
    with pytest.raises(BadRequest):
        validate_alias(alias)


def test_alias_of_host():
    svc = PublishService(store=None, config=Config(listen="127.0.0.1:8080"))
    assert svc.alias_of_host("my-app.localhost:8080") == "my-app"
    assert svc.alias_of_host("MY-APP.LOCALHOST.") == "my-app"
    assert svc.alias_of_host("a.b.localhost") == "a.b"  # resolves to nothing: not an alias
    for host in ("localhost", "localhost:8080", "127.0.0.1:8080", "", ".localhost", "evil-localhost"):
        assert svc.alias_of_host(host) is None, host
    assert svc.url("my-app") == "http://my-app.localhost:8080"
    assert PublishService(None, Config(listen="0.0.0.0:80")).url("x") == "http://x.localhost"


def test_token_bucket_burst_then_refill():
    now = [0.0]
    bucket = TokenBucket(burst=3, per_minute=60, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 1.0  # one token per second
    assert bucket.take() and not bucket.take()
    now[0] += 100
    assert sum(bucket.take() for _ in range(10)) == 3  # never more than the burst


def test_keyed_limiter_is_per_key_and_bounded():
    limiter = KeyedLimiter(burst=1, per_minute=1, max_keys=100, clock=lambda: 0.0)
    assert limiter.take("a") and not limiter.take("a") and limiter.take("b")
    for i in range(1000):
        limiter.take(f"ip{i}")
    assert len(limiter.buckets) == 100


def test_proxy_path_and_query_rewriting():
    assert path_after_port(b"/sandboxes/x/proxy/3000") == "/"
    assert path_after_port(b"/sandboxes/x/proxy/3000/") == "/"
    assert path_after_port(b"/sandboxes/x/proxy/3000/a/b%20c/") == "/a/b%20c/"
    t = Target(row=None, port=3000, path="/p", strip_credentials=True)
    assert t.query(b"token=secret&a=1&tok%65n=x&b=&tokens=2") == "a=1&b=&tokens=2"
    assert Target(None, 3000, "/p", strip_credentials=False).query(b"token=t&a=1") == "token=t&a=1"
    scope = {
        "headers": [
            (b"host", b"h:1"),
            (b"authorization", b"Bearer k"),
            (b"connection", b"keep-alive, x-hop"),
            (b"x-hop", b"1"),
            (b"keep-alive", b"5"),
            (b"cookie", b"c=1"),
        ],
        "client": ("10.0.0.9", 5555),
        "scheme": "http",
    }
    headers = dict(t.headers(scope))
    assert headers == {
        b"host": b"localhost:3000",
        b"cookie": b"c=1",
        b"x-forwarded-for": b"10.0.0.9",
        b"x-forwarded-proto": b"http",
        b"x-forwarded-host": b"h:1",
    }
