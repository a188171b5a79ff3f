import gc
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

DATA = pathlib.Path(__file__).parent / "data"

# No persistent compilation cache in the tests, in this process or the subprocesses it starts:
# XLA CPU's executable (de)serialisation crashed test workers intermittently (segfaults in
# `executable.serialize()` while writing an entry, in `backend_compile_and_load`, and "Failed to
# materialize symbols" while reading one), also with the cache locked.
os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
jax.config.update("jax_enable_compilation_cache", False)


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop JAX's in-memory compiled programs after each test module.

    Every worker crash on record (four clean-clone runs) was a segfault inside XLA's CPU
    backend at 79-97% of the run, late in a worker that had compiled several hundred programs
    and never released one; XLA CPU keeps each executable's JIT-ed code mapped while JAX's
    caches hold it. Modules rarely share a program, so releasing them costs little.
    """
    yield
    jax.clear_caches()
    gc.collect()


#: Test modules in the order xdist's workers take them (``--dist loadfile`` keeps a module on
#: one worker, so a module-scoped fixture is built once): the costliest first (worker seconds
#: in a clean-clone run, ``pytest --durations=0``), so that no long module starts last and runs
#: alone; modules not named follow in collection order.
COSTLIEST_FIRST = (
    "test_digits.py",
    "test_benchmarks.py",
    "test_sweep.py",
    "test_cli.py",
    "test_distributed.py",
    "test_pyro.py",
    "test_samplers.py",
    "test_arviz.py",
    "test_dtypes.py",
    "test_model_inputs.py",
    "test_emd.py",
)


def pytest_collection_modifyitems(config, items):
    """Order the tests by :data:`COSTLIEST_FIRST` (a stable sort: the rest keep their order)."""
    rank = {name: i for i, name in enumerate(COSTLIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def eight_schools_reference():
    """posteriordb reference: {"theta[1]": {"mean", "sd", "mcse_mean"}, ..., "mu", "tau"}."""
    with open(DATA / "posteriordb" / "eight_schools_reference.json") as f:
        ref = json.load(f)
    ref["data"] = {k: np.asarray(v, dtype=float) for k, v in ref["data"].items() if k != "J"}
    return ref


def reference_z(idata, ref, az):
    """Max |z| of posterior means against the reference, z = diff / sqrt(mcse^2 + mcse_ref^2),
    over mu, tau and theta (posteriordb's theta[j] is 1-indexed)."""
    summary = az.summary(idata, var_names=["mu", "tau", "theta"], kind="all")
    zs = {}
    for name, row in summary.iterrows():
        ref_name = name
        if name.startswith("theta["):
            ref_name = f"theta[{int(name[6:-1]) + 1}]"
        r = ref["params"][ref_name]
        zs[name] = (row["mean"] - r["mean"]) / np.hypot(row["mcse_mean"], r["mcse_mean"])
    return zs


@pytest.fixture(scope="session")
def device_env():
    """``device_env(n)``: the environment of a subprocess that sees ``n`` CPU devices (and,
    as every test, no persistent compilation cache)."""

    def make(num_devices: int) -> dict:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")
        env.pop("JAX_PLATFORMS", None)
        return env

    return make


@pytest.fixture(scope="session")
def on_devices(device_env):
    """``on_devices(script, n=4)``: run ``script`` in a fresh interpreter that sees ``n`` CPU
    devices and return the JSON it prints after ``RESULT`` (the device count is fixed when JAX
    starts, hence the subprocess)."""

    def run(script: str, num_devices: int = 4) -> dict:
        proc = subprocess.run(
            [sys.executable, "-c", script],
            env=device_env(num_devices),
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
        return json.loads(line[len("RESULT") :])

    return run


# A line of progress at least every minute (the slowest tests take 2-3 minutes and xdist's dots
# stay silent meanwhile): the controlling process reports how many tests have finished and which
# are running, from a daemon thread that prints only while the session runs.
PROGRESS_SECONDS = 60


class _Progress:
    def __init__(self) -> None:
        self.start = time.monotonic()
        self.finished = 0
        self.total = None
        self.running: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def line(self) -> str:
        now = time.monotonic()
        with self.lock:
            oldest = sorted(self.running.items(), key=lambda item: item[1])[:2]
            running = ", ".join(f"{node} ({now - t0:.0f} s)" for node, t0 in oldest)
            total = "?" if self.total is None else self.total
            return (
                f"[progress {(now - self.start) / 60:.1f} min] {self.finished}/{total} done"
                + (f"; running {running}" if running else "")
            )

    def loop(self) -> None:
        while not self.stop.wait(PROGRESS_SECONDS):
            sys.__stderr__.write("\n" + self.line() + "\n")
            sys.__stderr__.flush()


_progress: _Progress | None = None


def pytest_configure(config):
    global _progress
    if hasattr(config, "workerinput") or not config.getoption("numprocesses", None):
        return  # an xdist worker, or a run without workers (pytest prints as it goes)
    _progress = _Progress()
    threading.Thread(target=_progress.loop, name="test-progress", daemon=True).start()


def pytest_unconfigure(config):
    if _progress is not None:
        _progress.stop.set()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    if _progress is not None:
        _progress.total = len(ids)


def pytest_runtest_logstart(nodeid, location):
    if _progress is not None:
        with _progress.lock:
            _progress.running[nodeid] = time.monotonic()


def pytest_runtest_logfinish(nodeid, location):
    if _progress is not None:
        with _progress.lock:
            if _progress.running.pop(nodeid, None) is not None:
                _progress.finished += 1
