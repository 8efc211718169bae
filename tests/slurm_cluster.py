"""A real single-node SLURM cluster for tests: munged, slurmctld and slurmd, started per session.

Debian's packages (``apt-get install slurmctld slurmd munge slurm-client``)
are enough: the configuration is written at run time into a temp folder
(the host's short name, ``NodeAddr=127.0.0.1``, free ports, no accounting,
no cgroups, CPUs and memory below the machine's), so nothing under /etc is
touched and nothing outlives the session. munged gets its own key and
socket in that folder too (``AuthInfo=socket=...``): a system munged, if
any, is neither needed nor disturbed. Clients and jobs find the cluster
through ``SLURM_CONF``, set in ``os.environ`` while it runs.

Without the binaries (or without root, which slurmd needs) the tests skip
with the reason, so a machine without SLURM still runs the rest.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "sinfo", "squeue", "scancel")
INSTALL = "apt-get install slurmctld slurmd munge slurm-client"
START_TIMEOUT = 60.0  # seconds for the node to show idle (a loaded 2-core VM is slow)


@dataclass(frozen=True)
class Slurm:
    """What a test needs to know about the running cluster."""

    folder: Path
    conf: Path
    node: str
    cpus: int
    memory_mb: int

    def squeue(self) -> list[tuple[str, str, str]]:
        """(job id, state, job name) of every job SLURM still lists."""
        out = subprocess.run(["squeue", "-h", "-o", "%i %T %j"], capture_output=True,
                             text=True, check=True, timeout=30).stdout
        return [tuple(line.split(None, 2)) for line in out.splitlines() if line.strip()]


def skip_reason() -> str | None:
    """Why SLURM tests cannot run here, or None."""
    missing = [b for b in (*DAEMONS, *CLIENTS) if shutil.which(b) is None]
    if missing:
        return f"slurm not installed ({', '.join(missing)} missing): {INSTALL}"
    if os.geteuid() != 0:
        return "slurm tests start slurmd, which needs root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_conf(folder: Path) -> Slurm:
    """slurm.conf for one node: this host, on loopback, with half its memory to give out."""
    node = subprocess.run(["hostname", "-s"], capture_output=True, text=True,
                          check=True).stdout.strip()
    cpus = os.cpu_count() or 1
    memory_mb = int(psutil.virtual_memory().total / 2**20 * 0.5)
    for sub in ("state", "spool", "logs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=rlvrlin",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "AuthType=auth/munge",
        f"AuthInfo=socket={folder / 'munge.sock'}",
        "CredType=cred/munge",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}",
        f"SlurmdLogFile={folder / 'slurmd.log'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd.pid'}",
        "ReturnToService=2",
        "SchedulerType=sched/backfill",
        "InactiveLimit=0",
        "KillWait=2",
        "MinJobAge=5",  # finished jobs leave squeue quickly
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        "",
    ]))
    return Slurm(folder, conf, node, cpus, memory_mb)


def _wait_idle(slurm: Slurm, procs: dict[str, subprocess.Popen]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    state = ""
    while time.monotonic() < deadline:
        for name, p in procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}: "
                                   f"{_tail(slurm.folder / f'{name}.log')}")
        res = subprocess.run(["sinfo", "-h", "-n", slurm.node, "-o", "%t"],
                             capture_output=True, text=True, timeout=30)
        state = res.stdout.strip()
        if state == "idle":
            return
        time.sleep(0.3)
    raise RuntimeError(f"SLURM node {slurm.node} not idle after {START_TIMEOUT:g}s "
                       f"(sinfo: {state or res.stderr.strip()}); slurmd log: "
                       f"{_tail(slurm.folder / 'slurmd.log')}")


def _tail(path: Path, n: int = 5) -> str:
    try:
        return " | ".join(path.read_text().splitlines()[-n:])
    except OSError:
        return "(no log)"


def _stop(procs: dict[str, subprocess.Popen]) -> None:
    """Stop our daemons by PID, slurmd first (its jobs end with it), munged last."""
    for name in ("slurmd", "slurmctld", "munged"):
        p = procs.get(name)
        if p is None or p.poll() is not None:
            continue
        p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slurm]:
    """A running single-node SLURM cluster; ``SLURM_CONF`` points at it while it lives."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    info = write_conf(folder)
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(info.conf)
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, *args: str) -> None:  # output to NAME.out: pytest's stays clean
        with open(folder / f"{name}.out", "w") as out:
            procs[name] = subprocess.Popen([name, *args], stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=subprocess.STDOUT)

    try:
        start("munged", "-F", "--force", f"--key-file={key}",
              f"--socket={folder / 'munge.sock'}", f"--pid-file={folder / 'munged.pid'}",
              f"--log-file={folder / 'munged.log'}", f"--seed-file={folder / 'munged.seed'}")
        deadline = time.monotonic() + 10
        while not (folder / "munge.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        start("slurmctld", "-D", "-i", "-f", str(info.conf))
        start("slurmd", "-D", "-f", str(info.conf))
        _wait_idle(info, procs)
        yield info
    finally:
        _stop(procs)
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
