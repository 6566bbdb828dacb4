"""Sampled soft labels: generation throughput against the same top-20 job, and bytes per token.

    PYTHONPATH=. python -m bench.bench_sampled [--prompts 32] [--max-tokens 64] [--rounds 2] [--draws 50]

One real vLLM engine (the default teacher, CPU build unless a GPU is there), the same prompts
and seeded sampling, two jobs per round in alternating order: top-20 only, and top-20 plus
`--draws` sampled draws per position (the plugin in workers/vllm_draws.py). Throughput is
completion tokens per second of wall time through the adapter (VllmEngine.add/step, which
includes splitting the draws off); the ratio sampled / top-20 is per round, in the same run.
The completions of the two must be identical (checked). Bytes per token: the sampled rows
written as job-shard columns with the shard format's Parquet options (zstd, byte-stream
split), each column chunk's compressed size from the footer divided by completion tokens: the
int32 sampled columns (float32/float16 encodings) and the compact encoding's codes. Logprob
entries per position: what vLLM delivered for the sampled requests (the token, top-k, drawn
ids), against the 1 + k + N columns they reserve.
Prints a table and writes bench/results/sampled.json.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import as_lists, report

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "smollm2-135m-instruct"
TOPICS = "physics cooking history music gardening chess poetry databases sailing astronomy economics".split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--draws", type=int, default=50)
    parser.add_argument("--top-k", type=int, default=20)
    return parser.parse_args(argv)


def drain(engine, requests) -> tuple[dict, float]:
    start = time.perf_counter()
    for request in requests:
        engine.add(request)
    results = {}
    while engine.has_unfinished():
        for result in engine.step():
            assert result.error is None, result.error
            results[result.key] = result
    return results, time.perf_counter() - start


def column_bytes(table: pa.Table, tokens: int) -> dict[str, float]:
    """Compressed bytes per completion token of each column of `table`, written with the shard
    format's Parquet options (each column chunk's size from the footer)."""
    from teachercache.shard_format import parquet_options

    buffer = io.BytesIO()
    pq.write_table(table, buffer, **parquet_options(table.schema))
    meta = pq.ParquetFile(io.BytesIO(buffer.getvalue())).metadata
    sizes = dict.fromkeys(table.column_names, 0)
    for group in range(meta.num_row_groups):
        for column in range(meta.num_columns):
            chunk = meta.row_group(group).column(column)
            sizes[chunk.path_in_schema.split(".")[0]] += chunk.total_compressed_size
    return {name: size / tokens for name, size in sizes.items()}


def shard_bytes(results: dict, top_k: int) -> dict[str, float]:
    """Bytes per completion token of the soft-label columns as job shards store them: the float32
    (and float16) encoding's int32 sampled columns, and the compact encoding's codes
    (teachercache/sampled_codes.py)."""
    from teachercache.sampled_codes import encode_sampled
    from teachercache.shard_format import JOB_SCHEMA

    samples = [s for r in results.values() for s in r.samples]
    tokens = sum(len(s.completion_token_ids) for s in samples)
    names = ["top_token_ids", "top_logprobs", "sample_token_ids", "sample_counts"]
    # The adapter gives the top-k as [positions, k] arrays and the draws as lists (ragged).
    table = pa.table({n: [as_lists(getattr(s, n)) for s in samples] for n in names},
                     schema=pa.schema([JOB_SCHEMA.field(n) for n in names]))
    plain = column_bytes(table, tokens)
    codes = encode_sampled(*(table.column(n).combine_chunks() for n in ("top_token_ids", "sample_token_ids",
                                                                        "sample_counts")))
    coded = column_bytes(pa.table(codes), tokens)
    unique = sum(len(ids) for s in samples for ids in s.sample_token_ids)
    return {**{f"{n}_bytes_per_token": plain[n] for n in names},
            **{f"{n}_bytes_per_token": v for n, v in coded.items()},
            "sampled_bytes_per_token": plain["sample_token_ids"] + plain["sample_counts"],
            "sampled_compact_bytes_per_token": sum(coded.values()),
            f"top{top_k}_bytes_per_token": plain["top_token_ids"] + plain["top_logprobs"],
            "unique_draws_per_position": unique / tokens, "completion_tokens": tokens}


class CrossingCounter:
    """Counts the logprob entries vLLM delivers per position for the sampled requests (the
    token, its top-k, the drawn ids: what crossed from the engine), read where the adapter
    splits them (VllmEngine._sample, before the split)."""

    def __init__(self, engine_cls) -> None:
        self.entries = self.positions = 0
        self.unique = 0
        original = engine_cls._sample

        def counting(engine, token_ids, positions, reason, request):
            if request.draws is not None and request.key.startswith("sampled-"):
                self.positions += len(positions)
                self.entries += sum(1 + len(p.top_ids) for p in positions)
                self.unique += sum(sum(1 for c in p.top_logprobs[request.top_logprobs:] if c > 0) for p in positions)
            return original(engine, token_ids, positions, reason, request)

        engine_cls._sample = counting

    def summary(self, top_k: int, draws: int) -> dict[str, float]:
        return {"reserved_per_position": 1 + top_k + draws,
                "crossed_per_position": self.entries / self.positions,
                "unique_draws_per_position": self.unique / self.positions}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from workers.engine import Draws, EngineRequest, SamplingSpec
    from workers.vllm_adapter import VllmEngine

    crossing = CrossingCounter(VllmEngine)

    engine = VllmEngine.load(str(MODEL_DIR), max_model_len=1024, max_top_logprobs=args.top_k, dtype="float32")
    if not engine.can_draw:
        raise SystemExit("the vLLM plugin teachercache_draws is not registered: pip install -e . first")
    tokenizer = engine.tokenizer
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}, "
                                               f"part {i}."}], add_generation_prompt=True, return_dict=True)["input_ids"]
               for i in range(args.prompts)]
    prompts = [list(p) for p in prompts]
    spec = SamplingSpec(max_tokens=args.max_tokens, temperature=1.0, seed=1, ignore_eos=True)

    def job(tag: str, draws: Draws | None) -> list[EngineRequest]:
        return [EngineRequest(key=f"{tag}-{i}", prompt_token_ids=p, sampling=spec, top_logprobs=args.top_k,
                              draws=draws) for i, p in enumerate(prompts)]

    drain(engine, job("warmup", Draws(draws=args.draws))[:4])
    rows, ratios, last_sampled = [], [], {}
    for round_ in range(args.rounds):
        timings = {}
        order = [("topk", None), ("sampled", Draws(draws=args.draws))]
        for kind, draws in order if round_ % 2 == 0 else order[::-1]:
            results, wall = drain(engine, job(f"{kind}-{round_}", draws))
            tokens = sum(len(s.completion_token_ids) for r in results.values() for s in r.samples)
            timings[kind] = (results, wall, tokens)
            rows.append({"round": round_, "job": f"top-{args.top_k}" + (f" + {args.draws} draws" if draws else ""),
                         "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall})
        plain, sampled = timings["topk"][0], timings["sampled"][0]
        for i in range(len(prompts)):
            assert (plain[f"topk-{round_}-{i}"].samples[0].completion_token_ids
                    == sampled[f"sampled-{round_}-{i}"].samples[0].completion_token_ids), "draws changed a completion"
        ratio = (timings["sampled"][2] / timings["sampled"][1]) / (timings["topk"][2] / timings["topk"][1])
        ratios.append(ratio)
        print(f"round {round_}: sampled/top-{args.top_k} {ratio:.3f}", flush=True)
        last_sampled = sampled
    engine.close()
    sizes = shard_bytes(last_sampled, args.top_k)
    crossed = crossing.summary(args.top_k, args.draws)
    report("Sampled soft labels vs top-k: throughput (same engine, same run)", rows, "sampled.json",
           {"ratios_sampled_over_topk": ratios, "median_ratio": statistics.median(ratios), "bytes": sizes,
            "logprob_entries": crossed,
            "draws": args.draws, "top_k": args.top_k, "prompts": args.prompts, "max_tokens": args.max_tokens})
    print(f"throughput ratio sampled/top-{args.top_k} per round: {', '.join(f'{r:.3f}' for r in ratios)}")
    print("bytes per completion token: " + ", ".join(f"{k} {v:.2f}" for k, v in sizes.items()))
    print("logprob entries per sampled position (engine -> worker): " + ", ".join(f"{k} {v:.1f}" for k, v in crossed.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
