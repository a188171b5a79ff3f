"""Two processes on 127.0.0.1 as one JAX runtime (CPU backend, gloo collectives), 2 fake CPU
devices each: the chains split over the 4 devices of both processes, every process gets all
the draws, they agree with one process on 4 devices, and per-process checkpoints of a run
stopped mid-way resume it exactly. The processes are started and stopped
by the test (a timeout kills them)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

WORKER = textwrap.dedent(
    """
    import json, sys
    import jax
    import emdppl  # joins the runtime EMDPPL_COORDINATOR & co. describe, if set
    import numpy as np, numpyro, numpyro.distributions as dist
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 2)); y = X @ np.array([1.0, -2.0]) + rng.normal(size=50)
    def model(X, y):
        beta = numpyro.sample("beta", dist.Normal(0.0, 10.0).expand([2]))
        numpyro.sample("y", dist.Normal(X @ beta, 1.0), obs=y)
    mcmc = emdppl.MCMC("nuts", num_warmup=200, num_samples=300, num_chains=4, devices="all")
    idata = emdppl.infer(model, mcmc, model_kwargs=dict(X=X, y=y), rng_key=5, progress_bar=False)
    checkpoint = {}
    if jax.process_count() > 1:
        # Stop both processes in the 3rd of 30 checkpoints: process 0 after writing all of it,
        # process 1 after its trace chunk and state but before its index (as if killed there),
        # then run again: they must agree on 2 chunks and give the uninterrupted draws.
        from emdppl import driver
        class Stop(Exception):
            pass
        save, write, index = driver._save_checkpoint, driver._write_arrays, jax.process_index()
        def save_then_stop(*args):
            save(*args)
            if args[5] == 2:
                raise Stop
        def write_then_stop(path, tree):
            write(path, tree)
            if path.name == "state_00002.npz":
                raise Stop
        if index == 0:
            driver._save_checkpoint = save_then_stop
        else:
            driver._write_arrays = write_then_stop
        ck = emdppl.MCMC("nuts", num_warmup=200, num_samples=300, num_chains=4, devices="all",
                         checkpoint_dir=sys.argv[1])
        try:
            emdppl.infer(model, ck, model_kwargs=dict(X=X, y=y), rng_key=5, progress_bar=False)
        except Stop:
            pass
        driver._save_checkpoint, driver._write_arrays = save, write
        own = f"{sys.argv[1]}/process_{index}_of_2/checkpoint.json"
        checkpoint["done_when_stopped"] = json.load(open(own))["done"]
        resumed = emdppl.infer(model, ck, model_kwargs=dict(X=X, y=y), rng_key=5,
                               progress_bar=False)
        checkpoint["resumed"] = resumed.posterior["beta"].values.tolist()
        try:
            ck.checkpoint_dir = sys.argv[1] + "/process_0_of_2"
            emdppl.infer(model, ck, model_kwargs=dict(X=X, y=y), rng_key=5, progress_bar=False)
        except ValueError as err:
            checkpoint["refused"] = str(err)
    # SVI's particles and EMD's batch over the same 4 devices (2 per process)
    import warnings
    warnings.simplefilter("ignore", RuntimeWarning)  # short fits: the convergence warnings
    svi = emdppl.SVI("auto_normal", num_steps=100, num_particles=8, devices="all")
    fit = svi.fit(2, model, model_kwargs=dict(X=X, y=y), progress_bar=False)
    svi_params = {k: np.asarray(v).tolist() for k, v in fit.params.items()}
    from emdppl import generators, teachers
    teacher = teachers.GaussianMixture(
        jax.numpy.array([[-1.0], [1.5]]), jax.numpy.array([0.4, 0.6]), jax.numpy.array([0.3, 0.7]))
    distilled = emdppl.distill(teacher, generators.affine(1), num_steps=20, batch_size=64,
                               num_probe_draws=0, rng_key=3, progress_bar=False, devices="all")
    emd_params = [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(distilled.state.theta)]
    print("RESULT" + json.dumps({
        "svi_params": svi_params, "emd_params": emd_params, "emd_devices": len(distilled.devices),
        "process": jax.process_index(), "num_processes": jax.process_count(),
        "devices": len(jax.devices()), "local": len(jax.local_devices()),
        "main": emdppl.distributed.is_main_process(), "checkpoint": checkpoint,
        "draws": idata.posterior["beta"].values.tolist(),
    }), flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _result(stdout: str) -> dict:
    return json.loads(next(x for x in stdout.splitlines() if x.startswith("RESULT"))[6:])


@pytest.fixture(scope="module")
def runs(device_env, tmp_path_factory):
    env = device_env(2)
    work = tmp_path_factory.mktemp("distributed")
    checkpoint_dir = str(work / "checkpoints")
    port = str(_free_port())
    # Output to files, not pipes: a process blocked writing a full pipe while the test waits
    # on the other would stop both at jax.distributed's exit barrier.
    logs = [(open(work / f"out_{i}", "w+"), open(work / f"err_{i}", "w+")) for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, checkpoint_dir],
            env=dict(
                env,
                EMDPPL_COORDINATOR=f"127.0.0.1:{port}",
                EMDPPL_NUM_PROCESSES="2",
                EMDPPL_PROCESS_ID=str(i),
            ),
            stdout=out,
            stderr=err,
            text=True,
        )
        for i, (out, err) in enumerate(logs)
    ]
    outs = []
    try:
        for proc, (out, err) in zip(procs, logs, strict=True):
            proc.wait(timeout=900)
            out.seek(0), err.seek(0)
            outs.append((out.read(), err.read()))
    finally:
        for proc in procs:
            proc.kill()
        for files in logs:
            for f in files:
                f.close()
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err[-4000:]
    single_env = device_env(4)
    single = subprocess.run(
        [sys.executable, "-c", WORKER, checkpoint_dir],
        env=single_env, capture_output=True, text=True, timeout=900,
    )
    assert single.returncode == 0, single.stderr[-4000:]
    return [_result(out) for out, _ in outs], _result(single.stdout)


