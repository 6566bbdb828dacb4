"""On-policy distillation on CPU: a tiny student samples, teachercache scores, reverse-KL update.

    python examples/on_policy.py --url http://127.0.0.1:8080 --steps 30

Each step the student (a randomly initialised 2-layer Llama with the teacher's vocabulary, as in
examples/distill.py) samples a completion for each prompt; the service scores every sampled
token under the teacher (`Client.score`: one synchronous `/v1/completions` call, echo with
`max_tokens` 0, answered in Arrow IPC: the teacher's top-k at every position); the student is
updated on the per-token reverse KL to the teacher, on the teacher's top-k support:

    p = softmax(teacher top-k logprobs)                 the teacher, renormalised over its k
    q = softmax(student logits at the same k ids)       the student, renormalised over the same k
    KL(q || p) = sum_k q (log q - log p)                mode-seeking: what on-policy distillation minimises

averaged over the sampled (completion) positions. The same sequences sent twice (a group of
samples sharing a prompt, a repeated evaluation) are answered from the cache. ``main()`` returns
the per-step losses; it prints them every ``--log-every`` steps.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import teachercache as tc

ROOT = Path(__file__).resolve().parent.parent
TEACHER_DIR = ROOT / "models" / "smollm2-135m-instruct"
PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "The best way to learn is"]


def build_student(teacher_dir: Path, layers: int = 2, hidden: int = 64, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    heads = max(1, hidden // 16)
    config = LlamaConfig.from_pretrained(teacher_dir)
    config.update({"num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": 4 * hidden,
                   "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": hidden // heads})
    return LlamaForCausalLM(config)


def sample(student: LlamaForCausalLM, prompt_ids: list[list[int]], new_tokens: int) -> list[list[int]]:
    """One sampled completion per prompt (the student's own policy: on-policy)."""
    sequences = []
    with torch.no_grad():
        for ids in prompt_ids:
            out = student.generate(torch.tensor([ids]), do_sample=True, max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, pad_token_id=0, top_k=0)
            sequences.append(out[0].tolist())
    return sequences


def reverse_kl(student: LlamaForCausalLM, sequences: list[list[int]], prompt_lengths: list[int],
               scores: tc.online_format.Scores) -> torch.Tensor:
    """Mean KL(q || p) over the completion positions, on the teacher's top-k ids."""
    losses = []
    for b, sequence in enumerate(sequences):
        logits = student(torch.tensor([sequence])).logits[0]  # [T, V]: position t predicts token t + 1
        start, end = prompt_lengths[b], len(sequence)
        top_ids = torch.from_numpy(scores.top_ids[b, start:end]).long()  # [L, k]
        teacher = torch.log_softmax(torch.from_numpy(scores.top_logprobs[b, start:end]), dim=-1)
        student_k = torch.log_softmax(logits[start - 1:end - 1].gather(-1, top_ids), dim=-1)
        losses.append((student_k.exp() * (student_k - teacher)).sum(-1))
    return torch.cat(losses).mean()


def main(argv: list[str] | None = None, client: tc.Client | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="the service (default $TEACHERCACHE_URL)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--top-logprobs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--teacher-dir", type=Path, default=TEACHER_DIR)
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.teacher_dir)
    prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
    student = build_student(args.teacher_dir)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)
    own_client = client is None
    client = client or tc.Client(args.url)
    losses: list[float] = []
    try:
        for step in range(args.steps):
            sequences = sample(student, prompt_ids, args.new_tokens)
            scores = client.score(sequences, top_logprobs=args.top_logprobs)
            loss = reverse_kl(student, sequences, [len(p) for p in prompt_ids], scores)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
            if step % args.log_every == 0 or step == args.steps - 1:
                print(f"step {step:4d}  reverse KL {loss.item():.4f}")
    finally:
        if own_client:
            client.close()
    window = max(1, min(5, len(losses) // 3))
    print(f"first {window} steps: {statistics.fmean(losses[:window]):.4f}, "
          f"last {window}: {statistics.fmean(losses[-window:]):.4f}")
    return losses


if __name__ == "__main__":
    main()
