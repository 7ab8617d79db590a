"""OpenAPI at /openapi.json lists every HTTP route and is a valid OpenAPI 3 document; the docs and web
pages load without a key."""

import httpx
from fastapi.routing import APIRoute
from openapi_spec_validator import validate

from kiln.app import build_app
from kiln.config import Config


def test_openapi_is_valid_and_lists_every_route(daemon):
    r = httpx.get(daemon.url + "/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    validate(spec)  # raises on any violation of the OpenAPI 3 schema
    documented = {(path, method.upper()) for path, ops in spec["paths"].items() for method in ops}
    routes = {
        (route.path, method)
        for route in build_app(Config()).routes
        if isinstance(route, APIRoute) and route.include_in_schema
        for method in route.methods
    }
    assert routes - documented == set()
    for must in [
        ("/sandboxes", "POST"),
        ("/sandboxes/{sandbox_id}/exec", "POST"),
        ("/volumes", "POST"),
        ("/sandboxes/{sandbox_id}/publish", "POST"),
        ("/sandboxes/{sandbox_id}/proxy/{port}/{path}", "GET"),
        ("/secrets", "GET"),
        ("/templates/{template_id}", "DELETE"),
        ("/ports", "GET"),
    ]:
        assert must in documented, must


def test_docs_and_web_page_load_without_a_key(daemon):
    for path, kind in (
        ("/", "text/html"),
        ("/docs", "text/html"),
        ("/static/app.js", "javascript"),
        ("/static/vendor/xterm.js", "javascript"),
    ):
        r = httpx.get(daemon.url + path)
        assert r.status_code == 200 and kind in r.headers["content-type"], path
    outside = httpx.get(daemon.url + "/static/%2e%2e/app.py")
    assert outside.status_code in (401, 404) and b"import" not in outside.content
