"""Small distillation comparison: top-12, top-50, sampled (N=50) and full-distribution targets.

    PYTHONPATH=. python -m bench.bench_distill_sampled [--prompts 128] [--held-out 32] [--steps 200]

The teacher data is generated once by the real vLLM engine (the default teacher, seeded sampling
at temperature 1) with top-50 and 50 sampled draws per position (the plugin); top-12 is the
top-50's prefix. The full distribution is computed locally with transformers (the reference the
paper compares with). Four students (examples/distill.py's 2-layer Llama, same seed, same
batches, equal steps) are trained with: renormalised top-12 KL, top-50 KL, the sampled-label
cross-entropy, and the full KL. Held out (other prompts' teacher completions): KL(teacher || student)
over the full vocabulary, the student's LM loss on the teacher's tokens, and expected calibration
error (10 bins of the student's top-1 probability against whether the top-1 is the teacher's
token). Prints a table and writes bench/results/distill_sampled.json.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

import torch

from bench.common import report

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "smollm2-135m-instruct"
TOPICS = "physics cooking history music gardening chess poetry databases sailing astronomy economics".split()
ASKS = ["Explain {} to a child.", "Write a short story about {}.", "Give three facts about {}.", "Why is {} hard?"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--held-out", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    return parser.parse_args(argv)


def load_distill() -> Any:
    spec = importlib.util.spec_from_file_location("distill_example", ROOT / "examples" / "distill.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def teacher_rows(count: int, max_tokens: int) -> list[dict[str, Any]]:
    from workers.engine import Draws, EngineRequest, SamplingSpec
    from workers.vllm_adapter import VllmEngine

    engine = VllmEngine.load(str(MODEL_DIR), max_model_len=1024, max_top_logprobs=50, dtype="float32")
    tokenizer = engine.tokenizer
    requests = []
    for i in range(count):
        text = ASKS[i % len(ASKS)].format(TOPICS[(i // len(ASKS)) % len(TOPICS)]) + f" ({i})"
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               return_dict=True)["input_ids"]
        prompt = list(prompt)
        requests.append(EngineRequest(key=str(i), prompt_token_ids=prompt, top_logprobs=50,
                                      sampling=SamplingSpec(max_tokens=max_tokens, temperature=1.0, seed=i),
                                      draws=Draws(draws=50, temperature=1.0, seed=i)))
    for request in requests:
        engine.add(request)
    results = {}
    while engine.has_unfinished():
        for result in engine.step():
            results[result.key] = result
    engine.close()
    rows = []
    for request in requests:
        sample = results[request.key].samples[0]
        rows.append({"custom_id": request.key, "prompt_token_ids": request.prompt_token_ids,
                     "completion_token_ids": sample.completion_token_ids, "token_logprobs": sample.token_logprobs,
                     "top_token_ids": sample.top_token_ids, "top_logprobs": sample.top_logprobs,
                     "finish_reason": sample.finish_reason, "sample_token_ids": sample.sample_token_ids,
                     "sample_counts": sample.sample_counts})
    return rows


def with_top(rows: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    return [{**r, "top_token_ids": [t[:k] for t in r["top_token_ids"]],
             "top_logprobs": [t[:k] for t in r["top_logprobs"]]} for r in rows]


def full_kl(student: Any, teacher: Any, batch: dict[str, Any]) -> torch.Tensor:
    """KL(teacher || student) over the whole vocabulary at the completion positions."""
    with torch.no_grad():
        teacher_lp = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    predicts = batch["labels_mask"][:, 1:]
    log_p = teacher_lp[:, :-1][predicts].log_softmax(-1)
    hidden = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    log_q = student.lm_head(hidden[:, :-1][predicts]).log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def evaluate(student: Any, teacher: Any, batches: list[dict[str, Any]]) -> dict[str, float]:
    kls, nll, confidences, correct = [], [], [], []
    student.eval()
    with torch.no_grad():
        for batch in batches:
            predicts = batch["labels_mask"][:, 1:]
            log_p = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            log_p = log_p[:, :-1][predicts].log_softmax(-1)
            hidden = student.model(input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"]).last_hidden_state
            log_q = student.lm_head(hidden[:, :-1][predicts]).log_softmax(-1)
            tokens = batch["input_ids"][:, 1:][predicts]
            kls.append((log_p.exp() * (log_p - log_q)).sum(-1))
            nll.append(-log_q.gather(-1, tokens[:, None])[:, 0])
            top_p, top_id = log_q.exp().max(-1)
            confidences.append(top_p)
            correct.append((top_id == tokens).float())
    student.train()
    conf, acc = torch.cat(confidences), torch.cat(correct)
    bins = torch.clamp((conf * 10).long(), max=9)
    ece = sum(((bins == b).float().mean() * (conf[bins == b].mean() - acc[bins == b].mean()).abs()).item()
              for b in range(10) if (bins == b).any())
    return {"heldout_kl": torch.cat(kls).mean().item(), "heldout_lm_loss": torch.cat(nll).mean().item(),
            "heldout_ece": ece}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM

    import teachercache as tc

    distill = load_distill()
    rows = teacher_rows(args.prompts + args.held_out, args.max_tokens)
    train_rows, held_rows = rows[: args.prompts], rows[args.prompts:]
    teacher = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    held = [tc.collate_topk(held_rows[i: i + args.batch_size]) for i in range(0, len(held_rows), args.batch_size)]
    generator = torch.Generator().manual_seed(0)
    order = [torch.randperm(len(train_rows), generator=generator).tolist() for _ in range(args.steps)]
    results = []
    for name, kind, k in (("top-12", "topk", 12), ("top-50", "topk", 50), ("sampled N=50", "sampled", 50),
                          ("full (transformers)", "full", 50)):
        student = distill.build_student(MODEL_DIR, 2, 64, seed=0)
        optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
        data = with_top(train_rows, k)
        for step in range(args.steps):
            batch = tc.collate_topk([data[i] for i in order[step][: args.batch_size]])
            if kind == "full":
                loss = full_kl(student, teacher, batch)
            else:
                loss, _ = distill.distillation_loss(student, batch, 0.0, kind)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        results.append({"targets": name, "steps": args.steps, **evaluate(student, teacher, held)})
        print(results[-1], flush=True)
    report("Distilling the same student on the same teacher data (held-out)", results, "distill_sampled.json",
           {"prompts": args.prompts, "held_out": args.held_out, "max_tokens": args.max_tokens,
            "batch_size": args.batch_size, "lr": args.lr})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
