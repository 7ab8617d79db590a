"""The web page in headless Chromium (Debian's, driven by Playwright): key, create, terminal."""

from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

SCREENSHOTS = Path(__file__).resolve().parents[2] / ".cache" / "test-output"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def signed_in(browser, daemon):
    """A page of the daemon's web app, signed in with the admin key."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(daemon.url + "/")
    page.fill("#token", daemon.admin_token)
    page.click("text=Use this key")
    return page


def test_create_a_sandbox_and_use_its_terminal(browser, daemon, api):
    page = signed_in(browser, daemon)
    try:
        page.fill("#new-name", "browser")
        page.click("#create")
        row = page.locator("#sandboxes tbody tr[data-name=browser]")
        expect(row).to_be_visible(timeout=60_000)
        expect(row.locator("td").nth(1)).to_have_text("running")
        expect(row.locator("td").nth(6)).to_have_text("public")  # its egress policy
        row.locator("button.terminal").click()
        terminal = page.locator("#terminal .xterm-rows")
        expect(terminal).to_contain_text("$", timeout=30_000)  # the prompt
        page.locator("#terminal").click()
        page.keyboard.type("echo hello-$((6*7))-browser")
        page.keyboard.press("Enter")
        expect(terminal).to_contain_text("hello-42-browser", timeout=30_000)  # the output, not the typed line
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shot = SCREENSHOTS / "web-terminal.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        page.reload()  # the key is remembered
        expect(page.locator("#sandboxes tbody tr[data-name=browser]")).to_be_visible(timeout=30_000)
    finally:
        page.close()
        sb = next((s for s in api.get("/sandboxes").json() if s["name"] == "browser"), None)
        if sb:
            api.delete(f"/sandboxes/{sb['id']}")


def test_images_are_listed_and_offered_on_create(browser, daemon, api):
    page = signed_in(browser, daemon)
    try:
        expect(page.locator("#images tbody tr[data-name=minimal] td").nth(1)).to_have_text("builtin")
        expect(page.locator("#images tbody tr[data-name=default] td").nth(2)).to_have_text("ready")
        page.fill("#new-name", "browser-minimal")
        page.select_option("#new-image", "minimal")
        page.click("#create")
        row = page.locator("#sandboxes tbody tr[data-name=browser-minimal]")
        expect(row.locator("td").nth(7)).to_have_text("minimal", timeout=60_000)
    finally:
        page.close()
        sb = next((s for s in api.get("/sandboxes").json() if s["name"] == "browser-minimal"), None)
        if sb:
            api.delete(f"/sandboxes/{sb['id']}")


def test_fork_and_snapshot_buttons(browser, daemon, api):
    assert api.post("/sandboxes", json={"name": "browser-src"}).status_code == 201
    page = signed_in(browser, daemon)
    try:
        row = page.locator("#sandboxes tbody tr[data-name=browser-src]")
        row.locator("button.fork").click()
        expect(page.locator("#create-status")).to_contain_text("forked browser-src as browser-src-", timeout=60_000)
        page.once("dialog", lambda dialog: dialog.accept("browser-snap"))
        row.locator("button.snapshot").click()
        expect(page.locator("#create-status")).to_contain_text("snapshot browser-snap", timeout=60_000)
        assert api.get("/snapshots/browser-snap").status_code == 200
        forks = [s for s in api.get("/sandboxes").json() if s["name"].startswith("browser-src-")]
        assert len(forks) == 1
    finally:
        page.close()
        for s in api.get("/sandboxes").json():
            if s["name"].startswith("browser-src"):
                api.delete(f"/sandboxes/{s['id']}")
        api.delete("/snapshots/browser-snap")
