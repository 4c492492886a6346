"""bench/bench_host.py's pure logic on the CPU: --dry lists every public op and the plan() batches with no GPU
visible (in a subprocess), each cell's status follows what is importable, one failing cell does not stop
its row, and the table formatter gives the right columns and issue 21 verdicts from fake timings."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fi_cupy

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_host.py"


@pytest.fixture(scope="module")
def bh():
    spec = importlib.util.spec_from_file_location("bench_host", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dry_doc(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench_host") / "cases.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("OUT", None)
    r = subprocess.run([sys.executable, str(BENCH), "--dry", "--json", str(path)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "dry run: no device" in r.stdout
    return json.loads(path.read_text())


def test_dry_lists_every_public_op(dry_doc):
    assert dry_doc["dry"] is True and "rows" not in dry_doc  # nothing was timed
    ops = {c["op"] for c in dry_doc["cases"]}
    missing = []
    for name in fi_cupy.__all__:
        if name in dry_doc["not_timed"]:
            continue
        obj = getattr(fi_cupy, name)
        covered = any(op.startswith(name + ".") for op in ops) if isinstance(obj, type) else name in ops
        if not covered:
            missing.append(name)
    assert not missing, f"public names with no bench_host row: {missing}"
    for wrapper_call in ("BatchDecodeWithPagedKVCacheWrapper.run", "BatchPrefillWithPagedKVCacheWrapper.run",
                         "BatchPrefillWithRaggedKVCacheWrapper.run"):
        assert wrapper_call in ops


def test_dry_plan_batches(dry_doc):
    for op in ("BatchDecodeWithPagedKVCacheWrapper.plan", "BatchPrefillWithPagedKVCacheWrapper.plan"):
        rows = [c for c in dry_doc["cases"] if c["op"] == op]
        assert [c["batch"] for c in rows] == [1, 16, 128, 512]
        assert all(c["kind"] == "plan" for c in rows)
        assert all("flashinfer" in c["columns"] for c in rows)
    assert dry_doc["plan_batches"] == [1, 16, 128, 512]


def test_dry_columns_and_issue_figures(dry_doc):
    by_op = {}
    for c in dry_doc["cases"]:
        by_op.setdefault(c["op"], c)
        assert {"fi_cupy/torch", "fi_cupy/cupy"} <= set(c["columns"]), c
    # JAX arrays are immutable: no JAX caller for in-place ops, one for the rest
    for op in ("apply_rope_pos_ids_inplace", "merge_state_in_place", "append_paged_kv_cache"):
        assert "fi_cupy/jax" not in by_op[op]["columns"]
    for op in ("rmsnorm", "fused_add_rmsnorm", "apply_rope_pos_ids", "BatchDecodeWithPagedKVCacheWrapper.run"):
        assert "fi_cupy/jax" in by_op[op]["columns"]
    # the brief's torch equivalents
    for op in ("rmsnorm", "silu_and_mul", "softmax", "single_decode_with_kv_cache", "single_prefill_with_kv_cache"):
        assert "torch" in by_op[op]["columns"]
    with_issue = {(c["op"], c["batch"]): c["issue"] for c in dry_doc["cases"] if c["issue"]}
    assert with_issue == {
        ("rmsnorm", None): {"fi_cupy": 129, "flashinfer": 8.9, "torch": 14.9},
        ("silu_and_mul", None): {"fi_cupy": 57, "flashinfer": 8.0, "torch": 21},
        ("BatchDecodeWithPagedKVCacheWrapper.run", None): {"fi_cupy": 102, "flashinfer": 38.5},
        ("BatchDecodeWithPagedKVCacheWrapper.plan", 16): {"fi_cupy": 959, "flashinfer": 487},
    }
    assert "1x4096 bf16" in by_op["rmsnorm"]["shape"] and "1x14336" in by_op["silu_and_mul"]["shape"]
    assert by_op["BatchDecodeWithPagedKVCacheWrapper.run"]["shape"].startswith("16x1024")


def test_cupy_fp16_fallback_is_labelled(bh):
    rows = {c.op: c.shape for c in bh.cases("float16")}
    assert rows["rmsnorm"].endswith("[cupy: fp16]")
    assert not rows["softmax"].endswith("[cupy: fp16]")  # float32 inputs: nothing falls back
    assert not any("[cupy" in c.shape for c in bh.cases("bfloat16"))


def by_op(bh, op, batch=None):
    return next(c for c in bh.cases() if c.op == op and c.batch == batch)


def test_cells_follow_what_is_importable(bh):
    env = bh.Env(makers={"torch": "torch maker", "cupy": "cupy maker"})  # no JAX, no FlashInfer, no torch peer
    status = lambda case, col: bh.cell(case, env, col)[0]
    rms = by_op(bh, "rmsnorm")
    assert [status(rms, c) for c in bh.COLUMNS] == ["ready", "ready", "absent", "absent", "absent"]
    inplace = by_op(bh, "apply_rope_pos_ids_inplace")
    assert [status(inplace, c) for c in bh.COLUMNS] == ["ready", "ready", "n/a", "absent", "n/a"]
    no_fi = next(c for c in bh.cases() if c.op == "append_paged_kv_cache" and "check=False" in c.shape)
    assert status(no_fi, "flashinfer") == "n/a"
    env.flashinfer, env.torch = "flashinfer", "torch"
    assert [status(rms, c) for c in bh.COLUMNS] == ["ready", "ready", "absent", "ready", "ready"]


def test_a_failing_cell_does_not_stop_its_row(bh, monkeypatch):
    monkeypatch.setattr(bh, "device_sync", lambda: None)

    def build(mod, mk):
        if mk == "broken":
            raise RuntimeError("no kernel for you")
        return lambda: None
    case = bh.Case("norm", "rmsnorm", "fake", build)
    env = bh.Env(makers={"torch": "broken", "cupy": "fine"})
    rec = bh.run_case(case, env, bh.parse(["--calls", "5"]))
    assert rec["status"]["fi_cupy/torch"].startswith("error: RuntimeError: no kernel for you")
    assert rec["status"]["fi_cupy/cupy"] == "ok" and rec["us"]["fi_cupy/cupy"] >= 0
    assert rec["status"]["fi_cupy/jax"] == "absent" and "fi_cupy/jax" not in rec["us"]
    assert [bh.cell_text(rec, c) for c in bh.COLUMNS[:3]] == ["err", f"{rec['us']['fi_cupy/cupy']:.1f}", "-"]


def fake(bh, op, us, status=None, batch=None):
    rec = bh.record(by_op(bh, op, batch))
    rec["us"].update(us)
    rec["status"].update({c: "ok" for c in us}, **(status or {}))
    return rec


def test_table_from_fake_timings(bh, capsys):
    recs = [
        fake(bh, "rmsnorm", {"fi_cupy/torch": 7.5, "fi_cupy/cupy": 6.3, "flashinfer": 8.0, "torch": 14.04},
             {"fi_cupy/jax": "absent"}),
        fake(bh, "silu_and_mul", {"fi_cupy/torch": 9.0, "fi_cupy/cupy": 12.0, "fi_cupy/jax": 30.0, "flashinfer": 8.0},
             {"torch": "error: RuntimeError: boom"}),
        fake(bh, "BatchDecodeWithPagedKVCacheWrapper.run", {"fi_cupy/torch": 30.0}, {"flashinfer": "absent"}),
        fake(bh, "BatchDecodeWithPagedKVCacheWrapper.plan", {"fi_cupy/torch": 200.0, "flashinfer": 500.0}, batch=16),
        fake(bh, "BatchDecodeWithPagedKVCacheWrapper.plan", {"fi_cupy/torch": 300.0, "flashinfer": 500.0}, batch=512),
        fake(bh, "BatchDecodeWithPagedKVCacheWrapper.plan", {"fi_cupy/torch": 900.0, "flashinfer": 500.0}, batch=1),
        fake(bh, "single_decode_with_kv_cache", {"fi_cupy/torch": 50.0, "torch": 20.0}),
    ]
    header, rows = bh.table_rows(recs)
    assert header == ["op", "shape", "fi_cupy torch-caller", "fi_cupy cupy-caller", "fi_cupy jax-caller",
                      "FlashInfer", "torch", "issue 21 (H200)", "target (issue 21)"]
    assert all(len(r) == len(header) for r in rows)
    rms, silu, run, plan16, plan512, plan1, single = rows
    assert rms[:7] == ["rmsnorm", rms[1], "7.5", "6.3", "-", "8.0", "14.0"]
    assert rms[7] == "fi_cupy then 129, FI 8.9, torch 14.9" and rms[8] == "ok"
    assert silu[2:7] == ["9.0", "12.0", "30.0", "8.0", "err"]
    assert silu[8] == "MISS: torch 9.0 > FI 8.0; cupy 12.0 > 8"
    assert run[2:6] == ["30.0", "n/a", "n/a", "-"] and run[8] == "ok"  # against issue 21's 38.5: no FlashInfer here
    assert plan16[8] == "ok" and plan16[7] == "fi_cupy then 959, FI 487"
    assert plan512[8] == "MISS: torch 300 > FI/2 250"
    assert plan1[8] == "" and single[8] == ""  # no target at batch 1, none for single-request attention
    bh.print_tables(recs, "us per call")
    out = capsys.readouterr().out
    assert "norm: us per call" in out and "plan: us per call" in out and "attention: us per call" in out


def test_verdict_compares_with_the_same_run_first(bh):
    issue = {"flashinfer": 8.9}
    assert bh.verdict("elementwise", None, {"fi_cupy/torch": 8.5, "flashinfer": 8.0}, issue) == \
        "MISS: torch 8.5 > FI 8.0"
    assert bh.verdict("elementwise", None, {"fi_cupy/torch": 8.5}, issue) == "ok"  # issue 21's 8.9
    assert bh.verdict("elementwise", None, {"fi_cupy/torch": 9.5}, issue) == "MISS: torch 9.5 > FI(issue) 8.9"
    assert bh.verdict("sync", None, {"fi_cupy/torch": 900.0, "fi_cupy/cupy": 900.0, "flashinfer": 1.0}, None) == ""
    assert bh.verdict("elementwise", None, {}, None) == ""


def test_select(bh):
    cs = bh.cases()
    assert {c.group for c in bh.select(cs, "norm")} == {"norm"}
    assert {c.op for c in bh.select(cs, "rmsnorm")} == {"rmsnorm"}
    assert {c.op for c in bh.select(cs, "apply_rope_pos_ids")} == {"apply_rope_pos_ids", "apply_rope_pos_ids_inplace"}
    assert bh.select(cs, "") == cs
