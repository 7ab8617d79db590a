"""The SDK's mapping of HTTP answers to exception types."""

from kiln.client.errors import (
    Conflict,
    InvalidArgument,
    KilnError,
    NotFound,
    RateLimited,
    ServerError,
    Unauthorized,
    error_for,
)


def test_status_codes_map_to_exception_types():
    assert type(error_for(400, "bad")) is InvalidArgument
    assert type(error_for(413, "big")) is InvalidArgument
    assert type(error_for(401, "who")) is Unauthorized
    assert type(error_for(404, "gone")) is NotFound
    assert type(error_for(409, "taken")) is Conflict
    limited = error_for(429, "rate limit exceeded", retry_after="2")
    assert type(limited) is RateLimited and limited.retry_after == 2.0
    assert error_for(429, "quota").retry_after is None
    err = error_for(500, "internal error", request_id="req_1")
    assert type(err) is ServerError and err.request_id == "req_1" and err.status == 500
    assert type(error_for(418, "teapot")) is KilnError
    assert all(isinstance(e, KilnError) for e in (limited, err))
