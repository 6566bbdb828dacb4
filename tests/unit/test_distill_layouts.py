"""examples/distill.py's two losses agree: the packed layout (ShardDataset(layout="packed")) and the
padded one (collate_topk) give the same loss and the same gradients on the same rows, on a small
randomly initialised student (transformers' block-diagonal mask from the packed position_ids)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

import teachercache as tc
from teachercache.testing import SyncASGITransport
from tests.unit.test_loader import JOB_ID, ShardServerDouble

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "distill.py"
BASE_URL = "http://teachercache.test"


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("distill_example_layouts", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gradients(student: Any) -> list[torch.Tensor]:
    return [p.grad.clone() for p in student.parameters() if p.grad is not None]


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_packed_and_padded_batches_give_the_same_loss_on_the_same_rows(tmp_path: Path, alpha: float) -> None:
    distill = load_example()
    (tmp_path / "teacher").mkdir()
    # The test rows' token ids stay below 20000; a teacher config is all build_student reads.
    transformers.LlamaConfig(vocab_size=20000).save_pretrained(tmp_path / "teacher")
    student = distill.build_student(tmp_path / "teacher", layers=2, hidden=32, seed=0)
    server = ShardServerDouble(tmp_path, rows_per_shard=[5, 6])  # row 7 failed: dropped by both layouts
    with tc.Client(BASE_URL, transport=SyncASGITransport(server.app)) as client:
        rows = list(tc.ShardDataset(job=JOB_ID, client=client, shuffle=False))
        packed = list(tc.ShardDataset(job=JOB_ID, client=client, shuffle=False, layout="packed",
                                      tokens_per_batch=10_000))
    assert len(packed) == 1 and len(packed[0]["custom_id"]) == 10
    padded = tc.collate_topk(rows)
    assert padded["custom_id"] == packed[0]["custom_id"]

    loss_padded, kl_padded = distill.distillation_loss(student, padded, alpha)
    loss_padded.backward()
    grads_padded = gradients(student)
    student.zero_grad(set_to_none=True)
    loss_packed, kl_packed = distill.packed_distillation_loss(student, packed[0], alpha)
    loss_packed.backward()

    assert loss_packed.item() > 0
    assert torch.allclose(loss_packed, loss_padded, rtol=1e-5, atol=1e-6)
    assert torch.allclose(kl_packed, kl_padded, rtol=1e-5, atol=1e-6)
    for packed_grad, padded_grad in zip(gradients(student), grads_padded, strict=True):
        assert torch.allclose(packed_grad, padded_grad, rtol=1e-4, atol=1e-6)
