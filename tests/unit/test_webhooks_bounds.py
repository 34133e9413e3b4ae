"""Webhook worker helpers without servers: batch bounds and the HTTP target a POST goes to."""

from __future__ import annotations

from core.workers.webhooks_dispatch import MAX_BATCH_EVENTS, _bounded
from core.workers.webhooks_http import Target


def _job(n: int) -> dict[str, object]:
    return {"events": [{"seq": i} for i in range(n)]}


def test_a_batch_takes_whole_jobs_up_to_the_event_bound_and_at_least_one() -> None:
    jobs = [_job(MAX_BATCH_EVENTS // 2), _job(MAX_BATCH_EVENTS // 2), _job(1)]
    assert len(_bounded(jobs)) == 2
    huge = [_job(MAX_BATCH_EVENTS * 2), _job(1)]
    assert len(_bounded(huge)) == 1
    assert len(_bounded([_job(3), _job(4)])) == 2


def test_the_post_goes_to_the_checked_address_with_the_urls_host() -> None:
    t = Target.of("https://hooks.example.com/in?x=1", "93.184.216.34")
    assert (t.address, t.port, t.path, t.host_header) == ("93.184.216.34", 443, "/in?x=1", "hooks.example.com")
    t = Target.of("http://[::1]:8081", "::1")
    assert (t.path, t.host_header) == ("/", "[::1]:8081")
