"""`msgcore campaigns ...` against a real API process (uvicorn, as `msgcore api` runs it) on the test
MongoDB and PostgreSQL: create, upload with a report, start, status, pause, resume, cancel, list,
problems; and the errors a user can make, each one line and a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from pymongo.asynchronous.database import AsyncDatabase
from typer.testing import CliRunner

from core.domain.events import utcnow
from core.store.campaigns import CampaignStore
from core.store.eventstore import EventStore
from core.store.routes import RouteStore
from core.store.tenants import TenantStore
from core.workers.campaigns import CampaignSweeper
from core.workers.router import Router
from ops.cli import app
from ops.embedded import free_port
from projections.schema import migrate

REPO = Path(__file__).resolve().parents[2]

CSV = (
    "phone,first_name\n"
    "+4915100000001,Anna\n"
    "12345,Bob\n"  # row 3: no + or 00
    "+4915100000002,Carl\n"
    "+4915100000001,Anna again\n"  # row 5: a duplicate of row 2
)


@pytest.fixture
def api_process(mongo_url: str, mongo_db: AsyncDatabase, pg_url: str, pg_schema: str,
                tmp_path: Path) -> Iterator[str]:
    """`msgcore api` on a free port; its URL."""
    port = free_port()
    env = {**os.environ, "MSGCORE_MONGO_URL": mongo_url, "MSGCORE_MONGO_DB": mongo_db.name, "MSGCORE_PG_URL": pg_url,
           "MSGCORE_REPORTING_SCHEMA": pg_schema, "MSGCORE_API_PORT": str(port), "MSGCORE_ADMIN_KEY": "",
           "MSGCORE_DATA_DIR": str(tmp_path / "api-data"), "MSGCORE_LOG_LEVEL": "WARNING"}
    log_path = tmp_path / "api.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "api"], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log_path)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the api exited with {proc.returncode}: {log_path.read_text()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the api did not answer within {timeout_s}s: {log_path.read_text()}")


@pytest_asyncio.fixture(loop_scope="session")
async def api(mongo_db: AsyncDatabase, pg_url: str, pg_schema: str, api_process: str,
              tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    await migrate(pg_url, pg_schema)  # the API reads messages by state from here (counts, progress)
    key = await TenantStore(mongo_db).create("acme", "Acme", utcnow())
    yield {"url": api_process, "key": key, "data_dir": tmp_path / "cli-data"}


def run(api: dict[str, Any], *args: str, **env: str) -> tuple[int, str, str]:
    """The CLI in this process (much quicker than a process per command); the API is another process,
    so blocking this thread's event loop meanwhile is harmless."""
    base = {"MSGCORE_DATA_DIR": str(api["data_dir"]), "MSGCORE_API_URL": api["url"], "MSGCORE_API_KEY": api["key"],
            "COLUMNS": "200"}
    result = CliRunner().invoke(app, ["campaigns", *args], env={**base, **env}, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback would be a bug: never for a user's mistake
    return result.exit_code, result.stdout, result.stderr


async def test_create_upload_start_status_pause_resume_cancel(api: dict[str, Any], mongo_db: AsyncDatabase,
                                                              tmp_path: Path) -> None:
    code, out, err = run(api, "create", "--name", "Spring sale", "--from", "AcmeShop", "--template",
                         "Hi {{first_name}}, 20% off today")
    assert code == 0, err
    cid = out.strip()
    assert cid.startswith("cmp_") and f"msgcore campaigns upload {cid}" in err

    code, _, err = run(api, "pause", cid)
    assert code == 1
    assert f"campaign {cid}: cannot pause a campaign that is draft (invalid_campaign_transition)" in err

    csv_path = tmp_path / "recipients.csv"
    csv_path.write_text(CSV)
    code, out, err = run(api, "upload", cid, str(csv_path))
    assert code == 0, err
    assert f"campaign {cid}: 4 rows: 2 accepted, 1 duplicates, 1 invalid (status draft)" in out
    table = [line.strip("│ ").split(" │ ")[:2] for line in out.splitlines() if line.startswith("│")]
    assert [[cell.strip() for cell in row] for row in table] == [["3", "invalid_phone"], ["5", "duplicate"]], out
    assert "sending recipients.csv" in err

    code, out, err = run(api, "problems", cid)
    assert code == 0, err
    assert [line.split("\t")[:2] for line in out.splitlines()] == [["3", "invalid_phone"], ["5", "duplicate"]]

    code, out, err = run(api, "start", cid)
    assert (code, out.strip()) == (0, f"campaign {cid}: running"), err
    code, out, err = run(api, "status", cid)
    assert code == 0, err
    assert "running" in out and "4 rows: 2 accepted, 1 duplicates, 1 invalid" in out
    assert "accepted 2" in out and "0/2 handed to an SMSC" in out  # nothing sends: no router runs here
    code, out, _ = run(api, "status", cid, "--json")
    assert json.loads(out)["progress"]["total"] == 2

    for action, status in [("pause", "paused"), ("resume", "running"), ("cancel", "canceling")]:
        code, out, err = run(api, action, cid)
        assert (code, out.strip()) == (0, f"campaign {cid}: {status}"), err
    # The router (the lane's consumer) cancels what waits in the lane; the scheduler's job then sees
    # the lane idle: canceling -> canceled.
    assert await Router(EventStore(mongo_db), RouteStore(mongo_db), utcnow).step() == 2
    await CampaignSweeper(CampaignStore(mongo_db), utcnow).sweep()
    code, out, err = run(api, "status", cid, "--watch", "--interval", "0.2")  # returns: canceled is final
    assert code == 0 and "canceled" in out, err

    code, out, err = run(api, "list")
    assert code == 0 and cid in out and "Spring sale" in out and "canceled" in out, err
    code, _, err = run(api, "upload", cid, str(csv_path))
    assert code == 1 and f"campaign {cid}: it is canceled and takes no more recipients (campaign_closed)" in err


async def test_larger_upload_reports_rows_processed(api: dict[str, Any], tmp_path: Path) -> None:
    code, out, err = run(api, "create", "--name", "Big", "--from", "AcmeShop", "--template", "Hi {{name}}",
                         "--priority", "transactional", "--json")
    assert code == 0, err
    campaign = json.loads(out)
    assert campaign["status"] == "draft" and campaign["priority"] == "transactional"
    rows = 2500  # three batches of the API's 1,000 rows
    csv_path = tmp_path / "big.csv"
    csv_path.write_text("phone;name\n" + "".join(f"+49151{i:08d};N{i}\n" for i in range(rows)))
    code, out, err = run(api, "upload", campaign["id"], str(csv_path), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["rows"], report["accepted"], report["invalid"]) == (rows, rows, 0)
    assert "accepted rows" in err and f"{rows}/{rows}" in err  # the second phase ends at the API's count


async def test_user_errors_are_one_line_and_exit_non_zero(api: dict[str, Any], tmp_path: Path) -> None:
    code, _, err = run(api, "status", "cmp_nope")
    assert code == 1 and "campaign cmp_nope: not found for this API key's tenant (not_found)" in err
    code, _, err = run(api, "cancel", "cmp_nope")
    assert code == 1 and "campaign cmp_nope: not found" in err
    code, _, err = run(api, "upload", "cmp_nope", str(tmp_path / "missing.csv"))
    assert code == 2 and f"file not found: {tmp_path / 'missing.csv'}" in err
    code, cid, err = run(api, "create", "--name", "x", "--from", "AcmeShop", "--template", "Hi {{name}}")
    assert code == 0, err
    no_phone = tmp_path / "no-phone.csv"
    no_phone.write_text("name,city\nAnna,Köln\n")
    code, _, err = run(api, "upload", cid.strip(), str(no_phone))
    assert code == 2 and f"campaign {cid.strip()}: " in err and "(invalid_csv_header)" in err
    code, _, err = run(api, "create", "--name", "x", "--from", "AcmeShop", "--template-file",
                       str(tmp_path / "missing.txt"))
    assert code == 2 and "file not found" in err
    code, _, err = run(api, "create", "--name", "x", "--from", "AcmeShop")
    assert code == 2 and "--template or a file with --template-file" in err
    code, _, err = run(api, "create", "--name", "x", "--from", "Not a valid sender id", "--template", "Hi")
    assert code == 2 and "--from: " in err and "(validation_error)" in err
    code, _, err = run(api, "create", "--name", "x", "--from", "AcmeShop", "--template", "Hi", "--send-at",
                       "2030-06-01T09:00:00")
    assert code == 2 and "--send-at" in err and "no zone" in err

    code, _, err = run(api, "list", MSGCORE_API_KEY="mk_wrong")
    assert code == 1 and "(unauthorized)" in err and "--api-key" in err
    code, _, err = run(api, "list", MSGCORE_API_KEY="")
    assert code == 2 and "no API key" in err
    dead = f"http://127.0.0.1:{free_port()}"
    code, _, err = run(api, "list", "--api-url", dead)
    assert code == 3 and f"cannot reach the API at {dead}" in err and "is `msgcore up` running?" in err


async def test_defaults_come_from_what_msgcore_up_recorded(api: dict[str, Any]) -> None:
    data_dir: Path = api["data_dir"]
    data_dir.mkdir()
    (data_dir / "endpoints.json").write_text(json.dumps({"api": api["url"]}))
    (data_dir / "demo-tenant.key").write_text(api["key"] + "\n")
    code, out, err = run(api, "list", MSGCORE_API_URL="", MSGCORE_API_KEY="")
    assert code == 0 and "no campaigns" in err, (out, err)


def test_the_installed_command_prints_no_traceback(api_process: str, tmp_path: Path) -> None:
    env = {**os.environ, "MSGCORE_DATA_DIR": str(tmp_path), "MSGCORE_API_URL": api_process,
           "MSGCORE_API_KEY": "mk_wrong"}
    proc = subprocess.run([sys.executable, "-m", "ops.cli", "campaigns", "status", "cmp_x"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("msgcore campaigns status: campaign cmp_x: ")
