"""Streamed-burst TTFT at batch 16 (and 4), run 8: the split of each burst over engine steps.

FlexQuant engines: split from step telemetry (bursts.py). Stock engines: split inferred from the
burst's ttft_spread (validated on FlexQuant, where the split is known), cross-checked with tpot_req_p50.
Engine-side first-token times per FlexQuant burst (relative to the start of the burst's first step):
with async scheduling the CPU launches step n+2 only after step n's sampled tokens are back, so
  b16: T1 ~ ts(step 3), T2 ~ ts(step 4), T3 ~ ts(step 5)   (steps: P1, P2, P3(mixed), D, D, ...)
  b4:  T1 ~ ts(step 3), T2 ~ ts(step 4)                    (steps: P1, P2(mixed), D, D, ...)
"""
import json, math, statistics as st, sys
from collections import Counter
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from table import rows, ROUNDS, D

def k_from_spread(batch, spread):
    if batch == 16:
        return 1 if spread >= 233 else (2 if spread >= 217 else 3)
    return 1 if spread >= 47 else (2 if spread >= 30 else 3)

# tpot_req_p50 clusters per (engine type, k) at batch 16, used as a cross-check only
def k_from_tpot(engine_flex, tpot):
    if engine_flex:
        return 1 if tpot < 9.0 else (3 if tpot < 10.3 else (2 if tpot < 11.2 else None))
    return 1 if tpot < 9.4 else (3 if 10.2 <= tpot < 10.8 else (2 if 11.0 <= tpot < 11.8 else None))

def engine_times(r):
    ss = r["steps_S"]; t0 = ss[0]["ts"]; rel = [(s["ts"] - t0) * 1000 for s in ss]
    n = 3 if r["batch"] == 16 else 2
    T = [rel[i + 2] for i in range(n)]          # T1..Tn
    return T, rel[-1]

def per_request(batch, k, T):
    """first-token time of each of the `batch` requests, from T1..Tn and the split (k in step 1)."""
    if batch == 16:
        n2 = 7                                   # every split seen: step 2 = 8192-token budget -> 7 complete
        n3 = 16 - k - n2
        return [T[0]] * k + [T[1]] * n2 + [T[2]] * n3
    return [T[0]] * k + [T[1]] * (4 - k)

