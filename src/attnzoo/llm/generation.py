"""Prefill with a press, then greedy decoding from the compressed cache at the original positions.

The protocol is kvpress's query-agnostic one: the context is prefilled (and compressed); the question
and the answer come afterwards and are not compressed, with ``position_ids = original_length + i`` so
keys keep the RoPE rotation of their original positions. After answering, every layer is cropped back
to its post-prefill length so one compressed cache can serve several questions.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from .presses import BasePress, attention_modules, cache_layer_kv, cache_lengths, set_cache_layer_kv

QUESTION_MARK = "\u2063QUESTION\u2063"


def new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # pragma: no cover - older transformers
        return DynamicCache()


def split_chat(
    tokenizer, context: str, question: str, system: str | None = None, answer_prefix: str = ""
) -> tuple[Tensor, Tensor]:
    """Token ids ``(context_ids, question_ids)``, each ``(1, n)``, of a chat turn ``context + question``.

    The chat template is rendered around a marker so that the context part (template prefix + context)
    and the question part (question + end of turn + assistant header) are tokenized separately.
    Without a chat template: ``bos + context`` and ``"\\n" + question + "\\nAnswer:"``. ``answer_prefix``
    is appended to the question part (the start of the assistant's answer, as kvpress's pipeline).
    """
    if getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": context + QUESTION_MARK}
        ]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        pre, post = text.split(QUESTION_MARK)
        q_text = question + post
    else:
        bos = tokenizer.bos_token or ""
        pre, q_text = bos + context, "\n" + question + "\nAnswer:"
    q_text = q_text + answer_prefix
    c = tokenizer(pre, add_special_tokens=False, return_tensors="pt").input_ids
    q = tokenizer(q_text, add_special_tokens=False, return_tensors="pt").input_ids
    return c, q


@torch.no_grad()
def prefill(model, context_ids: Tensor, press: BasePress | None = None, cache=None):
    """Run the context through ``model`` (compressing with ``press``); returns ``(cache, last_logits)``."""
    cache = new_cache(model) if cache is None else cache
    ctx = press(model) if press is not None else contextlib.nullcontext()
    with ctx:
        out = model(input_ids=context_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.past_key_values, out.logits[:, -1]


@torch.no_grad()
def greedy_decode(
    model, cache, input_ids: Tensor, start_position: int, max_new_tokens: int, eos_ids=(), crop: bool = True
) -> list[int]:
    """Greedy continuation of ``input_ids`` (1, n) placed at ``start_position`` after ``cache``.

    Positions are explicit (``start_position + i``), so a compressed cache keeps the original RoPE
    positions. With ``crop`` the cache is restored to its length before the call.
    """
    lengths = cache_lengths(cache)
    eos = set(int(e) for e in eos_ids)
    pos = int(start_position)
    ids = input_ids
    out: list[int] = []
    try:
        for _ in range(max_new_tokens):
            n = ids.shape[1]
            position_ids = torch.arange(pos, pos + n, device=ids.device)[None]
            logits = model(
                input_ids=ids,
                past_key_values=cache,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
            nxt = int(logits.argmax(-1))
            pos += n
            if nxt in eos:
                break
            out.append(nxt)
            ids = torch.tensor([[nxt]], device=ids.device)
    finally:
        if crop:
            crop_cache(cache, lengths)
    return out


def crop_cache(cache, lengths: list[int]) -> None:
    for i, n in enumerate(lengths):
        k, v = cache_layer_kv(cache, i)
        if k.shape[-2] != n:
            set_cache_layer_kv(cache, i, k[..., :n, :], v[..., :n, :])


def answer(
    model,
    tokenizer,
    context: str,
    question: str,
    press: BasePress | None = None,
    max_new_tokens: int = 32,
    answer_prefix: str = "",
) -> str:
    """Answer ``question`` about ``context`` with the context's cache compressed by ``press``."""
    from .loading import eos_token_ids

    c, q = split_chat(tokenizer, context, question, answer_prefix=answer_prefix)
    cache, _ = prefill(model, c, press)
    with press.decode_context(model) if press is not None else contextlib.nullcontext():
        toks = greedy_decode(model, cache, q, c.shape[1], max_new_tokens, eos_token_ids(model, tokenizer))
    return tokenizer.decode(toks, skip_special_tokens=True).strip()


@dataclass
class MultiPrefill:
    """One prefill, several presses: every press compresses the same layer inputs into its own cache."""

    caches: list
    logits: Tensor
    length: int


@torch.no_grad()
def prefill_many(model, context_ids: Tensor, presses: list[BasePress | None]) -> MultiPrefill:
    """Prefill once; return one cache per press (``None`` = the full cache, shared, not copied).

    Exactly equivalent to prefilling separately under each press (the prefill itself is never
    affected by a press; only what is stored afterwards), at the cost of one forward pass.
    """
    stores: list[dict[int, tuple[Tensor, Tensor]]] = [dict() for _ in presses]
    for p in presses:
        if p is not None:
            p.reset()

    def hook(module, args, kwargs, output):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cache = kwargs.get("past_key_values", kwargs.get("past_key_value"))
        if hidden is None or cache is None or not BasePress.is_prefill(kwargs, hidden.shape[1]):
            return output
        attn = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        keys, values = cache_layer_kv(cache, module.layer_idx)
        for p, store in zip(presses, stores):
            if p is not None:
                store[module.layer_idx] = p.compress_layer(module, hidden, keys, values, attn, kwargs)
        return output

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in attention_modules(model)]
    try:
        full = new_cache(model)
        out = model(input_ids=context_ids, past_key_values=full, use_cache=True, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    caches = []
    for p, store in zip(presses, stores):
        if p is None:
            caches.append(full)
            continue
        c = new_cache(model)
        for i in sorted(store):
            k, v = store[i]
            c.update(k, v, i)
        caches.append(c)
    return MultiPrefill(caches, out.logits[:, -1], context_ids.shape[1])


def clone_cache(cache):
    return copy.deepcopy(cache)
