"""What every entry point (REST, SMPP) accepts of a new message: destination and sender formats and
the validity bounds. Kept here so the two entry points cannot drift apart."""

from __future__ import annotations

from datetime import timedelta

MIN_VALIDITY_S = 60
MAX_VALIDITY_S = int(timedelta(days=7).total_seconds())
E164 = r"^\+[1-9][0-9]{6,14}$"
# Numeric sender (optionally with +) of up to 16 digits, or an alphanumeric sender id of up to 11.
SENDER_ID = r"^(?:\+?[0-9]{1,16}|[A-Za-z0-9]{1,11})$"
