"""Sampled soft labels without an engine: the draw function, the cache key, the tail mass, the
job option and the layouts (the engine-side tests are tests/integration/test_sampled_vllm.py)."""

from __future__ import annotations

import io
import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from service.cachekey import cache_key, normalize_sampling, teacher_identity
from service.jobs.schemas import SoftLabels
from service.sampling import Draws, split_draws, with_draws
from teachercache.soft_labels import tail_logprob, tail_logprobs
from tests.stats import chi_square_p

torch = pytest.importorskip("torch")

IDENTITY = teacher_identity("m", "rev1", "sha256:tok", "float32")


def key(mode: str, draws: Draws | None, sampling: dict | None = None) -> str:
    normal = with_draws(normalize_sampling(mode, sampling or {}), draws)
    return cache_key(IDENTITY, mode, [1, 2, 3], [4] if mode == "score" else None, normal, 20)


def test_draws_split_the_key_and_top_k_keys_are_unchanged():
    assert key("generate", None) == "k2-484d1134b866a0bb18663450e596e3c4d6b2116ea4b7cf69a23cb05cd53fca69"
    plain_score = key("score", None)
    sampled = {key("generate", Draws()), key("generate", Draws(draws=51)), key("generate", Draws(temperature=0.9)),
               key("generate", Draws(seed=1)), key("score", Draws())}
    assert len(sampled) == 5 and key("generate", None) not in sampled and plain_score not in sampled


def test_a_task_carries_its_draws_in_its_sampling():
    normal = with_draws(normalize_sampling("score", {}), Draws(draws=7))
    sampling, draws = split_draws(normal)
    assert sampling == {} and draws == Draws(draws=7)
    assert split_draws({"max_tokens": 3}) == ({"max_tokens": 3}, None)


@pytest.mark.parametrize("bad", [{"kind": "sampled", "draws": 0}, {"kind": "sampled", "draws": 256},
                                 {"kind": "sampled", "temperature": 0.01}, {"kind": "topk", "seed": 1},
                                 {"kind": "full"}])
def test_soft_labels_are_bounded(bad):
    with pytest.raises(ValidationError):
        SoftLabels.model_validate(bad)


def test_soft_labels_stored_form():
    assert SoftLabels().stored() == {"encoding": "float32"}  # as before sampled labels existed
    assert SoftLabels(kind="sampled", draws=12).stored() == {
        "kind": "sampled", "draws": 12, "temperature": 1.0, "seed": 0, "encoding": "float32"}


def test_tail_mass_scalar_and_column_agree():
    rows = [[[-0.1, -3.0, -4.0], [-0.7, -0.7]], [], [[-1e-9], []]]
    column = pa.array(rows, pa.list_(pa.list_(pa.float32())))
    got = tail_logprobs(column).to_pylist()
    want = [[tail_logprob(np.array(p, np.float32).astype(float).tolist())
             for p in row] for row in rows]
    assert len(got) == 3 and got[1] == []
    for g_row, w_row in zip(got, want, strict=True):
        for g, w in zip(g_row, w_row, strict=True):
            assert (g == w == -math.inf) or g == pytest.approx(w, abs=1e-6)
    assert got[2][1] == 0.0  # no top-k: the whole mass is the tail


def _rows(ids: torch.Tensor, counts: torch.Tensor) -> list[tuple[list[int], list[int]]]:
    """Per row, the unique ids and counts without the padding."""
    return [([i for i, c in zip(r_ids, r_counts, strict=True) if c > 0], [c for c in r_counts if c > 0])
            for r_ids, r_counts in zip(ids.tolist(), counts.tolist(), strict=True)]


