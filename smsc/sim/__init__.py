"""The SMSC simulator (`msgcore smsc-sim`, tests, benchmarks): `server.Simulator` is the entry point.

Modules, each depending only on those listed before it: `faults` (settings and the fault engine),
`protocol` (what the control API needs of a simulator), `control` (the HTTP control API), `sessions`
(a connection and its write path), `journal`, `receipts` (scheduling and sending receipts),
`handlers` (the answer to each PDU), `server` (sockets, lifecycle, the public API).
"""
