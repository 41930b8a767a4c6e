"""The launch examples in scripts/launch run as shown: torchrun single- and multi-node for GPT and BERT, and
the SLURM template under a stand-in `srun` that starts one task per rank with SLURM's variables."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed_utils import free_port

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "scripts" / "launch"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # The scripts call `torchrun` / `python`: put this interpreter's bin directory first on PATH.
    env["PATH"] = f"{tmp_path}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(OMP_NUM_THREADS="1", ITERS="4", LOG_INTERVAL="2", EVAL_INTERVAL="2", EVAL_ITERS="1", **extra)
    return env


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize(
    "model, script, tp, pp", [("gpt", "single_node.sh", 2, 1), ("bert", "multi_node.sh", 1, 2)]
)
def test_torchrun_scripts_train(tmp_path, model, script, tp, pp):
    env = _env(tmp_path, NPROC="2", TP=str(tp), PP=str(pp), MASTER_PORT=str(free_port()))
    proc = _run(["bash", str(LAUNCH / script), model], env)
    assert f"tensor-parallel {tp} x pipeline-parallel {pp} x data-parallel 1" in proc.stdout
    assert " iteration        4/       4 |" in proc.stdout
    assert "lm loss:" in proc.stdout


def test_slurm_template_runs_under_srun(tmp_path):
    """A stand-in srun starts NTASKS copies with SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, as srun does."""
    fake_srun = tmp_path / "srun"
    fake_srun.write_text(
        "#!/usr/bin/env bash\n"
        'while [[ "$1" == --* ]]; do shift; done\n'
        "pids=()\n"
        "for ((i = 0; i < SLURM_NTASKS; i++)); do\n"
        '  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!)\n'
        "done\n"
        'status=0; for p in "${pids[@]}"; do wait "$p" || status=1; done; exit $status\n'
    )
    fake_scontrol = tmp_path / "scontrol"
    fake_scontrol.write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    for f in (fake_srun, fake_scontrol):
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    env = _env(
        tmp_path,
        SLURM_NTASKS="2",
        SLURM_JOB_NODELIST="node0",
        SLURM_SUBMIT_DIR=str(ROOT),
        MASTER_PORT=str(free_port()),
        TP="1",
        SAVE=str(tmp_path / "ckpt"),
        SAVE_INTERVAL="2",
    )
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    proc = _run(["bash", str(LAUNCH / "slurm.sbatch"), "gpt"], env)
    assert "tensor-parallel 1 x pipeline-parallel 1 x data-parallel 2" in proc.stdout
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
