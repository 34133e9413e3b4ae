"""The operator dashboard in a real headless Chromium against a running msgcore: log in, watch a
message appear without reloading, pause and resume a campaign with the page's buttons.

With MSGCORE_SCREENSHOTS=<dir> the tests also write login.png and dashboard.png there (the committed
ones are in docs/screenshots/: `MSGCORE_SCREENSHOTS=docs/screenshots pytest tests/browser`).
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, expect

from core.domain.events import utcnow
from ops.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

WAIT_MS = 30_000  # generous: the machine may be busy; nothing here measures time


async def _shot(page: Page, name: str) -> None:
    target = os.environ.get("MSGCORE_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(Path(target) / name), full_page=True)


async def _login(page: Page, stack: Stack, key: str) -> None:
    await page.goto(f"{stack.api_url}/dashboard")
    await page.fill("#key", key)
    await page.click("button[type=submit]")


async def test_login_shows_an_error_for_a_wrong_key_and_the_dashboard_for_the_right_one(
        dash_stack: Stack, page: Page) -> None:
    await page.goto(f"{dash_stack.api_url}/dashboard")
    await expect(page.locator("h1")).to_have_text("msgcore operator dashboard")
    await _shot(page, "login.png")
    await _login(page, dash_stack, "not-the-key")
    await expect(page.locator("#login-error")).to_have_text("Wrong admin key.")
    assert "key" not in page.url.split("/dashboard", 1)[1]  # no key in the URL, ever
    await _login(page, dash_stack, dash_stack.admin_key)
    await expect(page.locator("header h1")).to_have_text("msgcore operations")
    await expect(page.locator(".status[data-route=sim]")).to_have_text(re.compile(r"^(UP|BUSY|DOWN)$"),
                                                                         timeout=WAIT_MS)
    cookies = {c["name"]: c for c in await page.context.cookies()}
    session = cookies["msgcore_dashboard"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert dash_stack.admin_key not in session["value"]
    await page.click("#logout")
    await expect(page.locator("#key")).to_be_visible()


async def test_a_submitted_message_appears_without_reloading(dash_stack: Stack, page: Page) -> None:
    await _login(page, dash_stack, dash_stack.admin_key)
    await expect(page.locator("#recent")).to_be_visible(timeout=WAIT_MS)
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))
    key = dash_stack.keys["acme"]  # type: ignore[attr-defined]
    async with httpx.AsyncClient(base_url=dash_stack.api_url, headers={"Authorization": f"Bearer {key}"}) as http:
        r = await http.post("/v1/messages", json={"to": "+491701234567", "from": "acme", "text": "hello dashboard"})
        assert r.status_code == 202, r.text
        message_id = r.json()["id"]
    await expect(page.locator("#recent")).to_contain_text(message_id, timeout=WAIT_MS)
    await expect(page.locator("#accepted-hour")).not_to_have_text("0", timeout=WAIT_MS)  # projected
    assert navigations == []  # polled fragments, no reload


async def test_pause_and_resume_a_campaign_from_the_dashboard(dash_stack: Stack, page: Page,
                                                             mongo_client: Any) -> None:
    key = dash_stack.keys["acme"]  # type: ignore[attr-defined]
    send_at = (utcnow() + timedelta(days=1)).isoformat()  # scheduled: it stays open while the test acts on it
    async with httpx.AsyncClient(base_url=dash_stack.api_url, headers={"Authorization": f"Bearer {key}"}) as http:
        r = await http.post("/v1/campaigns", json={"name": "Spring sale", "from": "acme",
                                                   "template": "Hello {{name}}", "send_at": send_at})
        assert r.status_code == 201, r.text
        campaign_id = r.json()["id"]
        r = await http.post(f"/v1/campaigns/{campaign_id}/recipients", content="phone,name\n+491700000001,Ann\n",
                            headers={"Content-Type": "text/csv"})
        assert r.status_code == 200, r.text
        assert (await http.post(f"/v1/campaigns/{campaign_id}/start")).json()["status"] == "scheduled"
    campaigns = mongo_client[dash_stack.mongo_db]["campaigns"]
    await _login(page, dash_stack, dash_stack.admin_key)
    row = page.locator(f"#campaign-{campaign_id}")
    await expect(row.locator(".campaign-status")).to_have_text("scheduled", timeout=WAIT_MS)
    await _shot(page, "dashboard.png")

    await row.locator("button[data-action=pause]").click()
    await expect(row.locator(".campaign-status")).to_have_text("paused", timeout=WAIT_MS)
    await expect(page.locator("#panel-campaigns .notice")).to_contain_text("pause done")
    assert (await campaigns.find_one({"_id": campaign_id}))["status"] == "paused"

    await row.locator("button[data-action=resume]").click()
    await expect(row.locator(".campaign-status")).to_have_text("scheduled", timeout=WAIT_MS)
    assert (await campaigns.find_one({"_id": campaign_id}))["status"] == "scheduled"


async def test_actions_need_a_session_and_the_form_token(dash_stack: Stack) -> None:
    """Outside the browser: what a forged or stale request gets (4xx with a message, never 5xx)."""
    async with httpx.AsyncClient(base_url=dash_stack.api_url) as http:
        r = await http.post("/dashboard/campaigns/nope/pause", data={"csrf": "x"})
        assert r.status_code == 401 and r.headers["HX-Redirect"] == "/dashboard"
        r = await http.post("/dashboard/login", data={"key": dash_stack.admin_key})
        assert r.status_code == 303 and "msgcore_dashboard" in r.cookies
        r = await http.post("/dashboard/campaigns/nope/pause", data={"csrf": "forged"})
        assert r.status_code == 403 and "form token" in r.text
        page = (await http.get("/dashboard")).text
        csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        r = await http.post("/dashboard/campaigns/nope/pause", data={"csrf": csrf})
        assert r.status_code == 404 and "No campaign nope" in r.text
        r = await http.post("/dashboard/campaigns/nope/explode", data={"csrf": csrf})
        assert r.status_code == 404
        r = await http.get("/dashboard/panel/nothing")
        assert r.status_code == 404
        r = await http.post("/dashboard/dead-letters/nope/requeue", data={"csrf": csrf})
        assert r.status_code == 409 and "not found" in r.text
        assert "/dashboard" not in (await http.get("/openapi.json")).text
