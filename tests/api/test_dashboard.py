"""The dashboard is served by the API at `/` with its security headers, without touching the API's own routes."""

from __future__ import annotations

import httpx

from app.dashboard import CONTENT_SECURITY_POLICY


def test_page_and_assets_carry_the_policy(anon: httpx.Client) -> None:
    page = anon.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "<script>" not in page.text and 'src="http' not in page.text  # no inline script, nothing remote
    for asset in ("/ui/js/app.js", "/ui/style.css", "/ui/vendor/chart.umd.min.js"):
        response = anon.get(asset)
        assert response.status_code == 200, asset
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["x-content-type-options"] == "nosniff"
    assert "connect-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe-inline" not in CONTENT_SECURITY_POLICY


def test_api_routes_are_untouched(anon: httpx.Client, client: httpx.Client) -> None:
    assert "content-security-policy" not in client.get("/v1/models").headers
    assert anon.get("/v1/models").status_code == 401
    assert anon.get("/openapi.json").json()["components"]["schemas"]["JobCreate"]
    assert anon.get("/docs").status_code == 200
    assert anon.get("/ui/missing.js").status_code == 404
    assert anon.get("/ui/../app/main.py").status_code == 404
    assert anon.post("/").status_code == 405