def test_draw_counts_fit_their_distribution_and_repeat():
    vllm_draws = pytest.importorskip("workers.vllm_draws")
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(0)) * 3
    logprobs = torch.log_softmax(logits, dim=-1)
    specs = [Draws(draws=200, temperature=1.0, seed=s) for s in range(2)]
    totals = [Counter(), Counter()]
    for position in range(50):
        ids, counts = vllm_draws.draw_counts(logprobs, specs, [position] * 2)
        assert ids.dtype == counts.dtype == torch.int32
        # Padded only to the row with the most unique ids: one row fills the width.
        assert ((counts > 0).sum(dim=1).max()) == ids.shape[1]
        for row, (row_ids, row_counts) in enumerate(_rows(ids, counts)):
            assert sum(row_counts) == 200 and len(set(row_ids)) == len(row_ids)
            assert row_counts == sorted(row_counts, reverse=True)
            totals[row].update(dict(zip(row_ids, row_counts, strict=True)))
    for row in range(2):
        p, _ = chi_square_p(totals[row], torch.softmax(logits[row].double(), dim=-1))
        assert p > 1e-3
        p_wrong, _ = chi_square_p(totals[row], torch.softmax(logits[row].double() / 1.1, dim=-1))
        assert p_wrong < 1e-3
    again = _rows(*vllm_draws.draw_counts(logprobs, specs, [3, 3]))
    first = _rows(*vllm_draws.draw_counts(logprobs[1:], specs[1:], [3]))
    assert again[1] == first[0]


def test_unique_counts_per_row_on_the_device_layout():
    vllm_draws = pytest.importorskip("workers.vllm_draws")
    vocab = 10
    drawn = torch.tensor([[3, 1, 3, 7, 1, 3], [2, 2, 2, 2, vocab, vocab], [9, 0, 5, 0, vocab, vocab]])
    ids, counts = vllm_draws.unique_counts(drawn, vocab)
    # Most drawn first, ties by id, zero padding to the widest row (3 unique ids).
    assert ids.tolist() == [[3, 1, 7], [2, 0, 0], [0, 5, 9]]
    assert counts.tolist() == [[3, 2, 1], [4, 0, 0], [2, 1, 1]]


def test_with_draws_puts_unique_ids_after_each_rows_own_top_k():
    vllm_draws = pytest.importorskip("workers.vllm_draws")
    full = torch.log_softmax(torch.randn(3, 50, generator=torch.Generator().manual_seed(1)), dim=-1)
    top = 4
    gathered_ids = torch.arange(3 * (1 + top), dtype=torch.int32).reshape(3, 1 + top) + 100
    gathered_lps = -torch.rand(3, 1 + top)
    rows = [vllm_draws.DrawRow(0, 2, Draws(draws=30, seed=1), 0), vllm_draws.DrawRow(2, 4, Draws(draws=5, seed=2), 7)]
    ids, lps = vllm_draws.with_draws(gathered_ids, gathered_lps, full, rows, top)
    drawn = _rows(*vllm_draws.draw_counts(full[[0, 2]], [r.spec for r in rows], [0, 7]))
    width = 1 + max(top, 2 + len(drawn[0][0]), 4 + len(drawn[1][0]))
    assert ids.shape == lps.shape == (3, width) and width < 1 + 2 + 30
    # Row 1 has no draws: its token and top-k as gathered, zeros after.
    assert ids[1, : 1 + top].tolist() == gathered_ids[1].tolist() and not ids[1, 1 + top :].any()
    for r, (want_ids, want_counts) in zip(rows, drawn, strict=True):
        assert ids[r.row, : 1 + r.k].tolist() == gathered_ids[r.row, : 1 + r.k].tolist()
        assert torch.equal(lps[r.row, : 1 + r.k], gathered_lps[r.row, : 1 + r.k])
        got = _rows(ids[r.row : r.row + 1, 1 + r.k :], lps[r.row : r.row + 1, 1 + r.k :].to(torch.int32))[0]
        assert got == (want_ids, want_counts) and sum(got[1]) == r.spec.draws
    padded, _ = vllm_draws.with_draws(gathered_ids, gathered_lps, full, rows, top, pad_to=1 + 4 + 30)
    assert padded.shape[1] == 1 + 4 + 30 and torch.equal(padded[:, :width], ids)


