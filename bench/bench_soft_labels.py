"""Soft labels on real teacher output: bytes per completion token and fidelity of each encoding.

    PYTHONPATH=. python -m bench.bench_soft_labels [--positions FILE] [--k 20 50]

The positions are the default teacher's own (256 chat prompts x 64 tokens, top-50, seeded),
generated once with the real vLLM engine and cached in FILE (default
$TMPDIR/teachercache-soft-label-positions.parquet); top-k for k < 50 is their prefix.
Each layout writes the job-shard rows the way the service does; "bytes/token" counts every
soft-label column chunk (ids, logprobs, the token's own logprob, compact's reference, steps
and checksum) from the Parquet footer, divided by completion tokens. Fidelity: mean
KL(exact || decoded) over the top-k renormalised, max |delta logprob| (top-k and the token's
own), top-k order, bit-exactness. Decode speed is one core running the client's decoder on
in-memory record batches (after Parquet has decompressed them), best of several runs, per
second of wall time and of the process's CPU time; encode is the same for assembly's encoder,
write the whole Parquet file (encode, compression, byte-stream-split) once.
Prints a table and writes bench/results/soft_labels.json.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from teachercache.shard_format import JOB_SCHEMA, parquet_options, shard_metadata
from teachercache.soft_labels import (
    SOFT_LABELS_KEY,
    STORED_COLUMNS,
    Encoding,
    decode,
    encode,
    encoding_of,
    stored_schema,
)

DEFAULT_POSITIONS = Path(tempfile.gettempdir()) / "teachercache-soft-label-positions.parquet"
MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "smollm2-135m-instruct"
# DistillKit (arcee-ai), its published figures for its compressed logit format (polynomial +
# quantised residual logprobs, bit-packed ids), bytes per token, as quoted in issue 19.
DISTILLKIT_PUBLISHED = {50: 114.0, 128: 300.0}


def generate_positions(path: Path, prompts: int = 256, max_tokens: int = 64, k: int = 50) -> None:
    """Real positions of the default teacher: chat prompts, seeded sampling, top-k logprobs."""
    from workers.engine import EngineRequest, SamplingSpec
    from workers.vllm_adapter import VllmEngine

    engine = VllmEngine.load(str(MODEL_DIR), max_model_len=1024, max_top_logprobs=k, dtype="float32")
    topics = "physics cooking history music gardening chess poetry databases sailing astronomy economics".split()
    asks = ["Explain {} to a child.", "Write a short story about {}.", "Give three facts about {}.",
            "What is the most surprising thing about {}?", "Describe a day spent on {}.", "Write a haiku about {}."]
    rng = random.Random(0)
    for i in range(prompts):
        text = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": rng.choice(asks).format(rng.choice(topics))}],
            add_generation_prompt=True, tokenize=False)
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        engine.add(EngineRequest(f"g{i}", list(ids), SamplingSpec(max_tokens=max_tokens, seed=i), k))
    results = {}
    while engine.has_unfinished():
        results.update((r.key, r) for r in engine.step())
    engine.close()
    from bench.common import as_lists

    rows = [{name: as_lists(getattr(s, name)) for name in ("completion_token_ids", "token_logprobs", "top_token_ids",
                                                           "top_logprobs")}
            for key in sorted(results, key=lambda name: int(name[1:])) for s in results[key].samples]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(
        [f for f in JOB_SCHEMA if f.name in ("completion_token_ids", "token_logprobs", "top_token_ids",
                                             "top_logprobs")])), path)


def job_rows(positions: pa.Table, k: int) -> pa.Table:
    """The positions as job-shard rows (the contract's columns), top-k cut to `k`."""
    rows = []
    for index, row in enumerate(positions.to_pylist()):
        rows.append({"custom_id": f"q{index}", "request_index": index, "sample_index": 0,
                     "prompt_token_ids": [], "completion_token_ids": row["completion_token_ids"],
                     "completion_text": "", "token_logprobs": row["token_logprobs"],
                     "top_token_ids": [p[:k] for p in row["top_token_ids"]],
                     "top_logprobs": [p[:k] for p in row["top_logprobs"]], "finish_reason": "length",
                     "error": None, "cached": False})
    return pa.Table.from_pylist(rows, schema=JOB_SCHEMA)


def write(table: pa.Table, encoding: Encoding, options: dict) -> bytes:
    """The job shard assembly writes: compact's vocabulary fitted on the rows (one window)."""
    encoding = encoding.fitted(table)
    schema = stored_schema(JOB_SCHEMA.with_metadata(shard_metadata({})), encoding)
    buffer = io.BytesIO()
    with pq.ParquetWriter(buffer, schema, **options(schema)) as writer:
        writer.write_table(encode(table, encoding, schema))
    return buffer.getvalue()


def soft_label_bytes(data: bytes, encoding: Encoding) -> int:
    """The soft-label column chunks, and compact's vocabulary in the footer (twice: pyarrow keeps
    the file's metadata both as Parquet key/values and inside its serialised Arrow schema)."""
    metadata = pq.ParquetFile(io.BytesIO(data)).metadata
    names = set(STORED_COLUMNS[encoding_of(metadata.metadata).format])
    return 2 * len(metadata.metadata.get(SOFT_LABELS_KEY, b"")) + sum(metadata.row_group(g).column(c).total_compressed_size
               for g in range(metadata.num_row_groups) for c in range(metadata.num_columns)
               if metadata.row_group(g).column(c).path_in_schema.split(".")[0] in names)


def flat(table: pa.Table, column: str) -> np.ndarray:
    array = table.column(column).combine_chunks()
    while pa.types.is_list(array.type):
        array = array.flatten()
    return array.to_numpy(zero_copy_only=False)


def fidelity(exact: pa.Table, decoded: pa.Table, k: int) -> dict:
    a = flat(exact, "top_logprobs").astype(np.float64).reshape(-1, k)
    b = flat(decoded, "top_logprobs").astype(np.float64).reshape(-1, k)
    p = np.exp(a - a.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = np.exp(b - b.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    kl = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(np.where(q > 0, q, 1e-300))), 0).sum(1)
    ta, tb = flat(exact, "token_logprobs"), flat(decoded, "token_logprobs")
    same_bits = all(np.array_equal(flat(exact, c).view(np.uint32), flat(decoded, c).view(np.uint32))
                    for c in ("token_logprobs", "top_logprobs"))
    return {"mean_kl": float(kl.mean()), "max_dlogprob": float(max(np.abs(a - b).max(), np.abs(ta - tb).max())),
            "order_kept": bool(decoded.column("top_token_ids").equals(exact.column("top_token_ids"))
                               and (np.diff(b, axis=1) <= 0).all() == (np.diff(a, axis=1) <= 0).all()),
            "bit_exact": bool(same_bits and decoded.column("top_token_ids").equals(exact.column("top_token_ids")))}


def decode_rate(data: bytes, encoding: Encoding, positions: int, repeats: int = 7) -> tuple[float, float]:
    """Positions decoded per second of wall time and per second of this process's CPU time (one
    core: the decoder is single-threaded numpy), best of `repeats`."""
    parquet = pq.ParquetFile(io.BytesIO(data))
    encoding = encoding_of(parquet.schema_arrow.metadata)  # with the shard's vocabulary
    batches = list(parquet.iter_batches(batch_size=1024))
    wall = cpu = float("inf")
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            decode(batch, encoding)
        wall = min(wall, time.perf_counter() - started)
        cpu = min(cpu, max(time.process_time() - started_cpu, 1e-9))
    return positions / wall, positions / cpu


def encode_rate(table: pa.Table, encoding: Encoding, positions: int, repeats: int = 3) -> float:
    schema = stored_schema(JOB_SCHEMA, encoding)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        encode(table, encoding.fitted(table), schema)  # fitting compact's vocabulary included
        best = min(best, time.perf_counter() - started)
    return positions / best


def entropy_bits(symbols: np.ndarray) -> float:
    """Order-0 (empirical) entropy of `symbols` in bits per symbol."""
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def order0_floor(table: pa.Table, k: int) -> dict:
    """What any coder without context needs for compact's symbols, per completion token: for each
    rank its own order-0 entropy (frequencies over these positions, table size not counted) of
    the ids and of the step deltas (the first: the top-1 in 1/16 nat below 0), plus the token's
    own step from the top-1. Context (the previous tokens, the previous position's top-k) is the
    only way below it."""
    ids = flat(table, "top_token_ids").reshape(-1, k)
    q = np.rint(flat(table, "top_logprobs").astype(np.float64).reshape(-1, k) * -16).astype(np.int64)
    token = np.rint(flat(table, "token_logprobs").astype(np.float64) * -16).astype(np.int64)
    deltas = np.diff(q, axis=1, prepend=0)
    parts = {"ids": sum(entropy_bits(ids[:, j]) for j in range(k)) / 8,
             "steps": sum(entropy_bits(deltas[:, j]) for j in range(k)) / 8,
             "token": entropy_bits(token - q[:, 0]) / 8}
    return {name: round(value, 2) for name, value in parts.items()} | {"total": round(sum(parts.values()), 2)}


def plain_zstd(schema: pa.Schema) -> dict:
    return {"compression": "zstd"}  # the result shards' layout before byte-stream-split


def measure(table: pa.Table, k: int) -> list[dict]:
    positions = len(flat(table, "token_logprobs"))
    layouts = [("float32, zstd (the layout before)", "float32", plain_zstd),
               ("float32, lossless cache layout", "float32", parquet_options),
               ("float16", "float16", parquet_options), ("compact", "compact", parquet_options)]
    rows = []
    for label, name, options in layouts:
        encoding = Encoding.named(name)
        started = time.perf_counter()
        data = write(table, encoding, options)
        write_s = time.perf_counter() - started
        parquet = pq.ParquetFile(io.BytesIO(data))
        stored = encoding_of(parquet.schema_arrow.metadata)
        decoded = pa.Table.from_batches([decode(b, stored) for b in parquet.iter_batches()])
        rows.append({"k": k, "layout": label, "bytes_per_token": soft_label_bytes(data, encoding) / positions,
                     "file_bytes_per_token": len(data) / positions, **fidelity(table, decoded, k),
                     **dict(zip(("decode_positions_per_s", "decode_positions_per_cpu_s"),
                                decode_rate(data, encoding, positions))),
                     "encode_positions_per_s": encode_rate(table, encoding, positions),
                     "write_positions_per_s": positions / write_s})
        print(rows[-1], flush=True)
    floor = order0_floor(table, k)
    print(f"k={k} order-0 entropy floor, B/token: {floor}", flush=True)
    rows.append({"k": k, "layout": f"order-0 entropy floor of compact's symbols {floor}",
                 "bytes_per_token": floor["total"], "file_bytes_per_token": None, "mean_kl": None,
                 "max_dlogprob": None, "order_kept": None, "bit_exact": None, "decode_positions_per_s": None,
                 "decode_positions_per_cpu_s": None, "encode_positions_per_s": None, "write_positions_per_s": None})
    if k in DISTILLKIT_PUBLISHED:
        rows.append({"k": k, "layout": "DistillKit (published figure)", "bytes_per_token": DISTILLKIT_PUBLISHED[k],
                     "file_bytes_per_token": None, "mean_kl": None, "max_dlogprob": None, "order_kept": None,
                     "bit_exact": None, "decode_positions_per_s": None, "decode_positions_per_cpu_s": None,
                     "encode_positions_per_s": None, "write_positions_per_s": None})
    return rows


def main() -> None:
    from bench.common import report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=Path, default=DEFAULT_POSITIONS)
    parser.add_argument("--k", type=int, nargs="+", default=[20, 50])
    args = parser.parse_args()
    if not args.positions.exists():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        generate_positions(args.positions)
    positions = pq.read_table(args.positions)
    rows = []
    for k in args.k:
        rows += measure(job_rows(positions, k), k)
    count = sum(len(r) for r in positions.column("token_logprobs").to_pylist())
    report(f"soft labels: {count} real positions of the default teacher", rows, "soft_labels.json",
           {"positions": count, "args": {"k": args.k}})


if __name__ == "__main__":
    main()
