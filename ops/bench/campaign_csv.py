"""Phase 1 of the campaign benchmark: the recipient CSV, and the phone number prefixes that tell
campaign messages from one-time-password probes at the SMSC."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

FIRST_NAMES = ("Anna", "Jonas", "Lena", "Paul", "Mia", "Felix", "Emma", "Lukas", "Sofia", "Noah")
UNICODE_NAMES = ("Дмитрий", "Łukasz", "Zoë", "Αλέξης", "李娜", "Şebnem", "Jiří", "Ólafur")
STORES = ("Berlin Mitte", "Hamburg HBF", "Munich Marienplatz", "Cologne Dom", "Leipzig")
CAMPAIGN_PREFIX = "49151"  # campaign numbers: +49151 and 8 digits
PROBE_PREFIX = "4917"  # one-time passwords: +4917 and 9 digits


@dataclass
class CsvFacts:
    path: Path
    rows: int = 0
    size: int = 0
    seconds: float = 0.0
    invalid: int = 0
    duplicates: int = 0
    ucs2: int = 0

    @property
    def accepted(self) -> int:
        return self.rows - self.invalid - self.duplicates


def write_csv(path: Path, n: int) -> CsvFacts:
    """N data rows; see the module docstring for the share of each kind of row."""
    facts = CsvFacts(path, rows=n)
    start = time.perf_counter()
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write("phone,first_name,store_name\n")
        chunk: list[str] = []
        for i in range(n):
            phone = f"+{CAMPAIGN_PREFIX}{i:08d}"
            name = FIRST_NAMES[i % len(FIRST_NAMES)]
            store = STORES[i % len(STORES)]
            kind = i % 1000
            if kind == 500:
                phone = f"0151 {i:08d}"  # no country: invalid_phone
                facts.invalid += 1
            elif kind == 250:
                name = ""  # missing_tag
                facts.invalid += 1
            elif kind == 750:
                phone = f"0049 151 {i:08d}"  # valid once normalised
            elif i % 500 == 499:
                phone = f"+{CAMPAIGN_PREFIX}{i - 7:08d}"  # the number of row i-7 (never an invalid one)
                facts.duplicates += 1
            if i % 33 == 16 and name:
                name = UNICODE_NAMES[i % len(UNICODE_NAMES)]
                if kind != 500 and i % 500 != 499:
                    facts.ucs2 += 1
            chunk.append(f"{phone},{name},{store}\n")
            if len(chunk) >= 10_000:
                out.write("".join(chunk))
                chunk.clear()
        out.write("".join(chunk))
    facts.seconds = time.perf_counter() - start
    facts.size = path.stat().st_size
    return facts
