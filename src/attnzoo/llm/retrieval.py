"""RetrievalAttention press: "RetrievalAttention: Accelerating Long-Context LLM Inference via Vector
Retrieval" (Liu et al., arXiv 2409.10516).

After prefill, each layer keeps a static part in the KV cache (``n_sink`` initial tokens + the most
recent tokens, filling the budget) and moves every other key/value to a CPU vector index, one per
(batch, kv head), built with faiss (``index="hnsw"``: ``IndexHNSWFlat`` with inner-product metric;
``"flat"``: exact ``IndexFlatIP``; ``"exact"``: torch top-k, the oracle). At every later step each
query head searches its kv head's index with its query vector, takes the ``top_k`` keys of largest
inner product, and attends over ``static cache + retrieved`` with one softmax (equal to the paper's
log-sum-exp merge of the two partial attentions). Decoding goes through transformers'
``AttentionInterface`` (registered with ``AttentionMaskInterface``) while the press is active.

Deviations: the paper's attention-aware index (built from prefill query->key neighbours, to cope with
the query/key distribution gap) is not implemented; off-the-shelf HNSW / flat inner-product search is
used (the paper's "IVF/HNSW" baselines). Paper static part: 128 sinks + 512 recent, top-100 retrieved
[from the spec, marked recall]; here ``n_sink=4`` and the window is whatever the budget leaves.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .interface import attention_implementation, register_attention, sdpa_forward
from .presses import BasePress, repeat_kv

_ATTN_NAME = "attnzoo_retrieval"


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the retrieval press needs faiss: pip install faiss-cpu") from e
    return faiss


class KeyIndex:
    """Maximum-inner-product search over the keys of one (batch, kv head)."""

    def __init__(self, keys: Tensor, kind: str = "hnsw", hnsw_m: int = 32, ef_search: int = 128):
        self.kind = kind
        self.keys = keys.float().contiguous()  # (M, D)
        if kind == "exact":
            self.index = None
            return
        faiss = _faiss()
        d = self.keys.shape[-1]
        if kind == "flat":
            self.index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efSearch = ef_search
        else:
            raise ValueError(f"index must be 'hnsw', 'flat' or 'exact', got {kind!r}")
        self.index.add(self.keys.numpy())

    def search(self, queries: Tensor, k: int) -> Tensor:
        """Indices ``(n, k)`` of the ``k`` keys with largest inner product for each query ``(n, D)``."""
        k = min(k, self.keys.shape[0])
        if self.index is None:
            return (queries.float() @ self.keys.T).topk(k, dim=-1).indices
        _, idx = self.index.search(queries.detach().float().contiguous().numpy(), k)
        idx = torch.from_numpy(idx).long()
        # HNSW may return -1 when fewer than k neighbours were reached: fall back to the best hit
        return torch.where(idx < 0, idx[:, :1].clamp_min(0), idx)


@dataclass
class _LayerStore:
    keys: Tensor  # (B, Hkv, M, D)
    values: Tensor
    indexes: list  # [b][h] KeyIndex


@dataclass
class RetrievalPress(BasePress):
    """Static sinks + recent window in the cache; the rest in a faiss index, top-k retrieved per step."""

    n_sink: int = 4
    top_k: int = 64
    index: str = "hnsw"
    hnsw_m: int = 32
    ef_search: int = 128
    store: dict = field(default_factory=dict, init=False, repr=False)
    retrieved_counts: list = field(default_factory=list, init=False, repr=False)

    name = "retrieval"

    def protected(self, seq_len):
        return self.n_sink + 1

    def reset(self):
        self.records = []
        self.store = {}
        self.retrieved_counts = []

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        b, h, t, d = keys.shape
        n = self.n_kept(t)
        s = min(self.n_sink, n)
        recent = n - s
        mid_k, mid_v = keys[:, :, s : t - recent], values[:, :, s : t - recent]
        if mid_k.shape[2] > 0:
            idx = [
                [KeyIndex(mid_k[i, j], self.index, self.hnsw_m, self.ef_search) for j in range(h)]
                for i in range(b)
            ]
            self.store[module.layer_idx] = _LayerStore(mid_k.contiguous(), mid_v.contiguous(), idx)
        static_k = torch.cat([keys[:, :, :s], keys[:, :, t - recent :]], dim=2)
        static_v = torch.cat([values[:, :, :s], values[:, :, t - recent :]], dim=2)
        return static_k.contiguous(), static_v.contiguous()

    def report(self):
        r = super().report()
        r["top_k"] = self.top_k
        r["index"] = self.index
        r["offloaded_tokens"] = {i: s.keys.shape[2] for i, s in self.store.items()}
        return r

    # ---- decode ---------------------------------------------------------------------------------
    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        store = self.store.get(getattr(module, "layer_idx", -1))
        q_len, t = query.shape[2], key.shape[2]
        if store is None or q_len >= t:  # prefill, or nothing offloaded for this layer
            return sdpa_forward(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        return retrieval_attention(query, key, value, store, self.top_k, scaling), None

    def decode_context(self, model):
        register_attention(_ATTN_NAME, _dispatch)
        return _active(self, model)


_ACTIVE: list[RetrievalPress] = []


def _dispatch(module, query, key, value, attention_mask, **kwargs):
    return _ACTIVE[-1].attention(module, query, key, value, attention_mask, **kwargs)


@contextlib.contextmanager
def _active(press: RetrievalPress, model):
    _ACTIVE.append(press)
    try:
        with attention_implementation(model, _ATTN_NAME):
            yield
    finally:
        _ACTIVE.pop()


def retrieval_attention(
    query: Tensor, key: Tensor, value: Tensor, store: _LayerStore, top_k: int, scaling=None
) -> Tensor:
    """``(B, q, Hq, D)`` output: softmax over the static cache (bottom-right causal) + per-query top-k retrieved keys."""
    b, hq, q_len, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    scale = d**-0.5 if scaling is None else float(scaling)
    t = key.shape[2]
    logits_s = (
        torch.matmul(query.float(), repeat_kv(key, g).float().transpose(-1, -2)) * scale
    )  # (B, Hq, q, T)
    qpos = torch.arange(q_len, device=query.device)[:, None] + (t - q_len)
    kpos = torch.arange(t, device=query.device)[None, :]
    logits_s = logits_s.masked_fill(kpos > qpos, float("-inf"))
    k_eff = min(top_k, store.keys.shape[2])
    idx = torch.empty(b, hq, q_len, k_eff, dtype=torch.long)
    for i in range(b):
        for h in range(hkv):
            qs = query[i, h * g : (h + 1) * g].reshape(g * q_len, d)
            idx[i, h * g : (h + 1) * g] = store.indexes[i][h].search(qs, k_eff).view(g, q_len, k_eff)
    mk = repeat_kv(store.keys, g)  # (B, Hq, M, D)
    mv = repeat_kv(store.values, g)
    flat = idx.view(b, hq, q_len * k_eff, 1).expand(-1, -1, -1, d)
    rk = mk.gather(2, flat).view(b, hq, q_len, k_eff, d).float()
    rv = mv.gather(2, flat).view(b, hq, q_len, k_eff, d).float()
    logits_r = torch.einsum("bhqd,bhqkd->bhqk", query.float(), rk) * scale
    p = torch.cat([logits_s, logits_r], dim=-1).softmax(dim=-1)
    out = torch.matmul(p[..., :t], repeat_kv(value, g).float()) + torch.einsum(
        "bhqk,bhqkd->bhqd", p[..., t:], rv
    )
    return out.to(query.dtype).transpose(1, 2).contiguous()
