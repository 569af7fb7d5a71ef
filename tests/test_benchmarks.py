"""The benchmark scripts stay runnable: each one imports, and has the `main` its README command runs.

They are too slow for the suite (minutes each), so this only catches what breaks them before they
start: a syntax error or a renamed component they import.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import time
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py"))


def test_there_are_benchmarks():
    assert {path.stem for path in BENCHMARKS} >= {"pipeline", "choose", "train", "deploy", "load"}


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda path: path.name)
def test_the_benchmark_imports_and_has_a_main(script: Path):
    spec = importlib.util.spec_from_file_location(f"benchmark_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the `if __name__ == "__main__"` guard keeps it from running
    assert callable(getattr(module, "main", None)), f"{script.name} has no main()"


def _load(name: str):  # noqa: ANN202 - the benchmark script as a module
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_busy_machine_gets_no_timings_written(monkeypatch):
    """Figures that hold: a load average above the threshold before starting, or other processes' CPU while
    timing, makes the verdict say why and withhold the timings."""
    import os

    machine = _load("machine")
    monkeypatch.setattr(os, "getloadavg", lambda: (machine.BUSY_LOAD_PER_CORE * machine.cores() + 1.0, 0.0, 0.0))
    verdict = machine.Verdict()
    assert not verdict.quiet and "load average" in verdict.reason() and f"{machine.BUSY_LOAD_PER_CORE} per core" in verdict.reason()
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    quiet = machine.Verdict()
    assert quiet.quiet and quiet.reason() == "quiet"
    noisy = machine.Watch()
    noisy.others_cores = machine.BUSY_OTHERS_CORES + 0.5
    quiet.saw("something", noisy)
    assert not quiet.quiet and "something" in quiet.reason()


def test_timings_repeat_and_watch_the_other_processes():
    machine = _load("machine")
    calls = []
    pauses = iter([0.01, 0.05, 0.03, 0.02, 0.04, 0.06, 0.07][: machine.REPEATS])
    timer = machine.timed(lambda: (calls.append(1), time.sleep(next(pauses))), repeats=machine.REPEATS)
    assert len(calls) == len(timer.runs) == machine.REPEATS >= 3
    assert all(run >= pause for run, pause in zip(timer.runs, [0.01, 0.05, 0.03, 0.02, 0.04, 0.06, 0.07], strict=False))
    assert timer.median == statistics.median(timer.runs) < 1.0
    assert timer.watch.others_cores is None or timer.watch.others_cores >= 0
    facts = machine.state()
    assert {"at", "cpu", "load_average_1_5_15", "versions"} <= set(facts) and "flags" in facts["cpu"]


def test_the_deploy_benchmark_counts_multiply_adds_from_the_graph(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(__import__("numpy").ones((4, 3, 3, 3), dtype="float32"), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weights],
    )
    path = tmp_path / "conv.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert _load("deploy").macs_per_image(path) == 4 * 8 * 8 * 3 * 3 * 3


def test_the_deploy_benchmark_writes_another_image_size_beside_the_default():
    deploy = _load("deploy")
    assert deploy.results_stem(112, 112, 112) == "deploy"
    assert deploy.results_stem(224, 112, 224) == "deploy_224px"
    assert deploy.results_stem(None, None, 224) == "deploy"  # params.yaml's null: each backbone's own size


def test_the_deploy_benchmarks_gemm_chains_compute_what_they_say():
    """The thread-gain probe times the GEMMs it names: the fp32 chain is the product of its weights, the INT8 chain
    is QLinearMatMul nodes of the same shapes that onnxruntime runs on uint8 input."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    deploy = _load("deploy")
    rows, steps = 16, deploy.GAIN_GEMMS
    fp32, int8 = onnx.load_from_string(deploy.gemm_chain(rows, False)), onnx.load_from_string(deploy.gemm_chain(rows, True))
    assert [node.op_type for node in fp32.graph.node] == ["MatMul"] * steps
    assert [node.op_type for node in int8.graph.node] == ["QLinearMatMul"] * steps
    x = np.random.default_rng(1).standard_normal((rows, deploy.GAIN_CHANNELS[0])).astype(np.float32)
    expected = x.astype(np.float64)
    for node in fp32.graph.node:
        expected = expected @ numpy_helper.to_array(next(i for i in fp32.graph.initializer if i.name == node.input[1])).astype(np.float64)
    got = ort.InferenceSession(fp32.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.shape == (rows, deploy.GAIN_CHANNELS[-1]) and np.allclose(got, expected, rtol=1e-3, atol=1e-4)
    image = np.random.default_rng(2).integers(0, 256, (rows, deploy.GAIN_CHANNELS[0]), dtype=np.uint8)
    out = ort.InferenceSession(int8.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": image})[0]
    assert out.dtype == np.uint8 and out.shape == (rows, deploy.GAIN_CHANNELS[-1])


def test_the_deploy_benchmark_reports_what_a_second_thread_gives_int8_and_fp32(tmp_path, monkeypatch):
    deploy = _load("deploy")
    verdict = _load("machine").Verdict()
    rows = deploy.thread_gains(verdict, pixels={"4 x 4": 16}, calls=5, rounds=2)
    assert len(rows) == 1 and rows[0]["map"] == "4 x 4"
    row = rows[0]
    for kind in ("int8", "fp32"):
        one, two = row[f"{kind}_us_1_thread"], row[f"{kind}_us_2_threads"]
        assert one > 0 and two > 0 and abs(row[f"{kind}_gain"] - one / two) < 0.02 * one / two + 0.01
        assert len(row[f"{kind}_gain_by_round"]) == 2
    assert abs(row["int8_vs_fp32_1_thread"] - row["fp32_us_1_thread"] / row["int8_us_1_thread"]) < 0.02 * row["int8_vs_fp32_1_thread"] + 0.01
    result = {"machine": _load("machine").state(), "verdict": verdict.to_dict(), "rows": rows, "run": {"calls": 5, "rounds": 2, "forced": False}}
    text = deploy.thread_gains_markdown(result)
    assert f"| 4 x 4 (16) | {row['int8_us_1_thread']} → {row['int8_us_2_threads']} µs | {row['int8_gain']}x" in text
    busy = dict(result, rows=[{"map": "4 x 4", "gemm": row["gemm"]}])
    assert "| 4 x 4 (16) | busy |" in deploy.thread_gains_markdown(busy)
    monkeypatch.setattr(deploy, "RESULTS", tmp_path)
    monkeypatch.setattr(deploy, "thread_gains", lambda verdict, calls, rounds: rows)
    deploy.run_thread_gains(force=False, calls=5, rounds=2)
    written = json.loads((tmp_path / "deploy_threads.json").read_text())
    assert written["run"] == {"calls": 5, "rounds": 2, "forced": False} and (tmp_path / "deploy_threads.md").is_file()
    assert written["rows"] == rows if written["verdict"]["quiet"] else all(set(r) == {"map", "gemm"} for r in written["rows"])


def test_the_deploy_benchmark_times_int8_against_fp32_in_pairs_on_both_thread_counts(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def conv(path: Path, channels: int) -> Path:  # the "fp32" model does 16x the work of the "int8" one
        weights = numpy_helper.from_array(np.ones((channels, 3, 3, 3), dtype="float32"), "w")
        graph = helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "conv",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 32, 32])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weights],
        )
        onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
        return path

    deploy = _load("deploy")
    verdict = _load("machine").Verdict()
    images = np.random.default_rng(0).random((32, 3, 32, 32), dtype=np.float32)
    paired = deploy.paired_ratios(conv(tmp_path / "big.onnx", 256), conv(tmp_path / "small.onnx", 16), images[:1], images, 20, verdict)
    assert set(paired) == {"default threads", "1 thread"}
    for figures in paired.values():
        for size in ("batch_1", "batch_32"):
            row = figures[size]
            assert len(row["pairs"]) == deploy.PAIRS and row["min"] <= row["median"] <= row["max"]
        assert figures["batch_32"]["median"] > 2  # the smaller model is timed as the faster one, pair by pair


