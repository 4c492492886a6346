"""PNG charts of the benchmarks' JSON (issue 27): fi_cupy next to each peer the run measured (torch SDPA and
cuDNN, FlashInfer, transformers, ...), as a share of the ceiling measured in the same run (the copy
bandwidth, or a bf16 matmul for prefill), one bar group per shape.

    python bench/plot.py <folder with the JSON files> [--out DIR]      # needs: pip install ".[bench]"

One PNG per JSON file it has a chart for (bench_decode.json -> bench_decode.png; bench_decode_x.json, e.g.
a second run renamed, gets the same chart), written to --out (default: the folder), titled with the device
and the date the JSON holds. A peer with no figure (not importable in that run, or failed on that shape)
has no bar; one with no figure at all is named under the chart.

    bench_decode     % of the copy bandwidth: fi_cupy, torch SDPA (contiguous K/V), FlashInfer
    bench_prefill    % of the bf16 matmul: fi_cupy (auto), fi_cupy fa2, torch flash / cuDNN, FlashInfer
    bench_small_ops  % of the copy bandwidth: fi_cupy, FlashInfer, torch eager
    bench_sampling   % of one read of the probabilities at the copy bandwidth (softmax: read + write), per batch
    bench_cascade    speed-up over the plain decode of the same KV, and % of the cascade's floor
    bench_host       us per eager call, log scale: fi_cupy from each caller, FlashInfer, torch; per group
    bench_e2e        % of a decode step's floor (fi_cupy step and graph, transformers); prefill tokens/s
    bench_plan_cpu   plan()'s host part, us per batch (no peer)
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections import Counter
from pathlib import Path

INSTALL = 'bench/plot.py needs matplotlib: pip install ".[bench]"'
DPI = 120

# One colour per implementation across every chart: fi_cupy in blues, FlashInfer green, torch oranges.
OURS = ("#1f4e9c", "#4f8fd6", "#9cc3ee")
FLASHINFER = "#2ca02c"
TORCH = ("#f28e2b", "#b5561a")
OTHER = "#8c6bb1"  # transformers
CEILING = "#555555"


class Skip(Exception):
    """The file holds nothing to chart (e.g. bench_host --dry); the reason is printed."""


def _figure_class():
    try:
        import matplotlib
    except ImportError:
        sys.exit(INSTALL)
    matplotlib.use("Agg")  # files only, no display
    from matplotlib.figure import Figure
    return Figure


# ---------------------------------------------------------------------------------------------------------
# Drawing


def _num(v: float) -> str:
    if v >= 10:
        return f"{v:.0f}"
    return f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def _when(doc) -> str:
    date = doc.get("date") if isinstance(doc, dict) else None
    return date[:16].replace("T", " ") if isinstance(date, str) else ""


def _title(fig, title: str, doc) -> None:
    sub = ", ".join(p for p in ((doc.get("device") if isinstance(doc, dict) else None), _when(doc)) if p)
    fig.suptitle(title + (f"\n{sub}" if sub else ""), fontsize=11)


def _bars(ax, labels, series, *, horizontal=False, log=False, fmt=_num, ceiling=None, unit="") -> list:
    """Grouped bars: one group per label, one bar per (name, values, colour) in series (a None value: no
    bar). Returns the names of the series with no value at all (left out of the chart and its legend)."""
    absent = [name for name, vals, _ in series if all(v is None for v in vals)]
    series = [s for s in series if s[0] not in absent]
    k = max(1, len(series))
    width = 0.8 / k
    top = 0.0
    for i, (name, vals, color) in enumerate(series):
        have = [(j + (i - (k - 1) / 2) * width, v) for j, v in enumerate(vals) if v is not None]
        if not have:
            continue
        pos, val = zip(*have)
        draw = ax.barh if horizontal else ax.bar
        rects = draw(pos, val, width, color=color, label=name)
        ax.bar_label(rects, labels=[fmt(v) + unit for v in val], fontsize=6, padding=1)
        top = max(top, *val)
    ticks = list(range(len(labels)))
    if horizontal:
        ax.set_yticks(ticks, labels, fontsize=7)
        ax.set_ylim(len(labels) - 0.5, -0.5)  # first label on top
    else:
        ax.set_xticks(ticks, labels, fontsize=7, rotation=30 if max(map(len, labels), default=0) > 10 else 0,
                      ha="right" if max(map(len, labels), default=0) > 10 else "center")
        ax.set_xlim(-0.5, len(labels) - 0.5)
    if ceiling is not None:
        (ax.axvline if horizontal else ax.axhline)(ceiling, color=CEILING, lw=0.8, ls="--")
        top = max(top, ceiling)
    if log:
        (ax.set_xscale if horizontal else ax.set_yscale)("log")
    elif top > 0:
        (ax.set_xlim if horizontal else ax.set_ylim)(0, top * 1.15)  # room for the value labels
    ax.grid(axis="x" if horizontal else "y", lw=0.3, alpha=0.6)
    ax.set_axisbelow(True)
    return absent


def _fig_legend(fig) -> None:
    """One legend for every panel, under the charts (never over a bar; above them it meets the title)."""
    handles = {}
    for ax in fig.axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(len(handles), 5),
                   fontsize=8, frameon=False)


def _absent_note(fig, absent) -> None:
    names = list(dict.fromkeys(absent))
    if not names:
        return
    note = "no figures in this run: " + "; ".join(names)
    if fig.legends:  # the legend's title: the layout keeps room for it, clear of the entries
        fig.legends[-1].set_title(note, prop={"size": 7})
    else:
        fig.supxlabel(note, x=0.01, ha="left", fontsize=7)


def _finish(fig, title: str, doc, absent=()):
    """Every chart's last step: one legend under the panels, the title (device, date), the note naming the
    series with no figures in this run."""
    _fig_legend(fig)
    _title(fig, title, doc)
    _absent_note(fig, absent)
    return fig


def _pct(ours_pct, ours_t, peer_t):
    """A peer's share of the same ceiling: same bytes (or FLOPs), so the share scales with 1 / time."""
    return None if peer_t is None or not ours_t else ours_pct * ours_t / peer_t


