"""The mailer's asyncio SMTP client (core/workers/mailer_smtp.py) against real mail-sim servers
(aiosmtpd): pipelining on and off, connections dropped before and after DATA, refusals, multi-line
replies, AUTH and STARTTLS; and its HTTP/1.1 client for SendGrid (core/workers/mailer_http.py)
against mail-sim's SendGrid endpoint and a plain HTTP server. The `.eml` files mail-sim keeps are
the proof of what was taken."""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from core.domain.email import EmailContent, MailResult
from core.domain.email_mime import build_mime
from core.domain.events import utcnow
from core.domain.routing import MailTls, Route
from core.workers.mailer_http import HttpPool
from core.workers.mailer_smtp import SmtpConnection, SmtpPool
from core.workers.mailer_transport import SendGrid
from ops.mail_sim.server import MailSim

StartSim = Callable[..., Awaitable[MailSim]]


@pytest_asyncio.fixture
async def start_sim(tmp_path: Path) -> AsyncIterator[StartSim]:
    started: list[MailSim] = []

    async def start(**options: Any) -> MailSim:
        sim = MailSim(tmp_path / f"sink{len(started)}", **options)
        await sim.start()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        await sim.stop()


def mail(i: int, to: str = "", text: str = "") -> tuple[EmailContent, str]:
    content = EmailContent(to=to or f"user{i}@example.org", sender="shop@acme.example", subject=f"order {i}",
                           text=text or f"Thanks for order {i}.", html=f"<p>order {i}</p>")
    return content, f"01MSG{i:04d}"


async def send(pool: SmtpPool, i: int, **kw: str) -> MailResult:
    content, mid = mail(i, **kw)
    return await pool.send(content, build_mime(content, mid, utcnow()))


def taken(sim: MailSim) -> list[str]:
    """The X-Msgcore-Id of every e-mail mail-sim stored, in order."""
    return [str(email.message_from_bytes(f.read_bytes(), policy=email.policy.default)["X-Msgcore-Id"])
            for f in sim.eml_files()]


def pool_for(sim: MailSim, pool: int = 1, **route: Any) -> SmtpPool:
    return SmtpPool(Route(id="mail", kind="smtp", port=sim.port, pool=pool, **route), timeout_s=5.0)


@pytest.mark.parametrize("pipelining", [True, False])
async def test_many_emails_over_one_persistent_connection(start_sim: StartSim, pipelining: bool) -> None:
    sim = await start_sim(pipelining=pipelining)
    pool = pool_for(sim)
    results = [await send(pool, i) for i in range(5)]
    await pool.close()
    assert all(r.code == 250 and not r.maybe_sent for r in results)
    assert [r.provider_id for r in results] == [f.stem.split("-", 1)[1] for f in sim.eml_files()]
    assert taken(sim) == [f"01MSG{i:04d}" for i in range(5)]
    assert sim.connections == 1 and pool.opened == 1 and sim.transactions == 5


async def test_the_ehlo_reply_is_read_whole_and_pipelining_follows_the_server(start_sim: StartSim) -> None:
    on, off = await start_sim(pipelining=True), await start_sim(pipelining=False)
    for sim, expected in ((on, True), (off, False)):
        conn = await SmtpConnection.open(Route(id="m", kind="smtp", port=sim.port), 5.0)
        assert conn.pipelining is expected
        assert {"size", "8bitmime", "help"} <= set(conn.extensions)  # every line of the multi-line 250
        await conn.quit()


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_multi_line_final_reply_gives_the_queue_id(start_sim: StartSim, pipelining: bool) -> None:
    sim = await start_sim(pipelining=pipelining)
    sim.multiline = True
    pool = pool_for(sim)
    result = await send(pool, 1)
    await pool.close()
    assert result.code == 250 and result.provider_id == sim.eml_files()[0].stem.split("-", 1)[1]
    assert result.text.count("\n") == 2 and "Bye for now" in result.text


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_pooled_connection_dropped_before_data_is_reopened_and_the_email_sent_once(
        start_sim: StartSim, pipelining: bool) -> None:
    sim = await start_sim(pipelining=pipelining)
    pool = pool_for(sim)
    assert (await send(pool, 1)).code == 250
    sim.drop_next_mail = 1  # the server closes the pooled connection at the next MAIL
    second = await send(pool, 2)
    await pool.close()
    assert second.code == 250 and not second.maybe_sent and second.error == ""
    assert taken(sim) == ["01MSG0001", "01MSG0002"]  # once each
    assert sim.connections == 2 and pool.opened == 2


