"""Significance of the split mix, host-side step timing from telemetry, estimated absolute mean TTFT."""
import json, math, statistics as st, sys
from collections import Counter
from scipy.stats import fisher_exact
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from table import rows, ROUNDS, D
import analysis as A

rs = rows(ROUNDS)
for r in rs:
    r["k"] = int(r["k_S"]) if r["engine"] == "flex" else A.k_from_spread(r["batch"], r["spread_ms"])
    if r["batch"] == 16 and r["engine"] != "flex":
        kt = A.k_from_tpot(False, r["tpot_req_p50_ms"])
        if kt is not None and kt != r["k"] and min(abs(r["spread_ms"] - 233), abs(r["spread_ms"] - 217)) < 3:
            r["k"] = kt

print("## split mix, FlexQuant vs W8A8 (Fisher exact, two-sided)")
for b in (16, 4):
    f = [r["k"] for r in rs if r["batch"] == b and r["engine"] == "flex"]
    s = [r["k"] for r in rs if r["batch"] == b and r["engine"] != "flex"]
    for name, pred in (("k=1", lambda k: k == 1), ("k!=2", lambda k: k != 2), ("k=3", lambda k: k == 3)):
        a, c = sum(map(pred, f)), sum(map(pred, s))
        p = fisher_exact([[a, len(f) - a], [c, len(s) - c]])[1]
        print(f"b{b} {name}: flex {a}/{len(f)} ({a/len(f):.0%}), W8A8 {c}/{len(s)} ({c/len(s):.0%}), p={p:.3f}")
f = [r["k"] for r in rs if r["engine"] == "flex" and r["batch"] in (4, 16)]
s = [r["k"] for r in rs if r["engine"] != "flex" and r["batch"] in (4, 16)]
a, c = sum(k == 1 for k in f), sum(k == 1 for k in s)
print(f"b4+b16 k=1: flex {a}/{len(f)} ({a/len(f):.0%}), W8A8 {c}/{len(s)} ({c/len(s):.0%}), "
      f"p={fisher_exact([[a, len(f)-a], [c, len(s)-c]])[1]:.3f}")
# sensitivity: the two b16 W8A8 bursts whose spread and tpot disagree (spread says k=1) taken as k=2
for name, pred, c in (("k=1", 1, 14), ("k!=2", 2, 18)):
    a = 11 if pred == 1 else 15
    print(f"b16 {name} if the 2 ambiguous W8A8 bursts are k=2: flex {a}/25, W8A8 {c}/50, "
          f"p={fisher_exact([[a, 25 - a], [c, 50 - c]])[1]:.3f}")
# m1 round 4 (interrupted: first W8A8 engine only), extra stock data
r4 = json.load(open(f"{D}/machine-1/rounds/round-4-graphs.json"))
for row in r4["sweep"]:
    if row["batch"] in (4, 16):
        ks = [A.k_from_spread(row["batch"], x) for x in row["ttft_spread_ms_samples"]]
        print(f"m1 round 4 (W8A8 only) b{row['batch']}: ks by spread {ks}, tpot {[round(x,2) for x in row['tpot_req_p50_samples']]}, p50 {row['ttft_p50_ms']:.1f}")

print("\n## host side (FlexQuant telemetry): CPU time of the first prefill steps, ms (ts differences)")
for b in (16, 4):
    for kind in ("S", "N"):
        for k in (1, 2, 3, 4):
            sel = [r for r in rs if r["engine"] == "flex" and r["batch"] == b and r[f"k_{kind}"] == k]
            if not sel: continue
            ss = [r[f"steps_{kind}"] for r in sel]
            p1 = [(x[1]["ts"] - x[0]["ts"]) * 1000 for x in ss]
            p2 = [(x[2]["ts"] - x[1]["ts"]) * 1000 for x in ss if len(x) > 2]
            print(f"b{b} {kind} k={k} n={len(sel)}: step1 start->step2 start median {st.median(p1):.1f} "
                  f"(range {min(p1):.1f}-{max(p1):.1f})" + (f"; step2->step3 median {st.median(p2):.1f}" if p2 else ""))
# idle-followed steps (duration = the step's own host time, end - start)
own = []
for name, rj, sj in ROUNDS:
    L = A.load_steps(f"{D}/{sj}") if hasattr(A, "load_steps") else None
import gzip
def load(p): return [json.loads(l) for l in gzip.open(p, "rt")]
for name, rj, sj in ROUNDS:
    L = load(f"{D}/{sj}")
    for a, b_ in zip(L, L[1:]):
        gap = (b_["ts"] - a["ts"]) * 1000 - a["duration_ms"]
        if gap > 1e-3:   # only steps followed by an idle gap > 50 ms have duration = end - start
            own.append((a["num_prefill_tokens"] > 0, a["duration_ms"], gap))
dec = [d for p, d, g in own if not p]; pre = [d for p, d, g in own if p]
print(f"steps followed by an idle gap (own host time recorded): decode n={len(dec)} median {st.median(dec):.2f} ms; "
      f"prefill n={len(pre)} median {st.median(pre):.2f} ms")

print("\n## estimated mean TTFT per engine (model: client TTFT = engine-side time + engine offset from p50)")
res = json.load(open(str(__import__("pathlib").Path(__file__).resolve().parent / "analysis.json")))["engines"]
for b in (16, 4):
    print(f"batch {b}:")
    for rnd in [x[0] for x in ROUNDS]:
        e = {x["engine"]: x for x in res if x["batch"] == b and x["round"] == rnd}
        def absmean(x): return x["mean_rel"] + x["offset"]
        def abslast(x, k_last): return k_last + x["offset"]
        s = [e["w8a8"], e["w8a8-control"]]
        gm = lambda vals: math.exp(st.mean(map(math.log, vals)))
        f = e["flex"]
        print(f"  {rnd}: est. mean TTFT flex {absmean(f):.1f} vs W8A8 {absmean(s[0]):.1f}/{absmean(s[1]):.1f} "
              f"-> ratio {absmean(f)/gm([absmean(x) for x in s]):.3f} | recorded p50 ratio {f['p50']/gm([x['p50'] for x in s]):.3f}"
              f" | prefill-wall ratio {f['prefill']/gm([x['prefill'] for x in s]):.3f}")
