"""A Hugging Face Hub mirror on this machine: olah (PyPI), serving a git repository of the tiny model at a
pinned commit, and a dataset repository of its texts as Parquet (the Hub's dataset format), as an
in-house mirror behind a firewall serves its users (HF_ENDPOINT).

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
DATASET = "kubequant/tiny-texts"
TEXTS = ROOT / "tests" / "fixtures" / "text"
# The dataset's files: each text fixture as a Parquet file of one row (column "text"), so that the
# quantizer reads the same document from the Hub as from the claim.
DATASET_FILES = {"data/calibration.parquet": "calibration.txt", "data/evaluation.parquet": "evaluation.txt"}


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
    dataset: str = DATASET
    dataset_revision: str = ""  # the commit of the dataset repository


def _commit(repo: Path, message: str) -> str:
    git = ["git", "-C", str(repo), "-c", "user.name=kubequant", "-c", "user.email=tests@kubequant.io"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", message], check=True)
    return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


def _dataset_repo(repo: Path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, text in DATASET_FILES.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": [(TEXTS / text).read_text()]}), repo / name)
    return _commit(repo, "the tiny model's texts")


@contextmanager
def hub_mirror(workdir: Path, host: str = "127.0.0.1", port: int = 18090) -> Iterator[Mirror]:
    """olah on host:port, offline, with the tiny model as the git repository kubequant/tiny-llama and its
    texts as the dataset kubequant/tiny-texts."""
    repo = workdir / "mirrors" / "models" / REPO
    shutil.copytree(TINY_MODEL, repo)
    revision = _commit(repo, "the tiny model")
    dataset_revision = _dataset_repo(workdir / "mirrors" / "datasets" / DATASET)
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
        yield Mirror(endpoint=endpoint, repo=REPO, revision=revision, dataset_revision=dataset_revision)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
