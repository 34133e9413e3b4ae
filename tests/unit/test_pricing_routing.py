"""Pricing per part and route choice by strategy."""

from __future__ import annotations

import random

import pytest

from core.domain.errors import NoRoute
from core.domain.pricing import price_message
from core.domain.routing import Route, RouteStatus, Strategy, choose_route


@pytest.mark.parametrize(("parts", "price", "amount"), [(1, 5, 5), (3, 5, 15), (10, 0, 0), (2, 1234, 2468)])
def test_price_per_part(parts: int, price: int, amount: int) -> None:
    assert price_message(parts, price) == amount


@pytest.mark.parametrize(("parts", "price"), [(0, 5), (-1, 5), (1, -1)])
def test_price_refuses_nonsense(parts: int, price: int) -> None:
    with pytest.raises(ValueError):
        price_message(parts, price)


def routes(strategy: Strategy) -> list[Route]:
    return [Route(id="a", priority=1, strategy=strategy), Route(id="b", priority=1, strategy=strategy),
            Route(id="c", priority=2, strategy=strategy)]


UP, BUSY, DOWN = RouteStatus.UP, RouteStatus.BUSY, RouteStatus.DOWN


def test_longest_prefix_wins_and_default_route() -> None:
    rs = [Route(id="default", prefixes=("",)), Route(id="de", prefixes=("49",)),
          Route(id="de-mobile", prefixes=("4915",))]
    st = dict.fromkeys(("default", "de", "de-mobile"), UP)
    assert choose_route(rs, "+4915112345678", st).id == "de-mobile"
    assert choose_route(rs, "+4930123456", st).id == "de"
    assert choose_route(rs, "+33612345678", st).id == "default"
    with pytest.raises(NoRoute):
        choose_route([Route(id="de", prefixes=("49",))], "+33612345678", st)


def test_failover_stays_on_first_unless_down() -> None:
    rs = routes(Strategy.FAILOVER)
    assert choose_route(rs, "+1", {"a": BUSY, "b": UP, "c": UP}).id == "a"
    assert choose_route(rs, "+1", {"a": DOWN, "b": DOWN, "c": UP}).id == "c"
    assert choose_route(rs, "+1", {"a": DOWN, "b": DOWN, "c": DOWN}).id == "a"  # waits for the first


def test_load_balance_skips_busy_and_down() -> None:
    rs = routes(Strategy.LOAD_BALANCE)
    assert choose_route(rs, "+1", {"a": BUSY, "b": DOWN, "c": UP}).id == "c"
    assert choose_route(rs, "+1", {"a": BUSY, "b": BUSY, "c": BUSY}).id == "a"


def test_smart_balances_within_level_and_fails_over_between_levels() -> None:
    rs = routes(Strategy.SMART)
    rng = random.Random(7)
    picks = {choose_route(rs, "+1", {"a": UP, "b": UP, "c": UP}, rng=rng).id for _ in range(50)}
    assert picks == {"a", "b"}
    assert choose_route(rs, "+1", {"a": DOWN, "b": DOWN, "c": UP}, rng=rng).id == "c"
    assert choose_route(rs, "+1", {"a": BUSY, "b": UP, "c": UP}, rng=rng).id == "b"


def test_exclusions_avoid_a_route_unless_it_is_the_only_one() -> None:
    rs = routes(Strategy.FAILOVER)
    st = {"a": UP, "b": UP, "c": UP}
    assert choose_route(rs, "+1", st, excluded=("a",)).id == "b"
    assert choose_route(rs, "+1", st, excluded=("a", "b", "c")).id == "a"
