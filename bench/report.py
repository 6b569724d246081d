"""The benchmark report: bench/report.md and its plots, from the JSON the
benchmarks write (`make bench` runs them and then this).

    uv run python bench/report.py --sweep bench/out/sweep.json [--run bench/out/run.json]
        [--load bench/out/load.json] [--citus-sweep FILE] [--out bench/report.md]
        [--utilization 0.6] [--cores-per-node 16] [--targets 10000,100000]

From bench/sweep.py's points: throughput and p50/p99 against connections (one
PNG each), CPU an operation of each part of the service at each workload's
operating point (a PNG and a table), and a scale model turning those costs into
the cores, processes and nodes a target rate needs. With `--citus-sweep` (the
same sweep on a coordinator with local workers) the model's per-call costs on
a cluster are taken from there, and its assumption that a delegated call costs
a worker what it costs a single node is checked against it. bench/run.py's and
bench/load.py's medians are added as tables when given. The plots go to a
folder named after the report (bench/report/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
PARTS = {"api": "API", "pgbouncer": "PgBouncer", "redis": "Redis", "postgres": "PostgreSQL (the node or coordinator)",
         "workers": "Citus workers"}
MODELLED = ("HTTP credit, batched", "HTTP credit, unbatched", "HTTP bulk", "HTTP balance")


def _points(sweep: dict) -> dict[str, list[dict]]:
    """The sweep's points by workload, in connection order."""
    found: dict[str, list[dict]] = {}
    for point in sorted(sweep["points"], key=lambda p: p["connections"]):
        found.setdefault(point["workload"], []).append({**point, "service_cpu_ms": service_ms(point)})
    return found


def operating_point(points: list[dict]) -> dict:
    """The point to size by: the most operations a second among those with
    under 1 % errors (all points when none is), a saturated server's rate."""
    clean = [p for p in points if p["errors"] <= 0.01 * max(p["operations"], 1)]
    return max(clean or points, key=lambda p: p["per_s"])


def _unit(workload: str) -> str:
    return "credits" if workload == "HTTP bulk" else "requests" if workload.startswith("HTTP") else "calls"


