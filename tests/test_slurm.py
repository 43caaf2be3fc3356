"""sweep.py --launcher slurm on a real Slurm: .ci/slurm-up starts a one-node one on the CI machine,
and CI sets SWEEP_REQUIRE_SLURM=1, so there the test runs or fails, never skips. The sweep runs in
this process; its two seeds run as a job array, each task main.py in a process of its own."""
import json
import os
import shutil

import pytest

from conftest import ROOT
from test_sweep import finished_runs, sweep_in_process, tiny

import sweep


def slurm_or_skip():
    if shutil.which("sbatch"):
        return
    if os.environ.get("SWEEP_REQUIRE_SLURM"):
        pytest.fail("SWEEP_REQUIRE_SLURM is set but sbatch is not on the PATH: .ci/slurm-up starts a one-node Slurm")
    pytest.skip("no Slurm here (sbatch not on the PATH): .ci/slurm-up starts a one-node one (root, Debian)")


def test_a_sweep_runs_as_a_slurm_job_array(tiny_mnist, tmp_path, capsys, monkeypatch):
    """Two seeds, one job array: each run folder holds its final report and its own Slurm job and
    array task ids; the summary covers both."""
    slurm_or_skip()
    monkeypatch.chdir(ROOT)            # each task starts where sbatch was called, and unpickles sweep.run_seed
    args = tiny(tiny_mnist)
    code, out, err = sweep_in_process(capsys, *args, "--seeds", "1,2", "--launcher", "slurm", "--out-dir", tmp_path)
    assert code == 0, out + err
    folder = sweep.sweep_dir(tmp_path, args)
    assert "submitted Slurm job array" in out and "2/2 done, 0 failed" in out
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