async def test_a_fresh_connection_dropped_before_data_is_not_retried_and_not_maybe_sent(start_sim: StartSim) -> None:
    sim = await start_sim()
    sim.drop_next_mail = 2  # a second connection, were one opened, would be closed at MAIL too
    pool = pool_for(sim)
    result = await send(pool, 1)
    await pool.close()
    assert result.code == 0 and not result.maybe_sent and "closed before sending" in result.error
    assert sim.eml_files() == [] and sim.connections == 1 and sim.drop_next_mail == 1


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_drop_after_data_began_is_maybe_sent(start_sim: StartSim, pipelining: bool) -> None:
    sim = await start_sim(pipelining=pipelining, faults={"drop_ratio": 1.0})
    pool = pool_for(sim)
    result = await send(pool, 1)
    assert result.maybe_sent and "during DATA" in result.error and result.route_failed
    sim.plan.faults = sim.plan.faults.model_copy(update={"drop_ratio": 0.0})
    after = await send(pool, 2)  # a new connection for the next e-mail
    await pool.close()
    assert after.code == 250 and taken(sim) == ["01MSG0002"] and sim.connections == 2
    assert sim.plan.counts["dropped"] == 1


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_refused_recipient_is_answered_and_the_connection_kept(start_sim: StartSim, pipelining: bool) -> None:
    sim = await start_sim(pipelining=pipelining, refused_recipients=["nobody@example.org"])
    pool = pool_for(sim)
    refused = await send(pool, 1, to="nobody@example.org")
    sent = await send(pool, 2)
    await pool.close()
    assert refused.code == 550 and "Recipient address rejected" in refused.text and not refused.maybe_sent
    assert sent.code == 250 and taken(sim) == ["01MSG0002"]
    assert sim.connections == 1  # RSET, then the same connection carried the next e-mail


async def test_a_temporary_refusal_of_the_body_keeps_the_connection(start_sim: StartSim) -> None:
    sim = await start_sim(faults={"every_nth": 2})
    pool = pool_for(sim)
    results = [await send(pool, i) for i in range(4)]
    await pool.close()
    assert [r.code for r in results] == [250, 451, 250, 451] and sim.connections == 1
    assert taken(sim) == ["01MSG0000", "01MSG0002"]


async def test_dot_stuffing_keeps_lines_that_start_with_a_dot(start_sim: StartSim) -> None:
    sim = await start_sim()
    pool = pool_for(sim)
    text = ".\n..two dots\n.one dot\nend"
    assert (await send(pool, 1, text=text)).code == 250
    await pool.close()
    parsed = email.message_from_bytes(sim.eml_files()[0].read_bytes(), policy=email.policy.default)
    plain = next(p for p in parsed.iter_parts() if p.get_content_type() == "text/plain")
    assert plain.get_content().replace("\r\n", "\n").rstrip("\n") == text


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_auth(start_sim: StartSim, mechanism: str) -> None:
    sim = await start_sim(auth=("acme", "s3cret"), auth_mechanisms=[mechanism])
    good = pool_for(sim, username="acme", password="s3cret")
    assert (await send(good, 1)).code == 250
    await good.close()
    bad = pool_for(sim, username="acme", password="wrong")
    refused = await send(bad, 2)
    await bad.close()
    assert refused.code == 0 and "cannot connect" in refused.error and "535" in refused.error
    assert taken(sim) == ["01MSG0001"]


