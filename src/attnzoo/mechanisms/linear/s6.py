"""S6: the selective state-space token mixer of Mamba, the comparison baseline of the DSF paper.

Papers:
* "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (Gu, Dao; arXiv 2312.00752),
  Algorithm 2 (S6) and section 3.
* "Understanding the differences in Foundation Models: Attention, State Space Models, and Recurrent
  Neural Networks" (Sieber, Amo Alonso, Didier, Zeilinger, Orvieto; arXiv 2405.15731): the dynamical
  systems framework (DSF) in which S6 is compared with (linear) attention; see :mod:`attnzoo.dsf`.

Per channel ``c`` (``H * head_dim`` channels in all) with state size ``n = d_state``; ``u = W_in x``
is the mixer's input, and the selection parameters are functions of it::

    Delta_t = softplus(W_up W_down u_t + b_Delta)  (per channel)      b_t = W_B u_t,  c_t = W_C u_t  (in R^n)
    h_{t,c} = exp(Delta_{t,c} A_c) * h_{t-1,c} + Delta_{t,c} u_{t,c} b_t          A_c = -exp(A_log_c) in R^n (diagonal)
    y_{t,c} = c_t . h_{t,c} + D_c u_{t,c}

then ``out = W_o y``. Initialisation as in Mamba: ``A_c = -(1, 2, ..., n)`` (S4D-real),
``softplus(b_Delta)`` log-uniform in ``[dt_min, dt_max] = [0.001, 0.1]``, ``D = 1``,
``dt_rank = ceil(dim / 16)``.

In the DSF this is ``h_t = Lambda_t h_{t-1} + B_t u_t``, ``y_t = C_t h_t + D u_t`` with a diagonal,
input-dependent ``Lambda_t = exp(Delta_t A)``: linear attention with ``q <-> c_t``, ``k <-> b_t`` and a
learned diagonal decay instead of a normaliser. The fast form is therefore the shared chunked
recurrence :func:`attnzoo.core.scan.recurrence_chunked` with a per-state-entry log decay
``Delta_{t,c} A_{c,n}`` (``q = c_t``, ``k = b_t``, ``v = Delta_t * u_t``); the reference is the token loop
above written per channel. Decoding state: ``{"h": (B, H, n, head_dim)}``.

Deviations: the S6 layer only. Mamba's surrounding block (expansion, causal depthwise convolution,
SiLU gate) is not part of the token mixer and is not included. ``B`` is discretised with the Euler
rule ``Delta * B`` as in Mamba's reference code (the paper's ZOH applies to ``A``; the code's
simplification is used for ``B``). The selection projections read ``u`` (Mamba reads the post-convolution
activation, which is ``u`` here since there is no convolution).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.layout import merge_heads, split_heads
from ...core.module import AttentionModule
from ...core.scan import recurrence_chunked, recurrence_step
from ...registry import register


@register(
    "s6",
    paper="Mamba: Linear-Time Sequence Modeling with Selective State Spaces (S6 layer); compared in "
    "'Understanding the differences in Foundation Models: Attention, State Space Models, and Recurrent Neural Networks' "
    "(arXiv 2405.15731)",
    arxiv="2312.00752",
    family="linear",
    capabilities={"causal_self", "decode", "trainable"},
    complexity="time O(N C n e) (chunk C, state n, e channels); memory O(N n e + C^2 n e); decode state O(n e)",
    defaults={"d_state": 16, "dt_rank": None, "dt_min": 0.001, "dt_max": 0.1, "chunk": 16},
    summary="selective SSM (Mamba's S6): input-dependent diagonal decay exp(Delta A), B and C; the DSF paper's "
    "recurrent baseline",
    deviations="S6 layer only (no Mamba block conv/gate); Euler discretisation of B as in the Mamba code",
    test_config={"d_state": 4, "chunk": 8},
)
class S6(AttentionModule):
    """Selective SSM token mixer ``(B, N, C) -> (B, N, C)`` with ``H * head_dim`` channels."""

    def __init__(self, dim: int, num_heads: int, **kw) -> None:
        super().__init__(dim, num_heads, **kw)
        self.q_proj = None  # S6 has no queries/keys: c_t and b_t come from bc_proj
        self.k_proj = None
        st = self.settings
        n = int(st["d_state"])
        if n < 1:
            raise ValueError(f"s6: d_state must be >= 1, got {n}")
        channels = num_heads * self.head_dim
        rank = math.ceil(dim / 16) if st["dt_rank"] is None else int(st["dt_rank"])
        self.d_state = n
        self.bc_proj = nn.Linear(channels, 2 * n, bias=False)
        self.dt_down = nn.Linear(channels, rank, bias=False)
        self.dt_up = nn.Linear(rank, channels, bias=True)
        dt = torch.exp(torch.rand(channels) * (math.log(st["dt_max"]) - math.log(st["dt_min"])) + math.log(st["dt_min"]))
        with torch.no_grad():
            self.dt_up.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^{-1}(dt)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(channels, 1))
        self.D = nn.Parameter(torch.ones(channels))

    # -- the selection parameters ---------------------------------------------------------------------
    def selection(self, x: Tensor) -> dict[str, Tensor]:
        """``u (B, N, E)``, ``delta (B, N, E)``, ``b, c (B, N, n)`` and ``A (E, n)`` for input ``x (B, N, C)``."""
        u = self.v_proj(x)
        b, c = self.bc_proj(u).split(self.d_state, dim=-1)
        delta = F.softplus(self.dt_up(self.dt_down(u)))
        return {"u": u, "delta": delta, "b": b, "c": c, "A": -torch.exp(self.A_log.to(x.dtype))}

    def _scan_inputs(self, sel: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``q = c``, ``k = b`` (broadcast over heads), ``v = delta * u``, log decay ``delta * A`` (per head)."""
        h, e, n = self.num_heads, self.head_dim, self.d_state
        bsz, length = sel["u"].shape[:2]
        q = sel["c"][:, None].expand(bsz, h, length, n)
        k = sel["b"][:, None].expand(bsz, h, length, n)
        dh = split_heads(sel["delta"], h)  # (B, H, N, e)
        v = dh * split_heads(sel["u"], h)
        a = sel["A"].view(h, e, n).transpose(-1, -2)  # (H, n, e)
        g = dh[:, :, :, None, :] * a[None, :, None]  # (B, H, N, n, e)
        return q, k, v, g

    def _skip(self, sel: dict[str, Tensor]) -> Tensor:
        return split_heads(sel["u"] * self.D.to(sel["u"].dtype), self.num_heads)

    def mix_reference(self, x: Tensor) -> Tensor:
        """Reference: the S6 recurrence token by token, per channel (float64-capable). Returns ``y (B, N, E)``."""
        sel = self.selection(x)
        u, delta, b, c, a = sel["u"], sel["delta"], sel["b"], sel["c"], sel["A"]
        h = u.new_zeros(u.shape[0], u.shape[2], self.d_state)  # (B, E, n)
        ys = []
        for t in range(u.shape[1]):
            h = torch.exp(delta[:, t, :, None] * a) * h + (delta[:, t] * u[:, t])[:, :, None] * b[:, t, None, :]
            ys.append((h * c[:, t, None, :]).sum(-1) + self.D * u[:, t])
        return torch.stack(ys, dim=1)

    def mix(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        """Fast: the chunked recurrence. Returns ``y (B, N, E)`` and the state ``{"h": (B, H, n, e)}``."""
        sel = self.selection(x)
        q, k, v, g = self._scan_inputs(sel)
        o, h = recurrence_chunked(q, k, v, g, chunk=self.settings["chunk"], initial=None if state is None else state["h"])
        return merge_heads(o + self._skip(sel)), {"h": h}

    def forward(self, x: Tensor, context: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        self.check_inputs(x, context, key_padding_mask)
        y = self.mix_reference(x) if self.impl == "reference" else self.mix(x)[0]
        return self.out_proj(y)

    # -- decoding ------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device=None, dtype=None) -> dict:
        self.spec.require("decode")
        dtype = dtype or self.v_proj.weight.dtype
        device = device or self.v_proj.weight.device
        return {"h": torch.zeros(batch_size, self.num_heads, self.d_state, self.head_dim, dtype=dtype, device=device)}

    def prefill(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        self.spec.require("decode")
        self.check_inputs(x, None, None)
        y, state = self.mix(x, state)
        return self.out_proj(y), state

    def step(self, x_t: Tensor, state: dict) -> tuple[Tensor, dict]:
        x3, squeeze = self._check_step_input(x_t)
        sel = self.selection(x3)
        q, k, v, g = self._scan_inputs(sel)
        o, h = recurrence_step(state["h"], q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0])
        y = self.out_proj(merge_heads(o[:, :, None] + self._skip(sel)))
        return (y[:, 0] if squeeze else y), {"h": h}
