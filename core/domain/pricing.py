"""Pricing: integer minor units per part, never floats."""

from __future__ import annotations


def price_message(parts: int, price_per_part: int) -> int:
    """The amount for a message of `parts` parts, in minor units. A message has at least one part."""
    if parts < 1:
        raise ValueError(f"a message has at least one part, got {parts}")
    if price_per_part < 0:
        raise ValueError(f"price per part must not be negative, got {price_per_part}")
    return parts * price_per_part