async def test_starttls(start_sim: StartSim, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    sim = await start_sim(tls=server)
    route = Route(id="mail", kind="smtp", port=sim.port, tls=MailTls.STARTTLS)
    pool = SmtpPool(route, timeout_s=5.0, tls=ssl.create_default_context(cafile=str(cert)))
    results = [await send(pool, i) for i in range(2)]
    conn = pool.idle.get_nowait()
    assert conn is not None and conn.writer.get_extra_info("ssl_object") is not None
    pool.idle.put_nowait(conn)
    await pool.close()
    assert [r.code for r in results] == [250, 250] and taken(sim) == ["01MSG0000", "01MSG0001"]
    untrusted = SmtpPool(route, timeout_s=5.0)  # the system's CAs do not know this certificate
    refused = await send(untrusted, 3)
    await untrusted.close()
    assert "cannot connect" in refused.error and len(sim.eml_files()) == 2


# ---- SendGrid v3 over our HTTP/1.1 client (core/workers/mailer_http.py) ---------------------------

def sendgrid(sim: MailSim, api_key: str = "sg-key", pool: int = 1) -> SendGrid:
    return SendGrid(Route(id="sg", kind="http", provider="sendgrid", base_url=f"http://127.0.0.1:{sim.http_port}",
                          api_key=api_key, pool=pool), timeout_s=5.0)


async def post(client: SendGrid, i: int) -> MailResult:
    content, mid = mail(i)
    return await client.send(content, build_mime(content, mid, utcnow()))


async def test_sendgrid_requests_share_one_keep_alive_connection(start_sim: StartSim) -> None:
    sim = await start_sim(http_port=0, api_key="sg-key", faults={"every_nth": 3})
    client = sendgrid(sim)
    results = [await post(client, i) for i in range(5)]
    await client.close()
    assert [r.code for r in results] == [202, 202, 503, 202, 202] and not any(r.maybe_sent for r in results)
    assert [r.provider_id for r in results if r.code == 202] == [f.stem.split("-", 1)[1] for f in sim.eml_files()]
    assert taken(sim) == ["01MSG0000", "01MSG0001", "01MSG0003", "01MSG0004"] and sim.http_connections == 1


async def test_sendgrid_refusals_drops_and_no_server(start_sim: StartSim) -> None:
    sim = await start_sim(http_port=0, api_key="sg-key")
    wrong = sendgrid(sim, api_key="other")
    refused = await post(wrong, 1)
    await wrong.close()
    assert refused.code == 401 and not refused.maybe_sent and "authorization" in refused.text
    sim.plan.faults = sim.plan.faults.model_copy(update={"drop_ratio": 1.0})
    client = sendgrid(sim)
    lost = await post(client, 2)
    assert lost.code == 0 and lost.maybe_sent and "no answer" in lost.error
    sim.plan.faults = sim.plan.faults.model_copy(update={"drop_ratio": 0.0})
    assert (await post(client, 3)).code == 202  # a new connection after the drop
    await client.close()
    port = sim.http_port
    await sim.stop()
    gone = SendGrid(Route(id="sg", kind="http", provider="sendgrid", base_url=f"http://127.0.0.1:{port}"), 5.0)
    nobody = await post(gone, 4)
    await gone.close()
    assert not nobody.maybe_sent and "cannot connect" in nobody.error
    assert taken(sim) == ["01MSG0003"]


async def test_http_answers_chunked_or_ending_with_the_connection() -> None:
    """A plain HTTP/1.1 server on loopback: a chunked answer on a kept connection, then one that
    says `Connection: close` and one without any length (the body ends with the connection)."""
    answers = [b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\nX-Message-Id: c1\r\n\r\n"
               b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
               b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\nConnection: close\r\nX-Message-Id: c2\r\n\r\nok",
               b"HTTP/1.0 400 Bad\r\n\r\nno length"]
    accepted: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        while answers and (head := await reader.readuntil(b"\r\n\r\n")):
            length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:"))[15:])
            await reader.readexactly(length)
            answer = answers.pop(0)
            writer.write(answer)
            if b"close" in answer or answer.startswith(b"HTTP/1.0"):
                break
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    pool = HttpPool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", 1, 5.0)
    try:
        replies = [await pool.request("POST", "/v3/mail/send", {}, b"{}") for _ in range(3)]
    finally:
        await pool.close()
        server.close()
    assert [(r.status, r.body, r.headers.get("x-message-id")) for r in replies] == [
        (202, b"abcde", "c1"), (202, b"ok", "c2"), (400, b"no length", None)]
    assert len(accepted) == 2 and pool.opened == 2
