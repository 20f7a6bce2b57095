"""Write the tiny model's lm-evaluation-harness task: complete the identifier, LAMBADA-style.

Each document is a stretch of the held-out evaluation text cut just before an identifier that already
appeared in the lines above it (a variable, an attribute, a function being called again); the target is
that identifier. Like LAMBADA, the task scores whether the model's greedy continuation is exactly the
target (metric `acc`), which needs the context, and moves as soon as quantization damages the model's
top choices. It is a plain lm-evaluation-harness YAML (output type loglikelihood) over a local
JSON-lines file, so it runs offline, as a user's own tasks would.

    .venv/bin/python scripts/make_tiny_task.py            # writes tests/fixtures/tasks/

Deterministic: the same evaluation text and seed give the same file.
"""

from __future__ import annotations

import argparse
import json
import keyword
import random
import re
from pathlib import Path

TASK = "python_identifier"
CONTEXT_LINES = 8
MIN_IDENTIFIER_CHARS = 4
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

TASK_YAML = f"""\
# An lm-evaluation-harness task, written by scripts/make_tiny_task.py; data_files is relative to this file.
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {TASK}.jsonl
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
metadata:
  version: 1.0
"""


def _cut(lines: list[str], i: int) -> dict | None:
    """The document for line i: cut before its last identifier that the context above already holds."""
    above = "\n".join(lines[i - CONTEXT_LINES:i])
    seen = set(IDENTIFIER.findall(above))
    line = lines[i]
    if line.lstrip().startswith("#"):
        return None
    for match in reversed(list(IDENTIFIER.finditer(line))):
        name = match.group()
        # Inside a string or after a digit is not a name the code uses again.
        if (len(name) >= MIN_IDENTIFIER_CHARS and name in seen and not keyword.iskeyword(name)
                and line[:match.start()].count('"') % 2 == 0 and line[:match.start()].count("'") % 2 == 0
                and match.start() > len(line) - len(line.lstrip())):
            return {"context": above + "\n" + line[:match.start()], "target": name}
    return None


def documents(text: str, count: int, seed: int) -> list[dict]:
    lines = text.splitlines()
    candidates = [doc for i in range(CONTEXT_LINES, len(lines)) if (doc := _cut(lines, i))]
    return random.Random(seed).sample(candidates, count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=Path("tests/fixtures/text/evaluation.txt"))
    parser.add_argument("--output", type=Path, default=Path("tests/fixtures/tasks"))
    parser.add_argument("--documents", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    docs = documents(args.text.read_text(), args.documents, args.seed)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{TASK}.yaml").write_text(TASK_YAML)
    with open(args.output / f"{TASK}.jsonl", "w") as out:
        for doc in docs:
            out.write(json.dumps(doc) + "\n")
    print(f"wrote {len(docs)} documents to {args.output / f'{TASK}.jsonl'} and the task {args.output / f'{TASK}.yaml'}")


if __name__ == "__main__":
    main()