def layout_table() -> pa.Table:
    rows = [
        {"custom_id": "a", "prompt_token_ids": [1, 2], "completion_token_ids": [5, 6], "token_logprobs": [-1.0, -2.0],
         "top_token_ids": [[5, 7], [6, 8]], "top_logprobs": [[-1.0, -2.0], [-2.0, -3.0]], "finish_reason": "stop",
         "sample_token_ids": [[5, 7, 9], [6]], "sample_counts": [[5, 3, 2], [10]], "tail_logprob": [-1.5, -2.5]},
        {"custom_id": "b", "prompt_token_ids": [3], "completion_token_ids": [4], "token_logprobs": [-0.5],
         "top_token_ids": [[4, 1]], "top_logprobs": [[-0.5, -1.5]], "finish_reason": "stop",
         "sample_token_ids": [[4, 1]], "sample_counts": [[6, 4]], "tail_logprob": [-3.0]},
    ]
    from teachercache.layouts import table_from_rows

    return table_from_rows(rows)


def test_padded_and_packed_sampled_targets():
    from teachercache.layouts import packed_batch, padded_batch

    table = layout_table()
    padded, packed = padded_batch(table), packed_batch(table)
    mask = padded["labels_mask"]
    for name in ("sample_token_ids", "sample_targets", "tail_logprob"):
        assert torch.equal(padded[name][mask], packed[name]), name
    assert packed["sample_targets"].shape == (3, 3)
    assert torch.allclose(packed["sample_targets"].sum(-1), torch.ones(3))
    assert packed["sample_token_ids"][0].tolist() == [5, 7, 9] and packed["sample_targets"][1].tolist() == [1, 0, 0]
    assert packed["tail_logprob"].tolist() == [-1.5, -2.5, -3.0]
    assert padded["sample_token_ids"][0, 2].tolist() == [5, 7, 9]  # at the completion token's own position


def test_a_top_k_jobs_idempotency_fingerprint_is_what_it_was():
    """Computed by the service before sampled labels existed (main at e6865b9): a retry with the
    same Idempotency-Key across the upgrade still matches its job."""
    from service.jobs.schemas import JobCreate
    from service.jobs.service import body_sha256

    body = JobCreate.model_validate({"requests": [{"prompt": "hi"}], "soft_labels": {"encoding": "compact"},
                                     "top_logprobs": 5})
    assert body_sha256(body) == "f3eb02774eb31b3be643c190fe01a29b21a2fce7c21a9d049d88b03e27c37a21"
    sampled = body.model_copy(update={"soft_labels": SoftLabels(kind="sampled")})
    assert body_sha256(sampled) != body_sha256(body)


@pytest.mark.parametrize("kind", ["topk", "topk-ghost", "sampled"])
def test_the_distill_examples_losses_on_sampled_rows(tmp_path, kind):
    """Each --soft-labels loss of examples/distill.py on the same rows, padded and packed alike; the
    sampled one is the cross-entropy of the student's full softmax against counts / draws."""
    transformers = pytest.importorskip("transformers")
    from teachercache.layouts import packed_batch, padded_batch
    from tests.unit.test_distill_layouts import load_example

    distill = load_example()
    (tmp_path / "teacher").mkdir()
    transformers.LlamaConfig(vocab_size=64).save_pretrained(tmp_path / "teacher")
    student = distill.build_student(tmp_path / "teacher", layers=1, hidden=16, seed=0)
    table = layout_table()
    padded, _ = distill.distillation_loss(student, padded_batch(table), 0.0, kind)
    packed, _ = distill.packed_distillation_loss(student, packed_batch(table), 0.0, kind)
    assert torch.isfinite(padded) and padded.item() == pytest.approx(packed.item(), rel=1e-5)
    if kind == "sampled":
        batch = packed_batch(table)
        hidden = student.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                               use_cache=False).last_hidden_state[0]
        targets = batch["target_positions"]
        keep = batch["position_ids"][0, targets] > 0
        log_q = student.lm_head(hidden[targets[keep] - 1]).log_softmax(-1)
        want = -(batch["sample_targets"][keep] * log_q.gather(-1, batch["sample_token_ids"][keep])).sum(-1).mean()
        assert packed.item() == pytest.approx(want.item(), rel=1e-6)
    padded.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def sampled_job_table() -> pa.Table:
    from teachercache.shard_format import JOB_SCHEMA

    base = {"request_index": 0, "sample_index": 0, "prompt_token_ids": [1], "completion_text": "", "finish_reason": "stop",
            "error": None, "cached": False}
    rows = [
        # ids in the top-k, beyond it, and a position whose top-k holds none of them
        {**base, "custom_id": "a", "completion_token_ids": [5, 6, 9], "token_logprobs": [-1.0, -2.0, -0.1],
         "top_token_ids": [[5, 7], [6, 8], [3, 4]], "top_logprobs": [[-1.0, -2.0], [-2.0, -3.0], [-0.5, -1.0]],
         "sample_token_ids": [[7, 5, 40000], [6], [49151, 0]], "sample_counts": [[5, 3, 2], [10], [9, 1]]},
        # an error row: no sampled labels at all
        {**base, "custom_id": "b", "completion_token_ids": [], "token_logprobs": [], "top_token_ids": [],
         "top_logprobs": [], "finish_reason": "error", "error": "boom"},
        # no top-k (a sampled-only job): every id is coded as itself
        {**base, "custom_id": "c", "completion_token_ids": [4], "token_logprobs": [-0.5], "top_token_ids": [[]],
         "top_logprobs": [[]], "sample_token_ids": [[4, 1]], "sample_counts": [[6, 4]]},
    ]
    return pa.Table.from_pylist(rows, schema=JOB_SCHEMA)


