"""docs/distributed.md, "A search as a Ray job on this machine": run its commands as written.

The bash block is read from that page, so the test and the docs cannot drift. Its lines run
in one bash shell, in order, with a clean environment (no RAY_AUTH_* and a fresh HOME, so no
~/.ray/auth_token: the README's own exports must be what makes token authentication work).
The only changes, so parallel test runs do not collide: `ray start` gets free loopback ports
and 2 CPUs, and the addresses use the chosen dashboard port. One line is added before the
closing `kill`: a request without the token, which must be refused (so the test fails if
authentication were off). The README stops the head by its process id; every process the
head started carries a marker in its environment, and none may be left once the block ends.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from test_search import (
    MARK,
    VENV_BIN,
    _free_port,
    _marked,
    _short_tmp,
    _stop,
    _tail,
)

REPO = Path(__file__).resolve().parents[1]
HEADING = "## A search as a Ray job on this machine (token authentication)"
JOB_TIMEOUT_S = 420
STOP_TIMEOUT_S = 60
BLOCK = " --block &"
STOP = 'kill "$RAY_HEAD_PID"'


def readme_block() -> list[str]:
    """The commands of the first bash block under HEADING, continuation lines joined."""
    text = (REPO / "docs" / "distributed.md").read_text()
    section = text[text.index(HEADING):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"no bash block under {HEADING!r}"
    return [line.strip() for line in block.group(1).replace("\\\n", " ").splitlines()
            if line.strip()]


def test_readme_block_has_the_documented_shape():
    commands = readme_block()
    assert commands[0] == "export RAY_AUTH_MODE=token"
    assert commands[1].startswith("export RAY_AUTH_TOKEN=")
    assert commands[2].startswith("ray start --head --node-ip-address=127.0.0.1")
    assert commands[2].endswith(BLOCK)
    assert commands[3] == "RAY_HEAD_PID=$!"
    assert commands[4].startswith("until ray job list --address http://127.0.0.1:8265 ")
    assert commands[5].startswith("ray job submit --address http://127.0.0.1:8265 ")
    assert commands[-1] == STOP
    assert not any(c.startswith("ray stop") for c in commands)


def test_readme_local_ray_job_runs_as_written(tmp_path):
    commands = readme_block()
    assert commands[-1] == STOP
    dashboard = _free_port()
    extra = [f"--port={_free_port()}", f"--dashboard-port={dashboard}",
             f"--ray-client-server-port={_free_port()}",
             f"--dashboard-agent-listen-port={_free_port()}", "--num-cpus=2",
             "--disable-usage-stats"]
    refused_out, refused_rc = tmp_path / "refused.txt", tmp_path / "refused.rc"
    refused = (f"rc=0; env -u RAY_AUTH_MODE -u RAY_AUTH_TOKEN ray job list --address "
               f"http://127.0.0.1:8265 > {refused_out} 2>&1 || rc=$?; echo $rc > {refused_rc}")
    script = ["set -euo pipefail"]
    for command in [*commands[:-1], refused, commands[-1]]:
        if command.startswith("ray start "):
            command = f"{command.removesuffix(BLOCK)} {shlex.join(extra)}{BLOCK}"
        script.append(command.replace("http://127.0.0.1:8265", f"http://127.0.0.1:{dashboard}"))
    marker = f"readme-job-{uuid.uuid4().hex}"
    ray_tmp = _short_tmp("job-")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update({MARK: marker, "HOME": str(home), "RAY_TMPDIR": ray_tmp,
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "PYTHONUNBUFFERED": "1"})
    try:
        done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
        out = done.stdout + done.stderr
        assert done.returncode == 0, _tail(out)
        assert "Ray runtime started" in out, _tail(out)
        assert re.search(r"Job '\S+' succeeded", out), _tail(out)
        assert "2 trials finished, 0 failed" in out, _tail(out)
        # the same request without the token was refused: authentication is really on
        assert refused_rc.read_text().strip() != "0", refused_out.read_text()
        assert re.search(r"(?i)unauthori[sz]ed|authentication", refused_out.read_text())
        # the README's `kill` stopped the head and everything it started
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _marked(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _marked(marker)
        assert not left, f"processes left after the README's kill: {sorted(left)}"
    finally:
        _stop(marker)
        left = _marked(marker)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not left, f"Ray processes left running: {sorted(left)}"