def _plot(path: Path, series: dict[str, list[dict]], fields: list[tuple[str, str]], ylabel: str,
          title: str) -> None:
    """One panel per field: each workload's value against connections, log-log."""
    import matplotlib  # here: only the report needs it (a dev dependency)

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, len(fields), figsize=(6.5 * len(fields), 4.5), squeeze=False)
    connections = sorted({p["connections"] for points in series.values() for p in points})
    for axis, (field, label) in zip(axes[0], fields):
        for workload, points in series.items():
            # A point that finished no operation has a rate of 0 and no cost an operation.
            shown = [p for p in points if p["operations"] and p.get(field, 0) > 0]
            axis.plot([p["connections"] for p in shown], [p[field] for p in shown], marker="o", label=workload)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(connections, [str(c) for c in connections])
        axis.set_xlabel("connections")
        axis.set_ylabel(ylabel)
        axis.set_title(label)
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def _plot_cpu(path: Path, costs: dict[str, dict]) -> None:
    """Stacked bars: CPU ms an operation of each part, per workload."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(9, 4.5))
    names = list(costs)
    bottom = [0.0] * len(names)
    for part, label in PARTS.items():
        values = [costs[name][f"{part}_cpu_ms"] for name in names]
        axis.bar(names, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    axis.set_ylabel("CPU ms an operation")
    axis.set_title("CPU an operation, by part, at each workload's operating point")
    axis.tick_params(axis="x", labelrotation=20, labelsize=8)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def _cell(figures: dict, field: str, digits: int = 2) -> str:
    """A figure for a table, blank where the benchmark has none (pgbench's
    percentiles without its log, a bulk request's mean)."""
    return f"{figures[field]:.{digits}f}" if field in figures else ""


def service_ms(point: dict) -> float:
    return sum(point[f"{part}_cpu_ms"] for part in PARTS)


def scale(costs: dict, rate: float, utilization: float, cores_per_node: int) -> dict:
    """What `rate` operations a second need, from CPU ms an operation by part:
    cores of each part at `utilization`; API, PgBouncer and Redis processes
    (each uses at most one core); worker and coordinator nodes, and the API
    nodes (API, PgBouncer and Redis together) of `cores_per_node`."""
    cores = {part: rate * costs[part] / 1000 / utilization for part in costs}
    front = cores["api"] + cores["pgbouncer"] + cores["redis"]
    return {"cores": cores,
            "api_processes": math.ceil(cores["api"]), "pgbouncer_processes": math.ceil(cores["pgbouncer"]),
            "redis_processes": math.ceil(cores["redis"]),
            "api_nodes": math.ceil(front / cores_per_node),
            "coordinator_nodes": math.ceil(cores["coordinator"] / cores_per_node) if cores["coordinator"] else 0,
            "worker_nodes": max(1, math.ceil(cores["workers"] / cores_per_node))}


def model_costs(single: dict, cluster: dict | None) -> dict:
    """CPU ms an operation by tier. On a single node PostgreSQL's share is what
    the worker holding the user spends on a cluster (the call is delegated
    whole); the coordinator's is known only from a cluster's run."""
    if single.get("workers_cpu_ms"):  # the sweep itself ran on a cluster
        database = {"coordinator": single["postgres_cpu_ms"], "workers": single["workers_cpu_ms"]}
    else:
        database = {"coordinator": cluster["postgres_cpu_ms"] if cluster else 0.0,
                    "workers": single["postgres_cpu_ms"]}
    return {"api": single["api_cpu_ms"], "pgbouncer": single["pgbouncer_cpu_ms"],
            "redis": single["redis_cpu_ms"], **database}


def _commit() -> str:
    done = subprocess.run(["git", "-C", str(BENCH), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def _sweep_section(sweep: dict, series: dict[str, list[dict]], plots: str) -> list[str]:
    lines = ["## Throughput and latency against connections", "",
             f"![operations a second against connections]({plots}/throughput.png)", "",
             f"![p50 and p99 latency against connections]({plots}/latency.png)", "",
             "Credits a second for the bulk endpoint (each request "
             f"{sweep['bulk_items']} credits; its latency is a whole request's); calls or requests a second "
             "otherwise. Errors: non-2xx answers and socket errors (HTTP), clients aborted (pgbench). "
             "The SQL workloads run through PgBouncer as the API's role.", "",
             "| workload | connections | per s | mean ms | p50 ms | p95 ms | p99 ms | errors | load average |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for workload, points in series.items():
        for p in points:
            lines.append(f"| {workload} | {p['connections']} | {p['per_s']:.0f} | {_cell(p, 'mean_ms')} | "
                         f"{_cell(p, 'p50_ms')} | {_cell(p, 'p95_ms')} | {_cell(p, 'p99_ms')} | "
                         f"{p['errors']} | {p['load_average']:.1f} |")
    return lines + [""]


def _cpu_section(operating: dict[str, dict], plots: str) -> list[str]:
    lines = ["## CPU an operation", "",
             f"![CPU an operation by part]({plots}/cpu.png)", "",
             f"![CPU an operation against connections]({plots}/cpu-connections.png)", "",
             "At each workload's operating point (its highest rate with under 1 % errors), CPU ms an operation "
             "from /proc: each part's processes and their children (bench/cpu.py), and the whole machine's busy "
             "time (load generators and everything else on it included).", "",
             "| workload | connections | per s | " + " | ".join(PARTS.values()) + " | service | machine |",
             "|---|---:|---:|" + "---:|" * (len(PARTS) + 2)]
    for workload, p in operating.items():
        lines.append(f"| {workload} | {p['connections']} | {p['per_s']:.0f} | "
                     + " | ".join(f"{p[f'{part}_cpu_ms']:.3f}" for part in PARTS)
                     + f" | {service_ms(p):.3f} | {p['machine_cpu_ms']:.3f} |")
    return lines + [""]


def _model_section(sweep: dict, operating: dict[str, dict], cluster: dict[str, dict] | None, args) -> list[str]:
    on_cluster = sweep.get("citus_workers", 0) > 0
    lines = ["## Scale model", "",
             f"Each workload alone at {', '.join(f'{t:,}' for t in args.targets)} operations a second, from its "
             "measured CPU an operation (the table above). Assumptions:", "",
             f"- every part is CPU-bound and planned at {args.utilization:.0%} of its cores (headroom for peaks "
             "and for a node lost); disks keep up with the commits (group commit and the bulk endpoint "
             "make one commit of many credits);",
             "- an API process (uvicorn worker), a PgBouncer and a Redis each use at most one core, so each "
             "needs as many processes as cores (several PgBouncers behind one port with `so_reuseport`; Redis "
             "sharded by key);",
             f"- nodes of {args.cores_per_node} cores; API, PgBouncer and Redis share the API nodes;",
             "- users spread evenly over the shards, no hot account (one account's rate is bounded by one row's "
             "commit latency, whatever the size: bench/RESULTS.md, \"The limits\");"]
    if on_cluster:
        lines.append(f"- measured on a coordinator with {sweep['citus_workers']} local workers: the coordinator's "
                     "and the workers' CPU are each their own tier;")
    elif cluster:
        lines.append("- PostgreSQL's CPU on the single node is what the worker holding the user spends (a call "
                     "is delegated whole to that worker); the coordinator's CPU an operation is the Citus sweep's "
                     "(`--citus-sweep`);")
    else:
        lines.append("- PostgreSQL's CPU on the single node is what the worker holding the user spends (a call "
                     "is delegated whole to that worker); **the coordinator's own cost is not in this model**: "
                     "no Citus run was given (`--citus-sweep`), so coordinator nodes show as 0;")
    lines.append("- figures from a loaded, shared machine inflate every CPU cost (caches, context switches), "
                 "and each part's CPU includes its background work (the audit stream's logical decoding, Citus' "
                 "maintenance daemon, pg_cron) spread over the operations measured, which at a loaded machine's "
                 "few operations a second weighs most on the Citus nodes: read the counts as an upper bound of "
                 "this code's needs, not a quote.")
    lines += ["", "| workload | target per s | API cores | API processes | PgBouncer processes | Redis processes | "
              "coordinator cores | coordinator nodes | worker cores | worker nodes | API nodes |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for workload in MODELLED:
        if workload not in operating:
            continue
        costs = model_costs(operating[workload], (cluster or {}).get(workload))
        for target in args.targets:
            need = scale(costs, target, args.utilization, args.cores_per_node)
            lines.append(f"| {workload} | {target:,} | {need['cores']['api']:.1f} | {need['api_processes']} | "
                         f"{need['pgbouncer_processes']} | {need['redis_processes']} | "
                         f"{need['cores']['coordinator']:.1f} | {need['coordinator_nodes']} | "
                         f"{need['cores']['workers']:.1f} | {need['worker_nodes']} | {need['api_nodes']} |")
    if cluster and not on_cluster:
        lines += ["", "Checked against the Citus sweep: a worker's CPU an operation there against the single "
                  "node's PostgreSQL (the model's assumption), and the coordinator's on top.", "",
                  "| workload | single node PostgreSQL ms | cluster workers ms | ratio | cluster coordinator ms |",
                  "|---|---:|---:|---:|---:|"]
        for workload in MODELLED:
            if workload in operating and workload in cluster:
                single, other = operating[workload]["postgres_cpu_ms"], cluster[workload]["workers_cpu_ms"]
                lines.append(f"| {workload} | {single:.3f} | {other:.3f} | "
                             f"{other / single if single else float('nan'):.2f} | "
                             f"{cluster[workload]['postgres_cpu_ms']:.3f} |")
    return lines + [""]


def _run_section(run: dict) -> list[str]:
    lines = ["## Ledger functions against tpcb-like (bench/run.py)", "",
             f"{run['clients']} clients straight to PostgreSQL, {run['seconds']} s x {len(run['rounds']['tpcb-like'])} "
             "interleaved rounds, medians.", "",
             "| workload | TPS | mean latency ms | TPS / tpcb-like |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {m['tps']:.0f} | {m['mean_ms']:.2f} | {m['per_tpcb_like']:.2f} |"
              for name, m in run["median"].items()]
    return lines + [""]


def _load_section(load: dict) -> list[str]:
    parts = [("api_cpu_ms", "API"), ("postgres_cpu_ms", "PostgreSQL"), ("pgbouncer_cpu_ms", "PgBouncer"),
             ("redis_cpu_ms", "Redis"), ("machine_cpu_ms", "machine")]
    first = next(iter(load["median"].values()))
    lines = ["## HTTP against the raw SQL credit and balance read (bench/load.py)", "",
             f"{load['server']}, {load['workers']} API processes, wrk {load['connections']} connections, pgbench 8 "
             f"clients straight to PostgreSQL; {load['seconds']} s x {len(load['rounds'][next(iter(load['rounds']))])}"
             " interleaved rounds, medians; CPU ms a request.", "",
             "| workload | req/s | p50 ms | p99 ms | " + " | ".join(label for _, label in parts) + " | / SQL credit |",
             "|---|---:|---:|---:|" + "---:|" * (len(parts) + 1)]
    for name, m in load["median"].items():
        lines.append(f"| {name} | {m['rps']:.0f} | {_cell(m, 'p50_ms')} | {_cell(m, 'p99_ms')} | "
                     + " | ".join(_cell(m, field, 3) for field, _ in parts)
                     + f" | {m['rps'] / first['rps']:.2f} |")
    ratios = load["ratios"]
    lines += ["", f"HTTP balance / SQL balance {ratios['http_balance_per_sql_balance']:.2f}; HTTP balance / HTTP "
              f"credit {ratios['http_balance_per_http_credit']:.2f}; SQL balance / SQL credit "
              f"{ratios['sql_balance_per_sql_credit']:.2f}.", ""]
    return lines


def write(sweep: dict, out: Path, args, run: dict | None = None, load: dict | None = None,
          citus_sweep: dict | None = None) -> list[Path]:
    """The report at `out` and its plots beside it; the files written."""
    plots = out.with_suffix("")
    plots.mkdir(parents=True, exist_ok=True)
    series = _points(sweep)
    operating = {workload: operating_point(points) for workload, points in series.items()}
    cluster = ({workload: operating_point(points) for workload, points in _points(citus_sweep).items()}
               if citus_sweep else None)
    pngs = [plots / f"{name}.png" for name in ("throughput", "latency", "cpu", "cpu-connections")]
    _plot(pngs[0], series, [("per_s", "throughput")], "operations a second", "Throughput against connections")
    _plot(pngs[1], series, [("p50_ms", "p50"), ("p99_ms", "p99")], "ms", "Latency against connections")
    _plot_cpu(pngs[2], operating)
    _plot(pngs[3], series, [("service_cpu_ms", "the service's parts together"), ("machine_cpu_ms", "the machine")],
          "CPU ms an operation", "CPU an operation against connections")

    load_average = sweep["load_average"]
    topology = (f"a Citus coordinator with {sweep['citus_workers']} local workers" if sweep.get("citus_workers")
                else f"a single node (REWARDS_CITUS={sweep.get('citus', 'auto')})")
    lines = ["# Benchmark report", "",
             f"Written by `{args.command}` on "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC at commit {_commit()}: "
             f"{topology}, {sweep['cores']} cores, API {sweep['api_server']} with {sweep['api_workers']} processes, "
             f"{sweep['users']:,} accounts, {sweep['seconds']} s a point. Load average during the sweep: "
             f"{load_average['start'][0]:.1f} at the start, {load_average['end'][0]:.1f} at the end (each point's "
             "below). On a shared machine the absolute rates are the machine's, not the code's; ratios measured "
             "side by side mean more.", ""]
    lines += _sweep_section(sweep, series, plots.name)
    lines += _cpu_section(operating, plots.name)
    lines += _model_section(sweep, operating, cluster, args)
    if run:
        lines += _run_section(run)
    if load:
        lines += _load_section(load)
    out.write_text("\n".join(lines))
    return [out, *pngs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", type=Path, required=True, help="bench/sweep.py --json's file")
    parser.add_argument("--run", type=Path, help="bench/run.py --json's file")
    parser.add_argument("--load", type=Path, help="bench/load.py --json's file")
    parser.add_argument("--citus-sweep", type=Path, help="bench/sweep.py --json's file from a Citus cluster")
    parser.add_argument("--out", type=Path, default=BENCH / "report.md")
    parser.add_argument("--utilization", type=float, default=0.6, help="share of each core the model plans to use")
    parser.add_argument("--cores-per-node", type=int, default=16)
    parser.add_argument("--targets", default="10000,100000", type=lambda text: [int(n) for n in text.split(",")])
    parser.add_argument("--command", default="uv run python bench/report.py",
                        help="what made the benchmarks' files, as the report's first line says")
    args = parser.parse_args(argv)

    def read(path: Path | None) -> dict | None:
        return json.loads(path.read_text()) if path else None

    written = write(read(args.sweep), args.out, args, run=read(args.run), load=read(args.load),
                    citus_sweep=read(args.citus_sweep))
    print("\n".join(str(path) for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