def _rows(doc, key="rows") -> list:
    rows = doc.get(key) if isinstance(doc, dict) else None
    if not rows:
        raise Skip(f"no {key!r} in it (a run cut short, or --dry)")
    return rows


# ---------------------------------------------------------------------------------------------------------
# One chart per benchmark


def decode_chart(Figure, doc):
    rows = _rows(doc)
    labels = [f"{r['batch']}x{r['kv_len']}" + ("" if r["kv_dtype"] == "bfloat16" else
                                              " " + r["kv_dtype"].replace("float8_", ""))
              + ("" if r["layout"] == "NHD" else " " + r["layout"])
              + (" " + r["option"] if r.get("option") else "") for r in rows]
    series = [("fi_cupy", [r["pct_copy"] for r in rows], OURS[0]),
              ("torch SDPA (contiguous K/V)", [_pct(r["pct_copy"], r["ms"], r.get("torch_sdpa_ms")) for r in rows],
               TORCH[0]),
              ("FlashInfer", [_pct(r["pct_copy"], r["ms"], r.get("flashinfer_ms")) for r in rows], FLASHINFER)]
    fig = Figure(figsize=(max(8, 0.9 * len(rows) + 2), 4.8), layout="constrained")
    ax = fig.subplots()
    absent = _bars(ax, labels, series, ceiling=100)
    ax.set_ylabel(f"% of copy bandwidth ({doc['copy_GBps']:.0f} GB/s, same run)")
    ax.set_xlabel("batch x KV length (bf16 KV, NHD unless named); higher is better")
    return _finish(fig, "Paged-KV decode, 32/8 heads, d128, page 16: GB/s as % of the copy ceiling", doc, absent)


PREFILL_SERIES = (("auto", "fi_cupy", OURS[0]), ("fa2", "fi_cupy fa2 (portable kernel)", OURS[2]),
                  ("torch flash", "torch SDPA flash", TORCH[0]), ("torch cuDNN", "torch SDPA cuDNN", TORCH[1]),
                  ("FlashInfer", "FlashInfer", FLASHINFER))


def prefill_chart(Figure, doc):
    rows = _rows(doc)
    mm = doc["matmul_TFLOPs"]
    labels = [textwrap.fill(r["case"], 22) for r in rows]
    series = []
    for key, name, color in PREFILL_SERIES:
        if key == "auto":  # the row's own figures are backend="auto"
            vals = [r["pct_matmul"] for r in rows]
        else:
            vals = [None if r.get(key) is None else 100 * r[key] / mm for r in rows]
        series.append((name, vals, color))
    fig = Figure(figsize=(max(8, 1.7 * len(rows) + 2), 5.2), layout="constrained")
    ax = fig.subplots()
    absent = _bars(ax, labels, series, ceiling=100)
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=0, ha="center")
    ax.set_ylabel(f"% of bf16 matmul ({mm:.0f} TFLOP/s, same run)")
    ax.set_xlabel("higher is better")
    return _finish(fig, "Prefill, bf16, d128: TFLOP/s as % of a bf16 matmul", doc, absent)


