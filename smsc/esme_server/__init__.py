"""msgcore's SMPP server for ESMEs (wholesale customers that speak SMPP): `msgcore smpp-server`.

- `server.py`     listening socket, binds (accounts in core/store/smpp_accounts.py), submit_sm
- `session.py`    one connection: framing, window, dispatch, generic_nack for what it cannot read
- `submit.py`     submit_sm -> Submission (addresses, data_coding, SMPP times, REST's checks)
- `concat.py`     long messages (UDH, SAR) held until complete, then accepted as one
- `committer.py`  group commit: submits within a few ms share one transaction; resp after commit
- `queries.py`    query_sm (the fold), cancel_sm (only a message not yet routed)
- `receipts.py`   per account: the `dlr:<system_id>` topic read by position -> deliver_sm (receipts, MO)
- `intermediate.py` per account that asked: the routes' `await:` topics -> ENROUTE deliver_sm (bit 4)
- `mo.py`         the deliver_sm of an MO (`inbound` event) for an account with `receive_mo`
"""
