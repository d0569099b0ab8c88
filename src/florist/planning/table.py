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
    if plan.first_sketch_bytes is not None:
        sites.caption = (
            f"florist-secure: every site sends {_mib(plan.first_sketch_bytes)} of sketches in round 1; later rounds size them "
            "from the ranks kept, at most the figure shown (aggregation.sketch_width, aggregation.sketch_upload bound it)"
        )
        sites.caption_justify = "left"
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
            _mib(site.upload_bytes) if plan.first_sketch_bytes is None else f"at most {_mib(site.upload_bytes)}",
            f"at most {_mib(site.download_bytes)}",
        )
    server = Table(title=f"Server: aggregation by {method}", title_justify="left")
    for column in SERVER_COLUMNS:
        server.add_column(column, justify="right")
    aggregation = plan.aggregation
    server.add_row(
        _mib(plan.server_model_bytes), _mib(aggregation.received), _mib(aggregation.work), _mib(aggregation.result), _mib(plan.server_peak)
    )
    if plan.privacy is None:
        return [sites, server]
    privacy = plan.privacy
    dp = Table(title="Client-level DP (privacy.dp)", title_justify="left")
    columns = ("noise multiplier", "epsilon (run)", "delta", "sampling rate", "sites a round", "round-1 sketch values", "noise / signal", "sites for 1")
    for column in columns:
        dp.add_column(column, justify="right")
    dp.add_row(
        f"{privacy.noise_multiplier:.4g}",
        f"{privacy.epsilon:.4g}",
        f"{privacy.delta:g}",
        f"{privacy.sampling_rate:.4g}",
        str(privacy.sites),
        f"{privacy.sketch_values:,}",
        f"{privacy.noise_to_signal:.3g}",
        f"{privacy.sites_for_ratio_one:,}",
    )
    dp.caption = (
        "noise / signal: the noise in round 1's mean sketch over the largest norm the mean update's sketch can have; "
        "above 1 the noise outweighs any update. sites for 1: the sites a round would need at this noise multiplier."
    )
    dp.caption_justify = "left"
    return [sites, server, dp]
