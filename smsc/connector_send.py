"""The send path of a connector: a fixed pool of send workers (one per window slot; no task per
message) that keep the binds' windows full, honour the route's TPS bucket and wait out throttling.
Mixed into `Connector` (smsc/connector.py), whose state it uses."""

from __future__ import annotations

import asyncio
import logging
import random

from core import metrics
from core.domain.encoding import encode_text, make_udh
from core.domain.outcomes import (
    is_throttling,
)
from core.domain.retry import backoff_s
from smsc.connector_jobs import Item
from smsc.connector_metrics import RouteMetrics
from smsc.session import SessionError
from smsc.status import status_name

log = logging.getLogger(__name__)

THROTTLE_BASE_S = 0.5
THROTTLE_CAP_S = 10.0
PART_THROTTLE_RETRIES = 50  # a part throttled this often in a row is given up (retry, elsewhere if possible)


class SendPath:
    """Submitting the items of the batches read (`self.queue`), in read order."""

    meters: RouteMetrics  # the connector's Prometheus counters (smsc/connector_metrics.py)

    async def _send_worker(self) -> None:
        """One window slot: sends queued messages one after the other, in read order across workers."""
        loop = asyncio.get_running_loop()
        while True:
            item = await self.queue.get()
            job = item.job
            if job.dropped:
                continue
            try:
                await self._send(item)
            finally:
                if not job.dropped:
                    self.unfinished -= 1
                    self._done_at.append(loop.time())
                    job.finish_one()
                    if job.done.is_set():
                        self._commit_wake.set()
                    if self.unfinished <= self._wake_below:
                        self.wake.set()

    def _source_ton_npi(self, sender: str) -> tuple[int, int]:
        """TON/NPI of the source address: the route's when set, else derived from the sender
        (alphanumeric 5/0, numeric international 1/1)."""
        numeric = sender.lstrip("+").isdigit()
        ton = self.route.source_ton if self.route.source_ton is not None else (1 if numeric else 5)
        npi = self.route.source_npi if self.route.source_npi is not None else (1 if numeric else 0)
        return ton, npi

    async def _send(self, item: Item) -> None:
        """Submit every part of one message; the result stays on `item` (nothing is raised)."""
        state = item.state
        job = item.job
        encoded = encode_text(state.text)
        ref = random.randrange(256)
        source_ton, source_npi = self._source_ton_npi(state.sender)
        destination = state.to.lstrip("+")
        try:
            for index, payload in enumerate(encoded.parts, start=1):
                udh = make_udh(ref, encoded.part_count, index) if encoded.part_count > 1 else b""
                for _ in range(PART_THROTTLE_RETRIES + 1):
                    await self._wait_throttle()
                    await self.bucket.take()
                    if job.dropped or not self._may_send():
                        return  # the batch is dropped with our ownership: nothing more is sent
                    if self._past_drain() and not item.smsc_ids:
                        item.error = "connector stopping"
                        return
                    session = self.binds.pick()
                    result = await session.submit(
                        source=state.sender, destination=destination, short_message=udh + payload,
                        data_coding=encoded.data_coding, esm_class=0x40 if udh else 0, source_ton=source_ton,
                        source_npi=source_npi, dest_ton=self.route.dest_ton, dest_npi=self.route.dest_npi)
                    item.status, item.nack = result.status, result.generic_nack
                    self.meters.responses[result.status] += 1
                    if not is_throttling(result.status, result.generic_nack):
                        break
                    # Not taken: wait out the route's pause and submit the same part again.
                    self._throttled(state.message_id, result.status)
                if item.status != 0 or item.nack:
                    if item.nack:
                        self.stats["generic_nacks"] += 1
                        log.warning("connector message=%s route=%s: generic_nack 0x%02x for part %d", state.message_id,
                                    self.route.id, item.status, index)
                    return
                self.throttle_level = 0
                if index == 1:
                    item.submitted_at = asyncio.get_running_loop().time()
                if result.message_id:
                    item.smsc_ids.append(result.message_id)
                    self.desk.awaiting_commit.add(result.message_id)
        except (SessionError, OSError) as e:
            item.error, item.maybe_sent = f"{type(e).__name__}: {e}", True
            self.meters.unanswered += 1
        except LookupError as e:  # no bind was up: nothing left this process
            item.error = str(e)

    def _past_drain(self) -> bool:
        return self.drain_deadline is not None and asyncio.get_running_loop().time() > self.drain_deadline

    def _throttle_left(self) -> float:
        return self.throttled_until - asyncio.get_running_loop().time()

    async def _wait_throttle(self) -> None:
        while (left := self._throttle_left()) > 0:
            await asyncio.sleep(left)

    def _throttled(self, message_id: str, status: int) -> None:
        """The SMSC asked us to slow down: pause the whole route, longer each time in a row."""
        self.stats["throttled"] += 1
        metrics.SMPP_THROTTLED.labels(route=self.route.id).inc()
        self.throttle_level = min(self.throttle_level + 1, 8)
        delay = backoff_s(self.throttle_level, base_s=THROTTLE_BASE_S, cap_s=THROTTLE_CAP_S)
        loop = asyncio.get_running_loop()
        if loop.time() + delay > self.throttled_until:
            self.throttled_until = loop.time() + delay
            log.warning("connector route=%s: %s (message=%s); route paused %.1fs", self.route.id,
                        status_name(status), message_id, delay)

