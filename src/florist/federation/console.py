"""What the server prints: a table per round, one line per event that was not a plain success."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

console = Console(stderr=True)


def show_round(record: dict) -> None:
    table = Table(title=f"round {record['round']}", title_justify="left")
    for column in ("client", "node", "rank", "examples", "loss", "train s", "down KiB", "up KiB"):
        table.add_column(column, justify="right")
    for c in record.get("clients", []):
        table.add_row(
            str(c["partition"]), str(c["node"]), str(c["rank"]), str(c["examples"]), f"{c['train_loss']:.3f}",
            f"{c['train_seconds']:.1f}", f"{c['bytes_down'] / 1024:.0f}", f"{c['bytes_up'] / 1024:.0f}",
        )
    if record.get("clients"):
        console.print(table)
    for event in [*record.get("events", []), *record.get("federated_evaluation", {}).get("events", [])]:
        if event["status"] != "accepted":
            console.print(f"round {record['round']}: node {event['node']} {event['status']}: {event['reason']}")
    if "total_rank" in record:
        console.print(
            f"round {record['round']}: {len(record['clients'])} of {len(record['sampled'])} sampled clients aggregated "
            f"(quorum {record['quorum']}) in {record['aggregation_seconds']:.3f} s, total rank kept {record['total_rank']}"
        )
    for label, scores in (("evaluation", record["evaluation"]), ("federated evaluation", record.get("federated_evaluation", {}).get("combined"))):
        if scores:
            shown = {k: round(v, 4) for k, v in scores.items() if isinstance(v, float)}
            console.print(f"round {record['round']} {label}: {shown}")
