"""sweep.py --launcher slurm on a real Slurm: .ci/slurm-up starts a one-node one on the CI machine,
and CI sets SWEEP_REQUIRE_SLURM=1, so there the test runs or fails, never skips. The sweep is
`python sweep.py`, as a user starts it (its run_seed then travels to the tasks by value, so a task
imports none of the project before it starts main.py); its two seeds run as one job array."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, finished_runs, tiny_sweep_args

import sweep


def slurm_or_skip():
    if shutil.which("sbatch"):
        return
    if os.environ.get("SWEEP_REQUIRE_SLURM"):
        pytest.fail("SWEEP_REQUIRE_SLURM is set but sbatch is not on the PATH: .ci/slurm-up starts a one-node Slurm")
    pytest.skip("no Slurm here (sbatch not on the PATH): .ci/slurm-up starts a one-node one (root, Debian)")


def test_a_sweep_runs_as_a_slurm_job_array(tiny_mnist, tmp_path):
    """Two seeds, one job array: each run folder holds its final report and its own Slurm job and
    array task ids; the summary covers both. The timeout only stops a hang (a task left pending)."""
    slurm_or_skip()
    args = tiny_sweep_args(tiny_mnist)
    done = subprocess.run([sys.executable, str(ROOT / "sweep.py"), *args, "--seeds", "1,2", "--launcher", "slurm",
                           "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    folder = sweep.sweep_dir(tmp_path, args)
    assert "submitted Slurm job array" in done.stdout and "2/2 done, 0 failed" in done.stdout
    run_dirs = finished_runs(folder, (1, 2))
    jobs = []
    for seed, run in zip((1, 2), run_dirs):
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["config"]["seed"] == seed and "final" in metrics
        provenance = metrics["provenance"]
        assert provenance["slurm_job_id"] and provenance["slurm_array_task_id"] is not None
        jobs.append((provenance["slurm_job_id"], provenance["slurm_array_task_id"]))
    assert len(set(jobs)) == 2 and {str(task) for _, task in jobs} == {"0", "1"}
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["runs"] == [str(r) for r in run_dirs] and summary["metrics"]["test_nll"]["n"] == 2
    assert list((folder / "slurm").glob("*_submission.sh"))
