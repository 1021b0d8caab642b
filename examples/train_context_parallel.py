"""Train a small causal language model with context parallelism on CPU processes.

Every rank holds 1/P of every sequence (the tokens at :func:`attnzoo.distributed.local_positions`),
the model's parameters are replicated, attention runs context-parallel
(:class:`attnzoo.distributed.ContextParallel`: ring attention for softmax, halo exchange for a
sliding window, state prefix for linear attention, or head parallelism), and the parameter gradients
are summed over ranks after the backward (the loss is the global mean, so that sum is the exact
gradient). The task needs attention across shards: the second half of each sequence repeats the
first half, so predicting it means looking ``N / 2`` tokens back, on another rank.

Run (processes on one machine; gloo on CPU, NCCL when CUDA is there)::

    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29511 \\
        examples/train_context_parallel.py --steps 300 --mechanism softmax --layout zigzag
    python examples/train_context_parallel.py --spawn 2 --steps 50        # same, without torchrun

``--check`` compares the first step's loss and gradients with the same model run on the whole
sequence in one process (rank 0), e.g. ``--check --dtype float64`` agrees to ~1e-15.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import attnzoo
import attnzoo.distributed as D


class Block(nn.Module):
    def __init__(self, args, seq_len: int):
        super().__init__()
        settings = {"window": args.window} if args.mechanism == "sliding_window" else {}
        layer = attnzoo.create(args.mechanism, args.dim, args.heads, causal=True, **settings)
        self.attn = D.ContextParallel(layer, seq_len=seq_len, layout=args.layout, strategy=args.strategy)
        self.norm1, self.norm2 = nn.LayerNorm(args.dim), nn.LayerNorm(args.dim)
        self.mlp = nn.Sequential(nn.Linear(args.dim, 4 * args.dim), nn.GELU(), nn.Linear(4 * args.dim, args.dim))

    def forward(self, x, parallel: bool):
        h = self.norm1(x)
        x = x + (self.attn(h) if parallel else self.attn.layer(h))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Token + learned absolute position embeddings (indexed by global position), pre-norm blocks."""

    def __init__(self, args, seq_len: int):
        super().__init__()
        self.tok = nn.Embedding(args.vocab, args.dim)
        self.pos = nn.Embedding(seq_len, args.dim)
        self.blocks = nn.ModuleList(Block(args, seq_len) for _ in range(args.layers))
        self.norm = nn.LayerNorm(args.dim)
        self.head = nn.Linear(args.dim, args.vocab)

    def forward(self, tokens, positions, parallel: bool = True):
        x = self.tok(tokens) + self.pos(positions.clamp(max=self.pos.num_embeddings - 1))
        for blk in self.blocks:
            x = blk(x, parallel)
        return self.head(self.norm(x))


def make_batch(step: int, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Global inputs and next-token targets ``(B, N)``: a random first half, repeated (same on every rank)."""
    g = torch.Generator().manual_seed(1000 + step)
    half = (args.seq_len + 1) // 2 + 1
    first = torch.randint(0, args.vocab, (args.batch, half), generator=g)
    seq = torch.cat([first, first], dim=1)[:, : args.seq_len + 1]
    return seq[:, :-1], seq[:, 1:]


def local_loss(model, tokens, targets, rank, world, args, parallel=True):
    """This rank's part of the global mean cross-entropy (summing it over ranks gives the mean)."""
    n = args.seq_len
    pos = D.local_positions(n, rank, world, args.layout)
    tok_l = D.shard(tokens, rank, world, layout=args.layout, dim=1)
    tgt_l = D.shard(targets, rank, world, layout=args.layout, dim=1)
    valid = (pos < n).to(torch.get_default_dtype())
    logits = model(tok_l, pos[None].expand(tokens.shape[0], -1), parallel=parallel)
    ce = F.cross_entropy(logits.transpose(1, 2), tgt_l, reduction="none")  # (B, L)
    return (ce * valid).sum() / (tokens.shape[0] * n)


def all_reduce_grads(model, world):
    if world == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)


