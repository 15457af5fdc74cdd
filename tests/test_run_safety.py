"""Two runs on one folder and failed writes: every writing command refuses a folder another run holds
(one line, the folder untouched), takes over the lock of a run that is gone, and a failed write
(disk full) leaves nothing partial. Kills at the stages' own kill points are in test_training.py,
test_synthesis.py and below (evaluation)."""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

import boundbox
import evaluate
import inpainting
import location_describer
import random_box
import train_diffusion
from conftest import REPO, assert_user_error, run_script
from mvp_diff import files
from mvp_diff.errors import UserError
from mvp_diff.evaluation.standin import build_standin
from mvp_diff.run_lock import HOLDER_NAME, LOCK_NAME, run_lock


class Proc:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def main_in_process(script, argv, capsys, cwd):
    """script.main(argv) as the CLI runs it, from `cwd`: (exit code, stdout, stderr)."""
    capsys.readouterr()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        script.main([str(a) for a in argv])
        code = 0
    except SystemExit as exit:
        code = exit.code
    finally:
        os.chdir(old)
    out = capsys.readouterr()
    return Proc(code, out.out, out.err)


def listing(folder):
    """Every file under `folder` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# (script, argv, the folder it writes relative to the working folder)
COMMANDS = {
    "location_describer": (location_describer, ["--classname", "bottle", "--dataset", "dataset", "--outdir", "script"], "script/bottle"),
    "boundbox": (boundbox, ["--classname", "bottle", "--dataset", "dataset", "--outdir", "script"], "script/bottle"),
    "random_box": (random_box, ["--classname", "bottle", "--dataset", "dataset", "--num", 4], "output/dataset/mask/bottle"),
    "inpainting": (inpainting, ["--classname", "bottle", "--dataset", "dataset", "--no_lora", "--resolution", 64], "output/dataset/image/bottle"),
    "train_diffusion": (train_diffusion, ["--pretrained_model_name_or_path", "checkpoints/inpainting", "--train_data_dir", "dataset/bottle",
                                          "--output_dir", "output", "--resolution", 64, "--max_train_steps", 1], "output/bottle"),
    "evaluate": (evaluate, ["--classname", "bottle", "--dataset", "dataset", "--out", "output/evaluation", "--epochs", 1,
                            "--image_size", 64, "--base_channels", 8, "--parts", "segmentation", "--settings", "a"], "output/evaluation"),
}


@pytest.fixture
def work(demo_dataset_master, tmp_path):
    """A working folder with a (read-only by convention) dataset/ and an earlier run's outputs."""
    shutil.copytree(demo_dataset_master, tmp_path / "dataset")
    for _, _, folder in COMMANDS.values():
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "earlier.json").write_text("{}\n")
    return tmp_path


@pytest.mark.parametrize("name", list(COMMANDS))
def test_second_run_on_a_held_folder_refuses_in_one_line(name, work, capsys):
    """While another run holds the folder, each writing command stops at once with one line naming the
    folder, the holder's pid, host and start time and what to do, and writes nothing anywhere."""
    script, argv, folder = COMMANDS[name]
    before = listing(work)
    with run_lock(work / folder, command="python first_run.py"):
        holder = json.loads((work / folder / HOLDER_NAME).read_text())
        proc = main_in_process(script, argv, capsys, work)
    assert_user_error(proc, 1, folder, f"pid {os.getpid()} on {socket.gethostname()}", holder["started"], "python first_run.py", "wait for it")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    after = listing(work)
    after.pop(f"{folder}/{LOCK_NAME}", None)  # the first run's lock file
    assert after == before
    assert not (work / "dataset" / "bottle" / LOCK_NAME).exists() and not list((work / "dataset").rglob(f"{LOCK_NAME}*"))


def test_lock_of_a_run_that_is_gone_is_taken_over(work, capsys):
    """A run killed without releasing: its holder record is left, the OS lock is not. The next run says
    whose folder it takes over, removes the dead run's temp files, and finishes; no record stays."""
    folder = work / "output" / "dataset" / "mask" / "bottle"
    pid = dead_pid()
    record = {"pid": pid, "host": socket.gethostname(), "started": "2026-01-01 00:00:00 UTC", "command": "python random_box.py ..."}
    (folder / HOLDER_NAME).write_text(json.dumps(record))
    (folder / ".boxes.jsonl.x1y2.tmp").write_text('{"index": 0')  # a half-written file of that run
    proc = main_in_process(random_box, COMMANDS["random_box"][1], capsys, work)
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if "taking over" in line]
    assert len(notes) == 1 and f"pid {pid} on {socket.gethostname()}" in notes[0] and "no longer running" in notes[0], proc.stderr
    assert "output/dataset/mask/bottle" in notes[0]
    assert not list(folder.rglob("*.tmp")) and not (folder / HOLDER_NAME).exists()
    assert len((folder / "boxes.jsonl").read_text().splitlines()) == 4


