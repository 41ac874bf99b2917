"""Resuming a run after what users do: a killed run's lock, and output folders left half-empty.

Stdlib only: the Snakefile calls it on every parse, before Snakemake locks the working folder.

- **A killed run's lock.** Snakemake locks the output files of a run in `.snakemake/locks/` and
  a run killed with SIGKILL (or a lost terminal, or an out-of-memory kill) leaves the lock behind:
  every later run is refused until `snakemake --unlock`. The workflow records which process took
  the lock (`.snakemake/cnnviz-lock-owner.json`: host, pid and the process's start time); when
  that process is gone, the next run removes the stale lock and goes on (with the profile's
  `rerun-incomplete`, the jobs the kill interrupted are redone). A lock whose owner still runs,
  or that was taken on another host or by a run without the record, is left to Snakemake, which
  refuses the run and says so.
- **Half-empty output folders.** A job with a folder output records what it wrote in the folder
  (`.cnnviz-files`, JSON: every file and its size) when it ends. A folder whose record is missing,
  or that lacks a file the record names, is not a finished job's output: Snakemake clears an
  output folder before the job that makes it runs, and a cleanup that fails half-way (a file
  that cannot be removed) leaves some of the old files behind, under the old time stamp, which a
  later run would take as done. Before the DAG is built, such a folder is moved aside (renaming
  needs no permission on its files) so that Snakemake sees the output missing and redoes its job.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path

STAMP = ".cnnviz-files"  # JSON; no suffix: not taken for an atomic write's temporary
OWNER = "cnnviz-lock-owner.json"
_IGNORED = (STAMP, ".snakemake_timestamp")


# --------------------------------------------------------------------------- folder records


def folder_files(folder: Path) -> dict[str, int]:
    """Every visible file under `folder` (relative path -> size); hidden names (temporaries,
    Snakemake's time stamp, this record) are left out."""
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        files[rel.as_posix()] = path.stat().st_size
    return files


def write_stamp(folder: str | os.PathLike[str]) -> Path:
    """Record what a finished job left in its output folder (atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / STAMP
    tmp = folder / f".{STAMP}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"files": folder_files(folder)}, indent=0, sort_keys=True) + "\n")
    os.replace(tmp, stamp)
    return stamp


def half_state(folder: str | os.PathLike[str]) -> str | None:
    """Why an existing output folder is not a finished job's output, or None when it is (or when
    there is no folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    try:
        record = json.loads((folder / STAMP).read_text(encoding="utf-8"))
        files = dict(record["files"])
    except FileNotFoundError:
        return "no record of a job that finished writing it"
    except (OSError, ValueError, KeyError, TypeError):
        return "its record of the files is unreadable"
    for name, size in files.items():
        try:
            if (folder / name).stat().st_size != size:
                return f"{name} differs from what its job wrote"
        except OSError:
            return f"{name} is missing"
    return None


def set_aside(
    folders: Iterable[str | os.PathLike[str]], trash: str | os.PathLike[str]
) -> list[str]:
    """Move each half-state folder out of the way (into `trash`, then delete what can be deleted):
    the job that makes it then reruns. Returns one line per folder moved, with the reason."""
    moved = []
    for folder in map(Path, folders):
        reason = half_state(folder)
        if reason is None:
            continue
        trash = Path(trash)
        trash.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = trash / f"{stamp}-{os.getpid()}-{len(moved)}-{folder.name}"
        try:
            os.replace(folder, target)
        except OSError as error:
            moved.append(f"{folder}: {reason}; could not move it aside ({error}); delete it")
            continue
        shutil.rmtree(target, ignore_errors=True)
        moved.append(f"{folder}: {reason}; its job reruns")
    if moved:
        try:
            Path(trash).rmdir()  # empty unless a file there could not be removed
        except OSError:
            pass
    return moved


# --------------------------------------------------------------------------- stale locks


def _start_time(pid: int) -> str | None:
    """The process's start time (Linux: /proc/<pid>/stat field 22), None when it does not run."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        stat = ""
    if stat:
        fields = stat.rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else fields[19]
    try:  # no /proc: the pid alone
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return "?"


def owner_record() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid)}


def owner_gone(record: dict) -> bool:
    """True when the process that took the lock is known to be gone (same host, and its pid
    runs no longer, or runs another program started since)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    start = _start_time(record["pid"])
    return start is None or (start != "?" and record.get("start") not in (None, start))


def _owners(folder: Path) -> list[dict] | None:
    """The runs recorded as about to lock (None when there is no readable record)."""
    try:
        record = json.loads((folder / OWNER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    owners = record.get("owners") if isinstance(record, dict) else None
    if not isinstance(owners, list) or not all(isinstance(o, dict) for o in owners):
        return None
    return owners


def clear_stale_lock(snakemake_dir: str | os.PathLike[str] = ".snakemake") -> str | None:
    """Remove Snakemake's lock when every run that may have taken it is gone; returns a line
    saying so."""
    folder = Path(snakemake_dir)
    locks = sorted((folder / "locks").glob("*.lock"))
    if not locks:
        return None
    owners = _owners(folder)
    if not owners or not all(owner_gone(owner) for owner in owners):
        return None  # a run that did not say who it is, or one still going: Snakemake's --unlock
    for lock in locks:
        lock.unlink(missing_ok=True)
    (folder / OWNER).unlink(missing_ok=True)
    pids = ", ".join(str(owner.get("pid")) for owner in owners)
    return (
        f"cnnviz: removed the lock left by a run that is gone (pid {pids} on "
        f"{owners[0].get('host')}, killed?); its unfinished jobs are redone"
    )


def lock_held(snakemake_dir: str | os.PathLike[str] = ".snakemake") -> bool:
    return any((Path(snakemake_dir) / "locks").glob("*.lock"))


def dry_run(argv: list[str]) -> bool:
    """Whether snakemake's command line asks for a dry run (which takes no lock)."""
    for arg in argv[1:]:
        if arg in ("--dry-run", "--dryrun"):
            return True
        if arg.startswith("-") and not arg.startswith("--") and arg[1:].isalpha() and "n" in arg:
            return True
    return False


def claim_lock(snakemake_dir: str | os.PathLike[str] = ".snakemake") -> bool:
    """Record this process among the runs about to lock, unless a run holds the lock. Runs that
    started at the same moment are all recorded (one of them gets the lock): the lock counts as
    stale only when every one of them is gone."""
    folder = Path(snakemake_dir)
    if lock_held(folder):
        return False
    folder.mkdir(parents=True, exist_ok=True)
    owners = [o for o in _owners(folder) or [] if not owner_gone(o)] + [owner_record()]
    tmp = folder / f".{OWNER}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"owners": owners}) + "\n", encoding="utf-8")
    os.replace(tmp, folder / OWNER)
    return True
