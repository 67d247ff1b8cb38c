"""The report of ``portable-cnn bench``: the terminal, Markdown, JSON and the PNG plot.

The functions here only format and write what the runs measured (the records
of :func:`.runners.run_config`, the environment of
:func:`.environment.describe`, the breakdowns of :func:`.breakdown.run_breakdown`).
matplotlib is optional: without it the plot is skipped with a message.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .environment import peak_rss_mb


def format_ips(value: float) -> str:
    """Images/s for a table: whole numbers from 100 up, one decimal below.

    >>> format_ips(12345.6), format_ips(42.04)
    ('12,346', '42.0')
    """
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def _ratio_text(r) -> str:
    ratio = r.get("ratio_to_reference")
    if r["reference"]:
        return "reference"
    return f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})" if ratio else "n/a"


#: The memory column's header, in the terminal and in Markdown (:func:`memory_text` says what a cell holds).
MEMORY_HEADER = "peak MiB (device / traced)"


def memory_text(r) -> str:
    """A record's memory cell: the device peak on the GPU, else the traced step peak, else ``-`` (not measured).

    >>> memory_text({"device_peak_mb": None, "traced_step_peak_mb": 2.63})
    '2.6 traced'
    >>> memory_text({"device_peak_mb": 512.0, "traced_step_peak_mb": None}), memory_text({"device_peak_mb": None})
    ('512.0 device', '-')
    """
    if r.get("device_peak_mb") is not None:
        return f"{r['device_peak_mb']:,.1f} device"
    if r.get("traced_step_peak_mb") is not None:
        return f"{r['traced_step_peak_mb']:,.1f} traced"
    return "-"


def format_table(records) -> str:
    """The results as a plain-text table, one row per record; ``~`` marks a median that had not settled."""
    header = ("net", "mode", "batch", "dtype", "backend", "images/s", "min-max", "vs PyTorch (min-max)",
              MEMORY_HEADER, "check")
    lines = []
    for r in records:
        ips, check = r["images_per_s"], r["check"]
        if not check["ok"]:
            check_text = (f"FAIL (diff {check.get('max_abs_diff', float('nan')):.1e})" if check.get("against")
                          else "FAIL (not finite)")
        elif check.get("against"):
            check_text = f"ok (diff {check['max_abs_diff']:.1e} vs {check['against']})"
        else:
            check_text = "ok (finite)"
        stable = "" if r["stable"] else " ~"
        lines.append((r["net"], r["mode"], str(r["batch_size"]), r["dtype"], r["label"],
                      format_ips(ips["median"]) + stable, f"{format_ips(ips['min'])}-{format_ips(ips['max'])}",
                      _ratio_text(r), memory_text(r), check_text))
    widths = [max(len(row[i]) for row in [header] + lines) for i in range(len(header))]
    right = {2, 5, 6, 8}
    out = []
    for j, row in enumerate([header] + lines):
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        out.append("  ".join(cells).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_markdown(records) -> str:
    """The results table in Markdown, for docs/benchmarks.md."""
    lines = [
        "| net | mode | batch | dtype | backend | images/s (median) | min-max | vs PyTorch, median (min-max) | "
        f"{MEMORY_HEADER} | first-step check |",
        "| --- | --- | ---: | --- | --- | ---: | ---: | --- | ---: | --- |",
    ]
    for r in records:
        ips, check = r["images_per_s"], r["check"]
        if not check["ok"]:
            check_text = "**FAILED**"
        elif check.get("against"):
            check_text = f"ok, diff {check['max_abs_diff']:.0e}"
        else:
            check_text = "ok (finite)"
        lines.append(f"| {r['net']} | {r['mode']} | {r['batch_size']} | {r['dtype']} | {r['label']} | "
                     f"{format_ips(ips['median'])}{'' if r['stable'] else ' ~'} | "
                     f"{format_ips(ips['min'])}-{format_ips(ips['max'])} | {_ratio_text(r)} | {memory_text(r)} | "
                     f"{check_text} |")
    return "\n".join(lines) + "\n"


def gpu_comparison(records) -> tuple[list, list]:
    """CuPy over NumPy: the speed-up per net/mode/dtype/batch, and the batch size from which the GPU stays ahead.

    Returns
    -------
    speedups : list of dict
        ``net``, ``mode``, ``dtype``, ``batch_size`` and ``speedup`` (median, min, max of the per-round ratios).
    overtakes : list of dict
        Per net, mode and dtype: ``gpu_overtakes_cpu_at_batch`` (None if the
        GPU is not ahead at the largest batch) and ``smallest_measured``.
    """
    rows, overtakes = [], []
    by_key = {(r["net"], r["mode"], r["dtype"], r["batch_size"], r["backend"]): r for r in records}
    for net, mode, dtype in sorted({(r["net"], r["mode"], r["dtype"]) for r in records}):
        sizes = sorted({r["batch_size"] for r in records if (r["net"], r["mode"], r["dtype"]) == (net, mode, dtype)})
        first_faster, measured = None, False
        for batch in sizes:
            gpu, cpu = by_key.get((net, mode, dtype, batch, "cupy")), by_key.get((net, mode, dtype, batch, "numpy"))
            if gpu is None or cpu is None:
                continue
            speedup, measured = gpu["speedup_over_numpy"], True
            rows.append({"net": net, "mode": mode, "dtype": dtype, "batch_size": batch, "speedup": speedup})
            if speedup["median"] > 1.0 and first_faster is None:
                first_faster = batch
            elif speedup["median"] <= 1.0:
                first_faster = None  # the GPU must stay ahead from there on
        if measured:
            overtakes.append({"net": net, "mode": mode, "dtype": dtype, "gpu_overtakes_cpu_at_batch": first_faster,
                              "smallest_measured": sizes[0]})
    return rows, overtakes


def print_environment(env) -> None:
    """The header: date, machine, versions, BLAS threads and kernel, TF32, dtype, backends; then the notes."""
    m = env["machine"]
    print(f"portable-cnn bench  {env['date_utc']}  portable_cnn {env['versions']['portable_cnn']}"
          + (f" ({env['versions']['git']})" if env["versions"].get("git") else ""))
    print(f"machine: {m['cpu']}{' (' + m['simd'] + ')' if m.get('simd') else ''}, {m['cpu_count']} CPUs "
          f"({m['cpus_usable']} usable), {m['platform']}, Python {m['python']}")
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if k not in ("portable_cnn", "git") and v)
    print(f"versions: {versions}")
    for row in env["blas"]:
        print(f"threadpool: {row['internal_api']} {row['version'] or ''} ({row['user_api']}, {row['prefix']}), "
              f"kernel {row.get('architecture') or '-'}, {row['num_threads']} threads"
              + (f", {row['threading_layer']}" if row.get("threading_layer") else ""))
    if env.get("blas_note"):
        print(f"threadpool: {env['blas_note']}")
    if env["blas_env"]:
        print("BLAS/OpenMP environment: " + ", ".join(f"{k}={v}" for k, v in env["blas_env"].items()))
        if any(k in env["blas_env"] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")):
            print("  note: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are set; they slow current NumPy "
                  "(benchmarks/run_cpu.sh unsets them)")
    if "torch" in env:
        t = env["torch"]
        print(f"torch: {t['num_threads']} intra-op threads (torch.set_num_threads left at default), "
              f"{t['num_interop_threads']} inter-op, oneDNN {'on' if t['mkldnn'] else 'off'}, "
              f"CUDA {'yes: ' + t.get('cuda_device', '') if t['cuda'] else 'no'}")
    if "cupy" in env:
        print(f"cupy: {env['cupy']}")
    tf32 = env["tf32"]
    switches = "; ".join(v for k, v in tf32.items() if k != "enabled") if len(tf32) > 1 else "no GPU in this run"
    print(f"tf32: {'on' if tf32['enabled'] else 'off'} ({switches})")
    print(f"dtypes {', '.join(env['dtypes'])}; {env['protocol']['optimizer']}; backends {', '.join(env['backends'])}; "
          f"reference {', '.join(env['references']) or 'none'}")
    for note in env["notes"]:
        print(f"note: {note}")
    print()


def print_results(records) -> list[dict]:
    """The table, the unsettled marker's legend and a line per failed check; returns the failed records."""
    print(format_table(records))
    if any(not r["stable"] for r in records):
        print("~ : the median had not settled within --max-seconds")
    failed = [r for r in records if not r["check"]["ok"]]
    for r in failed:
        print(f"CHECK FAILED: {r['net']} {r['mode']} batch {r['batch_size']} {r['dtype']} {r['backend']}: "
              f"{r['check']}")
    return failed


