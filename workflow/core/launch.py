"""Data-parallel training started by the stage itself: with `train.num_processes: N` (N > 1),
`python -m workflow train` runs `accelerate launch --multi_gpu --num_processes N -m workflow train`
on the same params file, so dvc.yaml, the Snakefile and a SLURM job run one command for one process
or many. Each rank then runs the stage (workflow/stages/train.py checks that it is one of N).

    if needs_launch(num_processes):
        check_cpu_ranks(num_processes, usable_gpus())        # before waiting for anything
        launch_ranks("train", params_file, num_processes)   # returns when every rank has; SystemExit if one failed
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from workflow.core.config import ConfigError


def in_rank() -> bool:
    """True inside a process started by a multi-process launcher (accelerate launch, torchrun)."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def needs_launch(num_processes: int) -> bool:
    return num_processes > 1 and not in_rank()


def check_cpu_ranks(num_processes: int, gpus: int) -> None:
    """Without a GPU the ranks are whole torch processes sharing this machine's cores and memory: more of
    them than the cores this process may use (its CPU affinity: a SLURM allocation's) only contend, and
    enough of them exhaust the memory, so such a `train.num_processes` is refused."""
    cores = len(os.sched_getaffinity(0))
    if not gpus and num_processes > cores:
        raise ConfigError(
            f"`train.num_processes` {num_processes} on a machine without a GPU, which gives this process "
            f"{cores} CPU cores: at most one rank per core (a single process already uses every core)"
        )


def launch_command(stage: str, params_file: str, num_processes: int, config_file: str | Path) -> list[str]:
    """accelerate's launcher (torch.distributed underneath: NCCL ranks on GPUs, gloo ranks on CPU). Precision
    and compilation are the stage's own params, so the launcher is told to add none of its defaults. Every
    GPU the process may see (CUDA_VISIBLE_DEVICES: its device slots) and a port no other launch holds."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file),
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--gpu_ids",
        "all",
        "--main_process_port",
        "0",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "workflow",
        stage,
        "--params",
        params_file,
    ]


def write_launch_config(path: Path, num_processes: int) -> None:
    """The launcher's whole configuration. Without --config_file accelerate reads the user's own
    `accelerate config` file and takes from it whatever the command leaves unset: its gpu_ids would
    replace the device slots' CUDA_VISIBLE_DEVICES, and two experiments would share cards."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import ComputeEnvironment, DistributedType

    ClusterConfig(
        compute_environment=ComputeEnvironment.LOCAL_MACHINE,
        distributed_type=DistributedType.MULTI_GPU,
        mixed_precision="no",
        use_cpu=False,
        debug=False,
        num_processes=num_processes,
        num_machines=1,
        gpu_ids="all",
    ).to_yaml_file(path)


def launch_ranks(stage: str, params_file: str, num_processes: int, locks: tuple[int, ...] = ()) -> None:
    """Run the stage as `num_processes` ranks; a rank's failure (already reported on stderr) ends this
    process with its exit code. The launcher inherits `locks` (the device slots' lock files): if this
    process is killed, the slots stay held until the launcher and its ranks are done."""
    with tempfile.TemporaryDirectory(prefix="workflow-launch-") as folder:
        config = Path(folder) / "accelerate.yaml"
        write_launch_config(config, num_processes)
        command = launch_command(stage, params_file, num_processes, config)
        done = subprocess.run(command, check=False, pass_fds=locks)
    if done.returncode:
        raise SystemExit(done.returncode)
