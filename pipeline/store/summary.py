"""The table printed after an ingest: what was read, what is stored, how well it packs."""

from __future__ import annotations

from pipeline.console import print_table
from pipeline.store.ingest import IngestReport


def print_ingest_report(rep: IngestReport) -> None:
    mb = 1 / 1e6
    rows = [
        ("steps ingested", f"{len(rep.ingested)} {rep.ingested}"),
        ("steps skipped (unchanged)", f"{len(rep.skipped)}"),
        ("steps in store", f"{len(rep.steps)}"),
        ("checkpoint bytes read", f"{rep.ingested_bytes * mb:.1f} MB"),
        ("checkpoint bytes (all steps)", f"{rep.checkpoint_bytes * mb:.1f} MB"),
        ("store bytes", f"{rep.store_bytes * mb:.1f} MB"),
        ("store / checkpoints", f"{rep.ratio:.3f}"),
        ("seconds", f"{rep.seconds:.1f}"),
    ]
    if rep.nonfinite:
        rows.append(("steps with NaN/inf", f"{sorted(rep.nonfinite)}"))
    print_table(f"Ingest into {rep.store}", ["", "value"], rows)
