"""DDP on CPU (gloo): subjects sharded across processes, validation exact and counted once."""

import json
import os
import socket
import subprocess
import sys

import pytest
from helpers import ROOT, TINY
from single_process import assert_distributed_run_matches_one_process


@pytest.mark.slow
def test_ddp_cpu_training_matches_single_process_validation(tmp_path):
    run_dir = tmp_path / "ddp"
    overrides = [o for o in TINY if not o.startswith("data.num_val")] + ["data.num_val=3", "trainer.max_epochs=2"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "trainer=ddp_cpu", "trainer.devices=2", *overrides,
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # 4 subjects over 2 processes x 2 patches / batch 2 = 2 steps per epoch
    assert (metrics["epoch"], metrics["global_step"]) == (1, 4)
    assert_distributed_run_matches_one_process(run_dir, overrides, tmp_path / "single",
                                               ["synthetic_004", "synthetic_005", "synthetic_006"])


@pytest.mark.slow
def test_two_simulated_nodes_train_and_validate_like_one_process(tmp_path):
    """Two "nodes" on this machine: two torchrun launches (node rank 0 and 1, one CPU process
    each) meeting at a localhost rendezvous, trainer.num_nodes=2. On a real cluster the nodes
    are other machines (MASTER_ADDR a routable host, the data and run directory on a shared
    file system; SLURM sets the ranks itself) — here they share the disk and the loopback."""
    run_dir = tmp_path / "two_nodes"
    overrides = [o for o in TINY if not o.startswith("data.num_val")] + ["data.num_val=3", "trainer.max_epochs=2"]
    port = free_port()
    launches = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1",
             "--master_addr=127.0.0.1", f"--master_port={port}", str(ROOT / "train.py"), "trainer=ddp_cpu",
             "trainer.devices=1", "trainer.num_nodes=2", *overrides, f"hydra.run.dir={run_dir}"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [launch.communicate(timeout=600)[0] for launch in launches]
    assert all(launch.returncode == 0 for launch in launches), [o[-2000:] for o in outputs]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # 4 subjects over 2 nodes x 2 patches / batch 2 = 2 steps per epoch, as with 2 processes on one node
    assert (metrics["epoch"], metrics["global_step"]) == (1, 4)
    assert_distributed_run_matches_one_process(run_dir, overrides, tmp_path / "single",
                                               ["synthetic_004", "synthetic_005", "synthetic_006"])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_batch_dice_pooled_across_processes_equals_the_whole_batch(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
         str(ROOT / "tests" / "ddp_batch_dice_worker.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=180, env={**os.environ, "RESULT_DIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        values = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert values["loss_difference"] < 1e-6
        assert values["gradient_difference"] < 1e-7
        assert values["unpooled_loss_difference"] > 1e-3  # without pooling each process sees only its half
