import json
import os
import pathlib

import jax
import numpy as np
import pytest

DATA = pathlib.Path(__file__).parent / "data"

# JAX locks a persistent compilation cache only when it has a size limit; unlocked, one test
# worker can read an entry another is still writing (XLA then crashes in its deserialiser).
if jax.config.jax_compilation_cache_dir and jax.config.jax_compilation_cache_max_size == -1:
    jax.config.update("jax_compilation_cache_max_size", 16 * 2**30)


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
    """``device_env(n)``: the environment of a subprocess that sees ``n`` CPU devices and no
    persistent compilation cache (such processes would write it while the test workers read it;
    an entry read while being written crashed a worker once)."""

    def make(num_devices: int) -> dict:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")
        env.pop("JAX_PLATFORMS", None)
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
        return env

    return make
