"""Fair sharing of a stage's batch between lanes: tiers, tenant weights, rotation, no idle credit."""

from __future__ import annotations

from collections import Counter

from core.domain.fairness import SHARED_LANE, FairShare, Lane, interleave
from core.domain.message import MessageState, lane_of, queue_for, queue_name, stage_of


def test_tiers_put_the_shared_lane_first_then_transactional_campaigns_then_marketing() -> None:
    lanes = [Lane("c:m", "a"), Lane(SHARED_LANE, transactional=True), Lane("c:t", "b", transactional=True)]
    assert [[lane.key for lane in tier] for tier in FairShare.tiers(lanes)] == [[""], ["c:t"], ["c:m"]]


def test_equal_weights_share_equally_and_exactly_over_many_small_batches() -> None:
    share = FairShare()
    lanes = [Lane("c:1", "a"), Lane("c:2", "b"), Lane("c:3", "c")]
    total: Counter[str] = Counter()
    for _ in range(300):
        for lane, quota in share.plan(lanes, 1):  # one message per batch: shares come from the credit
            total[lane.tenant_id or ""] += quota
    assert total == {"a": 100, "b": 100, "c": 100}


def test_weights_set_the_proportions() -> None:
    share = FairShare()
    lanes = [Lane("c:1", "big", weight=30), Lane("c:2", "small", weight=10)]
    total: Counter[str] = Counter()
    for _ in range(100):
        for lane, quota in share.plan(lanes, 10):
            total[lane.tenant_id or ""] += quota
    assert total == {"big": 750, "small": 250}


def test_a_tenants_campaigns_split_its_share_not_the_whole_capacity() -> None:
    share = FairShare()
    lanes = [Lane("c:1", "a"), Lane("c:2", "a"), Lane("c:3", "a"), Lane("c:9", "b")]
    per_lane: Counter[str] = Counter()
    for _ in range(60):
        for lane, quota in share.plan(lanes, 60):
            per_lane[lane.key] += quota
    assert per_lane["c:9"] == 60 * 30  # b alone gets half
    assert per_lane["c:1"] == per_lane["c:2"] == per_lane["c:3"] == 60 * 10


def test_an_idle_tenant_banks_no_credit() -> None:
    share = FairShare()
    lanes = [Lane("c:1", "a"), Lane("c:2", "b")]
    for _ in range(10):
        plan = share.plan(lanes, 3)
        share.settle(plan, {"c:1": 0, "c:2": dict((lane.key, q) for lane, q in plan).get("c:2", 0)})
    assert share.credit.get("a", 0.0) <= 0.0


def test_quotas_never_exceed_capacity() -> None:
    share = FairShare()
    lanes = [Lane(f"c:{i}", f"t{i % 7}", weight=1 + i % 5) for i in range(40)]
    for capacity in (1, 2, 3, 7, 50, 499):
        plan = share.plan(lanes, capacity)
        assert sum(q for _, q in plan) == capacity
        assert all(q > 0 for _, q in plan)


def test_interleave_mixes_batches() -> None:
    assert interleave([[1, 2, 3], ["a"], [10, 20]]) == [1, "a", 10, 2, 20, 3]


def _state(**kw: object) -> MessageState:
    base = {"message_id": "m", "tenant_id": "acme", "state": "accepted", "version": 1, "priority": 10}
    return MessageState(**{**base, **kw})  # type: ignore[arg-type]


def test_lanes_follow_from_the_message() -> None:
    assert lane_of(_state()) == ""
    assert lane_of(_state(priority=0)) == "t:acme"
    assert lane_of(_state(campaign_id="42", priority=0)) == "c:42"
    assert queue_for(_state()) == "route"
    assert queue_for(_state(campaign_id="42")) == "route~c:42"
    assert queue_for(_state(state="routed", route_id="sim", priority=0)) == "send:sim~t:acme"
    assert queue_for(_state(state="sent", campaign_id="42")) == "receipt"
    assert stage_of(queue_name("send:sim", "c:42")) == "send:sim" and queue_name("route", "") == "route"
