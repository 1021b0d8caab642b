"""The Bigram-Backcopy (BB) task and its small transformer, from "Active-Dormant Attention Heads:
Mechanistically Demystifying Extreme-Token Phenomena in LLMs" (Guo et al., arXiv 2410.13835; official
code ``BBM/data.py`` class ``bbm``, ``BBM/model.py``, ``BBM/train_main.py``).

Task: sequences start with BOS; the first token is drawn from the unigram marginal with the trigger
tokens removed; then for every position: if ``x_t`` is a trigger (one of the ``k`` most frequent tokens),
``x_{t+1} = x_{t-1}`` (back-copy), otherwise ``x_{t+1} ~ P(.|x_t)`` (bigram). The attention head should
be *active* on triggers (attend to the previous token and copy it) and *dormant* elsewhere, where it
dumps its attention on BOS (the attention sink), while the value state of BOS shrinks (value-state
drain) and the residual norm of BOS grows (residual-state peak).

Deviations (CPU, offline): the paper's bigram statistics are the character bigrams of Tiny Shakespeare,
which the project does not ship; here they are a seeded random Markov chain over 65 symbols with sparse
Dirichlet rows (``bigram_table``) and its stationary distribution as the marginal. The model is smaller
(dim 64, sequence length 64, about 1k Adam steps instead of 10k at dim 256 and length 256). ReLU attention
(``attn="relu"``) is ``relu(q k^T / sqrt(d))`` on the causal keys with no normalization, as the paper's
``attn_use_relu`` option.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

VOCAB = 65
BOS = 65


def bigram_table(vocab: int = VOCAB, concentration: float = 0.1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(cond (V, V), marginal (V,))``: sparse random transition rows and their stationary distribution."""
    g = torch.Generator().manual_seed(seed)
    conc = torch.full((vocab,), concentration)
    gam = torch._standard_gamma(conc.expand(vocab, vocab).contiguous(), generator=g)
    cond = gam / gam.sum(-1, keepdim=True)
    m = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
    c64 = cond.double()
    for _ in range(500):
        m = m @ c64
    return cond, (m / m.sum()).float()


