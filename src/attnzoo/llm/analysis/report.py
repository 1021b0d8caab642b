"""One run of every analysis on a loaded model: tables (Markdown + JSON) and PNG pictures.

Sections: ``sinks``, ``massive``, ``dormant``, ``bb``, ``retrieval``, ``act``, ``interventions``. Each
returns Markdown and writes its pictures into ``out_dir``; ``results.json`` collects the numbers. Sizes are
chosen for a shared CPU (short prompts, few samples); every size is a parameter.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from . import plots
from .engine import Capture, attach, num_layers_heads
from .stats import (
    AttentionStats,
    dormant_sweep,
    residual_stats,
    sink_dims_from_first_token,
    sink_token_counts,
    threshold_sweep,
    var_sink_tokens,
)

SHORT_PROMPT = "Summer is warm. Winter is cold. The river flows to the sea, and the birds sing in the trees."


def code_text(n_funcs: int = 12, seed: int = 0) -> str:
    rng = random.Random(seed)
    names = ["total", "count", "items", "value", "result", "index", "data", "score", "buffer", "limit"]
    out = []
    for i in range(n_funcs):
        a, b, c = rng.sample(names, 3)
        out.append(
            f"def compute_{a}_{i}({b}, {c}=0):\n    {a} = []\n    for x in range({b}):\n"
            f"        if x % {rng.randint(2, 9)} == {c}:\n            {a}.append(x * {rng.randint(2, 9)})\n"
            f"    return sum({a})\n"
        )
    return "\n\n".join(out)


def chat_text(tokenizer) -> str:
    msgs = [
        {"role": "user", "content": "Can you suggest a quick dinner with rice and vegetables?"},
        {
            "role": "assistant",
            "content": "Sure. Fry an onion, add chopped peppers and carrots, stir in cooked rice, season with soy sauce and serve hot.",
        },
        {"role": "user", "content": "How long does it take, and can I add eggs?"},
        {
            "role": "assistant",
            "content": "About twenty minutes. Push the rice aside, scramble two eggs in the pan, then mix everything together.",
        },
        {"role": "user", "content": "Thanks, and what drink goes well with it?"},
    ]
    return tokenizer.apply_chat_template(msgs, tokenize=False)


def domain_ids(tokenizer, length: int = 160) -> dict[str, torch.Tensor]:
    """``{domain: (1, length) ids}`` for prose (generated haystack), code (generated) and chat."""
    from ..needle import haystack_text

    texts = {"prose": haystack_text(60, seed=3), "code": code_text(), "chat": chat_text(tokenizer) * 3}
    out = {}
    for k, t in texts.items():
        ids = tokenizer(t, add_special_tokens=(k != "chat")).input_ids[:length]
        out[k] = torch.tensor([ids])
    return out


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(f"{x:.3g}" if isinstance(x, float) else str(x) for x in r) + " |")
    return "\n".join(lines)


class Report:
    def __init__(self, model, tokenizer, out_dir, prefix: str = "llm_analysis_", quick: bool = True):
        self.model, self.tok = model, tokenizer
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.quick = quick
        self.results: dict = {}
        self.md: list[str] = []
        self.nl, self.nh, self.nkv, self.hd = num_layers_heads(model)

    def png(self, name: str) -> Path:
        return self.out / f"{self.prefix}{name}.png"

    def tokens(self, ids) -> list[str]:
        return self.tok.convert_ids_to_tokens(ids[0].tolist())

    @torch.no_grad()
    def stats(self, ids) -> AttentionStats:
        st = AttentionStats()
        with attach(self.model, st):
            self.model(input_ids=ids, use_cache=False)
        return st.result()

    # ------------------------------------------------------------------ sinks
    @torch.no_grad()
    def sinks(self, length: int = 160, thres: float = 0.1) -> str:
        doms = domain_ids(self.tok, length)
        res = {k: self.stats(v) for k, v in doms.items()}
        pos0 = torch.stack([r.pos0_mass()[0] for r in res.values()]).mean(0)
        first4 = torch.stack([r.first_k_mass(4)[0] for r in res.values()]).mean(0)
        hmass = torch.stack([r.hidden_sink_mass(thres)[0] for r in res.values()]).mean(0)
        hcount = torch.stack([r.hidden_sink_count(thres)[0].double() for r in res.values()]).mean(0)
        plots.layer_head_grid(
            pos0,
            self.png("sink_pos0"),
            f"attention mass on position 0 (mean of {len(doms)} prompts, {length} tokens)",
            "mean A[i, 0], i ≥ 1",
            cmap="magma",
            vmin=0,
            vmax=1,
        )
        plots.layer_head_grid(
            hmass,
            self.png("hidden_sinks"),
            f"ACT hidden-sink mass (s_j > {thres}, first sink excluded)",
            "mean attention on hidden sinks",
            cmap="viridis",
            vmin=0,
        )
        sweep = threshold_sweep(res["prose"], (0.02, 0.05, 0.1, 0.2, 0.3, 0.5))
        plots.sweep_lines(
            sweep,
            "thres",
            {
                "heads_with_hidden_sink": "share of heads with ≥1 hidden sink",
                "mean_hidden_sink_mass": "mean hidden-sink mass",
                "heads_with_any_sink": "share of heads with any sink",
            },
            self.png("act_sweep"),
            "ACT threshold sweep (prose prompt)",
            "THRES (column score cut)",
            logx=True,
        )
        toks = {k: self.tokens(v) for k, v in doms.items()}
        sink_tokens = {k: list(sink_token_counts(res[k], [toks[k]], thres).items())[:8] for k in res}
        # position vs content control: the same prose without the BOS token at position 0
        nobos = doms["prose"][:, 1:]
        pos0_nobos = self.stats(nobos).pos0_mass()[0]
        # query x key maps on a short prompt for chosen heads
        ids = self.tok(SHORT_PROMPT, return_tensors="pt").input_ids
        cap = Capture()
        with attach(self.model, cap):
            self.model(input_ids=ids, use_cache=False)
        st_short = self.stats(ids)
        flat = hmass.flatten()
        h_hidden = divmod(int(flat.argmax()), self.nh)
        h_low = divmod(int(pos0[2:].flatten().argmin()) + 2 * self.nh, self.nh)
        mid = self.nl // 2
        h_mid = (mid, int(pos0[mid].argmax()))
        chosen = [
            (0, 0),
            (1, int(pos0[1].argmin())),
            h_mid,
            h_hidden,
            h_low,
            (self.nl - 1, int(pos0[-1].argmax())),
        ]
        maps = {(layer, h): cap.maps[layer][0, h] for layer, h in chosen}
        plots.qk_maps(
            maps,
            self.tokens(ids),
            chosen,
            self.png("qk_maps"),
            f"query × key attention maps, prompt: {SHORT_PROMPT[:40]}…",
        )
        r = {
            "length": length,
            "pos0_mass_mean": float(pos0.mean()),
            "pos0_mass_by_layer": pos0.mean(1).tolist(),
            "share_heads_pos0_gt_0.5": float((pos0 > 0.5).double().mean()),
            "share_heads_pos0_gt_0.9": float((pos0 > 0.9).double().mean()),
            "first4_mass_mean": float(first4.mean()),
            "pos0_mass_mean_without_bos": float(pos0_nobos.mean()),
            "pos0_mass_mean_with_bos_prose": float(res["prose"].pos0_mass()[0].mean()),
            "hidden_sink_mass_mean": float(hmass.mean()),
            "hidden_sinks_per_head_mean": float(hcount.mean()),
            "share_heads_with_hidden_sink": float((hcount > 0).double().mean()),
            "per_domain_pos0": {k: float(v.pos0_mass().mean()) for k, v in res.items()},
            "sweep": sweep,
            "sink_tokens": sink_tokens,
            "qk_heads": chosen,
            "short_prompt_pos0_mean": float(st_short.pos0_mass().mean()),
        }
        self.results["sinks"] = r
        rows = [
            [
                k,
                res[k].pos0_mass().mean().item(),
                res[k].first_k_mass(4).mean().item(),
                res[k].hidden_sink_mass(thres).mean().item(),
                float((res[k].hidden_sink_count(thres) > 0).double().mean()),
                ", ".join(f"`{_clean(t)}`×{c}" for t, c in sink_tokens[k][:5]),
            ]
            for k in res
        ]
        md = [
            "### Attention sinks and hidden sinks",
            f"Per (layer, head), prompts of {length} tokens (prose, code, chat). Mass on position 0 = mean over queries i ≥ 1 of A[i, 0]; first-4 mass over queries i ≥ 4; ACT hidden sinks: column score s_j = Σ_i A_ij/(N−j) > {thres}, first sink excluded.",
            _md_table(
                [
                    "domain",
                    "pos-0 mass",
                    "first-4 mass",
                    "hidden-sink mass",
                    "heads with a hidden sink",
                    "most frequent hidden-sink tokens",
                ],
                rows,
            ),
            f"Share of heads with position-0 mass > 0.5: {r['share_heads_pos0_gt_0.5']:.2f}; > 0.9: {r['share_heads_pos0_gt_0.9']:.2f}. Position vs content control (prose without the BOS token): mean position-0 mass {r['pos0_mass_mean_without_bos']:.3f} vs {r['pos0_mass_mean_with_bos_prose']:.3f} with BOS.",
            "ACT threshold sweep (prose):",
            _md_table(
                [
                    "THRES",
                    "heads with ≥1 hidden sink",
                    "mean hidden sinks/head",
                    "mean hidden-sink mass",
                    "heads with any sink",
                ],
                [
                    [
                        s["thres"],
                        s["heads_with_hidden_sink"],
                        s["mean_hidden_sinks"],
                        s["mean_hidden_sink_mass"],
                        s["heads_with_any_sink"],
                    ]
                    for s in sweep
                ],
            ),
        ]
        return "\n\n".join(md)

    # ------------------------------------------------------------------ massive activations
    @torch.no_grad()
    def massive(self) -> str:
        ids = self.tok(SHORT_PROMPT, return_tensors="pt").input_ids
        rs = residual_stats(self.model, ids, keep_hidden=True)
        prose = domain_ids(self.tok, 160)["prose"]
        rp = residual_stats(self.model, prose, keep_hidden=True)
        toks = self.tokens(ids)
        plots.massive_lines(
            rp.top,
            rp.median,
            self.png("massive_layers"),
            "largest |h| vs median per layer (prose, 160 tokens)",
        )
        mid = self.nl // 2
        plots.token_norms(
            rs.resid_norm[mid, 0],
            rs.value_norm[mid, 0, 0],
            toks,
            self.png("token_norms"),
            f"layer {mid}: residual norm per token and value norm (kv head 0)",
        )
        drain = rp.drain_ratio()[:, 0]  # (L, Hkv)
        peak = rp.peak_ratio()[:, 0]
        series = {f"value drain ‖v_0‖/mean‖v‖, kv head {k}": drain[:, k].tolist() for k in range(self.nkv)}
        series["residual peak ‖h_0‖/median‖h‖"] = peak.tolist()
        plots.ratio_lines(
            series,
            self.png("drain_peak"),
            "value-state drain and residual-state peak of position 0 (prose)",
            "ratio",
        )
        dims = sink_dims_from_first_token(rp.hidden, k=2)
        var_counts = []
        for i in range(2, self.nl):
            f = var_sink_tokens(rp.hidden[i], dims, 20.0)[0]
            var_counts.append(
                (
                    i,
                    int(f.sum()),
                    [_clean(prose_tok) for prose_tok, flag in zip(self.tokens(prose), f.tolist()) if flag][
                        :6
                    ],
                )
            )
        ratio = rp.top[:, 0] / rp.median
        mass_rel = []
        for i in range(self.nl):
            a = rp.hidden[i][0].abs()
            big = (a / rp.median[i] > 100).nonzero().tolist()
            mass_rel.append(big)
        tokdims = {}
        for i, big in enumerate(mass_rel):
            for t, d in big:
                tokdims.setdefault((t, d), []).append(i)
        top_td = sorted(tokdims.items(), key=lambda kv: -len(kv[1]))[:8]
        ptok = self.tokens(prose)
        r = {
            "top1_by_layer": rp.top[:, 0].tolist(),
            "median_by_layer": rp.median.tolist(),
            "max_ratio": float(ratio.max()),
            "max_ratio_layer": int(ratio.argmax()),
            "massive_abs100_ratio1000": len(rp.massive),
            "massive_examples": rp.massive[:10],
            "rel100_token_dims": [[t, ptok[t], d, len(ls)] for (t, d), ls in top_td],
            "sink_dims": dims,
            "var_sink_tokens": var_counts,
            "drain_ratio_min": float(drain.min()),
            "drain_ratio_by_layer": drain.tolist(),
            "peak_ratio_max": float(peak.max()),
            "peak_ratio_by_layer": peak.tolist(),
        }
        self.results["massive"] = r
        md = [
            "### Massive activations, residual peaks and value drains",
            f"Largest |h| over median |h| of a decoder-layer output: max {r['max_ratio']:.0f}× (layer {r['max_ratio_layer']}). Entries with |h| > 100 and > 1000× the median (Sun et al.'s rule): {r['massive_abs100_ratio1000']}. Model-relative rule (> 100× the layer median), the most persistent (token, dim) pairs (number of layers):",
            _md_table(
                ["token position", "token", "dim", "layers"],
                [[t, f"`{_clean(s)}`", d, n] for t, s, d, n in r["rel100_token_dims"]],
            ),
            f"D_sink learned from position 0 (VAR): dims {dims}. VAR sink tokens (max_d∈D_sink |x̂_d| > 20) per layer: "
            + ", ".join(f"L{i}: {n}" for i, n, _ in var_counts[:: max(1, len(var_counts) // 10)])
            + ".",
            f"Value drain ‖v_0‖/mean‖v_j‖: minimum {r['drain_ratio_min']:.3f}; residual peak ‖h_0‖/median‖h_j‖: maximum {r['peak_ratio_max']:.1f}.",
        ]
        return "\n\n".join(md)

    # ------------------------------------------------------------------ dormant heads
    @torch.no_grad()
    def dormant(self, length: int = 160, row_thr: float = 0.2, col_thr: float = 0.9) -> str:
        doms = domain_ids(self.tok, length)
        res = {k: self.stats(v) for k, v in doms.items()}
        d = {k: v.dormant(row_thr, col_thr)[0] for k, v in res.items()}
        bos = {k: v.pos0_mass()[0] >= 0.89 for k, v in res.items()}
        switch = (d["prose"] != d["code"]) | (d["prose"] != d["chat"]) | (d["code"] != d["chat"])
        sw = [(i, h) for i, h in switch.nonzero().tolist()]
        plots.layer_head_grid(
            res["prose"].row_entropy[0],
            self.png("row_entropy"),
            "row-normalized attention entropy (prose)",
            "mean_i H(A_i)/log(i+1)",
            cmap="cividis",
            vmin=0,
            vmax=1,
        )
        status = d["prose"].double() + 2 * d["code"].double()
        plots.layer_head_grid(
            status,
            self.png("dormant_domains"),
            "dormant heads: 0 none, 1 prose only, 2 code only, 3 both",
            "status",
            cmap="viridis",
            vmin=0,
            vmax=3,
        )
        sweep = dormant_sweep(res["prose"])
        r = {
            "row_thr": row_thr,
            "col_thr": col_thr,
            "dormant_share": {k: float(v.double().mean()) for k, v in d.items()},
            "bos_rule_share": {k: float(v.double().mean()) for k, v in bos.items()},
            "domain_switching_heads": sw,
            "sweep_prose": sweep,
        }
        self.results["dormant"] = r
        md = [
            "### Active vs dormant heads (real model)",
            f"Detector of the Active-Dormant code: dormant when the row-normalized entropy < {row_thr} and the maximum column-normalized entropy > {col_thr}; second rule: mean attention on position 0 ≥ 0.89.",
            _md_table(
                ["domain", "dormant (entropy rule)", "dormant (BOS ≥ 0.89)"],
                [[k, r["dormant_share"][k], r["bos_rule_share"][k]] for k in d],
            ),
            f"Heads whose status changes with the domain: {len(sw)} of {self.nl * self.nh} (e.g. {', '.join(f'L{i}H{h}' for i, h in sw[:8])}).",
            "Threshold sweep (prose):",
            _md_table(
                ["row thr", "col thr", "dormant share"],
                [[s["row_thr"], s["col_thr"], s["dormant_share"]] for s in sweep],
            ),
        ]
        return "\n\n".join(md)

    # ------------------------------------------------------------------ bigram-backcopy
    def bb(self, steps: int = 800, relu_steps: int = 600) -> str:
        from .bigram_backcopy import token_detector, train_bb

        sm = train_bb("softmax", steps=steps, eval_every=50)
        rl = train_bb("relu", steps=relu_steps, eval_every=50)
        plots.bb_curves(
            {"softmax attention": sm["history"], "ReLU attention": rl["history"]}, self.png("bb_training")
        )
        task = sm["task"]
        det = {}
        for name, run in (("softmax", sm), ("relu", rl)):
            bos = token_detector(run["model"], task)
            det[name] = {
                thr: {
                    "active_triggers": sum(bos[t] < thr for t in task.triggers) / len(task.triggers),
                    "dormant_nontriggers": sum(bos[t] >= thr for t in bos if t not in task.triggers)
                    / (len(bos) - len(task.triggers)),
                }
                for thr in (0.5, 0.7, 0.89)
            }
        last = {"softmax": sm["history"][-1], "relu": rl["history"][-1]}
        first = sm["history"][0]
        r = {
            "first": first,
            "last": last,
            "detector": det,
            "seconds": {"softmax": sm["seconds"], "relu": rl["seconds"]},
            "triggers": task.triggers,
        }
        self.results["bb"] = r
        keys = [
            "bos_attn_nontrigger",
            "prev_attn_trigger",
            "value_drain",
            "resid_peak",
            "icl_loss",
            "markov_loss",
            "dormant_on_nontrigger",
            "active_on_trigger",
        ]
        md = [
            "### Bigram-Backcopy: the sink emerging during training, and ReLU attention",
            f"1 layer, 1 head, dim 64, sequences of 64 tokens, triggers {task.triggers}; softmax {steps} Adam steps ({sm['seconds']:.0f} s), ReLU {relu_steps} steps ({rl['seconds']:.0f} s) on a shared CPU.",
            _md_table(
                ["measure", "softmax, step 0", f"softmax, step {steps}", f"ReLU, step {relu_steps}"],
                [[k, first[k], last["softmax"][k], last["relu"][k]] for k in keys],
            ),
            "Per-token probe of the official code ([BOS, all non-trigger tokens, x], attention of x on BOS; active if < threshold):",
            _md_table(
                ["attention", "threshold", "triggers active", "non-triggers dormant"],
                [
                    [n, t, v["active_triggers"], v["dormant_nontriggers"]]
                    for n in det
                    for t, v in det[n].items()
                ],
            ),
        ]
        return "\n\n".join(md)

    # ------------------------------------------------------------------ retrieval heads
    def retrieval(
        self,
        lengths=(256, 512),
        depths=(0.0, 0.5, 1.0),
        k: int = 8,
        seeds=(0, 1, 2, 3, 4),
        mask_lengths=(384,),
        mask_depths=(0.25, 0.75),
    ) -> str:
        from .retrieval_heads import masking_experiment, retrieval_scores, share_above, top_heads

        t0 = time.time()
        sc = retrieval_scores(
            self.model, self.tok, lengths=lengths, depths=depths, max_new_tokens=24, progress=True
        )
        scores = sc["scores"]
        top = top_heads(scores, k)
        plots.layer_head_grid(
            scores,
            self.png("retrieval_scores"),
            f"retrieval score (Wu et al.), {sc['accepted']} accepted samples; red: top {k}",
            "mean copy-paste score",
            cmap="magma",
            vmin=0,
            marks=top,
        )
        t1 = time.time()
        mk = masking_experiment(
            self.model,
            self.tok,
            scores,
            k=k,
            seeds=seeds,
            lengths=mask_lengths,
            depths=mask_depths,
            progress=True,
        )
        plots.masking_bars(
            mk,
            self.png("retrieval_masking"),
            f"needle recall: no mask, top-{k} retrieval heads masked, {k} random heads masked",
        )
        shares = share_above(scores)
        r = {
            "scores": scores.tolist(),
            "accepted": sc["accepted"],
            "trials": len(sc["trials"]),
            "share_above": shares,
            "share_zero": float((scores == 0).double().mean()),
            "top": [(i, h, float(scores[i, h])) for i, h in top],
            "masking": mk,
            "seconds": {"scores": t1 - t0, "masking": time.time() - t1},
        }
        self.results["retrieval"] = r
        c = mk["conditions"]
        md = [
            "### Retrieval heads",
            f"Needle-in-a-haystack detection: lengths {list(lengths)} tokens × depths {list(depths)} × 3 needles = {len(sc['trials'])} samples, {sc['accepted']} accepted (ROUGE-1 recall > 0.5); greedy decoding ≤ 24 tokens.",
            f"Share of heads with retrieval score > 0.1: **{shares[0.1]:.3f}** ({int(round(shares[0.1] * self.nl * self.nh))} of {self.nl * self.nh}); > 0.05: {shares[0.05]:.3f}; > 0.2: {shares[0.2]:.3f}; score exactly 0: {r['share_zero']:.2f}.",
            "Top heads: " + ", ".join(f"L{i}H{h} {s:.2f}" for i, h, s in r["top"]) + ".",
            f"Masking (uniform attention during decoding, the Retrieval_Head rule) on {c['none']['n']} other prompts ({list(mask_lengths)} tokens, depths {list(mask_depths)}):",
            _md_table(
                ["condition", "needle ROUGE-1 recall", "accuracy (recall > 0.5)", "heads"],
                [
                    [name, v["recall"], v["accuracy"], " ".join(f"L{i}H{h}" for i, h in mk["heads"][name])]
                    for name, v in c.items()
                ],
            ),
            f"Random-{k} mean over {len(seeds)} seeds: recall {mk['random_mean_recall']:.3f}, accuracy {mk['random_mean_accuracy']:.3f}.",
        ]
        return "\n\n".join(md)

    # ------------------------------------------------------------------ ACT calibration
    def act(self, layers=None, n_calibration: int = 32, n_heldout: int = 96) -> str:
        from .calibration import act_search

        t0 = time.time()
        res = act_search(
            self.model,
            self.tok,
            n_calibration=n_calibration,
            n_heldout=n_heldout,
            layers=layers,
            progress=True,
        )
        gains = torch.full((self.nl, self.nh), float("nan"))
        for (i, h), (a, _) in res["per_head"].items():
            gains[i, h] = a - res["calibration_baseline"][0]
        plots.layer_head_grid(
            gains,
            self.png("act_search"),
            "ACT search: calibration accuracy gain per head\n(blank: not searched; red box: kept)",
            "Δ accuracy",
            cmap="coolwarm",
            vmin=-0.15,
            vmax=0.15,
            marks=res["kept_strict"],
        )
        r = {k: v for k, v in res.items() if k != "per_head"}
        r["per_head"] = {f"{i}-{h}": v for (i, h), v in res["per_head"].items()}
        r["seconds"] = time.time() - t0
        self.results["act"] = r
        md = [
            "### ACT attention calibration (head search on a calibration split)",
            f"Task: generated 4-shot review sentiment (70% two-clause contrasts); calibration split {n_calibration} prompts, held-out split {n_heldout}; β = 0.4, THRES = 0.1, layers searched: {sorted({i for i, _ in res['per_head']})}.",
            _md_table(
                ["setting", "accuracy", "mean log-prob margin"],
                [
                    ["calibration split, baseline", *res["calibration_baseline"]],
                    ["held-out, baseline", *res["heldout_baseline"]],
                    [
                        f"held-out, {len(res['kept_strict'])} heads with a strict calibration gain",
                        *res["heldout_calibrated_strict"],
                    ],
                    [
                        f"held-out, {len(res['kept'])} heads with a gain or an equal accuracy and a larger margin",
                        *res["heldout_calibrated"],
                    ],
                    ["held-out, every searched head calibrated", *res["heldout_all_heads"]],
                ],
            ),
        ]
        return "\n\n".join(md)

    # ------------------------------------------------------------------ VAR / VHR / ablation on the needle task
    @torch.no_grad()
    def interventions(self, lengths=(384,), depths=(0.25, 0.75)) -> str:
        from ..generation import new_cache
        from .interventions import HeadScale, VARRedistribution, select_vhr_heads, vhd_scores
        from .retrieval_heads import NEEDLES, _stop_ids, build_prompt_parts, decode_with_probes, rouge1_recall

        stop = _stop_ids(self.model, self.tok)
        prose = domain_ids(self.tok, 160)["prose"]
        dims = sink_dims_from_first_token(residual_stats(self.model, prose, keep_hidden=True).hidden, k=2)
        rows = {"baseline": [], "VAR (p=0.6)": [], "VHR (α=2)": []}
        nsel, var_frac = [], []
        last = self.nl * 14 // 32  # LLaVA-1.5: layer 1 + the last 14 of 32 layers, scaled
        for L in lengths:
            for d in depths:
                for j, nd in enumerate(NEEDLES):
                    ids, span, n_ctx = build_prompt_parts(self.tok, nd, L, d, seed=2000 + j)
                    ctx_span = (1, n_ctx)  # the designated span: the context (BOS excluded)
                    vhd, act = vhd_scores(self.model, ids, ctx_span)
                    heads = select_vhr_heads(vhd, act, layers=[1] + list(range(self.nl - last, self.nl)))
                    nsel.append(len(heads))
                    for name in rows:
                        cache = new_cache(self.model)
                        probe = VARRedistribution(ctx_span, dims) if name.startswith("VAR") else None
                        outer = [probe] if probe is not None else []
                        inner = [HeadScale(heads, 2.0)] if name.startswith("VHR") else []
                        with attach(self.model, *outer), attach(self.model, *inner):
                            # VAR and VHR act on the prefill and on every decoding step
                            self.model(
                                input_ids=ids[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1
                            )
                            toks, _ = decode_with_probes(self.model, ids, 24, stop, [], cache=cache)
                        if probe is not None:
                            var_frac.append(
                                sum(probe.selected_fraction.values()) / max(len(probe.selected_fraction), 1)
                            )
                        text = self.tok.decode([t for t in toks if t not in stop], skip_special_tokens=True)
                        rows[name].append(rouge1_recall(text, nd.answer))
        r = {k: sum(v) / len(v) for k, v in rows.items()}
        r["vhr_heads_selected_mean"] = sum(nsel) / len(nsel)
        r["var_selected_query_fraction_last_step"] = sum(var_frac) / max(len(var_frac), 1)
        r["sink_dims"] = dims
        r["n"] = len(nsel)
        self.results["interventions"] = r
        md = [
            "### VAR redistribution and VHR head reinforcement on the context span",
            f"Needle prompts ({list(lengths)} tokens, depths {list(depths)}, 3 needles = {len(nsel)} prompts); designated span = the context. VAR: D_sink = {dims}, τ = 20, ρ = 0.5, summ = 0.2, p = 0.6, layers 2..{self.nl - 2}. VHR: VHD from a run without the context, heads with VHD > median in layer 1 and the last {self.nl * 14 // 32} layers (mean {r['vhr_heads_selected_mean']:.1f} heads), α = 2.",
            _md_table(["intervention", "needle ROUGE-1 recall"], [[k, r[k]] for k in rows]),
        ]
        return "\n\n".join(md)

    # ------------------------------------------------------------------ activation patching (IOI-style)
    @torch.no_grad()
    def patching(self) -> str:
        from .patching import patch_heads

        clean_t = "When Mary and John went to the store, John gave a drink to"
        corrupt_t = "When Mary and John went to the store, Mary gave a drink to"
        clean = self.tok(clean_t, return_tensors="pt").input_ids
        corrupt = self.tok(corrupt_t, return_tensors="pt").input_ids
        good = self.tok(" Mary", add_special_tokens=False).input_ids[0]
        bad = self.tok(" John", add_special_tokens=False).input_ids[0]
        res = patch_heads(self.model, clean, corrupt, good, bad)
        eff = res["per_head"]
        top = eff.flatten().abs().argsort(descending=True)[:8].tolist()
        top = [(i // self.nh, i % self.nh, float(eff.flatten()[i])) for i in top]
        plots.layer_head_grid(
            eff,
            self.png("patching"),
            "activation patching clean → corrupt: normalized logit-difference recovery",
            "(LD_patched − LD_corrupt) / (LD_clean − LD_corrupt)",
            cmap="coolwarm",
            vmin=-float(eff.abs().max()),
            vmax=float(eff.abs().max()),
        )
        r = {"clean_ld": res["clean"], "corrupt_ld": res["corrupt"], "top": top}
        self.results["patching"] = r
        md = [
            "### Activation patching (IOI-style minimal pair)",
            f"Clean: “{clean_t}” (answer “Mary”), corrupted: “{corrupt_t}”; logit difference Mary − John: clean {res['clean']:.2f}, corrupted {res['corrupt']:.2f}. Each head's output z (all positions) patched from the clean run into the corrupted run, one head at a time.",
            "Largest effects: " + ", ".join(f"L{i}H{h} {v:+.2f}" for i, h, v in top) + ".",
        ]
        return "\n\n".join(md)

    def write(self, sections: list[str], md_name: str = "llm_analysis.md") -> Path:
        parts = []
        for s in sections:
            t0 = time.time()
            parts.append(getattr(self, s)())
            print(f"[analysis] {s}: {time.time() - t0:.0f} s", flush=True)
            (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=_json))
        (self.out / md_name).write_text("\n\n".join(parts) + "\n")
        return self.out / md_name


def _clean(t: str) -> str:
    return t.replace("Ġ", "␣").replace("Ċ", "\\n").replace("|", "\\|")


def _json(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    return str(o)
