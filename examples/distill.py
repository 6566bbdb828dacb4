"""Distil the teacher into a tiny student on CPU, from a finished job's top-k soft labels.

    python examples/distill.py --job JOB_ID --url http://127.0.0.1:8080 --steps 300
    python examples/distill.py --shards out/          # downloaded shards: a folder or .parquet files
    python examples/distill.py --shards out/ --layout packed --tokens-per-batch 2048

The student is a randomly initialised 2-layer LlamaForCausalLM (hidden size 64) built from
the teacher's own config, so it shares the teacher's tokenizer and vocabulary: the token ids
in the shards are the student's ids. With ``--job`` the shards are streamed from the service
(ShardDataset, range requests); with ``--shards`` they are read from local disk. Either way
collate_topk lays each batch out so that position ``t`` holds the teacher's top-k for the
token at ``t``, which the student predicts from position ``t - 1``. With ``--layout packed``
ShardDataset builds packed batches instead (the sequences of a batch concatenated, with
``position_ids`` restarting per sequence, which transformers turns into a block-diagonal causal
mask, and the targets only at ``target_positions``): no padding is computed, and on the same rows
both layouts give the same loss (``distillation_loss`` and ``packed_distillation_loss``).

The loss, per completion position (README: "Students: client, streaming, distillation"),
chosen with ``--soft-labels``:

``topk`` (default), today's renormalised top-k KL:

    p = softmax(teacher top-k logprobs)                         the teacher, renormalised over its k
    log q = s - logsumexp(s),  s = student log-probs at the k ids   the student, renormalised over the same k
    KL(p || q) = sum_k p (log p - log q)

``topk-ghost``: the same k entries unrenormalised plus one "ghost" bucket holding the rest of
the mass on both sides (the shard's ``tail_logprob`` for the teacher, log(1 - sum of the k
student probabilities) for the student, from its full softmax): KL over k + 1 buckets.

``sampled`` (a job with ``soft_labels: {"kind": "sampled"}``): random-sampling KD (Anshumann et
al., ACL 2025): the cross-entropy -sum_i (c_i / N) log q(i) of the student's full softmax against
the teacher's draw counts over the drawn ids, an unbiased estimate of the full-distribution
cross-entropy.

The loss is averaged over the completion positions of the batch, plus ``alpha`` times the cross-entropy
of the completion tokens themselves. It prints the loss every ``--log-every`` steps and the
first and last averages; ``main()`` returns the per-step losses.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

import teachercache as tc
from teachercache.shard_format import read_table

ROOT = Path(__file__).resolve().parent.parent
TEACHER_DIR = ROOT / "models" / "smollm2-135m-instruct"
# What collate_topk reads: the rest of a shard's columns need not cross the network.
COLUMNS = [
    "custom_id",
    "prompt_token_ids",
    "completion_token_ids",
    "token_logprobs",
    "top_token_ids",
    "top_logprobs",
    "finish_reason",
]
# What each --soft-labels reads beyond COLUMNS.
EXTRA_COLUMNS = {"topk": [], "topk-ghost": ["tail_logprob"], "sampled": ["sample_token_ids", "sample_counts"]}
SOFT_LABELS = tuple(EXTRA_COLUMNS)
# Stands in for -inf on masked top-k entries: exp() of it is exactly 0, and unlike -inf it
# never turns into NaN in (log p - log q) or in the gradients.
MASKED = -1e4
AVERAGE_OVER = 10  # steps averaged for the "first" and "last" loss


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--job", help="a finished job's id (streams its shards from --url)")
    source.add_argument("--shards", nargs="+", type=Path, help="local shards: a folder or .parquet files")
    parser.add_argument("--url", help="the service's base URL (default: $TEACHERCACHE_URL)")
    parser.add_argument("--teacher-dir", type=Path, default=TEACHER_DIR, help="the teacher's model folder")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per padded batch")
    parser.add_argument("--layout", choices=["padded", "packed"], default="padded")
    parser.add_argument("--tokens-per-batch", type=int, default=1024, help="tokens per packed batch")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--soft-labels", choices=SOFT_LABELS, default="topk",
                        help="the targets and their loss (module docstring)")
    parser.add_argument("--alpha", type=float, default=0.0, help="weight of the cross-entropy on the tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--log-every", type=int, default=20)
    return parser.parse_args(argv)


# -- the student ----------------------------------------------------------------------


def build_student(teacher_dir: Path, layers: int, hidden: int, seed: int) -> LlamaForCausalLM:
    """A small, randomly initialised Llama with the teacher's vocabulary and special tokens."""
    heads = max(1, hidden // 16)
    config = LlamaConfig.from_pretrained(teacher_dir)
    config.update(
        {
            "num_hidden_layers": layers,
            "hidden_size": hidden,
            "intermediate_size": 4 * hidden,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "head_dim": hidden // heads,
        }
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


# -- the loss -------------------------------------------------------------------------


def topk_forward_kl(
    teacher_logprobs: torch.Tensor, student_logits: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """KL(p || q) per position over the teacher's top-k entries, both sides renormalised over them.

    ``teacher_logprobs`` [N,k]: the teacher's top-k logprobs; ``student_logits`` [N,k]: the
    student's logits (or log-probs: renormalising over the k cancels the full-vocabulary
    normaliser, so both give the same q) at the same token ids; ``valid`` [N,k]: False on
    padding entries.
    """
    log_p = teacher_logprobs.masked_fill(~valid, MASKED).log_softmax(-1)
    student = student_logits.masked_fill(~valid, MASKED)
    log_q = student - student.logsumexp(-1, keepdim=True)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def logits_at(student: LlamaForCausalLM, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """The student's logits [N,k] at ``token_ids`` [N,k] only, from final hidden states [N,H].

    Llama's LM head is a bias-free linear layer, so logit(i) = hidden . W[i]: the k rows of W
    instead of the whole vocabulary (49152 for SmolLM2), which is most of a step's cost otherwise.
    """
    weight = student.get_output_embeddings().weight
    return torch.einsum("nh,nkh->nk", hidden, weight[token_ids])


def distillation_loss(
    student: LlamaForCausalLM, batch: dict[str, Any], alpha: float, kind: str = "topk"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, kl) of a padded batch (collate_topk): the mean distillation term (--soft-labels)
    over the batch's completion positions, plus alpha x CE."""
    hidden = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    # The hidden state at t predicts the token at t + 1, where collate_topk put the teacher's top-k.
    predicts = batch["labels_mask"][:, 1:]
    targets = {name: batch[name][:, 1:][predicts] for name in TARGETS if name in batch}
    return soft_label_loss(student, hidden[:, :-1][predicts], targets, batch["input_ids"][:, 1:][predicts],
                           kind, alpha)


def packed_distillation_loss(
    student: LlamaForCausalLM, batch: dict[str, Any], alpha: float, kind: str = "topk"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, kl) of a packed batch (ShardDataset(layout="packed")), the same as distillation_loss
    on the same rows. transformers reads the restarts of ``position_ids`` as sequence boundaries
    (a block-diagonal causal mask; flash-attention's varlen kernel takes ``cu_seqlens`` instead)."""
    # use_cache=False: transformers builds the packed mask only when there is no KV cache.
    hidden = student.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           use_cache=False).last_hidden_state[0]
    targets = batch["target_positions"]
    # The hidden state at t - 1 predicts the target at t; a sequence's first token has no t - 1.
    predicted = batch["position_ids"][0, targets] > 0
    targets = targets[predicted]
    wanted = {name: batch[name][predicted] for name in TARGETS if name in batch}
    return soft_label_loss(student, hidden[targets - 1], wanted, batch["input_ids"][0, targets], kind, alpha)


def loss_at(student: LlamaForCausalLM, hidden: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor,
            tokens: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, kl) from the hidden states [N,H] that predict N targets: their top-k [N,k] and tokens [N]."""
    kl = topk_forward_kl(top_logprobs, logits_at(student, hidden, top_ids), torch.isfinite(top_logprobs)).mean()
    if alpha == 0:
        return kl, kl
    # The cross-entropy does need the whole vocabulary, at the completion positions only.
    cross_entropy = torch.nn.functional.cross_entropy(student.lm_head(hidden), tokens)
    return kl + alpha * cross_entropy, kl


def ghost_kl(teacher_logprobs: torch.Tensor, tail: torch.Tensor, student_logprobs: torch.Tensor,
             valid: torch.Tensor) -> torch.Tensor:
    """KL over the k entries and the ghost bucket, per position; the student's log-probs [N,k] are
    from its full softmax, so its ghost is log(1 - their sum)."""
    log_p = torch.cat([teacher_logprobs.masked_fill(~valid, MASKED), tail[:, None]], dim=1)
    student = student_logprobs.masked_fill(~valid, MASKED)
    student_ghost = torch.log1p(-student.exp().sum(-1).clamp(max=1 - 1e-6))
    log_q = torch.cat([student, student_ghost[:, None]], dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def sampled_cross_entropy(sample_ids: torch.Tensor, targets: torch.Tensor, student_log_softmax: torch.Tensor
                          ) -> torch.Tensor:
    """-sum_i (c_i / N) log q(i) per position: targets [N,m] (counts / draws, 0 on padding)."""
    return -(targets * student_log_softmax.gather(-1, sample_ids)).sum(-1)


def soft_label_loss(student: LlamaForCausalLM, hidden: torch.Tensor, targets: dict[str, torch.Tensor],
                    tokens: torch.Tensor, kind: str, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, distillation term) for --soft-labels `kind` from the hidden states [N,H] and the
    N positions' targets (top_token_ids, top_logprobs, and tail_logprob / sample_*)."""
    if kind == "topk":
        return loss_at(student, hidden, targets["top_token_ids"], targets["top_logprobs"], tokens, alpha)
    log_softmax = student.lm_head(hidden).log_softmax(-1)  # these need the whole vocabulary
    if kind == "sampled":
        term = sampled_cross_entropy(targets["sample_token_ids"], targets["sample_targets"], log_softmax).mean()
    else:
        top_lps = targets["top_logprobs"]
        term = ghost_kl(top_lps, targets["tail_logprob"], log_softmax.gather(-1, targets["top_token_ids"]),
                        torch.isfinite(top_lps)).mean()
    if alpha == 0:
        return term, term
    return term + alpha * torch.nn.functional.nll_loss(log_softmax, tokens), term


TARGETS = ("top_token_ids", "top_logprobs", "tail_logprob", "sample_token_ids", "sample_targets")


def has_targets(batch: dict[str, Any]) -> bool:
    return bool(batch["labels_mask"].any()) if "labels_mask" in batch else len(batch["target_positions"]) > 0


# -- the data -------------------------------------------------------------------------


def local_shard_files(paths: list[Path]) -> list[Path]:
    files = [file for path in paths for file in (sorted(path.glob("*.parquet")) if path.is_dir() else [path])]
    if not files:
        raise SystemExit(f"no .parquet files in {', '.join(map(str, paths))}")
    return files


def local_loader(paths: list[Path], batch_size: int, seed: int, kind: str = "topk") -> DataLoader:
    columns = COLUMNS + EXTRA_COLUMNS[kind]
    rows = [row for file in local_shard_files(paths) for row in read_table(file, columns=columns).to_pylist()]
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(rows, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=tc.collate_topk)


def streaming_loader(job: str, url: str | None, batch_size: int, seed: int,
                     kind: str = "topk") -> tuple[DataLoader, tc.ShardDataset]:
    dataset = tc.ShardDataset(job=job, base_url=url, columns=COLUMNS + EXTRA_COLUMNS[kind], seed=seed,
                              shuffle_buffer=256)
    return DataLoader(dataset, batch_size=batch_size, collate_fn=tc.collate_topk), dataset


def packed_loader(args: argparse.Namespace) -> tuple[DataLoader, tc.ShardDataset]:
    """Packed batches, built by ShardDataset itself from the Arrow buffers (DataLoader only iterates)."""
    source = {"job": args.job, "base_url": args.url} if args.job else {"shards": local_shard_files(args.shards)}
    dataset = tc.ShardDataset(**source, seed=args.seed, shuffle_buffer=256, layout="packed",
                              columns=COLUMNS + EXTRA_COLUMNS[args.soft_labels], tokens_per_batch=args.tokens_per_batch)
    return DataLoader(dataset, batch_size=None), dataset


def batches(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Collated batches, epoch after epoch, without end; batches of only failed rows are skipped."""
    dataset: tc.ShardDataset | None
    if args.layout == "packed":
        loader, dataset = packed_loader(args)
    elif args.job:
        loader, dataset = streaming_loader(args.job, args.url, args.batch_size, args.seed, args.soft_labels)
    else:
        loader, dataset = local_loader(args.shards, args.batch_size, args.seed, args.soft_labels), None
    epoch = 0
    while True:
        if dataset is not None:
            dataset.set_epoch(epoch)  # a new shard order each epoch, as with DistributedSampler
        seen = 0
        for batch in loader:
            if has_targets(batch):
                seen += 1
                yield batch
        if seen == 0:
            raise SystemExit("the shards hold no completion tokens to distil on")
        epoch += 1


# -- training -------------------------------------------------------------------------


def train(student: LlamaForCausalLM, data: Iterator[dict[str, Any]], args: argparse.Namespace) -> list[float]:
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    student.train()
    losses = []
    loss_of = packed_distillation_loss if args.layout == "packed" else distillation_loss
    for step, batch in zip(range(1, args.steps + 1), data, strict=False):
        loss, kl = loss_of(student, batch, args.alpha, args.soft_labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step == 1 or step % args.log_every == 0:
            print(f"step {step:5d}  loss {loss.item():.4f}  {args.soft_labels} {kl.item():.4f}", flush=True)
    return losses


def main(argv: list[str] | None = None) -> list[float]:
    args = parse_args(argv)
    student = build_student(args.teacher_dir, args.layers, args.hidden, args.seed)
    millions = sum(p.numel() for p in student.parameters()) / 1e6
    print(f"student: {args.layers} layers, hidden {args.hidden}, {millions:.1f}M parameters", flush=True)
    losses = train(student, batches(args), args)
    window = min(AVERAGE_OVER, max(1, len(losses) // 2))
    first, last = statistics.fmean(losses[:window]), statistics.fmean(losses[-window:])
    print(f"loss: first {window} steps {first:.4f} -> last {window} steps {last:.4f}")
    return losses


if __name__ == "__main__":
    main()
