"""The images into a user's registry: `scripts/images.sh push`, as docs/install.md tells a user, to a real
registry (the CNCF distribution registry that scripts/cluster.sh builds), then the chart values it prints
name exactly what was pushed, and what was pushed pulls back by digest as the same image."""

from __future__ import annotations

import subprocess
import time
import urllib.request

import pytest
import yaml

from tests.kube.controlplane import ROOT
from tests.kube.node import IMAGES_SH, build_images, image, missing_for_a_real_node
from tests.kube.operator_process import free_port

pytestmark = [pytest.mark.citools, pytest.mark.slow]
REGISTRY = ROOT / ".tools" / "bin" / "registry"
HELM = ROOT / ".tools" / "bin" / "helm"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    why = missing_for_a_real_node()  # buildah and podman, as root
    if why:
        pytest.skip(why)
    if not REGISTRY.exists():
        pytest.skip(f"{REGISTRY} is missing: bash scripts/cluster.sh build (what .ci/run does) builds it")
    workdir = tmp_path_factory.mktemp("registry")
    port = free_port()
    (workdir / "config.yml").write_text(yaml.safe_dump({
        "version": 0.1, "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(workdir / "data")}},
        "http": {"addr": f"127.0.0.1:{port}"}}))
    log = (workdir / "registry.log").open("w")
    server = subprocess.Popen([str(REGISTRY), "serve", str(workdir / "config.yml")], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (workdir / "registry.log").read_text()
                time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_push_prints_the_chart_values_of_what_it_pushed(registry: str, tmp_path):
    build_images(("operator",))
    done = subprocess.run(["bash", str(IMAGES_SH), "push", f"{registry}/ml", "operator"], capture_output=True,
                          text=True, timeout=900, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                                       "KUBEQUANT_PUSH_TLS_VERIFY": "false"})
    assert done.returncode == 0, done.stderr[-3000:]
    [values] = done.stdout.strip().splitlines()
    repository = f"{registry}/ml/kubequant-operator"
    assert values.startswith(f"--set image.repository={repository} --set image.tag=0.1.0 --set image.digest=sha256:")
    digest = values.rsplit("=", 1)[1]

    rendered = subprocess.run([str(HELM), "template", "kubequant", str(ROOT / "charts" / "kubequant"), "-n", "kubequant",
                               *values.split()], capture_output=True, text=True, check=True).stdout
    [deployment] = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment"]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == f"{repository}@{digest}"

    # The registry holds that image: pulled back by digest, it is the image that was built.
    pulled = f"{repository}@{digest}"
    subprocess.run(["podman", "pull", "--quiet", "--tls-verify=false", pulled], check=True, capture_output=True, timeout=600)
    ids = [subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", ref], capture_output=True, text=True,
                          check=True).stdout.strip() for ref in (pulled, image("operator"))]
    assert ids[0] == ids[1]
    subprocess.run(["podman", "rmi", "--force", pulled], capture_output=True)
