"""Evaluation windows and the torch perplexity, including sliding windows."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantizer.errors import InputError
from quantizer.perplexity import (
    evaluation_windows,
    load_evaluation_windows,
    torch_perplexity,
    window_comparison,
    window_nll,
)
from tests.conftest import EVALUATION, TINY_MODEL


def test_non_overlapping_windows_score_every_token_but_the_first_of_each():
    windows = evaluation_windows(torch.arange(1000), 100)
    assert windows.ids.shape == (10, 100)
    assert windows.score_from == [1] * 10
    assert windows.tokens_scored == 10 * 99


def test_sliding_windows_score_each_token_once():
    windows = evaluation_windows(torch.arange(1000), 100, stride=50)
    assert len(windows) == 19
    assert torch.equal(windows.ids[1], torch.arange(50, 150))
    assert windows.score_from == [1] + [50] * 18
    assert windows.tokens_scored == 999  # every token after the first, once


def test_max_windows_spreads_evenly():
    windows = evaluation_windows(torch.arange(1000), 100, max_windows=3)
    assert [int(w[0]) for w in windows.ids] == [0, 400, 900]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"seq_len": 2000}, "fewer than one window"),
        ({"seq_len": 1}, "at least 2"),
        ({"seq_len": 100, "stride": 101}, "stride 101 must be between 1 and seq_len"),
    ],
)
def test_bad_windows(kwargs, message):
    with pytest.raises(InputError, match=message):
        evaluation_windows(torch.arange(1000), **kwargs)


def test_more_context_lowers_perplexity():
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()
    # The whole text both ways: about the same tokens scored, sliding windows give each more context.
    plain = torch_perplexity(model, load_evaluation_windows(EVALUATION, tokenizer, 256), batch_size=32)
    sliding = torch_perplexity(model, load_evaluation_windows(EVALUATION, tokenizer, 256, stride=64), batch_size=32)
    assert plain.tokens_scored <= sliding.tokens_scored < plain.tokens_scored + 2 * 256
    assert sliding.ppl < plain.ppl


def test_parquet_rows_are_documents_and_a_missing_column_names_the_field(tmp_path):
    # The Hub's datasets are Parquet: WikiText has one row per line, read as records like JSONL.
    import pyarrow as pa
    import pyarrow.parquet as pq

    from quantizer.textdata import read_texts

    pq.write_table(pa.table({"text": [" = Heading = \n", "", "Body line .\n", None]}), tmp_path / "wiki.parquet")
    assert read_texts(tmp_path / "wiki.parquet") == [" = Heading = \n", "", "Body line .\n"]
    assert read_texts(tmp_path) == read_texts(tmp_path / "wiki.parquet")  # a directory of them
    with pytest.raises(InputError, match=r"no column 'content' \(it has text\)"):
        read_texts(tmp_path / "wiki.parquet", "content")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        read_texts(tmp_path / "broken.parquet")


def test_window_comparison_is_the_full_vocabulary_kl_and_the_nll_of_the_scored_positions():
    torch.manual_seed(0)
    reference, quantized = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    ids = torch.randint(0, 11, (2, 6))
    score_from = [1, 4]  # window 1 scores tokens 4 and 5: positions 3 and 4 predict them
    compared = window_comparison(reference, quantized, ids, score_from)
    log_p, log_q = reference.log_softmax(-1), quantized.log_softmax(-1)
    positions = [(0, j) for j in range(0, 5)] + [(1, 3), (1, 4)]
    expected = sum(float(torch.nn.functional.kl_div(log_q[b, j], log_p[b, j], log_target=True, reduction="sum"))
                   for b, j in positions)
    assert compared.kl == pytest.approx(expected, rel=1e-5)
    assert compared.agree == sum(int(reference[b, j].argmax() == quantized[b, j].argmax()) for b, j in positions)
    assert compared.nll_reference == pytest.approx(window_nll(reference, ids, score_from), rel=1e-5)
    assert compared.nll_quantized == pytest.approx(window_nll(quantized, ids, score_from), rel=1e-5)
    same = window_comparison(reference, reference.clone(), ids, score_from)
    assert (same.kl, same.agree) == (pytest.approx(0.0, abs=1e-6), len(positions))