def check_first_step(model, args, rank, world) -> float:
    """Max |distributed - single-process| over the loss and every parameter gradient of step 0 (rank 0)."""
    tokens, targets = make_batch(0, args)
    model.zero_grad()
    loss = local_loss(model, tokens, targets, rank, world, args)
    loss.backward()
    total = loss.detach().clone()
    if world > 1:
        dist.all_reduce(total)
    all_reduce_grads(model, world)
    worst = 0.0
    if rank == 0:
        ref = copy.deepcopy(model)
        ref.zero_grad()
        ref_loss = local_loss(ref, tokens, targets, 0, 1, args, parallel=False)
        ref_loss.backward()
        worst = abs(total.item() - ref_loss.item())
        for p, r in zip(model.parameters(), ref.parameters()):
            worst = max(worst, (p.grad - r.grad).abs().max().item())
    model.zero_grad()
    return worst


def train(rank: int, world: int, args) -> dict:
    torch.manual_seed(args.seed)
    torch.set_default_dtype(getattr(torch, args.dtype))
    model = TinyLM(args, args.seq_len)
    if world > 1:  # identical replicas (the seed already makes them so; this makes it a guarantee)
        for p in model.parameters():
            dist.broadcast(p.data, 0)
    result = {"world": world, "losses": [], "comm_bytes_per_step": 0, "seconds_per_step": 0.0}
    if args.check:
        result["check_max_abs_diff"] = check_first_step(model, args, rank, world)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    t0 = time.perf_counter()
    D.comm_stats().reset()
    for step in range(args.steps):
        tokens, targets = make_batch(step, args)
        loss = local_loss(model, tokens, targets, rank, world, args)
        opt.zero_grad()
        loss.backward()
        all_reduce_grads(model, world)
        opt.step()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        result["losses"].append(total.item())
        if rank == 0 and args.log_every and (step % args.log_every == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {total.item():.4f}  (uniform guess: {math.log(args.vocab):.4f})", flush=True)
    steps = max(1, args.steps)
    result["seconds_per_step"] = (time.perf_counter() - t0) / steps
    result["comm_bytes_per_step"] = D.comm_stats().bytes_sent // steps  # attention traffic (not the gradient all-reduce)
    return result


def _spawned(rank, world, args):
    return train(rank, world, args)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mechanism", default="softmax", choices=["softmax", "sliding_window", "linear"])
    p.add_argument("--strategy", default="auto", choices=list(D.STRATEGIES))
    p.add_argument("--layout", default="zigzag", choices=list(D.LAYOUTS))
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--check", action="store_true", help="compare step 0 with a single-process run")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--spawn", type=int, default=0, help="start this many local processes instead of using torchrun")
    p.add_argument("--json", default="", help="write rank 0's result here")
    args = p.parse_args(argv)
    if args.mechanism in ("linear",) and args.layout == "zigzag":
        args.layout = "contiguous"  # the state prefix runs over contiguous shards
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.spawn:
        from attnzoo.distributed.launch import run

        result = run(_spawned, args.spawn, args, timeout_s=120.0, deadline_s=3600.0).values()[0]
    else:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        D.init_process_group(timeout_s=120.0)
        rank, world = D.group_info()
        result = train(rank, world, args)
        dist.barrier()  # every rank done before any tears down: a gloo peer closing early aborts the others
        dist.destroy_process_group()
        if rank != 0:
            return result
    if "check_max_abs_diff" in result:
        print(f"step-0 loss and gradients vs one process: max |diff| = {result['check_max_abs_diff']:.3e}")
    print(f"P={result['world']}: first loss {result['losses'][0]:.4f}, last {result['losses'][-1]:.4f}, "
          f"{result['seconds_per_step'] * 1e3:.1f} ms/step, attention traffic {result['comm_bytes_per_step']} B/step/rank")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)
    return result


if __name__ == "__main__":
    main()
