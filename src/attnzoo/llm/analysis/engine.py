"""The attention engine of the analysis subpackage: one ``AttentionInterface`` function, many probes.

``with attach(model, probe1, probe2): model(ids)`` switches every attention layer of a Hugging Face
Llama-family model to the registered implementation ``"attnzoo_analysis"``. That function computes the
attention exactly as transformers' ``eager_attention_forward`` (same operations in the same order, so
with no probe editing a layer the logits are bit-identical to ``attn_implementation="eager"``) and
gives every active probe four places to act, per layer:

1. ``edit_logits(ctx, logits)``: pre-softmax scores, causal mask already added (B, H, Q, K);
2. ``edit_weights(ctx, weights)``: post-softmax weights (rows sum to 1);
3. ``observe(ctx, weights)``: read-only statistics computed on the fly (nothing stored unless asked);
4. ``edit_output(ctx, out)``: the per-head outputs ``weights @ V`` (B, H, Q, D) before ``o_proj``
   (head ablation and head reinforcement act here; zeroing head h here is the same as zeroing the
   slice ``[h*D:(h+1)*D]`` of the ``o_proj`` input).

On exit the previous attention implementation is restored and every attribute and hook the probes
added is removed: the model is left exactly as it was (parameters are never touched).

Assumption: no left padding (batch 1 or equal-length prompts); query ``i`` of a call with ``Q`` queries
and ``K`` keys sits at absolute position ``K - Q + i``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

IMPL = "attnzoo_analysis"
_REGISTERED = False


def decoder_layers(model) -> list:
    from ..presses import decoder_layers as _dl

    return list(_dl(model))


def attention_modules(model) -> list:
    return [layer.self_attn for layer in decoder_layers(model)]


def num_layers_heads(model) -> tuple[int, int, int, int]:
    """``(layers, query heads, kv heads, head dim)`` of a Hugging Face decoder."""
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, hd


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """(B, Hkv, K, D) -> (B, Hkv*groups, K, D); query head h uses kv head h // groups."""
    if groups == 1:
        return x
    b, h, k, d = x.shape
    return x[:, :, None].expand(b, h, groups, k, d).reshape(b, h * groups, k, d)


@dataclass
class Ctx:
    """What a probe sees for one attention call of one layer."""

    layer: int
    module: object
    query: Tensor  # (B, H, Q, D) after RoPE
    key: Tensor  # (B, Hkv, K, D) after RoPE (cache included)
    value: Tensor  # (B, Hkv, K, D)
    mask: Tensor | None  # additive (B, 1, Q, K) or None

    @property
    def q_len(self) -> int:
        return self.query.shape[-2]

    @property
    def k_len(self) -> int:
        return self.key.shape[-2]

    @property
    def is_prefill(self) -> bool:
        """True when the call covers the whole sequence (no cached keys before it)."""
        return self.q_len == self.k_len

    def visible(self) -> Tensor:
        """Bool (B or 1, 1, Q, K): True where query i may attend key j."""
        q, k = self.q_len, self.k_len
        i = torch.arange(q, device=self.query.device)[:, None] + (k - q)
        j = torch.arange(k, device=self.query.device)[None, :]
        vis = (j <= i)[None, None]
        if self.mask is not None:
            vis = vis & (self.mask[..., :k] > torch.finfo(self.mask.dtype).min / 2)
        return vis


