"""The paper's four claims (arXiv 2601.09040; REFERENCE section 1) read off a study's results: for each, the
measure that tests it on this data, every BWSSL run beside the reference (E2E) and the random-init encoder,
and what the numbers say.

A probe difference counts only beyond Z = 2 standard errors of the validation set's sampling (binomial, the
two scores taken as independent: conservative for two runs scored on the same clips). That is the noise of
the clips, not of training: another seed moves a run more (the sweep's seeds measure that). Attention, where
notebook 03 kept each clip's value, is compared clip by clip: a difference counts beyond Z standard errors of
its mean over the clips. The change measures have no error bar here, so they give a direction only.

Inputs are the notebooks' JSON results: `probe` and `analysis` of notebook 02 (evaluate.depthwise and
analyze.analyze per run), optionally the per-layer attention rows of notebook 03 (viz.results).
"""
from __future__ import annotations

import math
import statistics

from .figures import CONTROLS, best_acc, chosen_on

Z = 2.0  # a difference counts beyond Z standard errors
LEVEL = 0.5  # "decodable": this fraction of the way from the random-init encoder's best to the best trained run

TABLES = {"close": "Claim 1: every family and pooling's best layer (chosen on held-out training clips, scored on "
                   "validation), BWSSL against E2E, beside both controls",
          "seeds": "Claim 1 over seeds: the best layer's lead over E2E of the same seed (the sweep; layers chosen on "
                   "held-out training clips)",
          "earlier": f"Claim 2: the first layer at which each run reaches a common level ({LEVEL:.0%} of the way "
                     "from the random-init encoder's best layer to the best trained run; families with a learned gain)",
          "saturate": "Claim 3: how much a layer changes its input, first half of the layers against the second",
          "mixing": "Claim 4: attention in the first half of the layers (notebook 03's clips), token against pooled "
                    "change, and what the attentive probe reads beyond mean pooling"}


def sampling_error(acc: float, n: int) -> float:
    """The binomial standard error of a top-1 measured on n clips."""
    return math.sqrt(max(acc * (1 - acc), 0.0) / n)


def compare(a: float, b: float, n: int) -> str:
    """'ahead', 'behind' or 'within noise': top-1 a against b, both measured on n clips."""
    noise = Z * math.hypot(sampling_error(a, n), sampling_error(b, n))
    return "ahead" if a - b > noise else "behind" if b - a > noise else "within noise"


def _count(says: list[str], order: tuple[str, ...]) -> str:
    return ", ".join(f"{says.count(s)} {s}" for s in order) + f" (of {len(says)})"


def _onsets(rows: list[dict]) -> str:
    """earlier_rows counted; an "earlier" where E2E never reaches the level is a run that learned more, not one
    whose curve rose sooner, so those are told apart."""
    if not rows:
        return "no family with a learned gain"
    never = sum(r["BWSSL is"] == "earlier" and r["E2E layer"] == "never" for r in rows)
    return _count([r["BWSSL is"] for r in rows], ("earlier", "same", "later")) + \
        (f"; E2E never reaches the level in {never} of the earlier" if never else "")


def close_rows(probe: dict, reference: str, n: int) -> list[dict]:
    """Claim 1, BWSSL gets close to E2E: per BWSSL run, family and pooling (the attentive probe too) the best
    layer's top-1 against the reference's, and whether the difference is beyond the clips' noise; beside them
    the best layers of both controls of the reference's architecture where the results hold them. Each layer is
    chosen on held-out training clips and scored on validation (figures.best_index); `layer chosen on` says so."""
    ref, rows = probe[reference], []
    for name in (m for m in probe if m != reference):
        for pool, fams in probe[name]["trained"].items():
            for fam, r in fams.items():
                e2e = ref["trained"][pool][fam]
                controls = {label: ref[key][pool][fam] for key, label in CONTROLS.items()
                            if fam in ref.get(key, {}).get(pool, {})}
                a, b = best_acc(r), best_acc(e2e)
                rows.append({"run": name, "family": fam, "pooling": pool, "E2E": b, "BWSSL": a,
                             **{c: best_acc(v) for c, v in controls.items()}, "difference": a - b,
                             "noise (2 SE)": Z * math.hypot(sampling_error(a, n), sampling_error(b, n)),
                             "BWSSL is": compare(a, b, n), "layer chosen on": chosen_on(r, e2e, *controls.values())})
    return rows