def print_gpu_comparison(rows, overtakes) -> None:
    """CuPy's speed-up over NumPy and where the GPU overtakes the CPU (nothing without CuPy and NumPy both)."""
    if not rows:
        return
    print("\nGPU (cupy) over CPU (numpy), images/s ratio, median (min-max):")
    for row in rows:
        s = row["speedup"]
        print(f"  {row['net']:<10} {row['mode']:<6} {row['dtype']} batch {row['batch_size']:>5}: "
              f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})")
    for o in overtakes:
        at = o["gpu_overtakes_cpu_at_batch"]
        text = (f"from batch {at} on" if at is not None and at != o["smallest_measured"] else
                f"already at the smallest batch measured ({at})" if at is not None else
                "not within the batch sizes measured")
        print(f"  {o['net']} {o['mode']} {o['dtype']}: the GPU overtakes the CPU {text}")


def print_memory() -> None:
    """The process's peak RSS, and what the table's memory column holds."""
    peak = peak_rss_mb()
    if peak is None:
        print("\npeak memory: process RSS not available on this platform (no resource module)")
    else:
        print(f"\npeak memory: process RSS {peak:,.0f} MiB (ru_maxrss, all runners together)")
    print(f"{MEMORY_HEADER}: device = the runner's peak GPU memory over the configuration (CuPy's pool, "
          "PyTorch's max_memory_allocated); traced = what one step allocates above what was live before it "
          "(tracemalloc: ours on numpy and array_api_strict); - = not measured (PyTorch's CPU allocator is "
          "invisible to tracemalloc)")


