"""The pre-submit check of a SLURM request, on partitions as SLURM describes them (no cluster
needed; tests/test_slurm.py runs it against a real one)."""

import pytest

from biasseg.slurm.request import (
    CannotQuery,
    Partition,
    gpu_count,
    misfit,
    request_problem,
    sbatch_options,
    slurm_minutes,
)

CPU_PARTITION = Partition("debug", nodes=1, cpus_per_node=2, mem_mb_per_node=23081, gpus_per_node=0, max_time_min=None,
                          max_nodes=None)
GPU_PARTITION = Partition("gpu", nodes=4, cpus_per_node=64, mem_mb_per_node=512000, gpus_per_node=8, max_time_min=2880,
                          max_nodes=2)
FITTING = {"partition": "gpu", "nodes": 1, "tasks_per_node": 4, "cpus_per_task": 8, "mem_gb": 64, "gpus_per_node": 4,
           "timeout_min": 1440}


@pytest.mark.parametrize("text, minutes", [("UNLIMITED", None), ("infinite", None), ("30", 30.0), ("1:30:00", 90.0),
                                           ("2-00:00:00", 2880.0), ("00:10", 10 / 60), ("1-12", 1440 + 720.0)])
def test_slurm_time_limits_read_in_minutes(text, minutes):
    assert slurm_minutes(text) == (None if minutes is None else pytest.approx(minutes))


@pytest.mark.parametrize("gres, gpus", [("(null)", 0), ("gpu:4", 4), ("gpu:a100:8(S:0-1)", 8), ("gpu:a100:2,gpu:v100:2", 4),
                                        ("shard:8", 0)])
def test_gpus_are_counted_from_a_nodes_gres(gres, gpus):
    assert gpu_count(gres) == gpus


def test_a_fitting_request_passes_and_each_misfit_names_its_key_and_what_fits():
    assert misfit(FITTING, GPU_PARTITION) is None
    cases = {
        "cpus_per_task": ({"cpus_per_task": 32}, "hydra.launcher.cpus_per_task=32 × tasks_per_node=4 = 128 > 64 CPUs per node "
                                                  "in partition gpu; use hydra.launcher.cpus_per_task=16 or less"),
        "mem_gb": ({"mem_gb": 600}, "hydra.launcher.mem_gb=600 > 500.0 GB per node in partition gpu; use hydra.launcher.mem_gb=500 or less"),
        "gpus_per_node": ({"gpus_per_node": 16}, "hydra.launcher.gpus_per_node=16 > 8 GPUs per node in partition gpu; use "
                                                 "hydra.launcher.gpus_per_node=8 (trainer.devices)"),
        "timeout_min": ({"timeout_min": 4320}, "hydra.launcher.timeout_min=4320 > the 2880-minute time limit of partition gpu; "
                                               "use hydra.launcher.timeout_min=2880 or less"),
        "nodes": ({"nodes": 3}, "hydra.launcher.nodes=3 > 2 node(s) in partition gpu; use hydra.launcher.nodes=2 or less"),
    }
    for change, message in cases.values():
        assert misfit({**FITTING, **change}, GPU_PARTITION).startswith(message)


def test_the_launchers_defaults_do_not_fit_a_two_cpu_partition_and_a_gpu_request_not_a_cpu_one():
    defaults = {"partition": "debug", "nodes": 1, "tasks_per_node": 1, "cpus_per_task": 8, "mem_gb": 64, "gpus_per_node": 0,
                "timeout_min": 1440}
    assert misfit(defaults, CPU_PARTITION) == ("hydra.launcher.cpus_per_task=8 > 2 CPUs per node in partition debug; "
                                               "use hydra.launcher.cpus_per_task=2 or less")
    assert misfit({**defaults, "cpus_per_task": 2}, CPU_PARTITION).startswith("hydra.launcher.mem_gb=64 > 22.5 GB per node")
    on_gpu = {**defaults, "cpus_per_task": 1, "mem_gb": 4, "gpus_per_node": 1}
    assert misfit(on_gpu, CPU_PARTITION).endswith("0 GPUs per node in partition debug; use trainer=cpu (or trainer.accelerator=cpu)")


def test_the_request_becomes_the_same_sbatch_options():
    options = sbatch_options({**FITTING, "account": "proj", "additional_parameters": {"mail_type": "END"}}, "gpu")
    assert options == ["--partition=gpu", "--nodes=1", "--ntasks-per-node=4", "--cpus-per-task=8", "--mem=65536M",
                       "--gpus-per-node=4", "--time=1440", "--account=proj", "--mail-type=END"]


def test_without_slurms_commands_the_check_says_it_cannot_query(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without SLURM: the launcher warns and submits unchecked
    with pytest.raises(CannotQuery, match="scontrol is not installed"):
        request_problem(FITTING)
