"""The driver ``emdppl.run``: keys, thinning, chunking, checkpoint and resume, argument checks."""

from __future__ import annotations

import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import emdppl

# ``emdppl.run`` is the function; its module is ``emdppl.driver``.
run_module = importlib.import_module("emdppl.driver")


def _counter_step(rng_key, state):
    count, total = state
    draw = jax.random.normal(rng_key)
    return (count + 1, total + draw), {"count": count + 1, "draw": draw}


# State: (steps taken, sum of every step's draw); info: the step's count and its N(0, 1) draw.
COUNTER = emdppl.Algorithm(
    init=lambda position, rng_key: (jnp.zeros((), jnp.int32), jnp.zeros(())),
    step=_counter_step,
)


def _logdensity(x):
    return -0.5 * jnp.sum(x**2 / jnp.array([1.0, 4.0]))


def _mala_state(algorithm):
    return algorithm.init(jnp.zeros((4, 2)), jax.random.key(1))


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("thinning", [1, 3])
def test_thinning_records_every_kth_step_with_its_key(thinning):
    num_steps = 8 * thinning
    key = jax.random.key(7)
    state, trace = emdppl.run(
        key, COUNTER, num_steps, COUNTER.init(None, None), thinning=thinning, progress_bar=False
    )
    recorded = np.arange(thinning - 1, num_steps, thinning)  # 0-based index of step k, 2k, ...
    np.testing.assert_array_equal(trace["count"], recorded + 1)
    # Step i draws with fold_in(rng_key, i): the documented contract that makes resume exact.
    draws = np.asarray(
        jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i)))(jnp.arange(num_steps))
    )
    np.testing.assert_allclose(trace["draw"], draws[recorded], rtol=1e-6)
    # Every step ran, recorded or not.
    assert int(state[0]) == num_steps
    np.testing.assert_allclose(float(state[1]), draws.sum(), rtol=1e-5)


@pytest.mark.parametrize("num_chunks", [1, 2, 13])
def test_chunking_does_not_change_the_result(num_chunks):
    # 13 records: 13 chunks of 1, or chunks of 7 with a shorter last one, or a single chunk.
    reference = emdppl.run(
        0, COUNTER, 26, COUNTER.init(None, None), thinning=2, num_chunks=1, progress_bar=False
    )
    result = emdppl.run(
        0,
        COUNTER,
        26,
        COUNTER.init(None, None),
        thinning=2,
        num_chunks=num_chunks,
        progress_bar=True,  # chunks are only used for progress or checkpoints
    )
    _assert_trees_equal(result, reference)


def test_a_run_without_progress_or_checkpoints_is_one_chunk(monkeypatch):
    calls = []
    chunk = run_module._chunk

    def counting(*args):
        calls.append(args[-2])  # length
        return chunk(*args)

    monkeypatch.setattr(run_module, "_chunk", counting)
    emdppl.run(0, COUNTER, 26, COUNTER.init(None, None), thinning=2, progress_bar=False)
    assert calls == [13]
    emdppl.run(0, COUNTER, 26, COUNTER.init(None, None), thinning=2, num_chunks=2)
    assert calls == [13, 7, 6]


def test_zero_steps_returns_the_state_and_no_trace():
    state = COUNTER.init(None, None)
    assert emdppl.run(0, COUNTER, 0, state, progress_bar=False) == (state, None)


@pytest.mark.parametrize(
    "num_steps, thinning", [(10, 3), (-1, 1), (10, 0)], ids=["not-multiple", "negative", "thin0"]
)
def test_bad_arguments_raise(num_steps, thinning):
    with pytest.raises(ValueError, match="multiple of thinning"):
        emdppl.run(0, COUNTER, num_steps, COUNTER.init(None, None), thinning=thinning)


def test_mcmc_thinning_keeps_every_kth_draw():
    """``MCMC(thinning=k)`` keeps draws k, 2k, ... of the unthinned chain (same keys)."""
    target = emdppl.Target.from_logdensity(_logdensity, jnp.zeros(2), num_chains=2)
    full = emdppl.MCMC("mala", num_warmup=0, num_samples=12, num_chains=2, step_size=0.5)
    thin = emdppl.MCMC("mala", num_warmup=0, num_samples=4, num_chains=2, thinning=3, step_size=0.5)
    full = full.sample(0, target, progress_bar=False)
    thin = thin.sample(0, target, progress_bar=False)
    np.testing.assert_array_equal(thin.positions, full.positions[:, 2::3])
    np.testing.assert_array_equal(thin.stats["lp"], full.stats["lp"][:, 2::3])
    _assert_trees_equal(thin.state, full.state)


