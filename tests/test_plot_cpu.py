"""bench/plot.py on the CPU: synthetic JSON docs in each benchmark's schema (the dicts built as the benchmarks
build them, written through bench/common.save_json, which dates them) give one valid PNG each, with and
without the peers' figures; a peer's bar is its share of the same ceiling; --dry and unknown files are
skipped, a malformed one is named; without matplotlib, one line naming the bench extra."""
import importlib.util
import json
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DEVICE = "NVIDIA H200"
COPY_BW = 4.0e12  # B/s, read + write
needs_mpl = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                               reason='matplotlib not installed (pip install ".[bench]")')


def _load(name: str, spec_name: str):
    spec = importlib.util.spec_from_file_location(spec_name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def plot():
    return _load("plot", "bench_plot")


@pytest.fixture(scope="module")
def bh():
    return _load("bench_host", "bench_host")  # also puts bench/ on sys.path (common)


@pytest.fixture
def save(bh, tmp_path, monkeypatch):
    """bench/common.py's save_json into tmp_path/json, as a benchmark run with OUT set."""
    common = _load("common", "bench_common")
    folder = tmp_path / "json"
    folder.mkdir()
    monkeypatch.setenv("OUT", str(folder))
    monkeypatch.delenv("FI_CUPY_BENCH_DIR", raising=False)
    return SimpleNamespace(folder=folder, json=common.save_json)


# ---------------------------------------------------------------------------------------------------------
# Docs as the benchmarks build them (fake times; peers=False: no peer importable in that run)

def decode_doc(peers=True):
    hq, hkv, d = 32, 8, 128
    data = []
    for (b, l), kvd, layout in [((b, l), "bfloat16", "NHD") for b, l in ((1, 8192), (16, 4096), (512, 512))] + \
            [((16, 4096), "float8_e4m3fn", "NHD"), ((16, 4096), "bfloat16", "HND")]:
        kv_item = 1 if "float8" in kvd else 2
        nbytes = b * l * hkv * d * 2 * kv_item + 2 * b * hq * d * 2
        t = nbytes / (0.7 * COPY_BW) + 4e-6
        eager = t + 30e-6
        sdpa = t * 1.6 if peers and (kvd, layout) == ("bfloat16", "NHD") else None
        fi = t * 1.1 if peers else None
        data.append({"batch": b, "kv_len": l, "kv_dtype": kvd, "layout": layout, "ms": t * 1e3,
                     "GBps": nbytes / t / 1e9, "pct_copy": 100 * nbytes / t / COPY_BW, "eager_us": eager * 1e6,
                     "torch_sdpa_ms": None if sdpa is None else sdpa * 1e3,
                     "flashinfer_ms": None if fi is None else fi * 1e3})
    return {"device": DEVICE, "copy_GBps": COPY_BW / 1e9, "copy_before_GBps": COPY_BW / 1e9,
            "copy_after_GBps": 0.99 * COPY_BW / 1e9, "compile_cold_s": 1.5, "load_cached_s": 0.004, "rows": data}


def prefill_doc(peers=True):
    mm = 750.0
    peer_names = ["fa2", "torch flash", "torch cuDNN", "FlashInfer"]
    data = []
    for i, name in enumerate(["single causal L=4096 32/32", "single non-causal L=4096 32/32",
                              "batch paged 16 x (1024 new + 1024 cached) 32/8 p16",
                              "ragged 64 x U[128, 2048] causal 32/8"]):
        f = 1e12 * (i + 1)
        res = {"auto": f / (500e12 + 20e12 * i), "fa2": f / 350e12}
        if peers:
            res.update({"torch flash": f / 400e12, "torch cuDNN": None if i == 2 else f / 520e12,
                        "FlashInfer": f / 480e12})
        t = res["auto"]
        data.append({"case": name, "ms": t * 1e3, "TFLOPs": f / t / 1e12, "pct_matmul": 100 * f / t / 1e12 / mm,
                     **{p: (None if res.get(p) is None else f / res[p] / 1e12) for p in peer_names}})
    return {"device": DEVICE, "matmul_TFLOPs": mm, "rows": data}


def small_ops_doc(peers=True):
    records = []
    for op, label, nbytes in (("rmsnorm", "1x4096", 2 * 4096 * 2 * 2 + 4096 * 2),
                              ("rmsnorm", "4096x4096", 2 * 4096 * 4096 * 2 + 4096 * 2),
                              ("silu_and_mul", "4096x14336", 3 * 4096 * 14336 * 2),
                              ("merge_state", "4096x32x128", 3 * 4096 * 32 * 128 * 2 + 3 * 4096 * 32 * 4)):
        rec = {"op": op, "shape": label, "bytes": nbytes}
        for name, speed in (("fi_cupy", 0.8), ("flashinfer", 0.75), ("torch", 0.5)):
            if name != "fi_cupy" and not peers:
                continue
            sec = nbytes / (speed * COPY_BW) + 2e-6
            gbs = nbytes / sec / 1e9
            rec[name] = {"us": sec * 1e6, "GBps": gbs, "pct_copy": 100 * gbs * 1e9 / COPY_BW}
        rec["fi_cupy_eager_us"] = "9.5" if label.startswith("1x") else ""
        records.append(rec)
    return {"device": DEVICE, "copy_GBps": COPY_BW / 1e9, "rows": records}


def sampling_doc(peers=True):
    vocab = 128256
    records = []
    for b in (1, 128):
        read_s = b * vocab * 4 / COPY_BW
        torch_p = 900e-6 if peers else None
        for i, name in enumerate(("softmax", "top_p 0.9", "top_k 50", "top_p_renorm_probs 0.9")):
            t = read_s * (1.5 + i) + 3e-6
            fi_t = t * 1.2 if peers else None
            of_copy = 2 * read_s / t if name == "softmax" else None
            records.append({"batch": b, "op": name, "us": t * 1e6, "reads": t / read_s, "of_copy": of_copy,
                            "flashinfer_us": fi_t and fi_t * 1e6,
                            "torch_sort_top_p_us": torch_p * 1e6 if (torch_p and name.startswith("top_p")) else None})
    return {"device": DEVICE, "vocab": vocab, "copy_GBps": COPY_BW / 1e9, "rows": records}


def cascade_doc(peers=True):
    token_bytes, io = 2 * 8 * 128 * 2, lambda b: 2 * b * 32 * 128 * 2
    data = []
    for prefix in (1024, 32768):
        for batch in (16, 256):
            cascade_bytes = (prefix + batch * 256) * token_bytes + io(batch)
            decode_bytes = batch * (prefix + 256) * token_bytes + io(batch)
            floor = cascade_bytes / COPY_BW
            t, eager = floor * 1.4 + 5e-6, 60.0
            t2 = t * 1.3 if peers else None
            plain = decode_bytes / (0.8 * COPY_BW) if prefix * batch < 32768 * 256 else None  # did not fit
            fi = t * 1.2 if peers else None
            diff = None if plain is None else 0.0078
            data.append({"prefix": prefix, "batch": batch, "unique": 256, "cascade_us": t * 1e6,
                         "floor_us": floor * 1e6, "cascade_eager_us": eager,
                         "shared_prefix_wrapper_us": None if t2 is None else t2 * 1e6,
                         "plain_decode_us": None if plain is None else plain * 1e6,
                         "flashinfer_cascade_us": None if fi is None else fi * 1e6, "max_abs_diff_vs_decode": diff})
    return {"device": DEVICE, "copy_GBps": COPY_BW / 1e9, "copy_before_GBps": COPY_BW / 1e9,
            "copy_after_GBps": COPY_BW / 1e9, "rows": data}


def host_doc(bh, peers=True):
    """bench_host's own records and header, its cells' statuses from a fake Env, fake timings."""
    env = bh.Env(makers={"torch": object(), "cupy": object()}, absent={"jax": "not asked for (--callers)"})
    if peers:
        env.flashinfer, env.torch = object(), object()
    doc = {**bh.header_info(DEVICE), "calls": 200, "plan_calls": 10, "columns": list(bh.COLUMNS),
           "absent": env.absent, "rows": []}
    for i, case in enumerate(bh.cases("float16")):
        rec = bh.record(case)
        for j, col in enumerate(bh.COLUMNS):
            status, thunk = bh.cell(case, env, col)
            if thunk is None:
                rec["status"][col] = status
            elif i == 3 and col == "fi_cupy/cupy":  # one failed cell, as run_case records it
                rec["status"][col] = "error: RuntimeError: boom"
            else:
                rec["us"][col] = (400.0 if case.kind == "plan" else 6.0) * (1 + 0.3 * j)
                rec["status"][col] = "ok"
        doc["rows"].append(rec)
    return doc


def e2e_doc(peers=True):
    rows = []
    for b in (1, 16, 64):
        step = 0.007 + 0.0002 * b
        floor = 0.0055 + 0.0001 * b
        rows.append({"batch": b, "step_s": step, "gpu_s": step * 0.95, "floor_s": floor, "tok_s": b / step})
    hf = {b: {"step_s": 0.03 + 0.001 * b, "prefill_tok_s": 9000.0} for b in (1, 16, 64)} if peers else {}
    return {"device": DEVICE, "copy_Bps": COPY_BW, "decode": rows, "prefill_tok_s": 60000.0, "prefill_requests": 16,
            "transformers": {str(k): v for k, v in hf.items()}}


def plan_cpu_doc(peers=True):
    return [{"batch": b, "plan_decode_us": round(20 + 0.05 * b, 1), "prefill_host_us": round(30 + 0.1 * b, 1)}
            for b in (1, 16, 128, 512)]


DOCS = {"bench_decode": decode_doc, "bench_prefill": prefill_doc, "bench_small_ops": small_ops_doc,
        "bench_sampling": sampling_doc, "bench_cascade": cascade_doc, "bench_host": host_doc, "bench_e2e": e2e_doc,
        "bench_plan_cpu": plan_cpu_doc}


def write_all(save, bh, peers):
    for name, make in DOCS.items():
        save.json(f"{name}.json", make(bh, peers) if make is host_doc else make(peers))


def assert_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    assert 300 <= w <= 12000 and 200 <= h <= 12000, (path.name, w, h)
    import matplotlib.image
    img = matplotlib.image.imread(path)  # decodes the whole file
    assert img.shape[:2] == (h, w)
    assert img.std() > 0.01  # not a blank canvas


def bars(fig, label):
    """Values of the bar series called label, over every axes of fig."""
    return [v for ax in fig.axes for c in ax.containers if c.get_label() == label for v in c.datavalues]


# ---------------------------------------------------------------------------------------------------------


@needs_mpl
@pytest.mark.parametrize("peers", [True, False], ids=["peers", "no-peers"])
def test_every_chart(plot, bh, save, tmp_path, peers):
    write_all(save, bh, peers)
    for name in DOCS:
        doc = json.loads((save.folder / f"{name}.json").read_text())
        if isinstance(doc, dict):
            assert doc["device"] == DEVICE and doc["date"][:2] == "20", name  # dated by common.save_json
    out = tmp_path / "png"
    written = plot.main([str(save.folder), "--out", str(out)])
    assert sorted(p.name for p in written) == sorted(f"{n}.png" for n in DOCS)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.png" for n in DOCS)
    for p in written:
        assert_png(p)


def _figure(plot):
    return plot._figure_class()


@needs_mpl
def test_peer_bars_are_shares_of_the_same_ceiling(plot, bh):
    Figure = _figure(plot)
    doc = decode_doc()
    fig = plot.decode_chart(Figure, doc)
    rows = doc["rows"]
    nbytes = [r["GBps"] * 1e9 * r["ms"] / 1e3 for r in rows]
    assert bars(fig, "fi_cupy") == pytest.approx([r["pct_copy"] for r in rows])
    assert bars(fig, "FlashInfer") == pytest.approx([100 * n / (r["flashinfer_ms"] / 1e3) / COPY_BW
                                                     for n, r in zip(nbytes, rows)])
    assert bars(fig, "torch SDPA (contiguous K/V)") == pytest.approx(
        [100 * n / (r["torch_sdpa_ms"] / 1e3) / COPY_BW for n, r in zip(nbytes, rows) if r["torch_sdpa_ms"]])

    doc = prefill_doc()
    fig = plot.prefill_chart(Figure, doc)
    mm = doc["matmul_TFLOPs"]
    assert bars(fig, "fi_cupy") == pytest.approx([r["pct_matmul"] for r in doc["rows"]])
    assert bars(fig, "torch SDPA cuDNN") == pytest.approx([100 * r["torch cuDNN"] / mm for r in doc["rows"]
                                                           if r["torch cuDNN"] is not None])
    assert len(bars(fig, "torch SDPA cuDNN")) == len(doc["rows"]) - 1  # its failed shape has no bar

    doc = sampling_doc()
    fig = plot.sampling_chart(Figure, doc)
    ours = [100 * r["of_copy"] if r["of_copy"] else 100 / r["reads"] for r in doc["rows"]]
    assert sorted(bars(fig, "fi_cupy")) == pytest.approx(sorted(ours))
    fi = [p * r["us"] / r["flashinfer_us"] for p, r in zip(ours, doc["rows"])]
    assert sorted(bars(fig, "FlashInfer")) == pytest.approx(sorted(fi))
    assert len(bars(fig, "torch sort-based top-p")) == 4  # the two top_p rows of each batch

    doc = cascade_doc()
    fig = plot.cascade_chart(Figure, doc)
    have = [r for r in doc["rows"] if r["plain_decode_us"] is not None]
    speed = bars(fig, "fi_cupy cascade")[:len(have)]  # the top panel first
    assert speed == pytest.approx([r["plain_decode_us"] / r["cascade_us"] for r in have])


@needs_mpl
def test_absent_peers_are_named(plot, bh):
    Figure = _figure(plot)
    fig = plot.decode_chart(Figure, decode_doc(peers=False))
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["fi_cupy"]
    notes = fig.legends[0].get_title().get_text()
    assert "torch SDPA" in notes and "FlashInfer" in notes
    fig = plot.host_chart(Figure, host_doc(bh, peers=False))
    notes = fig.legends[0].get_title().get_text()
    assert "FlashInfer (torch)" in notes and "JAX caller" in notes and "CuPy caller" not in notes
    fig = plot.host_chart(Figure, host_doc(bh, peers=True))
    assert "FlashInfer" not in fig.legends[0].get_title().get_text()
    assert any(t.get_text() == "err: fi_cupy (CuPy caller)" for ax in fig.axes for t in ax.texts)  # the failed cell


@needs_mpl
def test_skipped_and_malformed_files(plot, bh, save, tmp_path, capsys):
    bh.dry(bh.parse(["--dry"]))  # bench_host --dry writes bench_host.json through save_json: nothing timed
    (save.folder / "notes.json").write_text("{}")
    with pytest.raises(SystemExit, match="no chart written"):
        plot.main([str(save.folder)])
    out = capsys.readouterr().out
    assert "bench_host.json: skipped: a --dry listing" in out and "notes.json: no chart" in out

    save.json("bench_decode_run2.json", decode_doc())  # another run of a benchmark, renamed
    save.json("bench_prefill.json", {"device": DEVICE, "rows": prefill_doc()["rows"]})  # no matmul_TFLOPs
    with pytest.raises(SystemExit, match="could not chart bench_prefill.json"):
        plot.main([str(save.folder)])
    assert "KeyError" in capsys.readouterr().out
    assert_png(save.folder / "bench_decode_run2.png")  # the good file was still charted
    assert not (save.folder / "bench_prefill.png").exists()


def test_no_matplotlib_one_line(plot, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError, as when absent
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path)])
    msg = str(e.value)
    assert 'pip install ".[bench]"' in msg and "\n" not in msg


def test_save_json_dates_dicts_only(save):
    save.json("a.json", {"device": DEVICE, "rows": []})
    save.json("b.json", {"device": DEVICE, "date": "2020-01-02T03:04:05+00:00"})
    save.json("c.json", [{"batch": 1}])
    a, b, c = (json.loads((save.folder / f"{n}.json").read_text()) for n in "abc")
    assert a["date"][:2] == "20" and "T" in a["date"] and a["device"] == DEVICE
    assert b["date"] == "2020-01-02T03:04:05+00:00"  # bench_host's own date is kept
    assert c == [{"batch": 1}]
