"""Local text for calibration and evaluation: a text file, a JSONL or Parquet file of records (the
Hugging Face Hub's dataset format), or a directory of them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from quantizer.errors import InputError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
RECORD_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES


def _read_parquet(path: Path, field: str) -> list[str]:
    """One document per row of the `field` column (WikiText on the Hub: one row per line of the text)."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow's errors are several classes; each means "not a Parquet file"
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from exc
    if field not in schema.names:
        raise InputError(f"{path}: no column {field!r} (it has {', '.join(schema.names)}); "
                         "set the text field name (jsonlField) to the one your file uses")
    return [str(value) for value in pq.read_table(path, columns=[field]).column(field).to_pylist() if value is not None]


def _read_jsonl(path: Path, field: str) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: not valid JSON ({exc.msg}); expected one object per line") from exc
            if not isinstance(record, dict) or field not in record:
                raise InputError(
                    f"{path}:{number}: no field {field!r}; set the JSONL text field name to the one your file uses"
                )
            texts.append(str(record[field]))
    return texts


def read_texts(path: str | Path, jsonl_field: str = "text") -> list[str]:
    """Documents from a .txt file (one document), a .jsonl file (one per line), a .parquet file (one per
    row), or a directory of such files read in sorted order."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"text source {path} does not exist; pass a .txt/.jsonl/.parquet file or a directory of them")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + RECORD_SUFFIXES)
        if not files:
            raise InputError(f"directory {path} holds no {'/'.join(TEXT_SUFFIXES + RECORD_SUFFIXES)} files")
        return [text for file in files for text in read_texts(file, jsonl_field)]
    if path.suffix in JSONL_SUFFIXES:
        return _read_jsonl(path, jsonl_field)
    if path.suffix in PARQUET_SUFFIXES:
        return _read_parquet(path, jsonl_field)
    return [path.read_text(encoding="utf-8", errors="replace")]


def tokenize_corpus(tokenizer, texts: list[str]) -> torch.Tensor:
    """The GPTQ paper's convention: documents joined with blank lines and tokenized once."""
    joined = "\n\n".join(t for t in texts if t.strip())
    # The corpus is longer than the context on purpose (it is cut into windows): no length warning.
    ids = tokenizer(joined, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def digest_tokens(ids: torch.Tensor) -> str:
    return "sha256:" + hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()
