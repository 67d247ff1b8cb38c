"""Data-parallel training (portable_cnn.distributed): the same result on any number of ranks.

Two kinds of test:

* In one process, no MPI needed: the sharding arithmetic; BatchNorm and
  Dropout split across *threads* standing in for ranks (a barrier sums their
  arrays), against one layer given the whole batch; the trainer's
  data-parallel path on a one-rank communicator against the plain loop;
  the refusal of a multi-process launch without ``--distributed``.
* Under ``mpiexec -n 2`` and ``-n 3`` (tests/mpi_worker.py and the command
  line): float64 parameters equal to one process's within 1e-12 relative for
  the default digits net, ResNet-20 and a net with BatchNorm1d/2d and
  Dropout, with short last batches and uneven and empty shards; bitwise
  equal parameters on every rank; SIGTERM and a NaN loss stopping every rank
  at the same step; one rank's exception ending the job; a run resumed on
  another number of ranks. They skip where mpi4py or ``mpiexec`` is missing,
  and fail there instead where ``PORTABLE_CNN_REQUIRE_MPI=1`` (CI sets it).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path

import mpi_worker
import numpy as np
import pytest

from portable_cnn import cli, distributed, nn, optim
from portable_cnn.checkpoint import load_checkpoint
from portable_cnn.distributed import Communicator, launcher_world_size, shard_range

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(mpi_worker.__file__).resolve()

RTOL = 1e-12  # float64, one process against N ranks: only the order of summation differs
LAUNCH_TIMEOUT = 180  # seconds for one mpiexec launch (they take 2-8 s here)


# ----------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_shard_ranges_cover_the_batch_in_order_and_balanced(size):
    for total in range(0, 12):
        ranges = [shard_range(total, rank, size) for rank in range(size)]
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        lengths = [stop - start for start, stop in ranges]
        assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)


def test_launcher_world_size_reads_each_launcher():
    assert launcher_world_size({"OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_RANK": "1"}) == (3, 1, "OMPI_COMM_WORLD_SIZE")
    assert launcher_world_size({"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5"}) == (8, 5, "SLURM_STEP_NUM_TASKS")
    # A batch script of one process sees the job's SLURM_NTASKS only: not a launch of several.
    assert launcher_world_size({"SLURM_NTASKS": "8"}) == (1, 0, None)
    assert launcher_world_size({"PMI_SIZE": "1", "PMI_RANK": "0"}) == (1, 0, None)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_launch_of_several_processes_without_distributed_is_refused(monkeypatch, capsys, rank):
    for name in distributed.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", str(rank))
    assert cli.main(["train", "--epochs", "1", "--backend", "numpy"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    if rank == 0:  # one line for the job, from rank 0
        assert err.count("\n") == 1 and "without --distributed" in err and "PMI_SIZE=2" in err
    else:
        assert err == ""


# ----------------------------------------------------------------------------- layers split across threads


class ThreadGroup:
    """Threads standing in for ranks: ``sum`` adds every thread's array, in rank order, for all of them."""

    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=30)
        self.slots = [None] * size

    def sum(self, rank, array):
        self.slots[rank] = array
        self.barrier.wait()
        total = self.slots[0]
        for other in self.slots[1:]:
            total = total + other
        self.barrier.wait()  # nobody overwrites a slot before every thread has read them all
        return total


class ThreadReplicas:
    """The ``replicas`` a layer reads (:class:`portable_cnn.distributed.BatchSplit`'s interface) for one thread."""

    def __init__(self, group, rank, total):
        self.group, self.rank = group, rank
        self.rows = (shard_range(total, rank, group.size)[0], total)

    def sum(self, array):
        return self.group.sum(self.rank, array)


def layer_split_across_threads(layer, x, dy, size):
    """Forward and backward of copies of ``layer`` on ``size`` shards of ``x``; outputs, input grads and summed param grads."""
    group, results = ThreadGroup(size), [None] * size
    errors = []

    def rank_main(rank):
        try:
            copy_ = copy.deepcopy(layer)
            copy_.replicas = ThreadReplicas(group, rank, len(x))
            start, stop = shard_range(len(x), rank, size)
            y = copy_.forward(x[start:stop])
            dx = copy_.backward(dy[start:stop])
            results[rank] = (y, dx, copy_.grads, copy_.buffers)
        except BaseException as exc:  # surfaced below, with the barrier broken so no thread waits for ever
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    y = np.concatenate([r[0] for r in results])
    dx = np.concatenate([r[1] for r in results])
    grads = {key: sum(r[2][key] for r in results) for key in results[0][2]}
    return y, dx, grads, [r[3] for r in results]


