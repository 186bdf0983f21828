"""Per-sample fields by split (k) and engine type: spread, tpot_req_p50, streamed wall; plus unconditional."""
import statistics as st, sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from table import rows, ROUNDS
import analysis as A
from scipy.stats import fisher_exact
rs = rows(ROUNDS)
for r in rs:
    r["k"] = int(r["k_S"]) if r["engine"] == "flex" else A.k_from_spread(r["batch"], r["spread_ms"])
    r["amb"] = False
    if r["batch"] == 16 and r["engine"] != "flex":
        kt = A.k_from_tpot(False, r["tpot_req_p50_ms"])
        if kt is not None and kt != r["k"] and min(abs(r["spread_ms"] - 233), abs(r["spread_ms"] - 217)) < 3:
            r["k"] = kt
        r["amb"] = A.k_from_tpot(False, r["tpot_req_p50_ms"]) != r["k"]
def fmt(v): return f"{st.mean(v):6.1f} / {st.median(v):6.1f} (n={len(v)})" if v else "-"
for b in (16, 4):
    print(f"batch {b}: mean / median")
    for k in (1, 2, 3, "all"):
        for kind in ("W8A8", "flex"):
            sel = [r for r in rs if r["batch"] == b and (r["engine"] == "flex") == (kind == "flex") and not r["amb"]
                   and (k == "all" or r["k"] == k)]
            if not sel: continue
            print(f"  k={k} {kind:5s} spread {fmt([r['spread_ms'] for r in sel])}  tpot_req_p50 "
                  f"{fmt([r['tpot_req_p50_ms'] for r in sel])}  streamed wall {fmt([r['stream_wall_ms'] for r in sel])}")
    for kind in ("W8A8", "flex"):
        sel = [r for r in rs if r["batch"] == b and (r["engine"] == "flex") == (kind == "flex")]
        print(f"  non-streamed prefill wall {kind}: {fmt([r['prefill_wall_ms'] for r in sel])}")
print("non-k2 bursts per engine at b16:")
for kind in ("W8A8", "flex"):
    per = {}
    for r in rs:
        if r["batch"] == 16 and (r["engine"] == "flex") == (kind == "flex"):
            per.setdefault((r["round"], r["engine"]), []).append("?" if r["amb"] else r["k"])
    print(" ", kind, {f"{a}:{e}": ks for (a, e), ks in per.items()})
print("engines whose p50 lands on a non-k=2 burst (>=3 of 5 non-k2): flex 5/5, W8A8 2/10 (+1 with an ambiguous burst);",
      "Fisher p =", round(fisher_exact([[5, 0], [2, 8]])[1], 4), "/", round(fisher_exact([[5, 0], [3, 7]])[1], 4))
