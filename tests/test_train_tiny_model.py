"""scripts/train_tiny_model.py's text split: what a larger model trains on never reaches the held-out text."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import train_tiny_model


def test_subpackages_add_training_text_only():
    """--subpackages (for models too large for the top-level files) keeps the evaluation and calibration
    text of the fixtures, adds the packages' modules to training, and leaves their test suites out."""
    plain, wider = train_tiny_model.split_stdlib(), train_tiny_model.split_stdlib(subpackages=True)
    assert (wider.evaluation, wider.calibration) == (plain.evaluation, plain.calibration)
    assert (wider.eval_files, wider.calib_files) == (plain.eval_files, plain.calib_files)
    assert wider.train_files[: len(plain.train_files)] == plain.train_files
    added = wider.train_files[len(plain.train_files):]
    assert added and all("/" in name for name in added)
    assert not any({"test", "tests", "idle_test"} & set(Path(name).parts) for name in added)
    assert sum(map(len, wider.train_texts)) > 2 * sum(map(len, plain.train_texts))
    held_out = set(plain.eval_files) | set(plain.calib_files)
    assert not held_out & set(wider.train_files)

