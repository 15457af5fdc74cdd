"""Named points where the code may stop itself, so that tests interrupt a run at an exact moment
(mid-checkpoint, mid-sample, between a temp file's write and its rename) instead of after a guessed
delay. Off unless an environment variable names the point:

    MVP_DIFF_KILL_AT=NAME:N   SIGKILL this process at the N-th time it reaches point NAME (N: 1)
    MVP_DIFF_STOP_AT=NAME:N   SIGSTOP it there instead (a test resumes it with SIGCONT)

Each process counts its own hits. Points: `checkpoint` (training, state written, not yet renamed),
`sample` (Stage 3, image written, mask and entry not), `write:FILENAME` (any atomic write: temp file
complete, not yet renamed; e.g. write:manifest.jsonl, write:metrics.json).
"""

import os
import signal
from collections import Counter

KILL_ENV = "MVP_DIFF_KILL_AT"
STOP_ENV = "MVP_DIFF_STOP_AT"
_hits = Counter()


def _target(env):
    """(name, n) from `NAME:N` or `NAME`; None when unset."""
    spec = os.environ.get(env)
    if not spec:
        return None
    name, _, count = spec.rpartition(":")
    if name and count.isdigit():
        return name, int(count)
    return spec, 1


def kill_point(name):
    """Stop here if MVP_DIFF_KILL_AT or MVP_DIFF_STOP_AT names this point and hit count."""
    targets = {env: _target(env) for env in (KILL_ENV, STOP_ENV)}
    if not any(t and t[0] == name for t in targets.values()):
        return
    _hits[name] += 1
    for env, sig in ((KILL_ENV, signal.SIGKILL), (STOP_ENV, signal.SIGSTOP)):
        if targets[env] == (name, _hits[name]):
            os.kill(os.getpid(), sig)
