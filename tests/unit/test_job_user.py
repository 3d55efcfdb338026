"""The trainer's launch as the site's job user (hcls.trainer_executor.job_user_command), run for real: from a process
that holds only the capabilities the participant's unit grants (CAP_SETUID, CAP_SETGID, CAP_KILL, ambient, as a
non-root uid), the trainer gets the job user's uid in every slot, no capability and no way back."""

import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "custom"))
from hcls.trainer_executor import job_user_command  # noqa: E402

PYTHON = "/usr/bin/python3"  # readable by any user (the venv here may be under /root)
PROBE = """
import os, sys
status = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\\t" in l)
try:
    os.setuid(int(sys.argv[1]))
    back = "done"
except PermissionError as e:
    back = "PermissionError"
print(status["Uid"].split(), status["CapEff"].strip(), status["NoNewPrivs"].strip(), os.environ["HOME"], back)
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("capsh") or not shutil.which("setpriv"),
                    reason="needs root, capsh and setpriv to start a process with the unit's capabilities")  # fmt: skip
def test_the_trainer_runs_as_the_job_user_without_capabilities(tmp_path):
    job = pwd.getpwnam("daemon")  # a system user with a group of its name, as the role creates flare-job
    participant = 12710  # a uid that is not the job user's, holding the unit's capabilities as ambient ones
    argv = job_user_command("daemon", [PYTHON, "-c", PROBE, str(participant)], home=str(tmp_path))
    launcher = ["capsh", "--caps=cap_setuid,cap_setgid,cap_kill,cap_setpcap+eip", "--keep=1", f"--uid={participant}",
                "--addamb=cap_setuid,cap_setgid,cap_kill", "--", "-c", 'exec "$@"', "launcher", *argv]  # fmt: skip
    result = subprocess.run(launcher, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    words = result.stdout.split(" ")
    uids, cap_eff, no_new_privs, home, back = " ".join(words[:4]), *words[4:]
    assert uids == f"['{job.pw_uid}', '{job.pw_uid}', '{job.pw_uid}', '{job.pw_uid}']"
    assert int(cap_eff, 16) == 0 and no_new_privs == "1" and home == str(tmp_path)
    assert back.strip() == "PermissionError"
