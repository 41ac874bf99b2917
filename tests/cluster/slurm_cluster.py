"""A throwaway one-node SLURM cluster on this machine, for tests/test_slurm.py.

`install_reason()` installs Debian's slurm-wlm and munge when they are missing (apt-get, as root)
and returns why not where it cannot. `start(root)` writes slurm.conf and gres.conf from the
templates beside this file into `root`, starts munged (unless one already answers), slurmctld and
slurmd in the foreground as our own child processes, and waits for the node to be idle.
`stop(cluster)` cancels what is left and stops the daemons in the order that leaves nothing
behind: slurmd, slurmctld, then munged (only if we started it), then removes the pid files,
state folders and links we created. Nothing is purged: CI machines are fresh.

Clients (sbatch, squeue, scontrol, and Snakemake's SLURM plugin through them) find the cluster
through `cluster.env` (SLURM_CONF). Inside jobs, where Snakemake drops SLURM_CONF, they find it
through /etc/slurm/slurm.conf, a link made only where that file does not exist (else: skip).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
PACKAGES = ["slurm-wlm", "slurm-client", "munge"]
TOOLS = ["munged", "munge", "unmunge", "slurmctld", "slurmd"]
TOOLS += ["sbatch", "squeue", "scontrol", "sinfo", "scancel"]
MUNGE_RUN = Path("/run/munge")
MUNGE_KEY = Path("/etc/munge/munge.key")
# Where srun looks without SLURM_CONF. Snakemake's jobstep plugin (0.6.1) drops every SLURM_*
# variable, SLURM_CONF included, before its nested `srun` inside a job (compare
# snakemake-executor-plugin-slurm#164), so the test cluster's slurm.conf must also be found here.
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")


class ClusterUnavailable(RuntimeError):
    """This machine cannot host the test cluster (the message says why); the test skips."""


@dataclass
class SlurmCluster:
    root: Path
    node: str
    env: dict[str, str]
    daemons: list[subprocess.Popen] = field(default_factory=list)  # slurmd first, then slurmctld
    munged: subprocess.Popen | None = None  # set only when this module started munged
    created: list[Path] = field(default_factory=list)  # system paths we made; removed by stop()
    daemon_output: IO[bytes] | None = None

    def run(self, *cmd: str, timeout: float = 30) -> str:
        """A SLURM client command against this cluster; its stdout."""
        out = subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, timeout=timeout, check=True
        )
        return out.stdout

    def jobs(self) -> list[dict[str, str]]:
        """Every job slurmctld still knows (finished ones for MinJobAge), as key=value dicts."""
        text = self.run("scontrol", "-o", "show", "job")
        if "No jobs in the system" in text:
            return []
        return [_fields(line) for line in text.splitlines() if line.strip()]

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {name}\n" + "\n".join(tail))
        return "\n".join(parts)


def _fields(line: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"(\w[\w:/]*)=(\S*)", line))


def install_reason() -> str | None:
    """None when slurm and munge are usable here; else why not (after trying apt-get as root)."""
    if all(shutil.which(tool) for tool in TOOLS):
        return None
    if os.geteuid() != 0:
        return "slurm-wlm and munge are not installed, and installing them needs root"
    if not shutil.which("apt-get"):
        return "slurm-wlm and munge are not installed, and there is no apt-get to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"`{' '.join(cmd)}` failed: {error}"
        if done.returncode != 0:
            return f"`{' '.join(cmd)}` failed (rc {done.returncode}): {done.stderr[-500:]}"
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    return f"after apt-get install, still missing: {missing}" if missing else None


def node_line() -> tuple[str, str]:
    """(node name, "NodeName=... CPUs=... RealMemory=...") for this machine."""
    try:
        out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
        line = next(x for x in out.splitlines() if x.startswith("NodeName="))
        return line.split()[0].split("=", 1)[1], line.strip()
    except (OSError, StopIteration, subprocess.TimeoutExpired):
        name = socket.gethostname().split(".")[0]
        kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        return name, f"NodeName={name} CPUs={os.cpu_count()} RealMemory={kib // 1024}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        check = subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return cred.returncode == 0 and check.returncode == 0


def _start_munged(cluster: SlurmCluster) -> None:
    """Reuse a running munged; else start one (as user munge, like the Debian service does)."""
    if _munge_works():
        return
    if not MUNGE_KEY.exists():
        subprocess.run(["mungekey", "--create", "--keyfile", str(MUNGE_KEY)], check=True)
        shutil.chown(MUNGE_KEY, "munge", "munge")
        MUNGE_KEY.chmod(0o400)
        cluster.created.append(MUNGE_KEY)
    if not MUNGE_RUN.exists():
        MUNGE_RUN.mkdir(mode=0o755, parents=True)
        shutil.chown(MUNGE_RUN, "munge", "munge")
        cluster.created.append(MUNGE_RUN)
    # In the foreground, as our child: stopping it reaps it (PID 1 here may not reap daemons).
    munged = subprocess.Popen(
        [shutil.which("munged"), "--foreground"], user="munge", group="munge", extra_groups=[],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    cluster.munged = munged
    deadline = time.monotonic() + 15
    while not _munge_works():
        if munged.poll() is not None or time.monotonic() > deadline:
            munged.kill()
            raise RuntimeError(f"munged did not start: {munged.communicate()[1][-500:]!r}")
        time.sleep(0.2)


def write_config(root: Path) -> tuple[str, Path]:
    """slurm.conf and gres.conf for this machine in `root`; (node name, slurm.conf path)."""
    node, line = node_line()
    fields = {
        "@NODE_LINE@": line,
        "@NODE@": node,
        "@STATE@": str(root),
        "@CTLD_PORT@": str(_free_port()),
        "@SLURMD_PORT@": str(_free_port()),
    }
    for name in ("slurm.conf", "gres.conf"):
        text = (HERE / name).read_text()
        for key, value in fields.items():
            text = text.replace(key, value)
        (root / name).write_text(text)
    for folder in ("slurmctld", "slurmd"):
        (root / folder).mkdir(exist_ok=True)
    return node, root / "slurm.conf"


def start(root: Path, timeout: float = 60) -> SlurmCluster:
    """Start the cluster with its state under `root`; stop() it in a finally block."""
    root.mkdir(parents=True, exist_ok=True)
    node, conf = write_config(root)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = SlurmCluster(root=root, node=node, env=env)
    if os.geteuid() != 0:
        raise ClusterUnavailable("starting munged, slurmctld and slurmd here needs root")
    if DEFAULT_CONF.is_symlink() and not DEFAULT_CONF.exists():
        DEFAULT_CONF.unlink()  # dangling: left by a test run that was killed before its stop()
    if DEFAULT_CONF.exists() or DEFAULT_CONF.is_symlink():
        raise ClusterUnavailable(
            f"{DEFAULT_CONF} exists (another test cluster, or this machine's own SLURM setup), "
            "and the test cluster must not replace it: nested srun in a job reads that file"
        )
    try:
        if not DEFAULT_CONF.parent.exists():
            DEFAULT_CONF.parent.mkdir(parents=True)
            cluster.created.append(DEFAULT_CONF.parent)
        try:
            DEFAULT_CONF.symlink_to(conf)
        except FileExistsError:
            raise ClusterUnavailable(f"{DEFAULT_CONF} appeared: another test cluster") from None
        cluster.created.append(DEFAULT_CONF)
        _start_munged(cluster)
        out = cluster.daemon_output = open(root / "daemons.out", "ab")  # noqa: SIM115
        ctld = subprocess.Popen(
            ["slurmctld", "-D", "-i", "-f", str(conf)], env=env, stdout=out, stderr=out
        )
        cluster.daemons.append(ctld)
        time.sleep(0.5)
        slurmd = subprocess.Popen(
            ["slurmd", "-D", "-f", str(conf)], env=env, stdout=out, stderr=out
        )
        cluster.daemons.insert(0, slurmd)  # stopped first
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for daemon in cluster.daemons:
                if daemon.poll() is not None:
                    raise RuntimeError(f"{daemon.args[0]} exited:\n{cluster.log_tail()}")
            try:
                state = cluster.run("sinfo", "-h", "-N", "-o", "%T", timeout=10).strip()
            except subprocess.SubprocessError:
                state = ""
            if state == "idle":
                return cluster
            time.sleep(0.5)
        raise RuntimeError(f"node not idle after {timeout:.0f} s ({state!r})\n{cluster.log_tail()}")
    except BaseException:
        stop(cluster)
        raise


def stop(cluster: SlurmCluster) -> None:
    """Cancel leftover jobs, stop slurmd, slurmctld, then our munged; remove what we created."""
    if cluster.daemons and cluster.daemons[-1].poll() is None:
        subprocess.run(["scancel", "--full", "--user", str(os.getuid())], env=cluster.env,
                       capture_output=True, timeout=30)  # fmt: skip
    for daemon in cluster.daemons:  # slurmd, then slurmctld
        _stop(daemon)
    if cluster.daemon_output is not None:
        cluster.daemon_output.close()
    if cluster.munged is not None:
        _stop(cluster.munged)
        (MUNGE_RUN / "munged.pid").unlink(missing_ok=True)
    for path in reversed(cluster.created):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    for name in ("slurmctld.pid", "slurmd.pid"):
        (cluster.root / name).unlink(missing_ok=True)
    for folder in ("slurmctld", "slurmd"):
        shutil.rmtree(cluster.root / folder, ignore_errors=True)


def _stop(process: subprocess.Popen, timeout: float = 20) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