@pytest.mark.parametrize("size, n", [(2, 6), (3, 7), (4, 3)])  # uneven shards; (4, 3): an empty one
@pytest.mark.parametrize("layer_type, shape", [(nn.BatchNorm2d, (5, 3, 3)), (nn.BatchNorm1d, (5,)), (nn.BatchNorm1d, (5, 4))])
def test_batchnorm_split_across_ranks_equals_one_batch(size, n, layer_type, shape):
    rng = np.random.default_rng(size * 10 + n)
    layer = layer_type(shape[0], momentum=None if n == 7 else 0.1).to("numpy", "float64")
    layer.params["weight"] = rng.normal(1.0, 0.3, shape[0])
    layer.params["bias"] = rng.normal(0.0, 0.3, shape[0])
    x = rng.normal(2.0, 1.5, (n, *shape))
    dy = rng.normal(0.0, 1.0, (n, *shape))
    whole = copy.deepcopy(layer)
    y_ref = whole.forward(x)
    dx_ref = whole.backward(dy)
    y, dx, grads, buffers = layer_split_across_threads(layer, x, dy, size)
    np.testing.assert_allclose(y, y_ref, rtol=RTOL, atol=1e-14)
    np.testing.assert_allclose(dx, dx_ref, rtol=RTOL, atol=1e-14)
    for key in ("weight", "bias"):
        np.testing.assert_allclose(grads[key], whole.grads[key], rtol=RTOL, atol=1e-14, err_msg=key)
    for rank_buffers in buffers:  # every rank keeps the running statistics of the global batch
        for key in ("running_mean", "running_var"):
            np.testing.assert_allclose(rank_buffers[key], whole.buffers[key], rtol=RTOL, err_msg=key)
        assert int(rank_buffers["num_batches_tracked"]) == 1


def test_batchnorm_of_one_value_per_channel_in_the_global_batch_is_refused():
    layer = nn.BatchNorm1d(3).to("numpy", "float64")
    with pytest.raises(ValueError, match="more than 1 value per channel.*global batch of input shape \\(1, 3\\)"):
        layer_split_across_threads(layer, np.ones((1, 3)), np.ones((1, 3)), 2)


@pytest.mark.parametrize("size, n", [(2, 5), (3, 2)])
def test_dropout_masks_are_those_of_the_global_batch(size, n):
    layer = nn.Dropout(0.4, rng=11)
    x = np.random.default_rng(0).normal(size=(n, 3, 2))
    dy = np.ones_like(x)
    reference = copy.deepcopy(layer)
    y_ref, dx_ref = reference.forward(x), reference.backward(dy)
    y, dx, _, _ = layer_split_across_threads(layer, x, dy, size)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)


# ----------------------------------------------------------------------------- the trainer on one rank


