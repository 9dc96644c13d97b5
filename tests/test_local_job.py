"""README's "A search as a Ray job on this machine": run its commands as written.

The bash block is read from README.md, so the test and the docs cannot drift. Its lines run
in one bash shell, in order, with a clean environment (no RAY_AUTH_* and a fresh HOME, so no
~/.ray/auth_token: the README's own exports must be what makes token authentication work).
The only changes, so parallel test runs do not collide: `ray start` gets free loopback ports,
2 CPUs and its own temp dir appended, and the submit address uses the chosen dashboard port.
The closing `ray stop` is not run (it stops every Ray on the machine): the head's processes
carry a marker in their environment and are stopped by process id. A request without the
token must be refused, so the test fails if authentication were off.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
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
HEADING = "### A search as a Ray job on this machine (token authentication)"
JOB_TIMEOUT_S = 420


def readme_block() -> list[str]:
    """The commands of the first bash block under HEADING, continuation lines joined."""
    text = (REPO / "README.md").read_text()
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
    assert commands[3].startswith("ray job submit --address http://127.0.0.1:8265 ")
    assert commands[-1] == "ray stop"


def test_readme_local_ray_job_runs_as_written(tmp_path):
    commands = readme_block()
    assert commands[-1] == "ray stop"
    dashboard = _free_port()
    extra = [f"--port={_free_port()}", f"--dashboard-port={dashboard}",
             f"--ray-client-server-port={_free_port()}",
             f"--dashboard-agent-listen-port={_free_port()}", "--num-cpus=2",
             "--disable-usage-stats"]
    script = ["set -euo pipefail"]
    for command in commands[:-1]:
        if command.startswith("ray start "):
            command = f"{command} {shlex.join(extra)}"
        if command.startswith("ray job submit "):
            command = command.replace("http://127.0.0.1:8265", f"http://127.0.0.1:{dashboard}")
        script.append(command)
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
        # the same request without the token is refused: authentication is really on
        no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
        refused = subprocess.run(
            [str(VENV_BIN / "ray"), "job", "list", "--address",
             f"http://127.0.0.1:{dashboard}"], cwd=tmp_path, env=no_token,
            capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0, refused.stdout
        assert re.search(r"(?i)unauthori[sz]ed|authentication", refused.stdout + refused.stderr)
    finally:
        _stop(marker)
        left = _marked(marker)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not left, f"Ray processes left running: {sorted(left)}"

