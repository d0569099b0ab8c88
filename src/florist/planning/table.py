"""The plan as tables: one row per site, then the server."""

from __future__ import annotations

from rich.table import Table

from florist.planning.memory import MIB
from florist.planning.plan import Plan

SITE_COLUMNS = ("site", "rank", "weights", "compute copies", "trained+grads+AdamW", "activations", "largest temporary", "peak", "sends/round", "receives/round")
SERVER_COLUMNS = ("model (float32)", "replies held", "aggregation work", "aggregate", "peak")


def _mib(size: int) -> str:
    return f"{size / MIB:,.1f} MiB" if size < 10 * 2**30 else f"{size / 2**30:,.2f} GiB"


def plan_tables(plan: Plan, method: str) -> list[Table]:
    shape = plan.shape
    sizes = (
        f"{shape.parameters / 1e6:,.0f}M parameters, {shape.layers} layers, hidden {shape.hidden}, "
        f"intermediate {shape.intermediate}, vocabulary {shape.vocab}"
    )
    sites = Table(title=f"Per site: {plan.model} ({sizes}), training in {plan.precision}", title_justify="left")
    for column in SITE_COLUMNS:
        sites.add_column(column, justify="left" if column == "site" else "right")
    for site in plan.sites:
        memory = site.memory
        sites.add_row(
            str(site.partition),
            str(site.rank),
            _mib(memory.weights),
            _mib(memory.compute_copies),
            _mib(memory.trained + memory.gradients + memory.optimizer),
            _mib(memory.activations),
            _mib(memory.transient),
            _mib(memory.peak),
            _mib(site.upload_bytes),
            f"at most {_mib(site.download_bytes)}",
        )
    server = Table(title=f"Server: aggregation by {method}", title_justify="left")
    for column in SERVER_COLUMNS:
        server.add_column(column, justify="right")
    aggregation = plan.aggregation
    server.add_row(
        _mib(plan.server_model_bytes), _mib(aggregation.received), _mib(aggregation.work), _mib(aggregation.result), _mib(plan.server_peak)
    )
    return [sites, server]