def test_compact_stores_sampled_labels_as_codes_and_decodes_them_exactly():
    from teachercache.shard_format import JOB_SCHEMA, read_table
    from tests.unit.test_soft_labels import read_back, written

    table = sampled_job_table()
    data = written(table, "compact")
    stored = pq.ParquetFile(io.BytesIO(data)).schema_arrow
    assert "sample_token_ids" not in stored.names and "sample_token_codes" in stored.names
    codes = pq.read_table(io.BytesIO(data), columns=["sample_token_codes", "sample_count_values"])
    assert codes.column("sample_token_codes").to_pylist() == [[[1, 0, 40002], [0], [49153, 2]], None, [[4, 1]]]
    assert codes.column("sample_count_values").to_pylist() == [[5, 3, 2, 10, 9, 1], None, [6, 4]]
    back = read_back(data)
    assert back.schema.remove_metadata().equals(JOB_SCHEMA)
    for name in ("sample_token_ids", "sample_counts", "top_token_ids"):
        assert back.column(name).equals(table.column(name)), name
    # A projection onto the sampled columns alone reads what their decoding needs.
    alone = read_table(io.BytesIO(data), columns=["sample_counts", "sample_token_ids"])
    assert alone.column_names == ["sample_counts", "sample_token_ids"]
    assert alone.column("sample_token_ids").equals(table.column("sample_token_ids"))


def test_compact_shards_from_before_the_codes_still_read(monkeypatch):
    """A compact shard written before sampled labels were coded stores the plain int32 columns."""
    from teachercache import soft_labels
    from teachercache.shard_format import read_table
    from tests.unit.test_soft_labels import written

    table = sampled_job_table()
    monkeypatch.setattr(soft_labels, "_codes_sampled", lambda encoding: False)
    data = written(table, "compact")
    monkeypatch.undo()
    assert "sample_token_ids" in pq.ParquetFile(io.BytesIO(data)).schema_arrow.names
    for columns in (None, ["sample_token_ids", "sample_counts"]):
        back = read_table(io.BytesIO(data), columns=columns)
        assert back.column("sample_token_ids").equals(table.column("sample_token_ids"))
        assert back.column("sample_counts").equals(table.column("sample_counts"))


def test_damaged_sampled_codes_are_refused():
    from teachercache.errors import ShardFormatError
    from teachercache.sampled_codes import decode_sampled, encode_sampled
    from teachercache.soft_labels import Encoding, decode

    table = sampled_job_table()
    coded = encode_sampled(*(table.column(n).combine_chunks() for n in ("top_token_ids", "sample_token_ids",
                                                                        "sample_counts")))
    short = pa.array([[5, 3], None, [6, 4]], pa.list_(pa.int32()))
    with pytest.raises(ValueError, match="do not match"):
        decode_sampled(table.column("top_token_ids").combine_chunks(), coded["sample_token_codes"], short)
    batch = pa.table({"top_token_ids": table.column("top_token_ids"), "sample_token_codes": coded["sample_token_codes"],
                      "sample_count_values": short})
    with pytest.raises(ShardFormatError, match="damaged compact sampled labels"):
        decode(batch, Encoding.named("compact"))
