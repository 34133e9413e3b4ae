"""The campaign benchmark's printed figures, phase by phase."""

from __future__ import annotations

import argparse
import os
from typing import Any

import smsc.connector as connector_module
from api.campaign_upload import BATCH_ROWS
from core.config import Settings
from core.domain.routing import Route
from core.store.campaigns import UPLOAD_QUIET_S
from core.store.lanes import LaneBook
from core.workers.router import BULK_PER_BATCH
from ops.bench.campaign_csv import CsvFacts
from ops.bench.campaign_probes import Journal, Prober
from ops.bench.campaign_run import STEADY_SKIP_S
from ops.bench.support import line, pct


def print_stages(results: dict[str, Any], phase: str) -> None:
    stages = results.get("stages", {}).get(phase, {})
    line("  by event times p50/p95/max", "  ".join(
        f"{k} {pct(v, 50):.0f}/{pct(v, 95):.0f}/{max(v) if v else float('nan'):.0f} ms" for k, v in stages.items()))


def print_results(args: argparse.Namespace, settings: Settings, route: Route, facts: CsvFacts, journal: Journal,
                  prober: Prober, results: dict[str, Any]) -> None:
    """Every phase's figures, in phase order, after the run (the progress notes came during it)."""
    print(f"\nmsgcore campaign benchmark: {facts.rows} recipients, {os.cpu_count()} CPUs"
          f" (load average at the end {os.getloadavg()[0]:.1f})")
    _print_config(args, settings, route)
    _print_csv(facts)
    _print_upload(results, prober)
    _print_idle(results, prober)
    _print_flow(results, journal, prober)
    _print_cancel(args, results, journal)


def _print_config(args: argparse.Namespace, settings: Settings, route: Route) -> None:
    print("config")
    line("route", f"sim: tps {route.tps or 'unlimited (0): the store is the limit'}, window {route.window},"
                  f" 1 bind, receipt delay {args.receipt_delay} s")
    line("batches", f"stage batch {settings.batch_size} (MSGCORE_BATCH_SIZE), router bulk share {BULK_PER_BATCH}"
                    f"/batch, upload {BATCH_ROWS} rows/transaction; cancel by the lane's consumers, a batch each")
    connector = {k: getattr(connector_module, k) for k in ("CLAIM_AHEAD_S", "MIN_CLAIM_AHEAD", "TRANSACTIONAL_RESERVE")
                 if hasattr(connector_module, k)}
    line("timing", f"poll {settings.poll_interval_s} s, lane refresh {LaneBook.TTL_S} s, upload quiet"
                   f" {UPLOAD_QUIET_S} s, connector {connector}")


def _print_csv(facts: CsvFacts) -> None:
    print("1. CSV")
    line("generated", f"{facts.rows} rows, {facts.size / 2**20:.1f} MB ({facts.size / facts.rows:.0f} B/row)"
                      f" in {facts.seconds:.1f} s")
    line("expected", f"accepted {facts.accepted}, duplicates {facts.duplicates}, invalid {facts.invalid},"
                     f" UCS-2 {facts.ucs2}")


def _print_upload(results: dict[str, Any], prober: Prober) -> None:
    up = results["upload"]
    report = up["report"]
    after = results["campaign_after_upload"]
    print("2. upload (streamed POST .../recipients)")
    rows = report["rows"]
    line("wall", f"{up['s']:.1f} s  ({rows / up['s']:.0f} rows/s overall; body sent in {up['body_s']:.1f} s,"
                 f" then {rows / max(1e-9, up['s'] - up['body_s']):.0f} rows/s validate+render+accept)")
    line("report", f"rows {rows}, accepted {report['accepted']}, duplicates {report['duplicates']},"
                   f" invalid {report['invalid']}, problems_total {report['problems_total']},"
                   f" first problem rows {[p['row'] for p in report['problems'][:5]]}")
    line("campaign", f"encodings {after['encodings']}, problems_by_code {after['problems_by_code']},"
                     f" parts {after['recipients']['parts']}")
    line("api RSS", f"before {up['rss_before_kb'] / 1024:.0f} MB, peak during upload"
                    f" {up['rss_peak_kb'] / 1024:.0f} MB (VmRSS sampled every 0.2 s),"
                    f" VmHWM {up['hwm_kb'] / 1024:.0f} MB")
    line("CPU (s, % of a core)", up["cpu"])
    prober.print_phase("upload", "OTP delay during upload")
    print_stages(results, "upload")


