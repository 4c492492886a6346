"""bench/bench_jit.py --rounds on the CPU: every example and the built-in ALiBi are timed in each round, in the
same order, and the ratios are each case's best against the default's best (the kernel times are stubbed)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_jit.py"


def test_rounds_interleave_and_compare_bests(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_jit_under_test", BENCH)
    bj = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bj)
    calls, fake = [], {"default": [400e-6, 380e-6], "alibi": [460e-6, 420e-6]}

    def case(variant, name, backend="auto", pos="NONE"):
        label = "built-in" if pos == "ALIBI" else name
        calls.append(label)
        times = fake.get(label, [390e-6, 390e-6])
        return times[sum(c == label for c in calls) - 1], 0.0

    monkeypatch.setattr(bj, "prefill_case", case)
    monkeypatch.setattr(bj.kernels, "device_props", lambda device: {"name": "stub"})
    monkeypatch.setenv("OUT", str(tmp_path))
    bj.prefill_rounds(2)
    per_round = ["default", *bj.EXAMPLES, "built-in"]
    assert calls == per_round * 2
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("alibi"))
    assert "460.0 420.0" in row and row.rstrip().endswith(f"{420 / 380:.3f}")
    saved = json.loads((tmp_path / "bench_jit_rounds.json").read_text())
    assert saved["rounds_us"]["default"] == pytest.approx([400.0, 380.0])
    sys.modules.pop("bench_jit_under_test", None)