def print_breakdown(b) -> None:
    """One breakdown: ms per step, then ms, share and GFLOP/s per category."""
    print(f"\nbreakdown: {b['net']} batch {b['batch_size']} on {b['backend']}, {b['dtype']}: "
          f"{b['step_ms']:.1f} ms/step ({b['images_per_s_with_syncs']:,.0f} images/s with per-layer syncs)")
    for row in b["rows"]:
        gf = f"{row['gflop_per_s']:8.1f} GFLOP/s" if "gflop_per_s" in row else ""
        print(f"  {row['category']:<26} {row['ms']:9.2f} ms {row['percent']:6.1f}%  {gf}")
    if b["conv_backward_split"]:
        print(f"  ({b['conv_backward_split']})")


def plot(path, records, env) -> str | None:
    """Write a PNG of images/s against batch size, one panel per net and mode; return None, or why it was skipped."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib not installed: plot skipped (pip install 'portable-cnn[bench]')"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    nets = list(dict.fromkeys(r["net"] for r in records))
    modes = list(dict.fromkeys(r["mode"] for r in records))
    fig, axes = plt.subplots(len(modes), len(nets), figsize=(5.2 * len(nets), 3.8 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for j, net in enumerate(nets):
            ax = axes[i][j]
            subset = [r for r in records if r["net"] == net and r["mode"] == mode]
            for label, dtype in dict.fromkeys((r["label"], r["dtype"]) for r in subset):
                rows = sorted((r for r in subset if (r["label"], r["dtype"]) == (label, dtype)),
                              key=lambda r: r["batch_size"])
                xs = [r["batch_size"] for r in rows]
                med = np.array([r["images_per_s"]["median"] for r in rows])
                low = med - np.array([r["images_per_s"]["min"] for r in rows])
                high = np.array([r["images_per_s"]["max"] for r in rows]) - med
                fmt = "s--" if rows[0]["reference"] else "o-"  # the reference dashed, with squares
                ax.errorbar(xs, med, yerr=[low, high], fmt=fmt, capsize=3,
                            label=f"{label}, {dtype}" if len(env["dtypes"]) > 1 else label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:,.0f}"))
            sizes = sorted({r["batch_size"] for r in subset})
            ax.set_xticks(sizes)
            ax.set_xticklabels([str(s) for s in sizes])
            ax.minorticks_off()
            ax.set_title(f"{net}, {'training step' if mode == 'train' else 'inference'}")
            ax.set_xlabel("batch size")
            ax.set_ylabel("images/s (median, min-max)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"portable-cnn bench, {', '.join(env['dtypes'])}, {env['machine']['cpu']}, {env['date_utc']}",
                 fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_outputs(output: dict, json_path: str, markdown_path: str, plot_path: str) -> None:
    """Write the JSON, the Markdown table and the plot where asked (an empty path skips one); say what was written."""
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(output, indent=2) + "\n")
        print(f"\nwrote {path}")
    if markdown_path:
        path = Path(markdown_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(format_markdown(output["results"]))
        print(f"wrote {path}")
    if plot_path:
        why = plot(plot_path, output["results"], output["environment"])
        print(why if why else f"wrote {plot_path}")