class _Interrupted(Exception):
    pass


def test_checkpoint_resume_is_exact(tmp_path, monkeypatch):
    algorithm = emdppl.mcmc_algorithm("mala", _logdensity, step_size=0.5)
    num_steps, thinning, num_chunks = 60, 2, 5  # 30 records in 5 chunks of 6
    kwargs = dict(thinning=thinning, num_chunks=num_chunks, progress_bar=False)
    reference = emdppl.run(3, algorithm, num_steps, _mala_state(algorithm), **kwargs)

    # Interrupt the run right after its second checkpoint is written.
    save = run_module._save_checkpoint
    saves = []

    def save_then_interrupt(*args):
        save(*args)
        saves.append(args[2])  # records done
        if len(saves) == 2:
            raise _Interrupted

    monkeypatch.setattr(run_module, "_save_checkpoint", save_then_interrupt)
    with pytest.raises(_Interrupted):
        emdppl.run(
            3, algorithm, num_steps, _mala_state(algorithm), checkpoint_dir=tmp_path, **kwargs
        )
    assert saves == [6, 12]
    assert run_module.checkpoint_exists(tmp_path)
    monkeypatch.setattr(run_module, "_save_checkpoint", save)

    # Resume from the initial state: only the three missing chunks run, the result is the
    # uninterrupted one bit for bit.
    chunk = run_module._chunk
    chunks_run = []

    def counting_chunk(*args):
        chunks_run.append(args[3])  # first step index of the chunk
        return chunk(*args)

    monkeypatch.setattr(run_module, "_chunk", counting_chunk)
    resumed = emdppl.run(
        3, algorithm, num_steps, _mala_state(algorithm), checkpoint_dir=tmp_path, **kwargs
    )
    assert [int(start) for start in chunks_run] == [24, 36, 48]
    _assert_trees_equal(resumed, reference)

    # A finished checkpoint is returned as it is, without running a step.
    chunks_run.clear()
    again = emdppl.run(
        3, algorithm, num_steps, _mala_state(algorithm), checkpoint_dir=tmp_path, **kwargs
    )
    assert chunks_run == []
    _assert_trees_equal(again, reference)


@pytest.mark.parametrize("num_steps, thinning", [(24, 1), (48, 2)], ids=["thinning", "length"])
def test_mismatched_checkpoint_raises(tmp_path, num_steps, thinning):
    emdppl.run(
        0,
        COUNTER,
        24,
        COUNTER.init(None, None),
        thinning=2,
        checkpoint_dir=tmp_path,
        progress_bar=False,
    )
    with pytest.raises(ValueError, match="checkpoint .* belongs to a run of 24 steps"):
        emdppl.run(
            0,
            COUNTER,
            num_steps,
            COUNTER.init(None, None),
            thinning=thinning,
            checkpoint_dir=tmp_path,
            progress_bar=False,
        )