def small_ops_chart(Figure, doc):
    rows = _rows(doc)
    labels = [f"{r['op']} {r['shape']}" for r in rows]
    series = [(name, [(r.get(key) or {}).get("pct_copy") for r in rows], color)
              for key, name, color in (("fi_cupy", "fi_cupy", OURS[0]), ("flashinfer", "FlashInfer", FLASHINFER),
                                       ("torch", "torch eager", TORCH[0]))]
    fig = Figure(figsize=(9, 0.55 * len(rows) + 1.6), layout="constrained")
    ax = fig.subplots()
    absent = _bars(ax, labels, series, horizontal=True, ceiling=100)
    ax.set_xlabel(f"% of copy bandwidth ({doc['copy_GBps']:.0f} GB/s, same run); higher is better")
    return _finish(fig, "Norms, activations, RoPE, KV append, state merge (bf16): GB/s as % of the copy ceiling",
                   doc, absent)


def sampling_chart(Figure, doc):
    rows = _rows(doc)
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    ops = list(dict.fromkeys(r["op"] for r in rows))
    ncols = 2 if len(batches) > 1 else 1
    nrows = -(-len(batches) // ncols)
    fig = Figure(figsize=(8 * ncols, nrows * (0.5 * len(ops) + 1.2) + 1), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    absent, charted = [], set()
    for ax, b in zip(axes, batches):
        by_op = {r["op"]: r for r in rows if r["batch"] == b}
        cells = [by_op.get(op) for op in ops]
        # ours: softmax reads and writes (of_copy), the others read the probabilities once
        ours = [None if r is None else 100 * (r["of_copy"] if r.get("of_copy") else 1 / r["reads"]) for r in cells]
        series = [("fi_cupy", ours, OURS[0])]
        for key, name, color in (("flashinfer_us", "FlashInfer", FLASHINFER),
                                 ("torch_sort_top_p_us", "torch sort-based top-p", TORCH[0])):
            series.append((name, [None if r is None else _pct(p, r["us"], r.get(key)) for r, p in zip(cells, ours)],
                           color))
        miss = _bars(ax, ops, series, horizontal=True, ceiling=100)
        absent += miss
        charted |= {s[0] for s in series if s[0] not in miss}  # a peer with a bar at some batch ran
        ax.set_title(f"batch {b}", fontsize=9)
        ax.set_xlabel("% of the ceiling; higher is better", fontsize=8)
    for ax in axes[len(batches):]:
        ax.set_visible(False)
    copy = f" ({doc['copy_GBps']:.0f} GB/s)" if doc.get("copy_GBps") else ""
    title = (f"Sampling, vocab {doc.get('vocab', '?')}, float32: one read of the probabilities at the copy "
             f"bandwidth{copy} / time (softmax: read + write)")
    return _finish(fig, title, doc, [a for a in absent if a not in charted])


def cascade_chart(Figure, doc):
    rows = _rows(doc)
    labels = [f"{r['prefix'] // 1024}k x {r['batch']}" if r["prefix"] % 1024 == 0 else f"{r['prefix']} x {r['batch']}"
              for r in rows]
    impls = (("cascade_us", "fi_cupy cascade", OURS[0]), ("shared_prefix_wrapper_us", "fi_cupy 2-level wrapper",
                                                          OURS[2]),
             ("flashinfer_cascade_us", "FlashInfer cascade", FLASHINFER))
    fig = Figure(figsize=(max(8, 1.1 * len(rows) + 2), 8.4), layout="constrained")
    top, bottom = fig.subplots(2, 1)
    speed = [(name, [None if r.get(key) is None or r.get("plain_decode_us") is None else r["plain_decode_us"] / r[key]
                     for r in rows], color) for key, name, color in impls]
    _bars(top, labels, speed, log=True, ceiling=1, fmt=lambda v: f"{v:.1f}", unit="x")
    for j, r in enumerate(rows):
        if r.get("plain_decode_us") is None:  # the bench skips it when its cache does not fit
            top.text(j, 1.1, "no plain decode\n(did not fit)", ha="center", va="bottom", fontsize=7)
    top.set_ylabel("speed-up over the plain decode (x, log)")
    top.set_title("plain decode: every request holds its own copy of the prefix; higher is better", fontsize=9)
    floor = [(name, [None if r.get(key) is None else 100 * r["floor_us"] / r[key] for r in rows], color)
             for key, name, color in impls]
    absent = _bars(bottom, labels, floor, ceiling=100)  # an implementation with no time at all
    bottom.set_ylabel("% of the floor")
    own = {r.get("unique") for r in rows}
    bottom.set_xlabel("shared prefix x requests" + (f" ({own.pop()} own tokens each)" if len(own) == 1 else ""))
    copy = f" ({doc['copy_GBps']:.0f} GB/s)" if doc.get("copy_GBps") else ""
    bottom.set_title(f"floor: the cascade's bytes (prefix once) at the copy bandwidth{copy}; higher is better",
                     fontsize=9)
    if all(r.get("plain_decode_us") is None for r in rows):
        absent.append("plain decode (so no speed-up)")
    return _finish(fig, "Cascade (shared-prefix) decode, bf16, 32/8 heads, d128, page 16", doc, absent)


HOST_SERIES = {"fi_cupy/torch": ("fi_cupy (torch caller)", OURS[0]), "fi_cupy/cupy": ("fi_cupy (CuPy caller)", OURS[1]),
               "fi_cupy/jax": ("fi_cupy (JAX caller)", OURS[2]), "flashinfer": ("FlashInfer (torch)", FLASHINFER),
               "torch": ("torch's own op", TORCH[0])}


def _host_labels(rows) -> list:
    labels = [r["op"] + (f" (batch {r['batch']})" if r.get("batch") else "") for r in rows]
    seen = Counter(labels)
    return [lab if seen[lab] == 1 else f"{lab} [{r['shape'].split(', ')[-1]}]" for lab, r in zip(labels, rows)]


def host_chart(Figure, doc):
    if isinstance(doc, dict) and doc.get("dry"):
        raise Skip("a --dry listing: nothing was timed")
    rows = _rows(doc)
    columns = doc.get("columns") or list(dict.fromkeys(c for r in rows for c in r["us"]))
    groups = list(dict.fromkeys(r["group"] for r in rows))
    sizes = [sum(r["group"] == g for r in rows) for g in groups]
    # two columns of panels (a group's rows plus 2 grid rows for its title and axis), split where they balance
    units = lambda gs: sum(sizes[groups.index(g)] + 2 for g in gs)  # noqa: E731
    cut = min(range(1, len(groups) + 1), key=lambda c: max(units(groups[:c]), units(groups[c:])))
    halves = [h for h in (groups[:cut], groups[cut:]) if h]
    height = max(units(h) for h in halves)  # grid rows; each panel spans its group's
    fig = Figure(figsize=(9 * len(halves), (0.09 * len(columns) + 0.1) * height + 1.2), layout="constrained")
    gs = fig.add_gridspec(height, len(halves))
    vals = [v for r in rows for v in r["us"].values() if v]
    lim = (min(vals) / 1.5, max(vals) * 3) if vals else None
    absent, charted = [], set()
    for col, half in enumerate(halves):
        start = 0
        for g in half:
            n = sizes[groups.index(g)] + 2
            ax = fig.add_subplot(gs[start:start + n, col])
            start += n
            grows = [r for r in rows if r["group"] == g]
            series = [(HOST_SERIES.get(c, (c, OTHER))[0], [r["us"].get(c) for r in grows],
                       HOST_SERIES.get(c, (c, OTHER))[1]) for c in columns]
            miss = _bars(ax, _host_labels(grows), series, horizontal=True, log=True)
            absent += miss
            charted |= {s[0] for s in series if s[0] not in miss}
            if lim:
                ax.set_xlim(*lim)
            for j, r in enumerate(grows):  # a failed cell: say so after the row's bars
                failed = [c for c in columns if str(r["status"].get(c, "")).startswith("error")]
                if failed and lim:
                    x = max([v for v in r["us"].values() if v] or [lim[0]]) * 1.8
                    ax.text(x, j, "err: " + ", ".join(HOST_SERIES.get(c, (c,))[0] for c in failed), fontsize=6,
                            color="#c00000", va="center")
            ax.set_title(g, fontsize=9, loc="left")
    calls = f"mean of {doc['calls']} back-to-back calls" if doc.get("calls") else "back-to-back calls"
    plan = f"; plan(): median of {doc['plan_calls']}, each between syncs" if doc.get("plan_calls") else ""
    title = f"Host cost of eager calls: us per call, log scale ({calls}{plan}); shorter is better"
    return _finish(fig, title, doc, [a for a in absent if a not in charted])


def e2e_chart(Figure, doc):
    rows = _rows(doc, "decode")
    hf = doc.get("transformers") or {}
    labels = [f"batch {r['batch']}" for r in rows]
    series = [("fi_cupy step (host-inclusive)", [100 * r["floor_s"] / r["step_s"] for r in rows], OURS[0]),
              ("fi_cupy graph (GPU time)", [100 * r["floor_s"] / r["gpu_s"] for r in rows], OURS[2]),
              ("transformers eager step", [100 * r["floor_s"] / hf[str(r["batch"])]["step_s"]
                                           if str(r["batch"]) in hf else None for r in rows], OTHER)]
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[3, 1])
    absent = _bars(left, labels, series, ceiling=100)
    copy = f" at the copy bandwidth ({doc['copy_Bps'] / 1e9:.0f} GB/s)" if doc.get("copy_Bps") else ""
    left.set_ylabel("% of the step's floor")
    left.set_title(f"decode step; floor: weights + KV bytes{copy}; higher is better", fontsize=9)
    n = doc.get("prefill_requests")
    peer = hf.get(str(n), {}).get("prefill_tok_s") if n is not None else None
    absent += _bars(right, ["prefill"], [("fi_cupy prefill", [doc["prefill_tok_s"]], OURS[1]),
                                         ("transformers prefill", [peer], "#b39ddb")], fmt=lambda v: f"{v:,.0f}")
    right.set_ylabel("tokens/s")
    right.set_title(f"prefill{f', {n} prompts' if n else ''}; higher is better", fontsize=9)
    return _finish(fig, "End-to-end serving (examples/fi_llama, random weights, bf16)", doc, absent)


def plan_cpu_chart(Figure, doc):
    rows = doc if isinstance(doc, list) else _rows(doc)
    if not rows:
        raise Skip("no rows in it")
    labels = [f"batch {r['batch']}" for r in rows]
    series = [("decode plan()", [r["plan_decode_us"] for r in rows], OURS[0]),
              ("prefill plan(), host part", [r["prefill_host_us"] for r in rows], OURS[2])]
    fig = Figure(figsize=(8, 4.4), layout="constrained")
    ax = fig.subplots()
    _bars(ax, labels, series)
    ax.set_ylabel("us a call (median); lower is better")
    return _finish(fig, "plan(): host part, CPU only (no peer)", doc)


CHARTS = {"bench_decode": decode_chart, "bench_prefill": prefill_chart, "bench_small_ops": small_ops_chart,
          "bench_sampling": sampling_chart, "bench_cascade": cascade_chart, "bench_host": host_chart,
          "bench_e2e": e2e_chart, "bench_plan_cpu": plan_cpu_chart}


def chart_for(stem: str):
    """The chart of bench_NAME.json, or of bench_NAME_<anything>.json (another run of the same benchmark)."""
    for key in sorted(CHARTS, key=len, reverse=True):
        if stem == key or stem.startswith(key + "_"):
            return CHARTS[key]
    return None


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="where the benchmarks wrote their JSON ($OUT or $FI_CUPY_BENCH_DIR)")
    ap.add_argument("--out", help="where the PNGs go (default: the folder)")
    args = ap.parse_args(argv)
    Figure = _figure_class()  # before anything else: no matplotlib, one line saying how to get it
    folder = Path(args.folder)
    if not folder.is_dir():
        sys.exit(f"bench/plot.py: {folder} is not a folder")
    out = Path(args.out) if args.out else folder
    out.mkdir(parents=True, exist_ok=True)
    written, failed = [], []
    for path in sorted(folder.glob("*.json")):
        chart = chart_for(path.stem)
        if chart is None:
            print(f"{path.name}: no chart for this file; skipped")
            continue
        try:
            fig = chart(Figure, json.loads(path.read_text()))
        except Skip as e:
            print(f"{path.name}: skipped: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - one malformed file must not stop the others
            print(f"{path.name}: cannot chart it: {type(e).__name__}: {e}")
            failed.append(path.name)
            continue
        target = out / f"{path.stem}.png"
        fig.savefig(target, dpi=DPI)
        written.append(target)
        print(f"wrote {target}")
    if failed:
        sys.exit(f"bench/plot.py: could not chart {', '.join(failed)}")
    if not written:
        sys.exit(f"bench/plot.py: no chart written from {folder} (no bench_*.json with figures in it)")
    return written


if __name__ == "__main__":
    main()
