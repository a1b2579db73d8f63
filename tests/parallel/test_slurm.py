"""A real one-node SLURM cluster (slurmctld + slurmd + munged, started by a session fixture): `launch.sh --slurm`
with 2 tasks trains with DDP over gloo to the end; a job signalled mid-run (scancel --signal=USR1, then SIGTERM)
requeues twice and resumes to the same per-step losses; a Hydra multirun through submitit runs as a job array.
Skipped only where the Debian packages (slurmctld slurmd slurm-client munge) are absent; `.ci/run` installs them."""

from __future__ import annotations

import csv
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import MODEL_FAST, ROOT

BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")
MUNGED = "/usr/sbin/munged"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """A running (not zombie) process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError, ValueError):
        return False


class Cluster:
    """Daemons of a throw-away cluster in `root`; `env` is what jobs and clients need (SLURM_CONF)."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "MEMFIT_PYTHON": sys.executable,
                    "MEMFIT_LOGS": str(root / "logs")}
        for k in [k for k in self.env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del self.env[k]
        self.procs: list[subprocess.Popen] = []
        self.munged_pid: int | None = None

    def write_conf(self) -> None:
        d, host = self.root, socket.gethostname().split(".")[0]
        for sub in ("state", "spool", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        auth = "munge" if os.geteuid() == 0 else "none"
        self.conf.write_text(f"""ClusterName=memfit-test
SlurmctldHost=localhost
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/{auth}
CredType=cred/{auth}
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
NodeName={host} NodeAddr=127.0.0.1 CPUs=8 RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")  # CPUs=8 with config_overrides: two 2-task jobs run side by side on a 2-core machine

    def start(self) -> None:
        if os.geteuid() != 0:
            pytest.fail("the local SLURM cluster runs its daemons as root (SlurmUser=root); run the tests as root")
        self.write_conf()
        run_dir = Path("/run/munge")
        pidfile = run_dir / "munged.pid"
        if not (pidfile.is_file() and alive(int(pidfile.read_text().strip() or 0))):
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.chown(run_dir, "munge", "munge")
            subprocess.run(["runuser", "-u", "munge", "--", MUNGED], check=True, capture_output=True)
            self.munged_pid = int(pidfile.read_text().strip())  # ours: stopped at teardown
        logs = self.root / "log"
        for cmd, name in ((["slurmctld", "-D", "-i"], "ctld"), (["slurmd", "-D"], "slurmd")):
            with open(logs / f"{name}.out", "w") as out:
                self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT))
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if state.stdout.strip() == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM node never became idle; see {logs}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.munged_pid:
            try:
                os.kill(self.munged_pid, 15)
            except ProcessLookupError:
                pass

    def run(self, *cmd: str, check: bool = True) -> str:
        out = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr}")
        return out.stdout

    def job(self, job_id: str) -> dict[str, str]:
        fields = self.run("scontrol", "show", "job", "-o", job_id).split()
        return dict(f.split("=", 1) for f in fields if "=" in f)

    def wait(self, job_id: str, states: tuple[str, ...], timeout: float = 300, restarts: int | None = None) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info["JobState"] in states and (restarts is None or int(info["Restarts"]) == restarts):
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout} s: {self.job(job_id)}")

    def launch(self, name: str, *overrides: str) -> str:
        out = subprocess.run(["bash", str(ROOT / "launch.sh"), "--slurm", "--tasks-per-node", "2",
                              "--cpus-per-task", "1", "--time", "00:20:00", "--job-name", name, *overrides],
                             env=self.env, capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().splitlines()[-1]

    def run_dir(self, name: str, job_id: str) -> Path:
        return Path(self.env["MEMFIT_LOGS"]) / f"{name}-{job_id}"  # where launch.sh puts run directories


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    missing = [b for b in BINARIES if shutil.which(b) is None] + ([] if Path(MUNGED).exists() else [MUNGED])
    if missing:
        pytest.skip(f"Debian SLURM packages absent ({', '.join(missing)}): apt-get install slurmctld slurmd "
                    "slurm-client munge")
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


STEPS = 150  # long enough (a few seconds) that two signals land mid-run
RUN = [*MODEL_FAST, "model.arch.hidden_size=64", "model.arch.intermediate_size=128", "data.batch_size=8", "data.n_train=96", "data.n_val=8", "data.n_test=8", "logger=csv",
       "+logger.flush_logs_every_n_steps=1", "callbacks=none", f"trainer.max_steps={STEPS}",
       "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
       "trainer.enable_model_summary=false", "eval.before=false", "eval.test=false", "print_summary=false",
       "optim.lr=3e-3"]


def losses(run_dir: Path) -> dict[int, list[float]]:
    """step -> logged train/loss values over every CSV logger version (one version per job start)."""
    out: dict[int, list[float]] = {}
    for f in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(f.open()):
            if row.get("train/loss"):
                out.setdefault(int(row["step"]), []).append(float(row["train/loss"]))
    return out


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory):
    """The uninterrupted reference run; the interrupted one (same config) is submitted by its test."""
    cache = tmp_path_factory.mktemp("cache")
    return {"ref": slurm_cluster.launch("ref", *RUN, f"paths.cache_dir={cache}"), "cache": cache}


def test_launch_slurm_ddp_two_tasks_trains_to_the_end(slurm_cluster, jobs):
    info = slurm_cluster.wait(jobs["ref"], ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    run_dir = slurm_cluster.run_dir("ref", jobs["ref"])
    log = (run_dir / f"slurm-{jobs['ref']}.out").read_text()  # logs/<job>/ holds the job's output
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert info["NumTasks"] == "2" and info["NumNodes"] == "1"
    assert "distributed_backend=gloo" in log and "MEMBER: 2/2" in log and f"`max_steps={STEPS}` reached" in log
    curve = losses(run_dir)
    assert sorted(curve) == list(range(STEPS)) and all(len(v) == 1 for v in curve.values())
    assert curve[STEPS - 1][0] < 0.8 * curve[0][0]  # it learned


def test_signalled_job_requeues_and_resumes_same_losses(slurm_cluster, jobs):
    """USR1 (scancel --signal, as sbatch --signal sends before the time limit), then SIGTERM (preemption): each time
    the job checkpoints, requeues itself and resumes; the stitched loss curve equals the uninterrupted one."""
    cut = slurm_cluster.launch("cut", *RUN, f"paths.cache_dir={jobs['cache']}")
    run_dir = slurm_cluster.run_dir("cut", cut)
    for restart, (sig, after) in enumerate((("USR1", 6), ("TERM", 4)), start=1):
        version = run_dir / "csv" / f"version_{restart - 1}" / "metrics.csv"
        deadline = time.time() + 300
        while not (version.is_file() and len(version.read_text().splitlines()) > after):
            assert time.time() < deadline, f"run never logged {after} steps: {slurm_cluster.job(cut)}"
            time.sleep(0.2)
        slurm_cluster.run("scancel", f"--signal={sig}", cut)
        slurm_cluster.wait(cut, ("PENDING",), restarts=restart, timeout=120)
        # Slurm delays requeued starts; shorten that, but not to 0: slurmd rejects ("credential revoked") a restart
        # within the second its previous run was killed in
        slurm_cluster.run("scontrol", "update", f"JobId={cut}", "StartTime=now+3")
    info = slurm_cluster.wait(cut, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    log = (run_dir / f"slurm-{cut}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", log[-3000:]
    assert sorted(p.name for p in run_dir.glob("hpc_ckpt_*.ckpt")) == ["hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt"]
    assert log.count("Restored all states from the checkpoint") == 2

    got = losses(run_dir)
    versions = sorted(run_dir.glob("csv/version_*/metrics.csv"))
    assert len(versions) == 3  # three starts of the same job id
    firsts = [min(int(r["step"]) for r in csv.DictReader(v.open()) if r.get("train/loss")) for v in versions]
    assert firsts[0] == 0 and 0 < firsts[1] < firsts[2] < STEPS  # resumed mid-run, twice
    ref = losses(slurm_cluster.run_dir("ref", slurm_cluster.wait(jobs["ref"], ("COMPLETED",))["JobId"]))
    assert sorted(got) == sorted(ref) == list(range(STEPS))
    for step, values in got.items():
        for v in values:  # a step logged before the stop and again after resuming must agree too
            assert v == pytest.approx(ref[step][0], rel=1e-6, abs=1e-7), step


def test_hydra_multirun_runs_as_a_job_array(slurm_cluster, tmp_path):
    from omegaconf import OmegaConf

    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "memfit.train", "-m", "hydra/launcher=slurm", "optim.lr=1e-3,3e-3",
           "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10",
           f"hydra.sweep.dir={sweep}", *[o for o in RUN if not o.startswith("optim.lr=")], "trainer.max_steps=3", "trainer.accelerator=cpu",
           f"paths.cache_dir={tmp_path}/cache"]
    out = subprocess.run(cmd, env=slurm_cluster.env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    submitted = list((sweep / ".submitit").glob("*/*_submission.sh"))
    assert len(submitted) == 1 and "#SBATCH --array=0-1%2" in submitted[0].read_text()  # one array, two tasks
    array_id = submitted[0].parent.name
    values = []
    for task in (0, 1):
        result = sweep / ".submitit" / f"{array_id}_{task}" / f"{array_id}_{task}_0_result.pkl"
        status, ret = pickle.loads(result.read_bytes())
        assert status == "success", ret
        values.append(ret.return_value)
        assert OmegaConf.load(sweep / str(task) / ".hydra" / "config.yaml").optim.lr == [1e-3, 3e-3][task]
    assert all(v > 0 for v in values) and values[0] != values[1]  # both trained, with their own learning rate
