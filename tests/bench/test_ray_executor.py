"""The Ray executor: a local Ray on 2 CPUs, offline.

One local Ray serves the whole module (starting it is the slow part). Specs run as Ray tasks and come back in
completion order; the driver alone writes the store, so Ray results equal serial ones row for row and an
interrupted study resumes without duplicates.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")  # the test extra installs it; this only guards a bare checkout

from taskbalance.bench.executor import SerialExecutor, make_executor  # noqa: E402
from taskbalance.bench.ray_executor import RayExecutor  # noqa: E402
from taskbalance.bench.runner import RunResult, RunSpec  # noqa: E402
from taskbalance.bench.store import ResultsStore  # noqa: E402
from taskbalance.bench.study import Study, run_specs  # noqa: E402
from taskbalance.bench.suites import get_suite  # noqa: E402
from taskbalance.data.tiny import tiny_data  # noqa: E402

pytestmark = pytest.mark.slow
ENVIRONMENT_BEFORE = dict(os.environ)
# the workers cannot import this test module: ship its functions by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def quick_specs(seeds: int | None = None) -> list[RunSpec]:
    suite = get_suite("quick")
    overrides = {} if seeds is None else {"seeds": list(range(seeds))}
    return Study.from_suite(suite, tiny_data().tasks, **overrides).specs()


# Functions run on the workers (module level, so that the workers can import them).
def report_threads(spec: RunSpec) -> RunResult:
    import torch

    return RunResult(spec=spec, status="done", metrics={"threads": float(torch.get_num_threads())})


def sleep_by_seed(spec: RunSpec) -> RunResult:
    """Sleeps ``seed`` tenths of a second (in short naps, so that a cancellation interrupts it)."""
    Path(spec.hyperparameters["marker_dir"], f"started-{spec.seed}").touch()
    deadline = time.monotonic() + spec.seed / 10
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return RunResult(spec=spec, status="done")


def hold_until_released(spec: RunSpec) -> RunResult:
    """Waits (at most a minute) until the file named by the hyperparameter ``hold_until`` exists."""
    path = spec.hyperparameters.get("hold_until")
    deadline = time.monotonic() + 60
    while path is not None and not Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    released = path is None or Path(path).exists()
    return RunResult(spec=spec, status="done", metrics={"released": float(released)})


def kill_worker(spec: RunSpec) -> RunResult:
    os._exit(3)


def not_a_result(spec: RunSpec) -> RunResult:
    return "done"  # type: ignore[return-value]


@pytest.fixture(scope="module")
def executor():
    started = time.perf_counter()
    with RayExecutor(num_cpus=2) as local:
        first = ray.get(ray.remote(lambda: 1).remote())
        print(f"\nlocal Ray: ray.init to first trivial result {time.perf_counter() - started:.1f} s")
        assert first == 1
        yield local
    assert not ray.is_initialized(), "the executor started Ray, so it must shut it down"


@pytest.fixture(scope="module")
def serial_rows(tmp_path_factory):
    store = ResultsStore(tmp_path_factory.mktemp("serial"))
    run_specs(quick_specs(), store, SerialExecutor())
    yield {row_key(r): r for r in store.runs()}
    store.close()


def row_key(row: dict) -> tuple:
    return (row["dataset"], row["protocol_hash"], row["method"], str(row["hyperparameters"]), row["seed"])


COMPARED = ("status", "label", "metrics", "val_metrics", "selected_epoch", "steps", "tasks", "protocol")


def descendants(pid: int) -> list[int]:
    """The processes started (directly or not) by ``pid``, from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parents[int(text.split()[0])] = int(text.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def listening_addresses(pids: list[int]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Local addresses of the TCP sockets in LISTEN state owned by ``pids`` (from /proc/net/tcp{,6})."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # host-order words
                addresses.append(ipaddress.ip_address(words))
    return addresses


def is_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def test_local_ray_is_private_and_listens_on_the_loopback_interface_only(executor):
    assert executor.node_ip_address is not None
    assert ipaddress.ip_address(executor.node_ip_address).is_loopback
    assert ray.cluster_resources()["CPU"] == 2
    ray_processes = descendants(os.getpid())
    addresses = listening_addresses([os.getpid(), *ray_processes])
    assert addresses, "Ray's servers should be listening"
    assert all(is_loopback(a) for a in addresses), addresses
    environments = {}  # of Ray's native servers (Python workers rewrite theirs with their process titles)
    for pid in ray_processes:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            if name in ("gcs_server", "raylet"):
                environments[name] = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
    assert environments.keys() == {"gcs_server", "raylet"}
    assert all(b"RAY_USAGE_STATS_ENABLED=0" in env for env in environments.values())
    # this process's own environment is left as it was
    for name in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_USAGE_STATS_ENABLED"):
        assert os.environ.get(name) == ENVIRONMENT_BEFORE.get(name)


def test_quick_study_on_ray_gives_the_serial_rows(executor, serial_rows, tmp_path: Path):
    specs = quick_specs()
    with ResultsStore(tmp_path) as store:
        assert run_specs(specs, store, executor) == (len(specs), 0)
        rows = {row_key(r): r for r in store.runs()}
        assert rows.keys() == serial_rows.keys()
        for key, row in rows.items():
            assert {c: row[c] for c in COMPARED} == {c: serial_rows[key][c] for c in COMPARED}, key
        # the driver wrote every run once; a second pass has nothing left to do
        assert run_specs(specs, store, executor) == (0, len(specs))
        assert len(store.runs()) == len(specs)


def test_interrupted_study_resumes_without_duplicates(executor, serial_rows, tmp_path: Path):
    specs = quick_specs(seeds=1)

    class Interrupted(Exception):
        pass

    def stop_after_first(result: RunResult, i: int, n: int) -> None:
        raise Interrupted

    with ResultsStore(tmp_path) as store:
        with pytest.raises(Interrupted):
            run_specs(specs, store, executor, on_result=stop_after_first)
        assert len(store.runs(status="done")) == 1
        assert len(store.runs(status="running")) == len(specs) - 1
        assert run_specs(specs, store, executor) == (len(specs) - 1, 1)
        rows = store.runs()
    assert len(rows) == len(specs) == len({row_key(r) for r in rows})
    assert all(r["status"] == "done" for r in rows)
    for row in rows:
        assert row["metrics"] == serial_rows[row_key(row)]["metrics"]


def test_results_stream_back_in_completion_order(executor, tmp_path: Path):
    # the run submitted first holds its CPU until the driver has received the three others
    release = tmp_path / "release"
    held = RunSpec("tiny", "ew", 0, {"hold_until": str(release)})
    quick = [RunSpec("tiny", "ew", seed) for seed in (1, 2, 3)]
    order = []
    for result in RayExecutor(run=hold_until_released).map([held, *quick]):
        order.append(result)
        if len(order) == len(quick):
            release.touch()
    assert sorted(r.spec.seed for r in order[:3]) == [1, 2, 3]
    assert order[-1].spec == held
    assert order[-1].metrics == {"released": 1.0}  # it did wait for the driver, so results were streamed


def test_closing_the_stream_early_cancels_the_runs_not_yet_done(executor, tmp_path: Path):
    markers = {"marker_dir": str(tmp_path)}
    # one instant run, then five of ~100 s each (they nap in short steps, so a cancellation interrupts them)
    specs = [RunSpec("tiny", "ew", 0, markers), *[RunSpec("tiny", "ew", 1000 + i, markers) for i in range(5)]]
    results = RayExecutor(run=sleep_by_seed).map(specs)
    assert next(results).spec.seed == 0
    deadline = time.monotonic() + 60
    while len(list(tmp_path.iterdir())) < 3 and time.monotonic() < deadline:  # both CPUs on long runs
        time.sleep(0.05)
    assert len(list(tmp_path.iterdir())) == 3
    results.close()  # the driver stops consuming: queued runs are dropped, running ones interrupted
    deadline = time.monotonic() + 90  # its own budget: on a loaded 2-core machine the interruption is slow
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ray.available_resources().get("CPU", 0) == 2, "the running runs were not interrupted"
    assert len(list(tmp_path.iterdir())) == 3, "a queued run started after the stream was closed"


def test_each_run_gets_as_many_torch_threads_as_cpus_it_requests(executor):
    specs = [RunSpec("tiny", "ew", seed) for seed in range(2)]
    for cpus in (1, 2):
        results = list(RayExecutor(cpus_per_run=cpus, run=report_threads).map(specs))
        assert [(r.status, r.error) for r in results] == [("done", None)] * len(specs)
        assert [r.metrics["threads"] for r in results] == [float(cpus)] * len(specs)


def test_a_dead_worker_or_a_bad_return_is_a_failed_result_not_an_exception(executor):
    spec = RunSpec("tiny", "ew", 0)
    [died] = RayExecutor(run=kill_worker).map([spec])
    assert died.status == "failed" and died.spec == spec and "Ray task failed" in (died.error or "")
    [odd] = RayExecutor(run=not_a_result).map([spec])
    assert odd.status == "failed" and "not a RunResult" in (odd.error or "")
    [bad] = executor.map([RunSpec("tiny", "ema", 0, {"beta": 7.0}, arch="tiny")])  # execute's own failure
    assert bad.status == "failed" and "beta must be in [0, 1)" in (bad.error or "")


def test_a_run_the_local_ray_can_never_fit_is_an_error_not_a_hang(executor):
    cases = [({"gpus_per_run": 1}, "GPU"), ({"cpus_per_run": 3}, "CPU"), ({"resources": {"tpu": 1}}, "tpu")]
    for kwargs, short in cases:
        with pytest.raises(ValueError, match=f"asks for .*{short}.* but the local Ray has"):
            list(RayExecutor(run=report_threads, **kwargs).map([RunSpec("tiny", "ew", 0)]))
    assert ray.is_initialized()


def test_an_executor_using_a_ray_it_did_not_start_leaves_it_running(executor):
    guest = RayExecutor(run=report_threads)
    assert len(list(guest.map([RunSpec("tiny", "ew", 0)]))) == 1
    guest.close()
    assert ray.is_initialized()


def test_bench_command_runs_on_ray(executor, tmp_path: Path):
    from typer.testing import CliRunner

    from taskbalance.cli import app

    args = ["bench", "--suite", "quick", "--seeds", "1", "--epochs", "1", "--out", str(tmp_path),
            "--executor", "ray", "--no-report"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "7 run(s) executed" in result.output
    with ResultsStore(tmp_path) as store:
        assert len(store.runs(status="done")) == 7


def test_bad_settings_are_clear_errors():
    for kwargs, message in [
        ({"num_cpus": 0}, "num_cpus"),
        ({"cpus_per_run": 0}, "cpus_per_run"),
        ({"gpus_per_run": -1}, "gpus_per_run"),
        ({"num_cpus": 1, "cpus_per_run": 2}, "exceeds"),
        ({"object_store_memory": 1024}, "object_store_memory"),
        ({"resources": {"big": 0}}, "resources"),
        ({"max_retries": -1}, "max_retries"),
        ({"address": "auto", "num_cpus": 2}, "num_cpus"),
        ({"address": " "}, "address"),
    ]:
        with pytest.raises(ValueError, match=message):
            RayExecutor(**kwargs)


def test_make_executor_knows_ray_and_rejects_mismatched_options():
    assert isinstance(make_executor(None, "ray"), RayExecutor)
    assert make_executor(2, "ray").num_cpus == 2
    assert make_executor(None, "ray", ray_address="auto").address == "auto"
    assert isinstance(make_executor(None, "serial"), SerialExecutor)
    with pytest.raises(ValueError, match="ray executor"):
        make_executor(None, "local", ray_address="auto")
    with pytest.raises(ValueError, match="own CPUs"):
        make_executor(2, "ray", ray_address="auto")
    with pytest.raises(ValueError, match="unknown executor"):
        make_executor(None, "dask")
    with pytest.raises(ValueError, match="one run at a time"):
        make_executor(2, "serial")
