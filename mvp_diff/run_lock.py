"""One run per output folder.

    with run_lock(out_dir):
        ...write under out_dir...

The lock is an OS file lock (filelock) on FOLDER/.mvp_diff.lock: the kernel releases it when its
process ends, however it ends, so a killed run never blocks the next one. Beside it,
FOLDER/.mvp_diff.lock.json records the holder (pid, host, start time, command) for the message a
second run gets, and stays behind after a kill: the next run then says whose folder it takes over.
Under `accelerate launch` / torchrun the whole world is one run: rank 0 holds the lock, the other
ranks never take it.
"""

import json
import os
import shlex
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import UserError
from .files import atomic_write_json, remove_temp_files

LOCK_NAME = ".mvp_diff.lock"
HOLDER_NAME = ".mvp_diff.lock.json"
# The variables accelerate reads a process's global rank from (accelerate/utils/environment.py).
RANK_ENVS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def is_launch_main_process():
    """Whether this process is rank 0 of its launch (or not launched as several processes at all)."""
    for env in RANK_ENVS:
        if os.environ.get(env, "").strip().isdigit():
            return int(os.environ[env]) == 0
    return True


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def read_holder(folder):
    """The holder record of FOLDER's lock, or None."""
    try:
        holder = json.loads((Path(folder) / HOLDER_NAME).read_text())
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
        return None


def describe(holder):
    if not holder:
        return "a run whose details are unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: {holder.get('command')}"


def _same_host_and_dead(holder):
    return bool(holder) and holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"])


@contextmanager
def run_lock(folder, command=None, main_process=None):
    """Hold FOLDER's run lock for the `with` block; another run holding it is a UserError naming the
    folder, the holder and what to do. Leftover temp files of killed runs' atomic writes are removed
    once the lock is held (nobody else writes there then). Non-main ranks of a launch pass through."""
    if main_process is None:
        main_process = is_launch_main_process()
    if not main_process:
        yield
        return
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK_NAME, blocking=False)
    try:
        lock.acquire()
    except Timeout:
        holder = read_holder(folder)
        if _same_host_and_dead(holder):
            what = f"a process started by that run still holds it; end that process (fuser {folder / LOCK_NAME}) and rerun"
        else:
            what = "wait for it to finish, or stop it and rerun (finished work is kept), or choose another output folder"
        raise UserError(f"{folder} is in use by another run ({describe(holder)}); {what}")
    try:
        previous = read_holder(folder)
        if previous:
            state = "no longer running" if _same_host_and_dead(previous) else "ended without releasing it"
            print(f"note: taking over {folder} from an interrupted run ({describe(previous)}; {state})", file=sys.stderr)
        remove_temp_files(folder)
        command = command or " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
        atomic_write_json(folder / HOLDER_NAME, {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "command": command})
        yield
    finally:
        try:
            (folder / HOLDER_NAME).unlink(missing_ok=True)
            if created and [p.name for p in folder.iterdir()] == [LOCK_NAME]:
                # A run that wrote nothing (bad input) leaves no empty output folder behind; removed
                # while still held, so no other run can hold the removed lock file.
                (folder / LOCK_NAME).unlink()
                folder.rmdir()
        finally:
            lock.release()