def test_two_processes_form_one_runtime_and_split_the_chains(runs):
    processes, _ = runs
    assert sorted(p["process"] for p in processes) == [0, 1]
    assert all(p["num_processes"] == 2 and p["devices"] == 4 and p["local"] == 2 for p in processes)
    assert [p["main"] for p in sorted(processes, key=lambda p: p["process"])] == [True, False]


def test_every_process_gets_all_draws(runs):
    processes, _ = runs
    first, second = processes
    assert np.shape(first["draws"]) == (4, 300, 2)
    np.testing.assert_array_equal(first["draws"], second["draws"])


def test_checkpoints_per_process_resume_together_bit_for_bit(runs):
    """Stopped with process 1 one chunk (10 draws: the chunk length warm-up and sampling share,
    a divisor of 200 and 300) behind process 0, the two resume from the
    chunk both wrote and return the uninterrupted run's draws exactly; a process directory
    passed as checkpoint_dir in a 2-process run is refused (it holds a 1-process layout)."""
    processes, _ = runs
    by_index = sorted(processes, key=lambda p: p["process"])
    assert [p["checkpoint"]["done_when_stopped"] for p in by_index] == [30, 20]
    for p in processes:
        np.testing.assert_array_equal(p["checkpoint"]["resumed"], p["draws"])
        assert "holds the checkpoint of a run over 1 process(es)" in p["checkpoint"]["refused"]


def test_two_processes_agree_with_one_process_on_four_devices(runs):
    """Same seed, same chains per device: the draws agree to float round-off; asserted as
    |z| < 4 on the means (MCSE from the single-process run's ESS), p = 6.3e-5 each."""
    import arviz as az

    processes, single = runs
    many, one = np.asarray(processes[0]["draws"]), np.asarray(single["draws"])
    for i in range(2):
        mcse = float(az.mcse(one[..., i]))
        assert abs(many[..., i].mean() - one[..., i].mean()) < 4 * np.sqrt(2) * mcse


def test_svi_and_distillation_over_two_processes_match_one_process(runs):
    """SVI's ELBO particles and EMD's batch split over 4 devices of 2 processes: both processes
    end with the same parameters, equal to one process on 4 devices to float round-off (the
    same draws, summed in another order)."""
    processes, single = runs
    first, second = sorted(processes, key=lambda p: p["process"])
    assert first["emd_devices"] == second["emd_devices"] == 4
    for key in ("svi_params", "emd_params"):
        assert first[key] == second[key]
    for name, value in single["svi_params"].items():
        np.testing.assert_allclose(first["svi_params"][name], value, rtol=1e-4, atol=1e-5)
    for mine, theirs in zip(first["emd_params"], single["emd_params"], strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-5)


def test_initialize_refuses_bad_input_and_a_running_backend(monkeypatch):
    import emdppl

    with pytest.raises(ValueError, match="cpu_collectives must be 'gloo' or 'mpi'"):
        emdppl.distributed.initialize("127.0.0.1:1", 2, 0, cpu_collectives="nccl")
    with pytest.raises(RuntimeError, match="Set EMDPPL_COORDINATOR"):
        emdppl.distributed.initialize("127.0.0.1:1", 2, 0)  # this process's backend runs
    monkeypatch.setenv("EMDPPL_COORDINATOR", "127.0.0.1:1")
    monkeypatch.delenv("EMDPPL_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match="needs EMDPPL_NUM_PROCESSES and EMDPPL_PROCESS_ID"):
        emdppl.distributed.initialize_from_environment()
