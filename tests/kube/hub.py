"""A Hugging Face Hub mirror on this machine: olah (PyPI), serving a git repository of the tiny model at a
pinned commit, as an in-house mirror behind a firewall serves its users (HF_ENDPOINT).

olah lives in a virtual environment of its own (.venv-olah, made by .ci/run): its pins (fastapi,
pydantic, huggingface_hub) are not the project's.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.kube.controlplane import ROOT

OLAH = ROOT / ".venv-olah" / "bin" / "olah-cli"
TINY_MODEL = ROOT / "tests" / "fixtures" / "tiny-llama"
REPO = "kubequant/tiny-llama"


def missing_olah() -> str | None:
    if not OLAH.exists():
        return (f"{OLAH} is missing: python3 -m venv .venv-olah && .venv-olah/bin/pip install olah==0.5.4 "
                "(what .ci/run does)")
    return None


@dataclass(frozen=True)
class Mirror:
    endpoint: str
    repo: str
    revision: str  # the commit the tiny model was committed as


@contextmanager
def hub_mirror(workdir: Path, host: str = "127.0.0.1", port: int = 18090) -> Iterator[Mirror]:
    """olah on host:port, offline, with the tiny model as the git repository kubequant/tiny-llama."""
    repo = workdir / "mirrors" / "models" / REPO
    shutil.copytree(TINY_MODEL, repo)
    git = ["git", "-C", str(repo), "-c", "user.name=kubequant", "-c", "user.email=tests@kubequant.io"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "the tiny model"], check=True)
    revision = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    config = workdir / "olah.toml"
    config.write_text(
        f'[basic]\nhost = "{host}"\nport = {port}\nmirror-netloc = "{host}:{port}"\nmirror-lfs-netloc = "{host}:{port}"\n'
        f'mirrors-path = ["{workdir / "mirrors"}"]\nrepos-path = "{workdir / "cache"}"\n\n'
        # Offline: it never reaches for huggingface.co, and serves only its own repositories.
        "[accessibility]\noffline = true\n")
    log = (workdir / "olah.log").open("w")
    server = subprocess.Popen([str(OLAH), "-c", str(config)], cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{endpoint}/api/models/{REPO}/revision/{revision}", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (workdir / "olah.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "olah did not answer in 60 s"
            time.sleep(0.3)
        yield Mirror(endpoint=endpoint, repo=REPO, revision=revision)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