def test_the_pipeline_benchmark_splits_a_run_into_start_up_stages_and_steps():
    events = [[0.0, "imported", "flows.cli"], [2.0, "enter_stage", "data"], [2.5, "leave_stage", "data"],
              [3.0, "enter_stage", "deploy"], [3.5, "note", "export"], [5.0, "note", "the variants"], [8.0, "leave_stage", "deploy"],
              [9.0, "exit", ""]]
    events[0][0] = 1.0  # imports took a second
    parts = _load("pipeline").timeline(events, wall=10.0)
    assert parts["interpreter_s"] == 1.0 and parts["imports_s"] == 1.0 and parts["prefect_api_and_flow_start_s"] == 1.0
    assert parts["stages_s"] == {"data": 0.5, "deploy": 5.0}
    assert parts["deploy_steps_s"] == {"start": 0.5, "export": 1.5, "the variants": 3.0}
    assert parts["outside_stages_s"] == 4.5 and parts["after_last_stage_s"] == 1.0 and parts["between_stages_s"] == 0.5


def test_the_pipeline_benchmark_reports_the_median_round_with_its_own_timeline():
    """Figures that hold: each whole-run figure is a median over rounds, and the timeline shown is that of the
    round whose wall time is the median, not parts of different rounds."""
    pipeline = _load("pipeline")
    rounds = [{"wall_s": 31.0, "choose": "slow round"}, {"wall_s": 25.0, "choose": "median round"}, {"wall_s": 24.0, "choose": "fast round"}]
    median = pipeline.median_run(rounds)
    assert median["wall_s"] == 25.0 and median["choose"] == "median round"
    assert median["wall_s_rounds"] == [31.0, 25.0, 24.0]  # in the order they ran
    even = pipeline.median_run(rounds[:2])
    assert even["wall_s"] == 28.0 and even["choose"] == "median round"  # the lower middle's timeline
    assert pipeline.ROUNDS >= 3