def test_lock_held_by_a_dead_runs_child_names_it(tmp_path):
    """The lock still held although the recorded pid is gone (a child process inherited it): the message
    says so instead of suggesting to wait."""
    from filelock import FileLock

    with FileLock(tmp_path / LOCK_NAME):
        (tmp_path / HOLDER_NAME).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "started": "t", "command": "c"}))
        with pytest.raises(UserError, match="a process started by that run still holds it"):
            with run_lock(tmp_path):
                pass


def test_other_ranks_of_a_launch_never_take_the_lock(tmp_path, monkeypatch):
    with run_lock(tmp_path, command="rank 0"):
        monkeypatch.setenv("RANK", "1")
        with run_lock(tmp_path):  # passes through: rank 0 holds the lock for the whole launch
            assert json.loads((tmp_path / HOLDER_NAME).read_text())["command"] == "rank 0"
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(UserError, match="in use by another run"):
            with run_lock(tmp_path):
                pass
    assert not (tmp_path / HOLDER_NAME).exists()


# --- failed writes -------------------------------------------------------------------------------


def disk_full(monkeypatch, after=0):
    """Make the (after+1)-th and later atomic writes fail as a full disk does: data written, fsync fails."""
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) > after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", fsync)


def test_full_disk_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "records.jsonl"
    files.atomic_write_text(target, "old\n")
    disk_full(monkeypatch)
    with pytest.raises(UserError) as err:
        files.atomic_write_text(target, "new and longer\n")
    assert str(err.value).startswith(f"{target}: no space left on device") and "\n" not in str(err.value)
    assert target.read_text() == "old\n" and sorted(p.name for p in target.parent.iterdir()) == ["records.jsonl"]


def test_full_disk_stops_a_command_in_one_line(work, capsys, monkeypatch):
    """random_box.py with the disk full after 2 writes: one line naming the file, no partial file."""
    folder = work / "output" / "dataset" / "mask" / "bottle"
    disk_full(monkeypatch, after=3)  # the holder record and two box masks get written
    proc = main_in_process(random_box, COMMANDS["random_box"][1], capsys, work)
    assert_user_error(proc, 1, "output/dataset/mask/bottle/", "no space left on device")
    assert len([line for line in proc.stderr.splitlines() if "error:" in line]) == 1
    assert not list(folder.rglob("*.tmp")) and not (folder / "boxes.jsonl").exists() and not (folder / HOLDER_NAME).exists()
    monkeypatch.undo()
    proc = main_in_process(random_box, COMMANDS["random_box"][1], capsys, work)  # space freed: the rerun completes
    assert proc.returncode == 0 and len((folder / "boxes.jsonl").read_text().splitlines()) == 4


# --- evaluation killed mid-report ----------------------------------------------------------------


def test_evaluation_killed_mid_cache_and_mid_report_reruns_to_the_same_metrics(demo_dataset_master, tmp_path, capsys):
    """Killed while writing setting (b)'s cached result, then while writing metrics.json: each rerun
    ends with the metrics.json and report.md of an uninterrupted run."""
    gen = tmp_path / "gen"
    build_standin(demo_dataset_master, "bottle", gen, num=2)
    out = tmp_path / "report"
    args = ["--classname", "bottle", "--dataset", demo_dataset_master, "--generated", gen, "--out", out, "--parts", "segmentation",
            "--settings", "a,b", "--epochs", 1, "--image_size", 64, "--base_channels", 8]
    assert main_in_process(evaluate, args, capsys, tmp_path).returncode == 0
    reference = {name: (out / name).read_bytes() for name in ("metrics.json", "report.md")}
    shutil.rmtree(out)

    for point in ("write:b.json:1", "write:metrics.json:1"):
        killed = run_script("evaluate.py", *args, env={"MVP_DIFF_KILL_AT": point})
        assert killed.returncode == -9, killed.stderr[-2000:]
        assert list(out.rglob(".*.tmp")) and (out / HOLDER_NAME).exists()  # stopped between a temp write and its rename
        rerun = main_in_process(evaluate, args, capsys, tmp_path)
        assert rerun.returncode == 0 and "taking over" in rerun.stderr, rerun.stderr[-2000:]
        assert {name: (out / name).read_bytes() for name in reference} == reference, point
        assert not list(out.rglob("*.tmp")) and not (out / HOLDER_NAME).exists()


def test_kill_points_are_off_unless_named(tmp_path):
    """A kill point of another name, or a later hit, does not stop the process."""
    code = "from mvp_diff.kill_points import kill_point\nfor _ in range(2): kill_point('a')\nprint('ran')"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for spec, alive in (("b", True), ("a:3", True), ("a:2", False), ("a", False)):
        proc = subprocess.run([sys.executable, "-c", code], env=dict(env, MVP_DIFF_KILL_AT=spec), capture_output=True, text=True)
        assert (proc.returncode == 0 and "ran" in proc.stdout) == alive, (spec, proc.returncode)