@dataclass
class BBTask:
    """The generated BB task: ``sample(batch)`` -> (B, T + 1) token ids starting with BOS."""

    seq_len: int = 64
    k: int = 3
    seed: int = 0
    cond: Tensor = field(init=False)
    marginal: Tensor = field(init=False)
    triggers: list[int] = field(init=False)

    def __post_init__(self):
        self.cond, self.marginal = bigram_table(seed=self.seed)
        self.triggers = self.marginal.topk(self.k).indices.sort().values.tolist()

    def is_trigger(self, x: Tensor) -> Tensor:
        return torch.isin(x, torch.tensor(self.triggers))

    def sample(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        t = self.seq_len
        x = torch.empty(batch, t + 1, dtype=torch.long)
        x[:, 0] = BOS
        first = self.marginal.clone()
        first[self.triggers] = 0
        x[:, 1] = torch.multinomial(first / first.sum(), batch, replacement=True, generator=generator)
        x[:, 2] = torch.multinomial(self.cond[x[:, 1]], 1, generator=generator)[:, 0]
        for i in range(2, t):
            nxt = torch.multinomial(self.cond[x[:, i]], 1, generator=generator)[:, 0]
            trig = self.is_trigger(x[:, i])
            x[:, i + 1] = torch.where(trig, x[:, i - 1], nxt)
        return x


class BBBlock(nn.Module):
    def __init__(self, dim: int, attn: str):
        super().__init__()
        self.attn_kind = attn
        self.ln1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, record: dict | None = None) -> Tensor:
        h = self.ln1(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        t = x.shape[1]
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        if self.attn_kind == "softmax":
            a = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        else:
            a = torch.relu(s) * causal
        x = x + self.o(a @ v)
        x = x + self.mlp(self.ln2(x))
        if record is not None:
            record["attn"] = a.detach()
            record["value"] = v.detach()
            record["resid"] = x.detach()
        return x


class BBModel(nn.Module):
    """One-layer, one-head pre-norm transformer (token + learned position embeddings, MLP, LayerNorm)."""

    def __init__(self, dim: int = 64, seq_len: int = 64, attn: str = "softmax", layers: int = 1):
        super().__init__()
        if attn not in ("softmax", "relu"):
            raise ValueError(f"attn must be 'softmax' or 'relu', got {attn!r}")
        self.emb = nn.Embedding(VOCAB + 1, dim)
        self.pos = nn.Embedding(seq_len + 1, dim)
        self.blocks = nn.ModuleList([BBBlock(dim, attn) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, VOCAB + 1, bias=False)

    def forward(self, x: Tensor, record: list | None = None) -> Tensor:
        h = self.emb(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for i, b in enumerate(self.blocks):
            h = b(h, record[i] if record is not None else None)
        return self.out(self.ln(h))


@torch.no_grad()
def bb_measures(model: BBModel, task: BBTask, x: Tensor, threshold: float = 0.89) -> dict:
    """Sink / drain / peak / detector measures of layer 0 on a batch ``x`` (B, T) (inputs only)."""
    rec = [dict() for _ in model.blocks]
    logits = model(x, rec)
    a, v, r = rec[0]["attn"], rec[0]["value"], rec[0]["resid"]
    share = a / a.sum(-1, keepdim=True).clamp_min(1e-30)  # normalized (== a for softmax)
    q = torch.arange(1, x.shape[1])
    trig = task.is_trigger(x[:, 1:])
    bos = share[:, 1:, 0]  # queries 1.. -> BOS
    prev = share[:, q, q - 1]
    vn = v.norm(dim=-1)
    rn = r.norm(dim=-1)
    dormant_q = bos >= threshold
    return {
        "bos_attn_nontrigger": float(bos[~trig].mean()),
        "bos_attn_trigger": float(bos[trig].mean()),
        "prev_attn_trigger": float(prev[trig].mean()),
        "value_drain": float((vn[:, 0] / vn[:, 1:].mean(-1)).mean()),
        "resid_peak": float((rn[:, 0] / rn[:, 1:].median(-1).values).mean()),
        "dormant_on_nontrigger": float(dormant_q[~trig].double().mean()),
        "active_on_trigger": float((~dormant_q[trig]).double().mean()),
        "logits": logits,
    }


@torch.no_grad()
def token_detector(model: BBModel, task: BBTask, threshold: float = 0.89) -> dict[int, float]:
    """The official probe: feed ``[BOS, every non-trigger token..., x]`` and read the attention of the last
    position on BOS; ``< threshold`` means the head is active on ``x``. Returns ``{token: bos attention}``."""
    non = [t for t in range(VOCAB) if t not in task.triggers]
    base = torch.tensor([BOS] + non)
    xs = torch.stack([torch.cat([base, torch.tensor([t])]) for t in range(VOCAB)])
    xs = xs[:, -model.pos.num_embeddings :]
    xs[:, 0] = BOS
    rec = [dict() for _ in model.blocks]
    model(xs, rec)
    a = rec[0]["attn"]
    share = a[:, -1] / a[:, -1].sum(-1, keepdim=True).clamp_min(1e-30)
    return {t: float(share[t, 0]) for t in range(VOCAB)}


def train_bb(
    attn: str = "softmax",
    steps: int = 800,
    batch: int = 64,
    dim: int = 64,
    seq_len: int = 64,
    lr: float = 3e-3,
    optimizer: str = "adam",
    eval_every: int = 50,
    seed: int = 0,
    task: BBTask | None = None,
    max_seconds: float | None = None,
) -> dict:
    """Train the BB model on CPU; returns ``{"model", "task", "history": [measures per eval step], ...}``."""
    torch.manual_seed(seed)
    task = BBTask(seq_len=seq_len, seed=0) if task is None else task
    model = BBModel(dim, seq_len, attn)
    if optimizer == "adam":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=1e-4)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    g = torch.Generator().manual_seed(seed + 1)
    ev = task.sample(256, torch.Generator().manual_seed(12345))
    hist = []
    t0 = time.time()
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            model.eval()
            m = bb_measures(model, task, ev[:, :-1])
            lp = torch.log_softmax(m.pop("logits"), -1).gather(-1, ev[:, 1:, None])[..., 0]
            trig = task.is_trigger(ev[:, 1:-1])
            m.update(
                step=step,
                loss=float(-lp.mean()),
                icl_loss=float(-lp[:, 1:][trig].mean()),
                markov_loss=float(-lp[:, 1:][~trig].mean()),
            )
            hist.append(m)
            model.train()
        if step == steps or (max_seconds is not None and time.time() - t0 > max_seconds):
            break
        x = task.sample(batch, g)
        logits = model(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return {"model": model, "task": task, "history": hist, "seconds": time.time() - t0, "attn": attn}