def test_checkpoint_of_another_run_is_refused_and_never_pickled(tmp_path):
    """A directory reused with other data, another seed or other settings raises instead of
    returning the old draws; the files are arrays + JSON that load without running code."""
    target = emdppl.Target.from_logdensity(_logdensity, jnp.zeros(2), num_chains=2)
    kwargs = dict(checkpoint_dir=tmp_path, num_chunks=3, progress_bar=False)
    algorithm = emdppl.mcmc_algorithm("mala", target.logdensity_fn, step_size=0.5)
    state = _mala_state(algorithm)
    emdppl.run(0, algorithm, 12, state, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.json", "chunk_00000.npz", "chunk_00001.npz", "chunk_00002.npz",
        "state_00001.npz", "state_00002.npz",  # the state after the last chunk and before it
    ]
    for path in tmp_path.glob("*.npz"):
        np.load(path, allow_pickle=False)  # plain arrays
    other_settings = emdppl.mcmc_algorithm("mala", target.logdensity_fn, step_size=0.4)
    shifted = emdppl.mcmc_algorithm("mala", lambda x: _logdensity(x - 1.0), step_size=0.5)
    for rng_key, alg in ((1, algorithm), (0, other_settings), (0, shifted)):
        with pytest.raises(ValueError, match="belongs to another run"):
            emdppl.run(rng_key, alg, 12, state, **kwargs)
    (tmp_path / "state_00002.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"state_00002.npz is unreadable.*remove"):
        emdppl.run(0, algorithm, 12, state, **kwargs)


def test_mcmc_checkpoint_reused_with_new_data_raises(tmp_path):
    """The reported case: the same checkpoint_dir with new data ran warm-up and returned the
    old draws. Now the data are part of the fingerprint."""
    import numpyro
    import numpyro.distributions as dist

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    mcmc = emdppl.MCMC("mala", num_warmup=50, num_samples=30, num_chains=2,
                       checkpoint_dir=str(tmp_path))
    first = emdppl.infer(model, mcmc, model_kwargs=dict(y=jnp.zeros(5)), progress_bar=False)
    again = emdppl.infer(model, mcmc, model_kwargs=dict(y=jnp.zeros(5)), progress_bar=False)
    np.testing.assert_array_equal(first.posterior["mu"], again.posterior["mu"])  # resumed
    with pytest.raises(ValueError, match="belongs to another run"):
        emdppl.infer(model, mcmc, model_kwargs=dict(y=jnp.ones(5)), progress_bar=False)


def test_a_process_one_chunk_behind_resumes_with_the_others(tmp_path, monkeypatch):
    """Several processes resume at the chunk every one of them wrote: a checkpoint one chunk
    ahead of the agreed count resumes from the previous state it keeps, bit for bit (the
    agreement, a collective across processes, is stubbed to one chunk behind here)."""
    algorithm = emdppl.mcmc_algorithm("mala", _logdensity, step_size=0.5)
    kwargs = dict(num_chunks=4, progress_bar=False)  # 4 chunks of 5
    reference = emdppl.run(3, algorithm, 20, _mala_state(algorithm), **kwargs)
    save, saves = run_module._save_checkpoint, []

    def save_then_interrupt(*args):
        save(*args)
        saves.append(args[2])
        if len(saves) == 3:
            raise _Interrupted

    monkeypatch.setattr(run_module, "_save_checkpoint", save_then_interrupt)
    with pytest.raises(_Interrupted):
        emdppl.run(3, algorithm, 20, _mala_state(algorithm), checkpoint_dir=tmp_path, **kwargs)
    monkeypatch.setattr(run_module, "_save_checkpoint", save)
    monkeypatch.setattr(run_module, "_agreed_done", lambda done: min(done, 10))
    chunk, starts = run_module._chunk, []
    monkeypatch.setattr(
        run_module, "_chunk", lambda *args: starts.append(int(args[3])) or chunk(*args)
    )
    resumed = emdppl.run(
        3, algorithm, 20, _mala_state(algorithm), checkpoint_dir=tmp_path, **kwargs
    )
    assert starts == [10, 15]
    _assert_trees_equal(resumed, reference)
    index = json.loads((tmp_path / "checkpoint.json").read_text())
    assert (index["done"], index["previous"]["done"]) == (20, 15)
    states = sorted(p.name for p in tmp_path.glob("state_*"))
    assert states == ["state_00002.npz", "state_00003.npz"]
    monkeypatch.setattr(run_module, "_agreed_done", lambda done: 5)  # two chunks apart
    with pytest.raises(ValueError, match="more than one chunk apart"):
        emdppl.run(3, algorithm, 20, _mala_state(algorithm), checkpoint_dir=tmp_path, **kwargs)


def test_a_checkpoint_of_another_process_layout_is_refused_before_warm_up(tmp_path):
    (tmp_path / "process_1_of_2").mkdir()
    target = emdppl.Target.from_logdensity(_logdensity, jnp.zeros(2), num_chains=2)
    mcmc = emdppl.MCMC("mala", num_warmup=10, num_samples=10, num_chains=2,
                       checkpoint_dir=str(tmp_path))
    with pytest.raises(ValueError, match="a run over 2 process.*this run has 1"):
        mcmc.sample(0, target, progress_bar=False)