def _print_idle(results: dict[str, Any], prober: Prober) -> None:
    print("3. idle baseline (campaign accepted, not started)")
    if "projected_at_baseline" in results:
        accepted = results["upload"]["report"]["accepted"]
        line("projector", f"{results['projected_at_baseline']} of {accepted} campaign messages in"
                          " PostgreSQL when the baseline began (the rest were still being projected)")
    prober.print_phase("idle", "OTP delay idle")
    print_stages(results, "idle")


def _print_flow(results: dict[str, Any], journal: Journal, prober: Prober) -> None:
    fl = results["flow"]
    print(f"4. flow ({fl['s']:.0f} s after start)")
    total = journal.between(fl["t_start"], fl["t_end"])
    steady_from = fl["t_start"] + STEADY_SKIP_S
    steady = journal.between(steady_from, fl["t_end"])
    rate = total / fl["s"]
    steady_rate = steady / max(1, int(fl["t_end"]) - int(steady_from))
    accepted = results["upload"]["report"]["accepted"]
    line("campaign submit_sm at SMSC", f"{total} in the window: {rate:.0f} msg/s overall,"
                                       f" {steady_rate:.0f} msg/s after the first {STEADY_SKIP_S:.0f} s")
    proj = accepted / steady_rate if steady_rate else float("inf")
    line("whole campaign at that rate", f"{proj:.0f} s ({proj / 3600:.2f} h) for {accepted} messages")
    lane = fl["lane"]
    remaining = lane["written"] - lane["passed"]
    eta = f"ETA {remaining / lane['rate']:.0f} s" if lane["rate"] else "no ETA (no progress)"
    line("completion (checkpoints)", f"{lane['passed']} of {lane['written']} passed by the connector"
                                     f" ({lane['passed'] / max(1, lane['written']):.1%}); waiting: route"
                                     f" {lane['route_backlog']}, send {lane['send_backlog']}; {lane['rate']:.0f} msg/s"
                                     f" after the first {STEADY_SKIP_S:.0f} s -> {eta}")
    camp = fl["campaign"]
    line("API progress at the end", f"{camp.get('progress')}")
    line("API counts (PostgreSQL)", f"{camp.get('counts')}")
    line("CPU (s, % of a core)", fl["cpu"])
    prober.print_phase("flow", "OTP delay during campaign")
    print_stages(results, "flow")


def _print_cancel(args: argparse.Namespace, results: dict[str, Any], journal: Journal) -> None:
    c = results["cancel"]
    print(f"5. cancel (watched {c['s']:.0f} s, at most {args.cancel_watch:.0f} s)")
    until = c["drained_s"] or c["s"]
    how = "lane drained" if c["drained_s"] else "watch ended"
    # About: the backlog and the journal are read a moment apart, so a batch sent in between may be
    # counted on either side (the exact figure is reporting's, once the projector has caught up).
    line("canceled", f"about {c['canceled']} of the {c['waiting']} waiting at the cancel:"
                     f" {c['canceled'] / max(1.0, until):.0f} msg/s ({how} after {until:.0f} s)")
    line("submit_sm after cancel", f"{c['sent_after']} (batches the connector had already attempted)")
    if c["left"]:
        rate_c = (c["waiting"] - c["left"]) / c["s"] if c["s"] else 0
        eta = f"{c['left'] / rate_c:.0f} s more at that rate" if rate_c else "no rate"
        line("status", f"{c['left']} still waiting in the lane at the end of the watch ({eta}); not waited for")
    final = results["final_campaign"]
    line("campaign status", f"{final.get('status')}")
    line("API counts at the end", f"{final.get('counts')} (PostgreSQL, lagging)")
    if "pg_states" in results:
        line("reporting.messages", f"{results['pg_states']} (2 s after the watch)")
    line("SMSC totals", f"{journal.campaign_total} campaign submit_sm, {len(journal.probes)} probes,"
                        f" {journal.other} other")