class OneRank:
    """The ``mpi4py.MPI.Comm`` calls a one-rank :class:`Communicator` makes (none reach MPI)."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1


@pytest.mark.parametrize("run", ["batchnorm-dropout", "digits-empty-shards"])
def test_the_data_parallel_path_on_one_rank_is_the_plain_loop(run):
    """Loss sums over the global count, the flat buffer, sharded batches and evaluation: the same numbers."""
    plain = mpi_worker.train(run)
    parallel = mpi_worker.train(run, Communicator(OneRank()))
    for key, value in plain.items():
        np.testing.assert_allclose(parallel[key], value, rtol=RTOL, atol=1e-15, err_msg=key)


def test_distributed_optimizer_sums_extras_in_the_gradient_buffer():
    model = nn.Sequential(nn.Linear(3, 2, rng=0)).to("numpy", "float64")
    model[0].grads = {"weight": np.ones((2, 3)), "bias": np.full(2, 2.0)}
    opt = distributed.DistributedOptimizer(optim.SGD(model, lr=0.5), Communicator(OneRank()))
    before = model[0].params["weight"].copy()
    extras = opt.step([np.float64(1.5), 4, 0.0])
    np.testing.assert_array_equal(extras, [1.5, 4.0, 0.0])
    np.testing.assert_array_equal(model[0].params["weight"], before - 0.5)
    assert opt.lr == 0.5


def test_checkpoint_and_log_record_the_world_size(tmp_path):
    trainer = mpi_worker.build("digits-empty-shards", Communicator(OneRank()))
    trainer.fit(1)
    assert trainer.history[-1].world_size == 1
    assert trainer.checkpoint().train["world_size"] == 1


# ----------------------------------------------------------------------------- under mpiexec


def _mpiexec() -> str | None:
    """The ``mpiexec`` beside this interpreter (pip's mpich puts it there), else the one on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _require_mpi():
    missing = []
    if importlib.util.find_spec("mpi4py") is None:
        missing.append("mpi4py")
    if _mpiexec() is None:
        missing.append("mpiexec")
    if missing:
        reason = f"{' and '.join(missing)} not installed (pip install 'portable-cnn[mpi]')"
        if os.environ.get("PORTABLE_CNN_REQUIRE_MPI") == "1":
            pytest.fail(f"{reason}; PORTABLE_CNN_REQUIRE_MPI=1")
        pytest.skip(reason)


def launch(ranks: int, *args, timeout=LAUNCH_TIMEOUT, cwd=None) -> subprocess.CompletedProcess:
    """``mpiexec -n ranks python args...`` with one BLAS thread per rank; the completed process."""
    _require_mpi()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               # Open MPI, if that is the mpiexec found: as root, and more ranks than cores.
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    for name in distributed.LAUNCHER_VARIABLES:  # a test run under a launcher must not look like one here
        env.pop(name, None)
    command = [_mpiexec(), "-n", str(ranks), sys.executable, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, check=False)


@lru_cache(maxsize=None)
def one_process(run: str) -> dict:
    return mpi_worker.train(run)


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    """The worker's output directory for a world size, launched once: ``exact`` on 2 ranks; ``exact,stop,nan`` on 3."""
    done = {}

    def get(ranks):
        if ranks not in done:
            out = tmp_path_factory.mktemp(f"ranks{ranks}")
            result = launch(ranks, str(WORKER), "exact" if ranks == 2 else "exact,stop,nan", str(out))
            assert result.returncode == 0, result.stdout + result.stderr
            done[ranks] = out
        return done[ranks]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("run", list(mpi_worker.RUNS))
def test_n_ranks_train_the_parameters_of_one_process(results_dir, ranks, run):
    out = results_dir(ranks)
    got = np.load(out / f"{run}.npz")
    reference = one_process(run)
    assert set(got.files) == set(reference)
    for key, value in reference.items():
        scale = np.max(np.abs(value)) if value.size else 1.0
        np.testing.assert_allclose(got[key], value, rtol=RTOL, atol=RTOL * scale, err_msg=f"{run}: {key}")
    assert json.loads((out / "identical.json").read_text()) is True  # bitwise the same on every rank


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_with_one_checkpoint(results_dir):
    out = results_dir(3)
    stops = [json.loads((out / f"stop-{rank}.json").read_text()) for rank in range(3)]
    # SIGTERM after step 3 on rank 1: its flag travels in step 4's Allreduce, and all stop there.
    assert stops == [{"step": 4, "trainer_step": 4, "path": str(out / "stopped.safetensors")}] * 3
    assert [p.name for p in out.glob("*.safetensors")] == ["stopped.safetensors"]
    assert not list(out.glob(".*.tmp"))
    ckpt = load_checkpoint(out / "stopped.safetensors")
    assert (ckpt.step, ckpt.batch_in_epoch, ckpt.train["world_size"]) == (4, 4, 3)


@pytest.mark.slow
def test_a_nan_loss_stops_every_rank_at_the_same_step(results_dir):
    out = results_dir(3)
    found = [json.loads((out / f"nan-{rank}.json").read_text()) for rank in range(3)]
    assert found[0] is not None and found == [found[0]] * 3


@pytest.mark.slow
def test_an_exception_on_one_rank_ends_the_whole_job(tmp_path):
    began = time.perf_counter()
    result = launch(2, str(WORKER), "fail", str(tmp_path), timeout=120)
    elapsed = time.perf_counter() - began
    assert result.returncode != 0
    assert "rank 1 fails on purpose" in result.stderr and "aborting all 2 ranks" in result.stderr
    assert not list(tmp_path.glob("finished-*.json"))  # rank 0 did not train its 50 epochs
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end"


def _write_digits_npz(path: Path, n: int = 90) -> Path:
    ds = mpi_worker.digits_subset(n, 30)
    np.savez(path, x=ds.x_train, y=ds.y_train, x_test=ds.x_test, y_test=ds.y_test)
    return path


@pytest.mark.slow
def test_command_line_on_two_ranks_then_resumed_on_three_is_one_process(tmp_path, capsys):
    data = _write_digits_npz(tmp_path / "digits.npz")
    common = ["train", "--data", str(data), "--dtype", "float64", "--batch-size", "8", "--backend", "numpy", "--seed", "3"]
    log = tmp_path / "log.jsonl"
    first = launch(2, "-m", "portable_cnn", *common, "--distributed", "--epochs", "1",
                   "--checkpoint", str(tmp_path / "dist.safetensors"), "--log-json", str(log), cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    lines = first.stdout.splitlines()
    assert sum(line.startswith("test accuracy:") for line in lines) == 1  # rank 0 alone speaks
    assert "distributed: 2 ranks, all-reduce over mpi, global batch 8 (about 4 per rank), global BatchNorm statistics" in lines
    assert [json.loads(line)["world_size"] for line in log.read_text().splitlines()] == [2]
    second = launch(3, "-m", "portable_cnn", "train", "--resume", str(tmp_path / "dist.safetensors"), "--distributed",
                    "--epochs", "2", "--quiet", cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.count("test accuracy:") == 1

    assert cli.main([*common, "--epochs", "2", "--quiet", "--checkpoint", str(tmp_path / "one.safetensors")]) == 0
    capsys.readouterr()
    resumed, one = load_checkpoint(tmp_path / "dist.safetensors"), load_checkpoint(tmp_path / "one.safetensors")
    assert (resumed.epoch, resumed.train["world_size"], one.train["world_size"]) == (2, 3, 1)
    for key, value in one.model_state.items():
        np.testing.assert_allclose(resumed.model_state[key], value, rtol=RTOL, atol=RTOL * np.abs(value).max(), err_msg=key)
    assert resumed.metrics["test_accuracy"] == one.metrics["test_accuracy"]


@pytest.mark.slow
def test_command_line_refuses_two_ranks_without_distributed(tmp_path):
    result = launch(2, "-m", "portable_cnn", "train", "--epochs", "1", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == "" and result.stderr.count("without --distributed") == 1
