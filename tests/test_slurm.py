"""The SLURM path, for real: a one-node cluster on localhost runs the tiny workflow (issue 7).

The session fixture starts Debian's ``munged``, ``slurmctld`` and ``slurmd`` (slurm-wlm 22.05)
as root with their own key, ports, state and log folders under a temporary directory
(``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``, one node with the machine's
CPUs and memory, no ``cgroup.conf``), waits for ``sinfo`` to show the node idle, and stops the
daemons at the end of the session, also when a test fails. The test runs the workflow with
``--profile workflow/profiles/slurm``; its map must be byte-identical to the local run's.

Where the slurm binaries are absent (a laptop) the test is skipped with the reason; CI exports
``CROPMAP_REQUIRE_SLURM=1`` (``.ci/run`` installs slurm-wlm and munge first) so it fails there
instead of skipping.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_faults import (
    MAP,
    baseline,
    job_logs,
    secret_key,
    snakemake,
    snakemake_env,
    write_config,
)

pytestmark = pytest.mark.workflow

REQUIRED = os.environ.get("CROPMAP_REQUIRE_SLURM") == "1"
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
BINARIES = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scontrol", "srun")
MEM_MB = {"train": 8000, "fetch": 4000, "stack": 4000, "predict": 4000, "chips": 2000, "labels": 2000, "mosaic": 2000}


def _unavailable() -> str | None:
    missing = [b for b in BINARIES if shutil.which(b, path=SBIN) is None]
    if missing:
        return f"slurm binaries not installed ({', '.join(missing)}): apt-get install slurm-wlm munge (CI does, see .ci/run)"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed: pip install -e '.[slurm]'"
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd runs jobs as their user)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    root: Path
    conf: Path
    bin: Path  # srun wrapper, first in PATH
    cpus: int
    mem_mb: int

    def env(self) -> dict[str, str]:
        env = snakemake_env()
        env["SLURM_CONF"] = str(self.conf)
        # The jobstep executor strips SLURM_* (SLURM_CONF too) from the srun it starts inside a job;
        # real clusters keep slurm.conf at /etc/slurm, ours lives here, so srun gets it back.
        env["PATH"] = os.pathsep.join([str(self.bin), env["PATH"], "/usr/sbin", "/sbin"])
        return env

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True, env=self.env(), timeout=60, check=check)

    def logs(self) -> str:
        return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted((self.root / "log").glob("*.log")))


def _node_line() -> tuple[str, int, int]:
    """``CPUs=.. Boards=.. ... RealMemory=..`` of this machine (``slurmd -C``), CPUs, memory."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, env=dict(os.environ, PATH=SBIN), timeout=60).stdout
    first = out.splitlines()[0] if out else ""
    line = " ".join(t for t in first.split() if not t.startswith(("NodeName=", "UpTime=")))
    cpus = int(re.search(r"CPUs=(\d+)", line).group(1)) if "CPUs=" in line else (os.cpu_count() or 1)
    mem = int(re.search(r"RealMemory=(\d+)", line).group(1)) if "RealMemory=" in line else 2000
    if "CPUs=" not in line:
        line = f"CPUs={cpus} RealMemory={mem}"
    return line, cpus, mem


def _stop(pidfile: Path) -> None:
    """SIGTERM (then SIGKILL) the daemon whose pid we recorded: only processes this fixture started."""
    if not pidfile.exists():
        return
    try:
        pid = int(pidfile.read_text().split()[0])
    except (ValueError, IndexError):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        for _ in range(50):
            time.sleep(0.1)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = _unavailable()
    if reason:
        if REQUIRED:
            pytest.fail(f"CROPMAP_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    for d in ("state", "spool", "log", "bin"):
        (root / d).mkdir()
    root.chmod(0o755)  # munged: the socket's folder must be reachable
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    node, cpus, mem = _node_line()
    host = socket.gethostname()
    conf = root / "slurm.conf"
    conf.write_text(f"""# written by tests/test_slurm.py
ClusterName=cropmap{os.getpid()}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MinJobAge=600
NodeName=cropmap NodeAddr=127.0.0.1 NodeHostname={host} {node} State=UNKNOWN
PartitionName=debug Nodes=cropmap Default=YES MaxTime=INFINITE State=UP
""")
    (root / "bin" / "srun").write_text(f'#!/bin/sh\nSLURM_CONF={conf} exec {shutil.which("srun", path=SBIN)} "$@"\n')
    (root / "bin" / "srun").chmod(0o755)
    cluster = Cluster(root, conf, root / "bin", cpus, mem)
    env = cluster.env()
    try:
        subprocess.run([shutil.which("munged", path=SBIN), "--force", f"--socket={root}/munge.sock", f"--key-file={key}",
                        f"--log-file={root}/log/munged.log", f"--pid-file={root}/munged.pid", f"--seed-file={root}/munge.seed"],
                       check=True, env=env, timeout=60, capture_output=True)
        subprocess.run([shutil.which("slurmctld", path=SBIN)], check=True, env=env, timeout=60, capture_output=True)
        subprocess.run([shutil.which("slurmd", path=SBIN), "-N", "cropmap"], check=True, env=env, timeout=60, capture_output=True)
        deadline = time.monotonic() + 90
        state = ""
        while time.monotonic() < deadline:
            state = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.strip()
            if state == "cropmap idle":
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"the node never became idle (sinfo: {state!r})\n{cluster.logs()}")
        yield cluster
    finally:
        for pidfile in ("slurmd.pid", "slurmctld.pid", "munged.pid"):
            _stop(root / pidfile)


def test_tiny_workflow_on_slurm_writes_the_local_map(slurm_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> None:
    local = baseline(tmp_path_factory)
    wd = tmp_path_factory.mktemp("on-slurm")
    write_config(wd, secret_key(tmp_path_factory))
    cores = min(2, slurm_cluster.cpus)
    over = [f"{r}:mem_mb={slurm_cluster.mem_mb}" for r, m in MEM_MB.items() if m > slurm_cluster.mem_mb]
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(wd),
           "--profile", str(ROOT / "workflow" / "profiles" / "slurm"), "--cores", str(cores), "--jobs", "4",
           "--latency-wait", "5", "--slurm-no-account", "--slurm-status-command", "squeue",
           "--slurm-init-seconds-before-status-checks", "1", "--slurm-keep-successful-logs",
           *(["--set-resources", *over] if over else []), str(wd / MAP)]
    res = snakemake(wd, cmd=cmd, check=False, timeout=1200, env=slurm_cluster.env())
    out = res.stdout + res.stderr
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)", out)
    lines = [ln for ln in out.splitlines() if "submitted with SLURM jobid" in ln or ln.startswith("Finished jobid")]
    (wd / "slurm-jobs.txt").write_text("\n".join(lines) + "\n")
    if os.environ.get("CROPMAP_SLURM_REPORT"):
        Path(os.environ["CROPMAP_SLURM_REPORT"]).write_text("\n".join(lines) + "\n")
    assert res.returncode == 0, f"{out[-5000:]}\n{job_logs(wd)}\n{slurm_cluster.logs()}"
    rules = set(re.findall(r"slurm_logs/rule_(\w+)/", out))
    assert {"fetch", "stack", "labels", "chips", "train", "predict", "mosaic"} <= rules, rules
    for jobid, _ in submitted:  # every job really ran under SLURM, and ended well
        info = slurm_cluster.run("scontrol", "show", "job", jobid).stdout
        assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info, info
    assert (wd / MAP).read_bytes() == (local / MAP).read_bytes(), "the SLURM map differs from the local one"
