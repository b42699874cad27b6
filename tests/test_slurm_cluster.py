"""The CI Slurm cluster itself (.ci/slurm-up): two nodes, pretend GPUs, the pyxis look-alike flags."""

from __future__ import annotations

import pytest

from tests.slurm_helpers import job_info, require_cluster, submit, wait_jobs

pytestmark = pytest.mark.slurm


def test_two_nodes_gpus_and_container_flags(tmp_path):
    env = require_cluster()
    script = tmp_path / "probe.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --nodes=2 --gpus-per-node=2 --output={tmp_path}/probe-%j.out\n"
        f"srun --container-image=none.sqsh --container-mounts={tmp_path}:{tmp_path} "
        f"--container-workdir={tmp_path} --no-container-mount-home "
        "bash -c 'echo $SLURMD_NODENAME $SLURM_GPUS_ON_NODE $FAKE_PYXIS_IMAGE $PWD'\n")
    job = submit(script, env=env, cwd=tmp_path)
    assert wait_jobs([job], timeout=60) == {job: "COMPLETED"}
    lines = sorted((tmp_path / f"probe-{job}.out").read_text().split("\n"))
    assert [ln for ln in lines if ln] == [f"n1 2 none.sqsh {tmp_path}", f"n2 2 none.sqsh {tmp_path}"]
    assert job_info(job)["ExitCode"] == "0:0"


def test_failed_job_state_and_exit_code(tmp_path):
    env = require_cluster()
    script = tmp_path / "fail.sbatch"
    script.write_text(f"#!/bin/bash\n#SBATCH --output={tmp_path}/fail-%j.out\nexit 3\n")
    job = submit(script, env=env, cwd=tmp_path)
    assert wait_jobs([job], timeout=60) == {job: "FAILED"}
    assert job_info(job)["ExitCode"] == "3:0"