def seed_rows(best_rows: list[dict]) -> list[dict]:
    """Claim 1 over seeds, from the sweep's best-layer rows (figures.sweep_best_rows, several seeds): per preset,
    BWSSL run, family and pooling, the lead over E2E of the same seed, its mean and sd, and whether it has the
    same sign on every seed."""
    groups: dict[tuple, list[float]] = {}
    for r in best_rows:
        if r["vs E2E"] != "":
            groups.setdefault((r["preset"], r["model"], r["blocks"], r["family"], r["pooling"]), []).append(r["vs E2E"])
    return [{"preset": p, "run": m, "blocks": k, "family": f, "pooling": pool, "seeds": len(v),
             "vs E2E": statistics.mean(v), "sd": statistics.stdev(v),
             "BWSSL is": "ahead on every seed" if min(v) > 0 else "behind on every seed" if max(v) < 0 else "mixed"}
            for (p, m, k, f, pool), v in groups.items() if len(v) > 1]


def onset(acc: list[float], level: float) -> int | None:
    """The first layer (1-based) whose top-1 reaches `level`; None if none does."""
    return next((i + 1 for i, a in enumerate(acc) if a >= level), None)


def earlier_rows(probe: dict, reference: str, n: int, level: float = LEVEL) -> list[dict]:
    """Claim 2, higher-level information becomes decodable earlier: per family and pooling with a learned gain
    (the best trained run beyond the clips' noise above the random-init encoder's best layer), the first layer
    at which each run reaches a common level, `level` of the way from that control to the best trained run.
    A run that never reaches it counts as one layer past the last."""
    ref = probe[reference]
    rows = []
    for pool, fams in ref["trained"].items():
        if pool == "attentive":  # a few chosen layers, not a curve over depth
            continue
        for fam in fams:
            floor = best_acc(ref["random_init"][pool][fam])  # best layers chosen on held-out training clips
            top = max(best_acc(res["trained"][pool][fam]) for res in probe.values())
            if compare(top, floor, n) != "ahead":
                continue
            at = floor + level * (top - floor)
            first = {name: onset(res["trained"][pool][fam]["acc"], at) for name, res in probe.items()}
            depth = len(ref["trained"][pool][fam]["acc"])
            for name in (m for m in probe if m != reference):
                a, b = (first[m] or depth + 1 for m in (name, reference))
                rows.append({"run": name, "family": fam, "pooling": pool, "level": at,
                             "E2E layer": first[reference] or "never", "BWSSL layer": first[name] or "never",
                             "BWSSL is": "earlier" if a < b else "later" if a > b else "same"})
    return rows