def main():
    rs = rows(ROUNDS)
    out = {}
    print("## 1. FlexQuant streamed-burst splits (telemetry)")
    for b in (16, 4):
        splits = Counter(tuple(r["split_S"]) for r in rs if r["engine"] == "flex" and r["batch"] == b)
        nsplits = Counter(tuple(r["split_N"]) for r in rs if r["engine"] == "flex" and r["batch"] == b)
        print(f"batch {b} streamed: {dict(splits)}")
        print(f"batch {b} non-streamed (max_tokens=1): {dict(nsplits)}")

    print("\n## 2. validation of k-from-spread on FlexQuant (known k)")
    for b in (16, 4):
        fl = [r for r in rs if r["engine"] == "flex" and r["batch"] == b]
        ok = sum(k_from_spread(b, r["spread_ms"]) == r["k_S"] for r in fl)
        print(f"batch {b}: {ok}/{len(fl)} correct")
        for k in (1, 2, 3):
            sp = [r["spread_ms"] for r in fl if r["k_S"] == k]
            tp = [r["tpot_req_p50_ms"] for r in fl if r["k_S"] == k]
            if sp:
                print(f"  flex k={k}: n={len(sp)} spread {min(sp):.1f}-{max(sp):.1f} (mean {st.mean(sp):.1f}), "
                      f"tpot_req_p50 {min(tp):.2f}-{max(tp):.2f}")

    print("\n## 3. stock engines: k inferred from spread (tpot cross-check at b16)")
    for r in rs:
        r["k"] = int(r["k_S"]) if r["engine"] == "flex" else k_from_spread(r["batch"], r["spread_ms"])
        r["k_check"] = True
        if r["batch"] == 16 and r["engine"] != "flex":
            kt = k_from_tpot(False, r["tpot_req_p50_ms"])
            near = min(abs(r["spread_ms"] - 233), abs(r["spread_ms"] - 217)) < 3
            if kt is not None and kt != r["k"] and near:
                r["k"] = kt              # spread on a class boundary, tpot squarely in a cluster
            r["k_check"] = kt == r["k"]
    for b in (16, 4):
        for kind in ("stock", "flex"):
            sel = [r for r in rs if r["batch"] == b and (r["engine"] == "flex") == (kind == "flex")]
            c = Counter(r["k"] for r in sel)
            bad = [(r["round"], r["engine"], r["rep"], round(r["spread_ms"], 1), round(r["tpot_req_p50_ms"], 2))
                   for r in sel if not r["k_check"]]
            print(f"batch {b} {kind}: n={len(sel)} k counts {dict(sorted(c.items()))}"
                  + (f"; spread/tpot disagree: {bad}" if bad else ""))
            for k in (1, 2, 3):
                sp = [r["spread_ms"] for r in sel if r["k"] == k and r["k_check"]]
                if sp:
                    print(f"    k={k}: spread mean {st.mean(sp):.1f} median {st.median(sp):.1f} (n={len(sp)})")

    print("\n## 4. engine-side first-token times per k (FlexQuant telemetry, ms from the burst's first step)")
    model = {}
    for b in (16, 4):
        fl = [r for r in rs if r["engine"] == "flex" and r["batch"] == b]
        for r in fl:
            T, last = engine_times(r)
            reqs = per_request(b, r["k"], T)
            r["T"] = T
            r["rel_median"] = st.median(reqs); r["rel_mean"] = st.mean(reqs)
            r["rel_first"], r["rel_last"] = min(reqs), max(reqs)
            r["client_minus_engine_spread"] = r["spread_ms"] - (T[-1] - T[0])
            r["O"] = r["stream_wall_ms"] - last   # client wall minus engine time to the last step's start
        for k in (1, 2, 3):
            sel = [r for r in fl if r["k"] == k]
            if not sel: continue
            m = {f: st.median([r[f] for r in sel]) for f in ("rel_first", "rel_median", "rel_mean", "rel_last",
                                                               "client_minus_engine_spread", "O")}
            m["T"] = [round(st.median([r["T"][i] for r in sel]), 1) for i in range(len(sel[0]["T"]))]
            m["n"] = len(sel)
            model[(b, k)] = m
            print(f"b{b} k={k} n={m['n']}: T={m['T']}  first {m['rel_first']:.1f}  median {m['rel_median']:.1f}  "
                  f"mean {m['rel_mean']:.1f}  last {m['rel_last']:.1f} | client spread - (Tn-T1) "
                  f"{m['client_minus_engine_spread']:.1f} | stream wall - engine(last step start) {m['O']:.1f}")

    print("\n## 5. engine p50 = median of 5 burst medians: predicted from the k's vs recorded")
    print("pred = 3rd smallest of the per-burst engine-side medians (model per k); offset = recorded p50 - pred")
    res = []
    for b in (16, 4):
        for (rnd, eng), sel in group(rs, b).items():
            ks = [r["k"] for r in sel]
            meds = sorted(model[(b, k)]["rel_median"] for k in ks)
            pred = meds[2]
            means = [model[(b, k)]["rel_mean"] for k in ks]
            if eng == "flex":
                meds_b = sorted(r["rel_median"] for r in sel)  # the burst's own telemetry
                pred_own = meds_b[2]
                means_own = [r["rel_mean"] for r in sel]
            else:
                pred_own, means_own = None, None
            p50 = sel[0]["row_ttft_p50_ms"]
            res.append(dict(batch=b, round=rnd, engine=eng, ks=ks, p50=p50, pred=pred, offset=p50 - pred,
                            pred_own=pred_own, offset_own=(p50 - pred_own) if pred_own else None,
                            mean_rel=st.mean(means), mean_rel_own=st.mean(means_own) if means_own else None,
                            prefill=sel[0]["row_prefill_ms"], checks=all(r["k_check"] for r in sel)))
    for b in (16, 4):
        print(f"\nbatch {b}: round engine ks p50 pred offset | own-telemetry pred/offset | model mean TTFT(rel)")
        for x in res:
            if x["batch"] != b: continue
            own = f"{x['pred_own']:.1f} / {x['offset_own']:.1f}" if x["pred_own"] else "-"
            print(f"  {x['round']} {x['engine']:13s} {x['ks']} {'' if x['checks'] else '(?)'} p50 {x['p50']:.1f} "
                  f"pred {x['pred']:.1f} offset {x['offset']:.1f} | {own} | mean {x['mean_rel']:.1f}")
        for kind in ("stock", "flex"):
            sel = [x for x in res if x["batch"] == b and (x["engine"] == "flex") == (kind == "flex")]
            off = [x["offset"] for x in sel]
            print(f"  {kind}: offset mean {st.mean(off):.1f} median {st.median(off):.1f} range {min(off):.1f}..{max(off):.1f}; "
                  f"model mean-TTFT(rel) avg {st.mean(x['mean_rel'] for x in sel):.1f}; "
                  f"recorded p50 avg {st.mean(x['p50'] for x in sel):.1f}")
        # A-B-A per round at equal split: offset(flex) - mean offset(stock of round)
        print("  per round, FlexQuant minus W8A8 engines around it:")
        for rnd in [r[0] for r in ROUNDS]:
            f = next(x for x in res if x["batch"] == b and x["round"] == rnd and x["engine"] == "flex")
            s = [x for x in res if x["batch"] == b and x["round"] == rnd and x["engine"] != "flex"]
            gm = math.exp(st.mean(math.log(x["p50"]) for x in s))
            print(f"    {rnd}: p50 ratio {f['p50']/gm:.3f} | p50 diff {f['p50']-st.mean(x['p50'] for x in s):+.1f} ms"
                  f" | predicted-by-split diff {f['pred']-st.mean(x['pred'] for x in s):+.1f} ms"
                  f" | residual (offset) diff {f['offset']-st.mean(x['offset'] for x in s):+.1f} ms"
                  f" | model mean-TTFT diff {f['mean_rel']-st.mean(x['mean_rel'] for x in s):+.1f} ms")
    json.dump({"model": {f"b{b}k{k}": v for (b, k), v in model.items()}, "engines": res},
              open(str(__import__("pathlib").Path(__file__).resolve().parent / "analysis.json"), "w"), indent=1)

def group(rs, b):
    g = {}
    for r in rs:
        if r["batch"] == b:
            g.setdefault((r["round"], r["engine"]), []).append(r)
    return g

if __name__ == "__main__":
    main()