def test_the_pipeline_benchmark_keeps_an_older_runs_optional_figures_apart_with_their_date():
    """A run without --budgets does not leave the file's older flow timings at the top level, beside this
    run's machine and date, where they would read as this run's; they are kept under `earlier`, dated."""
    pipeline = _load("pipeline")
    old = {"machine": {"at": "2026-11-23 13:12 UTC"}, "strategies": {"old": 1}, "flow_warm_cache": {"seconds": 77.3}}
    now = {"machine": {"at": "2026-12-07 10:00 UTC"}, "strategies": {"new": 1}}
    second = pipeline.merged(old, now)
    assert "flow_warm_cache" not in second and second["strategies"] == {"new": 1}
    assert second["earlier"]["flow_warm_cache"] == {"value": {"seconds": 77.3}, "measured_at": "2026-11-23 13:12 UTC"}
    third = pipeline.merged(second, {"machine": {"at": "2026-12-08 09:00 UTC"}})
    assert third["earlier"]["flow_warm_cache"]["measured_at"] == "2026-11-23 13:12 UTC"  # the date stays that of the run that measured it
    measured_again = pipeline.merged(third, {"machine": {"at": "2026-12-09 09:00 UTC"}, "flow_warm_cache": {"seconds": 20.1}})
    assert measured_again["flow_warm_cache"] == {"seconds": 20.1} and "earlier" not in measured_again
    committed = json.loads(pipeline.RESULTS.read_text())
    assert "measured_at" not in committed and set(committed.get("earlier", {})).isdisjoint(committed)  # so does the committed file


def test_the_pipeline_timeline_figure_is_drawn_from_the_results_file(tmp_path):
    """The whole-run figure in the README comes from the committed results, and `--plot` draws it again."""
    from PIL import Image

    pipeline = _load("pipeline")
    results = json.loads(pipeline.RESULTS.read_text())
    drawn = pipeline.plot_timeline(results, tmp_path / "timeline.png")
    with Image.open(drawn) as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 300
    assert set(pipeline.RUNS_PLOTTED) <= set(results["strategies"])  # every bar has its run in the results
