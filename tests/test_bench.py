"""The benchmark harness: a tiny in-process run, its JSON against the documented schema, the README
block, the correctness gate and the measuring helpers. Nothing here asserts a speed."""

from __future__ import annotations

import functools
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from agalite_triton import agalite_recurrence
from bench import readme as bench_readme
from bench import run as bench_run
from bench.__main__ import main
from bench.gate import gate_gtrxl, gate_recurrence
from bench.memory import peak_bytes
from bench.sweep import default_sweep
from bench.timing import summarise

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_DOC = ROOT / "bench" / "results" / "README.md"


def _documented(section: str) -> set[str]:
    """Field names listed in the first column of a table under ``## <section>`` of the schema doc."""
    text = SCHEMA_DOC.read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in body.splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([a-z_0-9]+)`", line.split("|")[1]))
    return names


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run in-process, with a bogus extra backend that the gate must refuse."""
    out = tmp_path_factory.mktemp("bench")
    readme = out / "README.md"
    readme.write_text("# Title\n\nbefore\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\n\nafter\n")
    real = bench_run.available_backends
    bench_run.available_backends = lambda device: [*real(device), "bogus"]
    try:
        doc = main([
            "--batch", "2", "--seq-len", "3", "--memory", "3", "--budget", "0.002", "--presets", "paper",
            "--systems", "AGaLiTe-paper,GaLiTe-tmaze,GTrXL,LSTM-128,recurrence-paper", "--device", "cpu", "--threads", "1",
            "--out", str(out), "--no-progress", "--readme", str(readme), "--note", "test run",
        ])  # fmt: skip
    finally:
        bench_run.available_backends = real
        torch.set_num_threads(torch.get_num_threads())
    return doc, out, readme


def test_run_writes_the_documented_json(tiny_run):
    doc, out, _ = tiny_run
    files = sorted(out.glob("cpu-*core-*.json"))
    assert len(files) == 1 and re.fullmatch(r"cpu-\d+core-\d{4}-\d\d-\d\d\.json", files[0].name)
    stored = json.loads(files[0].read_text())
    assert stored == json.loads(json.dumps(doc))

    top = _documented("Top-level fields")
    assert top <= set(stored), sorted(top - set(stored))
    record_fields = _documented("Result records")
    assert {"throughput", "ratio_to", "peak_bytes", "p20_s", "p80_s"} <= record_fields
    for r in stored["results"]:
        assert set(r) == record_fields, sorted(set(r) ^ record_fields)

    assert stored["schema"] == "agalite-bench/1"
    assert stored["device"]["type"] == "cpu" and stored["device"]["threads"] == 1
    assert stored["versions"]["torch"] == torch.__version__
    assert stored["versions"]["python"] == sys.version.split()[0]
    assert stored["config"]["seq_len"] == 3 and stored["config"]["gtrxl_memories"] == [3]
    assert stored["config"]["rounds"] == 3 and "3 rounds" in stored["timing_method"]
    assert stored["note"] == "test run" and "--note" not in stored["command"]
    assert stored["command"].startswith("python -m bench --batch 2 --seq-len 3")
    load = stored["device"]["load_average"]
    assert load is None or (len(load["start"]) == 3 and len(load["end"]) == 3)


def test_run_measures_every_case(tiny_run):
    doc, out, _ = tiny_run
    results = doc["results"]
    assert {r["workload"] for r in results} == {
        "inference", "training", "recurrence_forward", "recurrence_forward_backward",
    }  # fmt: skip
    labels = {(r["workload"], r["label"]) for r in results}
    assert ("inference", "GTrXL-3 [recompute]") in labels and ("inference", "GTrXL-3 [kv_cache]") in labels
    assert ("training", "GTrXL-3") in labels and ("inference", "LSTM-128x2") in labels
    fused_on = doc["cpu_fused"]["galite"]["state"] == "ready"
    for workload in ("inference", "training"):
        assert (workload, "GaLiTe-tmaze [reference]") in labels
        assert ((workload, "GaLiTe-tmaze [reference, eager]") in labels) == fused_on
    for r in results:
        assert r["status"] == "ok", r
        assert 0 < r["p20_s"] <= r["median_s"] <= r["p80_s"]
        assert r["reps"] >= 3  # pooled over the CPU sweep's rounds
        assert r["throughput"] == pytest.approx(r["batch"] * r["seq_len"] / r["median_s"])
        assert r["peak_bytes"] is not None and r["peak_bytes"] > 0
        assert r["ratio"] is not None
        if r["label"] in ("AGaLiTe-paper [reference]", "recurrence-paper [reference]"):
            assert r["ratio"] == 1.0
    state = {s["label"]: s["state_bytes_per_env"] for s in doc["systems"]}
    assert state["GTrXL-3 [recompute]"] == 4 * 4 * 3 * 128 + 8  # L * M * d float32 + the counter
    assert state["AGaLiTe-paper [reference]"] == 4 * 4 * (2 * 4 * 256 + 2 * 4 * 64 + 4 * 256) + 8
    assert state["GaLiTe-tmaze [reference]"] == 4 * 4 * 4 * (64 * 128 + 128)  # L H (D K + K) float32, no tick
    png = out / doc["plot"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gate_refuses_a_backend_that_cannot_agree(tiny_run):
    doc = tiny_run[0]
    bogus = [g for g in doc["gates"] if g["backend"] == "bogus"]
    assert bogus and not any(g["passed"] for g in bogus)
    assert doc["backends"] == ["reference"]
    assert any("bogus" in s["label"] for s in doc["skipped"])
    assert not any(r["backend"] == "bogus" for r in doc["results"])


def test_gate_catches_a_wrong_recurrence():
    cpu = torch.device("cpu")

    def off_by_a_bit(*args):
        out, state = agalite_recurrence(*args, backend="reference")
        return out * (1 + 1e-3), state

    assert not gate_recurrence("wrong", cpu, impl=off_by_a_bit).passed
    same = gate_recurrence("same", cpu, impl=functools.partial(agalite_recurrence, backend="reference"))
    assert same.passed and same.max_error == 0.0
    assert gate_gtrxl(cpu).passed


def test_readme_block_is_rewritten_and_nothing_else(tiny_run):
    doc, out, readme = tiny_run
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n\n<!-- bench:start -->\n")
    assert text.endswith("<!-- bench:end -->\n\nafter\n")
    assert "old" not in text
    block = text.split("<!-- bench:start -->")[1]
    assert "a " + f"{doc['device']['cpu_count']}-core CPU" in block and "torch threads 1" in block
    assert "Note: test run" in block and "| AGaLiTe-paper [reference] |" in block
    assert f"![throughput against batch size]({doc['plot']})" in block
    assert "GTrXL-3 [kv_cache]" in block and "as a multiple of each baseline's" in block
    assert "| GaLiTe-tmaze [reference] |" in block
    if doc["cpu_fused"]["galite"]["state"] == "ready":
        assert "GaLiTe-tmaze [reference] rollout steps/s (float32), fused CPU recurrence over the eager" in block
    # python -m bench.readme <json> renders the same block from the stored file.
    other = out / "OTHER.md"  # beside the first, so that the relative links are the same
    other.write_text("x\n<!-- bench:start -->\n<!-- bench:end -->\ny\n")
    json_path = next(out.glob("*.json"))
    bench_readme.main([str(json_path), "--readme", str(other)])
    assert other.read_text() == "x\n" + text[text.index("<!-- bench:start -->") :].replace("\n\nafter\n", "\ny\n")


def test_readme_without_markers_is_an_error(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("no block here\n")
    with pytest.raises(ValueError, match="bench:start"):
        bench_readme.update_readme(path, {}, tmp_path / "x.json")


def test_cpu_peak_memory_is_exact_for_known_allocations():
    def two_at_once():
        a = torch.empty(1000, 1000)
        b = torch.empty(500, 1000)
        del a, b
        c = torch.empty(100)
        return c

    peak, method = peak_bytes(two_at_once, torch.device("cpu"))
    assert peak == 6_000_000 and "profile_memory" in method


def test_timing_summary_orders_quantiles():
    t = summarise([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.p20_s, t.median_s, t.p80_s, t.reps) == (pytest.approx(1.8), 3.0, pytest.approx(4.2), 5)


def test_sweep_selections_are_checked():
    sweep = default_sweep(torch.device("cpu"))
    assert sweep.mode == "quick" and sweep.dtypes == ("float32",)
    narrowed = sweep.narrowed(only=["recurrence"], batches=[8, 2])
    assert narrowed.workloads == ("recurrence",) and narrowed.recurrence_batches == (2, 8)
    assert narrowed.mode == "quick+custom"
    with pytest.raises(ValueError, match="--only"):
        sweep.narrowed(only=["inferance"])
    with pytest.raises(ValueError, match="--presets"):
        sweep.narrowed(presets=["huge"])
    assert default_sweep(torch.device("cpu"), full=True).gtrxl_memories == (32, 64, 128, 256)


def test_eager_rows_only_beside_the_fused_path():
    """``[reference, eager]`` is timed beside ``[reference]`` only while the latter is the fused path;
    with the fused path off both would time the same eager code."""
    from agalite_triton.reference import cpu_fused

    if cpu_fused.build_info()["state"] != "ready":
        pytest.skip("the fused CPU recurrence cannot be built here")
    cpu = torch.device("cpu")
    sweep = default_sweep(cpu).narrowed(presets=["paper"], batches=[2])

    def eager_labels() -> set[str]:
        return {c.system["label"] for c in bench_run.plan(sweep, cpu, ["reference"]) if c.system["mode"] == "eager"}

    with cpu_fused.forced(True):
        assert eager_labels() == {"AGaLiTe-paper [reference, eager]", "recurrence-paper [reference, eager]",
                                  "GaLiTe-tmaze [reference, eager]"}  # fmt: skip
    with cpu_fused.forced(False):
        assert eager_labels() == set()


def test_micro_benchmarks_are_not_collected_by_default():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]
    assert sorted(p.name for p in (ROOT / "bench").glob("test_*.py"))  # they exist, outside tests/


def test_a_failing_case_is_recorded_and_the_sweep_goes_on():
    sweep = default_sweep(torch.device("cpu")).narrowed(budget_s=0.001, rounds=2)
    system = dict(name="x", label="x", family="lstm", mode=None, backend=None, state_bytes_per_env=0)

    def out_of_memory():
        raise RuntimeError("CPU out of memory (tried to allocate 1 TiB)")

    def broken():
        raise ValueError("bad shape")

    cases = [
        bench_run.Case("inference", system, "float32", 1, 1, out_of_memory),
        bench_run.Case("inference", system, "float32", 2, 1, broken),
        bench_run.Case("inference", system, "float32", 3, 1, lambda: lambda: torch.ones(3).sum()),
    ]
    records = bench_run._measure_all(cases, torch.device("cpu"), sweep, progress=False)
    assert [r["status"] for r in records] == ["oom", "error", "ok"]
    assert "bad shape" in records[1]["error"] and records[1]["median_s"] is None
    assert records[2]["reps"] >= 2 and records[2]["throughput"] > 0
