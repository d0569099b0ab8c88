"""What the server prints: one line per client reply as it arrives, one per event that was not a
plain success, and a table per round.

Much of it quotes what nodes sent (a reason, a metric's name), so the console reads no markup."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

from florist.printing import make_console

if TYPE_CHECKING:
    from florist.federation.validation import ClientUpdate

console = make_console(stderr=True, markup=False)


def show_reply(server_round: int, node: int, update: ClientUpdate) -> None:
    if update.examples is None:  # a secure-sum site's numbers are only in the round's totals
        console.print(f"round {server_round} client {update.partition} (node {node}): rank {update.rank}, trained (its numbers go into the secure sum)")
        return
    console.print(
        f"round {server_round} client {update.partition} (node {node}): rank {update.rank}, {update.examples} examples, "
        f"loss {update.metrics['train-loss']:.3f}, trained {update.metrics['train-seconds']:.1f} s"
    )


def show_event(server_round: int, node: int, status: str, reason: str) -> None:
    if status != "accepted":
        console.print(f"round {server_round}: node {node} {status}: {reason}")


def show_round(record: dict) -> None:
    table = Table(title=f"round {record['round']}", title_justify="left")
    totals = record.get("totals")
    trained = () if totals else ("examples", "loss", "train s")
    for column in ("client", "node", "rank", *trained, "down KiB", "up KiB"):
        table.add_column(column, justify="right")
    for c in record.get("clients", []):
        numbers = () if totals else (str(c["examples"]), f"{c['train_loss']:.3f}", f"{c['train_seconds']:.1f}")
        table.add_row(str(c["partition"]), str(c["node"]), str(c["rank"]), *numbers, f"{c['bytes_down'] / 1024:.0f}", f"{c['bytes_up'] / 1024:.0f}")
    if record.get("clients"):
        console.print(table)
    if totals:
        clipped = f", {totals['sites_clipped']} clipped" if "sites_clipped" in totals else ""
        console.print(
            f"round {record['round']} secure sum of {len(record['clients'])} sites: {totals['examples']} examples, "
            f"{totals['train_tokens']} train tokens, weighted train loss {totals['train_loss']:.3f}{clipped}"
        )
    if "total_rank" in record:
        console.print(
            f"round {record['round']}: {len(record['clients'])} of {len(record['sampled'])} sampled clients aggregated "
            f"(quorum {record['quorum']}) in {record['aggregation_seconds']:.3f} s, total rank kept {record['total_rank']}"
        )
    privacy = record.get("secure", {}).get("privacy")
    if privacy:
        console.print(
            f"round {record['round']} privacy: noise multiplier {privacy['noise_multiplier']:.4g}, epsilon {privacy['round_epsilon']:.4g} "
            f"this round, {privacy['run_epsilon']:.4g} for the run so far (delta {privacy['delta']:g}); "
            f"the noise in the mean sketch is {record['secure']['noise_to_signal']:.3g}x the largest mean update's norm"
        )
        if "server_epsilon" in privacy:
            console.print(
                f"round {record['round']} privacy: without privacy.secure_aggregation the server reads each site's upload, "
                f"which carries 1/sqrt(sites) of the noise: epsilon {privacy['server_epsilon']:.4g} against it for the run so far"
            )
    selection = record.get("tau_selection")
    if selection:
        losses = ", ".join(f"{tau}: {loss:.4f}" for tau, loss in zip(selection["candidates"], selection["validation_loss"]))
        console.print(f"round {record['round']} automatic tau {selection['chosen']} (validation loss {losses or 'not scored'})")
    for label, scores in (("evaluation", record["evaluation"]), ("federated evaluation", record.get("federated_evaluation", {}).get("combined"))):
        if scores:
            # The headline figures; per-category ones are in metrics.jsonl.
            shown = {k: round(v, 4) for k, v in scores.items() if isinstance(v, float) and "/" not in k}
            console.print(f"round {record['round']} {label}: {shown}")
        if scores and scores.get("withheld_categories"):
            console.print(
                f"round {record['round']} {label}: sites withheld the scores of {scores['withheld_categories']} categories "
                f"({scores['withheld_examples']} examples) under privacy.min_category_count"
            )