class Probe:
    """Base class: override any of the hooks; ``layers`` = set of layer indices it acts on (None = all)."""

    layers: set[int] | None = None

    def applies(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def install(self, model) -> None:  # called on entering ``attach``
        pass

    def uninstall(self, model) -> None:  # called on leaving ``attach``
        pass

    def edit_logits(self, ctx: Ctx, logits: Tensor) -> Tensor:
        return logits

    def edit_weights(self, ctx: Ctx, weights: Tensor) -> Tensor:
        return weights

    def observe(self, ctx: Ctx, weights: Tensor) -> None:
        pass

    def edit_output(self, ctx: Ctx, out: Tensor) -> Tensor:
        return out


def analysis_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention (bit-identical to transformers' eager path) with the probes' hooks in between."""
    probes = [p for p in getattr(module, "_az_probes", ()) if p.applies(module.layer_idx)]
    groups = module.num_key_value_groups
    key_states = repeat_kv(key, groups)
    value_states = repeat_kv(value, groups)
    attn = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    mask = attention_mask
    if mask is not None:
        if mask.shape[-1] != key_states.shape[-2]:
            mask = mask[..., : key_states.shape[-2]]
        attn = attn + mask
    ctx = Ctx(module.layer_idx, module, query, key, value, mask)
    for p in probes:
        attn = p.edit_logits(ctx, attn)
    weights = torch.nn.functional.softmax(attn, dim=-1, dtype=torch.float32).to(query.dtype)
    for p in probes:
        weights = p.edit_weights(ctx, weights)
    for p in probes:
        p.observe(ctx, weights)
    out = torch.matmul(weights, value_states)
    for p in probes:
        out = p.edit_output(ctx, out)
    return out.transpose(1, 2).contiguous(), weights


def register() -> None:
    """Register ``"attnzoo_analysis"`` with transformers (attention function + eager additive mask)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(IMPL, analysis_attention)
    try:
        from transformers import AttentionMaskInterface
        from transformers.masking_utils import eager_mask
    except ImportError:  # pragma: no cover - transformers < 4.53 builds masks for any name
        AttentionMaskInterface = None
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register(IMPL, eager_mask)
    _REGISTERED = True


@contextlib.contextmanager
def attach(model, *probes: Probe):
    """Run ``model`` through the analysis attention with ``probes`` active (nestable; restores on exit)."""
    register()
    mods = attention_modules(model)
    stack = getattr(model, "_az_probe_stack", None)
    outer = stack is None
    if outer:
        stack = []
        model._az_probe_stack = stack
        model._az_old_impl = model.config._attn_implementation
        for m in mods:
            m._az_probes = stack
        model.config._attn_implementation = IMPL
    installed = []
    try:
        for p in probes:
            p.install(model)
            installed.append(p)
            stack.append(p)
        yield probes if len(probes) != 1 else probes[0]
    finally:
        for p in reversed(installed):
            for i in range(len(stack) - 1, -1, -1):
                if stack[i] is p:
                    del stack[i]
                    break
            p.uninstall(model)
        if outer:
            model.config._attn_implementation = model._az_old_impl
            del model._az_old_impl
            del model._az_probe_stack
            for m in mods:
                if hasattr(m, "_az_probes"):
                    del m._az_probes


# --------------------------------------------------------------------------- observers


class Capture(Probe):
    """Store the full post-edit attention maps (B, H, Q, K) of chosen layers (short prompts only)."""

    def __init__(self, layers=None):
        self.layers = None if layers is None else set(int(x) for x in layers)
        self.maps: dict[int, Tensor] = {}

    def observe(self, ctx, weights):
        self.maps[ctx.layer] = weights.detach().float().cpu().clone()


class HeadOutputs(Probe):
    """Record per-head outputs ``weights @ V`` at the last query position: ``{layer: (B, H, D)}``.

    With ``all_positions=True`` the full (B, H, Q, D) outputs are kept instead.
    """

    def __init__(self, layers=None, all_positions: bool = False):
        self.layers = None if layers is None else set(int(x) for x in layers)
        self.all_positions = all_positions
        self.out: dict[int, Tensor] = {}

    def edit_output(self, ctx, out):
        self.out[ctx.layer] = (out if self.all_positions else out[:, :, -1]).detach().float().clone()
        return out


class TopKey(Probe):
    """Per decoding step, the top-1 attended key of the last query for every (layer, head).

    ``steps`` is a list (one entry per forward call with ``decode_only`` semantics) of ``(L, B, H)``
    int tensors, built on the fly; only calls whose query count is 1 are recorded by default.
    """

    def __init__(self, num_layers: int, decode_only: bool = True):
        self.num_layers = num_layers
        self.decode_only = decode_only
        self.steps: list[Tensor] = []
        self._cur: dict[int, Tensor] = {}

    def observe(self, ctx, weights):
        if self.decode_only and ctx.q_len != 1:
            return
        self._cur[ctx.layer] = weights[:, :, -1].argmax(-1).cpu()
        if len(self._cur) == self.num_layers:
            self.steps.append(torch.stack([self._cur[i] for i in range(self.num_layers)]))
            self._cur = {}


@contextlib.contextmanager
def forward_hooks(modules_and_fns):
    """Register forward hooks ``[(module, fn), ...]`` and remove them on exit."""
    handles = [m.register_forward_hook(fn) for m, fn in modules_and_fns]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- recomputation check


@torch.no_grad()
def recompute_attention(model, input_ids: Tensor, layer: int) -> Tensor:
    """Attention of ``layer`` recomputed from the hooked q/k projections (RoPE and GQA applied by hand).

    Independent of the attention function: q = q_proj(x), k = k_proj(x) are captured by forward hooks,
    rotated with the model's rotary embedding (rotate-half convention of Llama), k repeated to the
    query heads (query head h uses kv head h // groups), causal softmax of q k^T / sqrt(D).
    """
    nl, nh, nkv, hd = num_layers_heads(model)
    attn = attention_modules(model)[layer]
    got: dict[str, Tensor] = {}

    def grab(name):
        def fn(mod, inp, out):
            got[name] = out.detach()

        return fn

    with forward_hooks([(attn.q_proj, grab("q")), (attn.k_proj, grab("k"))]):
        model(input_ids=input_ids, use_cache=False)
    b, t = input_ids.shape
    q = got["q"].view(b, t, nh, hd).transpose(1, 2).double()
    k = got["k"].view(b, t, nkv, hd).transpose(1, 2).double()
    pos = torch.arange(t)[None].expand(b, t)
    cos, sin = model.model.rotary_emb(got["q"], pos)
    cos, sin = cos[:, None].double(), sin[:, None].double()

    def rot(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat([-x2, x1], -1)

    q = q * cos + rot(q) * sin
    k = k * cos + rot(k) * sin
    k = repeat_kv(k, nh // nkv)
    s = q @ k.transpose(-1, -2) * (attn.scaling if hasattr(attn, "scaling") else hd**-0.5)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    s = s.masked_fill(~causal, float("-inf"))
    return torch.softmax(s, -1)
