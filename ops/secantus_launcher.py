"""Runs SecantusDB's own command line with a shorter idle-transaction lifetime, and without a
per-document catalog read that only geo indexes need.

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

Production MongoDB is not affected by any of this.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

TRANSACTION_LIFETIME_S = 10.0


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


if __name__ == "__main__":
    sys.exit(main())
