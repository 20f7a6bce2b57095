"""What the documents say about the code is what the code does: the metrics and verdicts install.md lists,
the metric names values.yaml's comments give, and no git tag that does not exist."""

from __future__ import annotations

import re

from prometheus_client import REGISTRY

from quantizer import contract
from tests.kube.controlplane import ROOT
from tests.kube.docs import INSTALL, README


def _metrics_table() -> dict[str, str]:
    section = INSTALL.read_text().split("\n## Metrics\n", 1)[1].split("\n### ", 1)[0]
    return {m.group(1): m.group(0) for m in re.finditer(r"^\| `(kubequant_\w+)` \|.*$", section, re.M)}


def test_the_metrics_table_lists_every_operator_metric():
    import kubequant.metrics  # noqa: F401  (registers them)

    exported = set()
    for family in REGISTRY.collect():
        if family.name.startswith("kubequant_"):
            exported.add(f"{family.name}_total" if family.type == "counter" else family.name)
    assert set(_metrics_table()) == exported


def test_the_gate_outcomes_listed_are_the_contract_verdicts():
    row = _metrics_table()["kubequant_gate_outcomes_total"]
    listed = re.findall(r"`([A-Z]\w+)`", row.split("`outcome`", 1)[1])
    assert listed == list(contract.GATE_VERDICTS)


def test_values_comments_name_the_metrics_the_alerts_use():
    rules = (ROOT / "charts" / "kubequant" / "templates" / "prometheusrule.yaml").read_text()
    for name in re.findall(r"\b(kube_\w+)\b", (ROOT / "charts" / "kubequant" / "values.yaml").read_text()):
        assert name in rules, f"values.yaml names {name}, which no alert reads"


def test_no_document_names_a_tag_that_does_not_exist():
    import subprocess

    tags = set(subprocess.run(["git", "-C", str(ROOT), "tag"], capture_output=True, text=True).stdout.split())
    documents = [README, INSTALL, ROOT / "charts" / "kubequant" / "templates" / "NOTES.txt",
                 ROOT / "deploy" / "argocd" / "application.yaml"]
    for document in documents:
        text = document.read_text()
        named = re.findall(r"--branch (\S+)", text) + re.findall(r"kubequant/kubequant/(v\d[\w.]*)/", text) + \
            re.findall(r"targetRevision: (v\d\S*)", text)
        assert set(named) <= tags, f"{document.name} names {sorted(set(named) - tags)}, which this repository does not have"
