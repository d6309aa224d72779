"""The diagnosis as Markdown: one run's table (:func:`run_markdown`) and a sweep's tables with the paired tests
(:func:`sweep_markdown`)."""
from __future__ import annotations

from typing import Optional

from integrations.common.stats import fmt_mean_std


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def run_markdown(res: dict) -> str:
    """One run's diagnosis as a Markdown table (attention in %, rho and entropy as numbers)."""
    lines = [f"{res['variant']} ({res['checkpoint']}), {res['split']}, {res['n_questions']} questions, "
             f"{res['glimpses']} glimpses. Attention mass on the asked class (%; chance = uniform over boxes); "
             "mean |rho| (Spearman) of the Hungarian order of P with x-centre / area (signed mean in brackets; "
             "input order = the "
             "file's random order); entropy of P (nats, / log n).", "",
             "| family | n | mass | chance | mass per glimpse | abs rho x | abs rho area | input abs rho x | entropy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for fam, f in res["families"].items():
        att, perm = f["attention"], f["permutation"]
        glimpses = " / ".join(_pct(m) for m in att["mass_per_glimpse"])
        if perm is None:
            rx = ra = ent = "-"
        else:
            rx = f"{_num(perm['spearman_x']['abs_mean'])} ({_num(perm['spearman_x']['mean'])})"
            ra = f"{_num(perm['spearman_area']['abs_mean'])} ({_num(perm['spearman_area']['mean'])})"
            ent = f"{_num(perm['entropy']['mean'])} ({_num(perm['entropy']['relative'])})"
        lines.append(f"| {fam} | {f['n']} | {_pct(att['mass'])} | {_pct(att['chance'])} | {glimpses} | {rx} | {ra} | "
                     f"{_num(f['input_order']['spearman_x']['abs_mean'])} | {ent} |")
    eta = res["eta"]["checkpoint"]
    if eta:
        lines += ["", "eta (checkpoint): " + ", ".join(f"{k} = {v:.4g}" for k, v in eta.items())]
    return "\n".join(lines)


def _ms(s: Optional[dict], scale: float = 1.0, digits: int = 2) -> str:
    return fmt_mean_std(s, scale, digits)


def sweep_markdown(results: dict) -> str:
    """The sweep's diagnosis: attention mass, order and entropy of P, eta, and the paired tests."""
    from integrations.common.stats import fmt_p

    from ..compare import LABELS

    variants, fams, summ = results["variants"], results["families"], results["summary"]
    n_seeds = {v: len(s) for v, s in results["seeds"].items()}
    head = "| family | chance | " + " | ".join(LABELS[v] for v in variants) + " |"
    rule = "|---|---|" + "---|" * len(variants)
    counts = ", ".join(f"{LABELS[v]}: {n}" for v, n in n_seeds.items())
    lines = [f"Diagnosis on {results['split']}: mean ± std over seeds ({counts})."
             + (f" Unfinished runs skipped: {', '.join(results['skipped'])}." if results["skipped"] else ""), "",
             "Attention mass on the asked class (%, mean over glimpses; chance = share of the image's boxes of "
             "that class).", "", head, rule]
    for fam in fams:
        chance = next((summ[fam][v].get("chance") for v in variants if "chance" in summ[fam][v]), None)
        lines.append(f"| {fam} | {_ms(chance, 100, 1)} | "
                     + " | ".join(_ms(summ[fam][v].get("mass"), 100, 1) for v in variants) + " |")
    G = max((sum(k.startswith("mass_g") for k in summ["all"][v]) for v in variants), default=0)
    if G:
        lines += ["", "Attention mass on the asked class per glimpse (%, all questions).", "",
                  "| variant | " + " | ".join(f"g{g}" for g in range(G)) + " |", "|---|" + "---|" * G]
        for v in variants:
            lines.append(f"| {LABELS[v]} | " + " | ".join(_ms(summ["all"][v].get(f"mass_g{g}"), 100, 1)
                                                          for g in range(G)) + " |")
    enc = [v for v in variants if any("relevance_asked" in summ[f][v] for f in fams)]
    if enc:
        lines += ["", "Relevance weight sigmoid(logit) the set encoder applies to each box (mean over glimpses): boxes "
                  "of the asked class / other boxes.", "",
                  "| family | " + " | ".join(LABELS[v] for v in enc) + " |", "|---|" + "---|" * len(enc)]
        for fam in fams:
            lines.append(f"| {fam} | " + " | ".join(f"{_ms(summ[fam][v].get('relevance_asked'))} / "
                                                     f"{_ms(summ[fam][v].get('relevance_other'))}" for v in enc) + " |")
    po = [v for v in variants if any("abs_spearman_x" in summ[f][v] for f in fams)]
    if po:
        lines += ["", "Order of P (Hungarian) against the geometry: mean |Spearman rho| over sets (input order = "
                  "the feature file's random order, the chance level); entropy of P in nats and / log n.", "",
                  "| family | input abs rho x | " + " | ".join(f"{LABELS[v]} abs rho x | {LABELS[v]} abs rho area | "
                                                             f"{LABELS[v]} entropy (/ log n)" for v in po) + " |",
                  "|---|---|" + "---|---|---|" * len(po)]
        for fam in fams:
            base = next((summ[fam][v].get("input_abs_spearman_x") for v in variants), None)
            cells = []
            for v in po:
                s = summ[fam][v]
                cells += [_ms(s.get("abs_spearman_x")), _ms(s.get("abs_spearman_area")),
                          f"{_ms(s.get('entropy'))} ({_ms(s.get('entropy_relative'))})"]
            lines.append(f"| {fam} | {_ms(base)} | " + " | ".join(cells) + " |")
    if any(results["eta"].get(v) for v in variants):
        lines += ["", "Final eta (checkpoint), mean ± std over seeds.", "", "| variant | eta |", "|---|---|"]
        for v in variants:
            for k, s in results["eta"].get(v, {}).items():
                lines.append(f"| {LABELS[v]} ({k}) | {_ms(s, 1, 4)} |")
    rows = [(fam, name, t) for fam in fams for name, t in results["tests"][fam].items()]
    if rows:
        lines += ["", "Paired t-tests over seeds (first minus second; mass in points, abs rho as is).", "",
                  "| family | comparison | mean difference | p |", "|---|---|---|---|"]
        for fam, name, t in rows:
            scale = 100 if name.startswith("mass") else 1
            diff = "-" if t["diff_mean"] is None else f"{scale * t['diff_mean']:+.2f}"
            lines.append(f"| {fam} | {name} | {diff} | {fmt_p(t['p'])} |")
    return "\n".join(lines)
