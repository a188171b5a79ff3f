import gc
import json
import os
import pathlib

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
