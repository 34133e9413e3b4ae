"""Runs SecantusDB's own command line with a shorter idle-transaction lifetime, without a
per-document catalog read that only geo indexes need, and with two per-command costs made rare.

A worker killed in the middle of a transaction leaves it open on the server, holding the heads it
wrote; every other writer of those heads conflicts until the server reaps it. MongoDB and SecantusDB
both reap after 60 s idle (`transactionLifetimeLimitSeconds`), which stalls a stage for a minute
after a crash. Our transactions idle for milliseconds, so the embedded server gets 10 s. (On a
production replica set: `setParameter transactionLifetimeLimitSeconds`.) SecantusDB's CLI has no
flag for it; its server class takes the value, so this sets that default and hands over to the CLI.

Geo pre-flight: SecantusDB 0.7.0b3 validates every inserted or updated document against the geo
indexes of its collection, and reads every index's options from the catalog to do so, even when the
collection has no geo index. A profile of the end-to-end benchmark (py-spy, GIL samples) put 27 % of
the server's time there: `events` has six indexes, none geo. The patch returns early when none of the
indexes passed in is a geo index; the check itself is unchanged otherwise.

Catalog reads per document: an insert command reads the collection's index list and options from the
catalog again for every document it inserts (`_iter_indexes`, `_index_options_map`: 28 % of the
server's time in the same profile). Within one insert command they cannot change (the command runs in
one storage transaction), so the patch reads them once per command, per thread.

Idle-transaction reaping: SecantusDB looks for expired transactions on every transaction statement,
commit and abort, walking every session it ever saw under its registry lock (`_prune_locked`: 4 % of
the server's busy time in the end-to-end benchmark, plus waits on that lock). The patch walks at most
every PRUNE_EVERY_S; with a lifetime of TRANSACTION_LIFETIME_S an abandoned transaction is reaped at
most that much later.

Profiling settings: every command reads the database's profiling level from a storage table (2 % of
the server's busy time). They change only through `set_profile`; the patch keeps them in memory and
forgets them whenever `set_profile` runs.

Production MongoDB is not affected by any of this.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

TRANSACTION_LIFETIME_S = 10.0
PRUNE_EVERY_S = 0.5


def main() -> int:
    import secantus.server
    from secantus.cli import main as secantus_main

    original = secantus.server.SecantusDBServer.__init__

    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("transaction_lifetime_seconds", TRANSACTION_LIFETIME_S)
        original(self, *args, **kwargs)

    secantus.server.SecantusDBServer.__init__ = init  # type: ignore[method-assign]
    _skip_geo_preflight_without_geo_indexes()
    _read_the_catalog_once_per_insert()
    _prune_idle_transactions_less_often()
    _keep_profile_settings_in_memory()
    return int(secantus_main() or 0)


def _skip_geo_preflight_without_geo_indexes() -> None:
    import secantus.storage as storage

    original = getattr(storage.Storage, "_validate_geo_indexes", None)
    geo_type_of = getattr(storage, "_geo_type_of", None)
    if original is None or geo_type_of is None:  # another SecantusDB version: leave it as it is
        return

    @functools.wraps(original)
    def validate(self: Any, db: str, coll: str, doc: Any, indexes: Any, partials: Any = None) -> None:
        if not any(geo_type_of(spec) is not None for _name, spec, *_rest in indexes):
            return
        original(self, db, coll, doc, indexes, partials)

    storage.Storage._validate_geo_indexes = validate


def _read_the_catalog_once_per_insert() -> None:
    import threading

    import secantus.storage as storage

    cls = storage.Storage
    names = ("insert", "_iter_indexes", "_index_options_map")
    if not all(hasattr(cls, n) for n in names):  # another SecantusDB version: leave it as it is
        return
    insert, iter_indexes, options_map = (getattr(cls, n) for n in names)
    local = threading.local()

    @functools.wraps(iter_indexes)
    def cached_iter_indexes(self: Any, db: str, coll: str) -> Any:
        cache = getattr(local, "cache", None)
        if cache is None:
            return iter_indexes(self, db, coll)
        key = ("indexes", db, coll)
        if key not in cache:
            found = list(iter_indexes(self, db, coll))
            if not found:  # no `_id` index yet: the collection is being created by this very insert
                return iter(found)
            cache[key] = found
        return iter(cache[key])

    @functools.wraps(options_map)
    def cached_options_map(self: Any, db: str, coll: str) -> Any:
        cache = getattr(local, "cache", None)
        if cache is None:
            return options_map(self, db, coll)
        key = ("options", db, coll)
        if key not in cache:
            found = options_map(self, db, coll)
            if not found:
                return found
            cache[key] = found
        return {name: dict(opts) for name, opts in cache[key].items()}  # callers get their own copies

    @functools.wraps(insert)
    def insert_reading_the_catalog_once(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(local, "cache", None) is not None:  # nested: the outer call owns the cache
            return insert(self, *args, **kwargs)
        local.cache = {}
        try:
            return insert(self, *args, **kwargs)
        finally:
            local.cache = None

    cls._iter_indexes = cached_iter_indexes
    cls._index_options_map = cached_options_map
    cls.insert = insert_reading_the_catalog_once


def _prune_idle_transactions_less_often() -> None:
    import time

    import secantus.transactions as transactions

    cls = getattr(transactions, "TransactionRegistry", None)
    original = getattr(cls, "_prune_locked", None)
    if cls is None or original is None:  # another SecantusDB version: leave it as it is
        return

    @functools.wraps(original)
    def prune_locked(self: Any) -> int:
        now = time.monotonic()  # the registry's own lock is held: one caller at a time
        if now - getattr(self, "_msgcore_pruned_at", float("-inf")) < PRUNE_EVERY_S:
            return 0
        self._msgcore_pruned_at = now
        return int(original(self))

    cls._prune_locked = prune_locked


def _keep_profile_settings_in_memory() -> None:
    import threading

    import secantus.storage as storage

    cls = storage.Storage
    get_profile, set_profile = getattr(cls, "get_profile", None), getattr(cls, "set_profile", None)
    if get_profile is None or set_profile is None:  # another SecantusDB version: leave it as it is
        return
    lock = threading.Lock()
    cache: dict[tuple[int, str], dict[str, Any]] = {}
    generation = [0]

    @functools.wraps(get_profile)
    def cached_get_profile(self: Any, db: str) -> dict[str, Any]:
        key = (id(self), db)
        with lock:
            found, seen = cache.get(key), generation[0]
        if found is not None:
            return dict(found)
        settings = get_profile(self, db)
        with lock:
            if generation[0] == seen:  # no set_profile ran meanwhile: what we read is current
                cache[key] = dict(settings)
        return settings

    @functools.wraps(set_profile)
    def forgetting_set_profile(self: Any, db: str, **kwargs: Any) -> None:
        try:
            set_profile(self, db, **kwargs)
        finally:
            with lock:
                generation[0] += 1
                cache.clear()

    cls.get_profile = cached_get_profile
    cls.set_profile = forgetting_set_profile


if __name__ == "__main__":
    sys.exit(main())
