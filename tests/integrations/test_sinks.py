"""Sinks write scalars that read back: CSV (default), TensorBoard and MLflow (offline, local file store)."""

import math

import pytest

from taskbalance.sinks import CSVSink, MemorySink, MultiSink, Sink, open_sink, read_csv_scalars

ROWS = {
    0: {"loss/a": 0.1 + 0.2, "weight/a": 1.0 / 3.0, "conflict/cosine/a~b": -0.25},
    10: {"loss/a": 1e-30, "weight/a": 7.0, "conflict/cosine/a~b": 0.5},
}


def write(sink: Sink) -> None:
    with sink:
        for step, scalars in ROWS.items():
            sink.log_scalars(step, scalars)


def expected_series() -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for step, scalars in ROWS.items():
        for name, value in scalars.items():
            series.setdefault(name, []).append((step, value))
    return series


def test_csv_values_read_back_exactly(tmp_path):
    path = tmp_path / "run" / "metrics.csv"
    write(CSVSink(path))
    assert read_csv_scalars(path) == expected_series()


def test_csv_flushes_after_every_call(tmp_path):
    path = tmp_path / "m.csv"
    sink = CSVSink(path)
    sink.log_scalars(3, {"x": 2.5})
    assert read_csv_scalars(path) == {"x": [(3, 2.5)]}  # readable before close
    sink.close()


def test_csv_appends_across_sinks_and_can_truncate(tmp_path):
    path = tmp_path / "m.csv"
    write(CSVSink(path))
    with CSVSink(path) as sink:  # a resumed run appends, without a second header
        sink.log_scalars(20, {"loss/a": 2.0})
    series = read_csv_scalars(path)
    assert series["loss/a"] == expected_series()["loss/a"] + [(20, 2.0)]
    with CSVSink(path, append=False) as sink:
        sink.log_scalars(0, {"y": 1.0})
    assert read_csv_scalars(path) == {"y": [(0, 1.0)]}


def test_csv_keeps_non_finite_values_and_odd_names(tmp_path):
    path = tmp_path / "m.csv"
    with CSVSink(path) as sink:
        sink.log_scalars(1, {'odd, "name"': math.inf, "nan": math.nan})
    series = read_csv_scalars(path)
    assert series['odd, "name"'] == [(1, math.inf)]
    assert math.isnan(series["nan"][0][1])


def test_csv_refuses_foreign_file_and_bad_input(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a taskbalance scalar CSV"):
        CSVSink(path)
    sink = CSVSink(tmp_path / "m.csv")
    with pytest.raises(TypeError, match="real number"):
        sink.log_scalars(0, {"x": "high"})
    with pytest.raises(TypeError, match="step"):
        sink.log_scalars(-1, {"x": 1.0})
    sink.close()
    with pytest.raises(ValueError, match="closed"):
        sink.log_scalars(0, {"x": 1.0})


def test_memory_and_multi_sink_fan_out(tmp_path):
    memory = MemorySink()
    path = tmp_path / "m.csv"
    write(MultiSink([memory, CSVSink(path)]))
    assert memory.series == expected_series() == read_csv_scalars(path)
    assert memory.closed
    assert memory.last("weight/a") == 7.0


def test_open_sink_specs(tmp_path):
    sink = open_sink(f"csv:{tmp_path / 'a.csv'}")
    assert isinstance(sink, CSVSink)
    sink.close()
    both = open_sink(f"{tmp_path / 'b.csv'},csv:{tmp_path / 'c.csv'}")
    assert isinstance(both, MultiSink) and len(both.sinks) == 2
    both.close()
    with pytest.raises(ValueError, match="unknown sink spec"):
        open_sink("parquet:x")


def test_tensorboard_values_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from taskbalance.sinks import TensorBoardSink

    write(TensorBoardSink(tmp_path / "tb"))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    for name, series in expected_series().items():
        got = [(e.step, e.value) for e in events.Scalars(name)]
        assert [s for s, _ in got] == [s for s, _ in series]
        # TensorBoard stores float32
        assert [v for _, v in got] == pytest.approx([v for _, v in series], rel=1e-6, abs=1e-37)


def test_mlflow_values_read_back_from_local_file_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from taskbalance.sinks import MLflowSink
    from taskbalance.sinks.mlflow_sink import mlflow_metric_name

    uri = (tmp_path / "mlruns").as_uri()
    sink = MLflowSink(uri, experiment="diag", run_name="r1")
    write(sink)
    client = sink.client
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED"
    for name, series in expected_series().items():
        history = client.get_metric_history(sink.run_id, mlflow_metric_name(name))
        assert sorted((m.step, m.value) for m in history) == series
    assert mlflow_metric_name("conflict/cosine/a~b") == "conflict/cosine/a_b"
    # attaching to the existing run (a resumed job) adds to it and leaves its status alone
    with MLflowSink(uri, run_id=sink.run_id) as again:
        again.log_scalars(30, {"loss/a": 4.0})
    history = client.get_metric_history(sink.run_id, "loss/a")
    assert (30, 4.0) in [(m.step, m.value) for m in history]