def halves(values: list[float], first_layer: int, layers: int) -> tuple[float, float]:
    """Means of a per-layer measure over the first half of the encoder's layers and over the second (layer
    l > layers // 2); `values[i]` belongs to layer first_layer + i (1-based)."""
    early = [v for i, v in enumerate(values) if first_layer + i <= layers // 2]
    late = [v for i, v in enumerate(values) if first_layer + i > layers // 2]
    return tuple(statistics.mean(v) if v else float("nan") for v in (early, late))  # nan: a half with no layer


def saturate_rows(analysis: dict) -> list[dict]:
    """Claim 3, late blocks saturate: per model (runs and the random-init encoder) the relative change a
    layer makes to its input (tokens), the first half's layers against the second's, and how well the
    second half keeps the geometry (kNN overlap and CKA with the layer before). The change metrics compare
    layer l with l - 1, so they start at layer 2."""
    rows = []
    for name, a in analysis.items():
        early, late = halves(a["token_relative_change"], 2, a["layers"])
        rows.append({"model": name, "change, first half": early, "change, second half": late,
                     "second / first": late / early if early else float("nan"),
                     "kNN overlap, second half": halves(a["knn_overlap"], 2, a["layers"])[1],
                     "CKA with the layer before, second half": halves(a["consecutive_cka"], 2, a["layers"])[1]})
    return rows


ATTENTION = (("entropy_mean", "entropy (nats)"), ("spatial_px_mean", "distance (px)"),
             ("temporal_frames_mean", "distance (frames)"), ("self_mean", "share to itself"))


def mixing_rows(probe: dict, analysis: dict, attention: dict[str, list[dict]] | None = None,
                uniform: dict | None = None, reference: str | None = None) -> list[dict]:
    """Claim 4, token-level shifts show stronger early mixing that pooled metrics miss: per model, the first
    half's attention (entropy, distance, share to itself: notebook 03's rows) beside uniform
    attention; how much more a first-half layer moves its tokens than their mean (token against pooled
    relative change); and what the attentive probe reads beyond mean pooling at the same layer. Where the
    rows keep each clip, every other model's attention minus the reference's, clip by clip (mean ± SE)."""
    models = {name: res["trained"] for name, res in probe.items()}
    first = next(iter(probe.values()))
    models[CONTROLS["random_init"]] = first["random_init"]
    rows = []
    for name, res in models.items():
        row = {"model": name}
        layers = (attention or {}).get(name, [])
        for key, label in ATTENTION if layers else ():
            row[f"{label}, first half"] = halves([r[key] for r in layers], 1, len(layers))[0]
        a = analysis.get(name)
        if a:
            token = halves(a["token_relative_change"], 2, a["layers"])[0]
            pooled = halves(a["pooled_relative_change"], 2, a["layers"])[0]
            row["token - pooled change, first half"] = token - pooled
        for fam, r in res.get("attentive", {}).items() if "mean" in res else ():
            row[f"attentive - mean pooling ({fam})"] = r["acc"][-1] - res["mean"][fam]["acc"][r["layers"][-1]]
        rows.append(row)
    if uniform:
        rows.append({"model": "uniform attention",
                     **{f"{label}, first half": uniform[key.removesuffix("_mean")] for key, label in ATTENTION}})
    for name in (m for m in (attention or {}) if reference in attention and m != reference):
        paired = {label: _paired(attention, reference, name, key.removesuffix("_mean")) for key, label in ATTENTION}
        if all(paired.values()):
            n = next(iter(paired.values()))[2]
            rows.append({"model": f"{name} - {reference}, paired over {n} clips",
                         **{f"{label}, first half": f"{m:+.3g} ± {se:.2g}" for label, (m, se, _) in paired.items()}})
    return rows


def early_clips(layers: list[dict], key: str) -> list[float] | None:
    """Each clip's mean of a per-layer attention measure over the first half of the layers (viz.clip_layers'
    "clips"); None for rows without them (one clip, older results)."""
    half = layers[:len(layers) // 2]  # in order of depth, as halves() splits them
    if not half or any(key not in r.get("clips", {}) for r in half):
        return None
    return [statistics.mean(r["clips"][key][i] for r in half) for i in range(len(half[0]["clips"][key]))]


def _paired(attention: dict[str, list[dict]], a: str, b: str, key: str) -> tuple[float, float, int] | None:
    """Mean and standard error over clips of b's first-half measure minus a's, clip by clip (the same clips)."""
    x, y = (early_clips(attention[m], key) if m in attention else None for m in (a, b))
    if not x or not y or len(x) != len(y) or len(x) < 2:
        return None
    d = [q - p for p, q in zip(x, y)]
    return statistics.mean(d), statistics.stdev(d) / math.sqrt(len(d)), len(d)


def _line(claim: str, run: str, measure: str, says: str) -> dict:
    return {"claim": claim, "run": run, "measure": measure, "what the numbers say": says}


def _seed_lines(seeded: list[dict], name: str) -> list[dict]:
    """Claim 1 over seeds for one run (seed_rows), as a line; none without seeds. With no real difference a lead
    is as likely either side of 0 on each seed, so a row has one sign on all n seeds by chance with probability
    2 * 2**-n; the count that chance alone gives, whatever the rows share, is said beside it."""
    seeds = [r for r in seeded if r["run"] == name]
    chance = sum(2.0 ** -r["seeds"] for r in seeds)  # expected rows "ahead on every seed" (and as many behind)
    return [_line("1. BWSSL gets close to E2E, over seeds", name, f"best layer's lead over E2E of the same seed, "
                  f"{seeds[0]['seeds']} seeds of the sweep's {seeds[0]['preset']} point",
                  _count([r["BWSSL is"] for r in seeds], ("ahead on every seed", "mixed", "behind on every seed"))
                  + f"; chance alone: {chance:.2g} ahead and {chance:.2g} behind on every seed")] if seeds else []


def summary(probe: dict, analysis: dict, reference: str, n: int, attention: dict[str, list[dict]] | None = None,
            uniform: dict | None = None, sweep: list[dict] | None = None,
            blocks: dict[str, int] | None = None) -> dict | None:
    """Every claim's rows, and one line per claim and BWSSL run saying what the numbers show (`sweep`: the
    sweep's best-layer rows, for claim 1 over seeds); None where there is nothing to compare (no reference run,
    or no other run beside it). `blocks` (run: its number of blocks) leaves out the runs other than the
    reference that train in one block, such as imported VideoMAE weights probed beside the study's runs: the
    claims compare BWSSL with E2E."""
    if blocks:
        one_block = {k for k in blocks if k != reference and blocks[k] == 1}  # controls: not in blocks
        probe, analysis, attention = ({k: v for k, v in d.items() if k not in one_block} if d else d
                                      for d in (probe, analysis, attention))
    if reference not in probe or len(probe) < 2:
        return None
    close, earlier = close_rows(probe, reference, n), earlier_rows(probe, reference, n)
    saturate, mixing = saturate_rows(analysis), mixing_rows(probe, analysis, attention, uniform, reference)
    seeded = seed_rows(sweep or [])
    change = {r["model"]: r for r in saturate}
    mixed = {r["model"]: r for r in mixing}
    control = CONTROLS["random_init"]
    lines = []
    for name in (m for m in probe if m != reference):
        says = [r["BWSSL is"] for r in close if r["run"] == name]
        lines.append(_line("1. BWSSL gets close to E2E", name, "best-layer top-1 per family and pooling (layer "
                           "chosen on held-out training clips), against E2E's",
                           _count(says, ("ahead", "within noise", "behind"))))
        lines += _seed_lines(seeded, name)
        lines.append(_line("2. information is decodable earlier", name,
                           f"first layer reaching {LEVEL:.0%} of the way from random init to the best run",
                           _onsets([r for r in earlier if r["run"] == name])))
        if name in change and reference in change:
            s, e, c = (change.get(m, {}) for m in (name, reference, control))
            ratio, ref_ratio = s["second / first"], e["second / first"]
            verdict = ("undefined: no layer of the first half has a change measure (they start at layer 2; "
                       "fewer than 4 layers)" if math.isnan(ratio) or math.isnan(ref_ratio) else
                       f"BWSSL's late layers change {'less' if ratio < ref_ratio else 'more'} than E2E's, "
                       "against their early ones")
            lines.append(_line("3. late blocks saturate", name, "relative change of a layer, second half over first "
                               "half of the layers; kNN overlap with the layer before, second half",
                               f"{ratio:.2f} (E2E {ref_ratio:.2f}"
                               + (f", random init {c['second / first']:.2f}" if c else "") + f"): {verdict}; "
                               f"kNN overlap {s['kNN overlap, second half']:.3f} (E2E "
                               f"{e['kNN overlap, second half']:.3f})"))
        key = "entropy (nats), first half"
        if key in mixed.get(name, {}) and key in mixed.get(reference, {}) and "uniform attention" in mixed:
            u = mixed["uniform attention"][key]
            b, e = u - mixed[name][key], u - mixed[reference][key]
            c = f", random init {u - mixed[control][key]:.3f}" if key in mixed.get(control, {}) else ""
            paired = _paired(attention or {}, reference, name, "entropy")  # entropy BWSSL - E2E, clip by clip
            word = "more" if b < e else "less"
            if paired:
                mean, se, n_clips = paired
                word = "more" if mean > Z * se else "less" if mean < -Z * se else "no differently"
                c += f"; its entropy minus E2E's, paired over {n_clips} clips, {mean:+.3f} ± {se:.3f}"
            lines.append(_line("4. stronger early mixing", name, "attention entropy below uniform attention's, "
                               "first half of the layers (notebook 03's clips)", f"{b:.3f} nats (E2E {e:.3f}{c}): "
                               f"BWSSL's early attention is {word} spread than E2E's"
                               + (" (direction only)" if not paired else "")))
        trained = probe[name]["trained"]
        for fam, r in trained.get("attentive", {}).items() if "mean" in trained else ():
            acc = trained["mean"][fam]["acc"]
            pooled, layer = acc[r["layers"][-1]], r["layers"][-1] % len(acc) + 1
            lines.append(_line("4. pooled metrics miss token-level information", name,
                               f"attentive probe against mean pooling, {fam}, layer {layer}",
                               f"{r['acc'][-1]:.3f} against {pooled:.3f}: the attentive probe is "
                               f"{compare(r['acc'][-1], pooled, n)}"))
    for name in dict.fromkeys(r["run"] for r in seeded if r["run"] not in probe):  # trained by the sweep alone
        lines += _seed_lines(seeded, name)
    return {"reference": reference, "val_clips": n, "z": Z, "level": LEVEL, "lines": lines, "close": close,
            "seeds": seeded, "earlier": earlier, "saturate": saturate, "mixing": mixing}  # the keys of TABLES


def over_seeds(said: dict[int, dict]) -> list[dict]:
    """Claims 2 and 3 over seeds, from each seed's summary (its runs trained and probed under that seed): for
    each run that every seed has, the onsets counted over all seeds (on the families and poolings that every
    seed probed, so that each seed weighs the same), and each seed's change ratio beside E2E's of the same
    seed."""
    first = next(iter(said.values()))
    ref, seeds = first["reference"], ", ".join(map(str, said))
    lines = []
    runs = [{r["run"]: None for r in s["close"]} for s in said.values()]
    probed = set.intersection(*({(r["family"], r["pooling"]) for r in s["close"]} for s in said.values()))
    pools = ", ".join(sorted({p for _, p in probed} - {"attentive"}))  # the attentive probe has no onset
    for name in (m for m in runs[0] if all(m in r for r in runs)):  # the runs every seed trained
        onsets = [r for s in said.values() for r in s["earlier"] if r["run"] == name
                  and (r["family"], r["pooling"]) in probed]
        lines.append(_line("2. information is decodable earlier, over seeds", name,
                           f"as above, seeds {seeds}, poolings {pools}", _onsets(onsets)))
        ratios = [({r["model"]: r["second / first"] for r in s["saturate"]}) for s in said.values()]
        pairs = [(r[name], r[ref]) for r in ratios if name in r and ref in r  # nan: too shallow to say
                 and not (math.isnan(r[name]) or math.isnan(r[ref]))]
        if pairs:
            more = sum(b > e for b, e in pairs)
            lines.append(_line("3. late blocks saturate, over seeds", name, f"as above, seeds {seeds}",
                               ", ".join(f"{b:.2f}" for b, _ in pairs) + " (E2E "
                               + ", ".join(f"{e:.2f}" for _, e in pairs)
                               + f"): BWSSL's late layers change more than E2E's on {more} of {len(pairs)} seeds"))
    return lines
