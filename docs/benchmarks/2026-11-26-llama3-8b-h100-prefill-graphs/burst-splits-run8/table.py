"""Per round, engine, batch (4, 16): every streamed-burst sample, with FlexQuant's telemetry split."""
import json, sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from bursts import load_steps, plan, assign

D = str(__import__("pathlib").Path(__file__).resolve().parents[1])
ROUNDS = [("m1r1", "machine-1/rounds/round-1-graphs.json", "machine-1/logs/run-3-steps.jsonl.gz"),
          ("m1r3", "machine-1/rounds/round-3-graphs.json", "machine-1/logs/run-12-steps.jsonl.gz"),
          ("m2r1", "machine-2/rounds/round-1-graphs.json", "machine-2/logs/run-3-steps.jsonl.gz"),
          ("m2r2", "machine-2/rounds/round-2-graphs.json", "machine-2/logs/run-7-steps.jsonl.gz"),
          ("m2r3", "machine-2/rounds/round-3-graphs.json", "machine-2/logs/run-12-steps.jsonl.gz")]
EXTRA = [("m1r2-eager", "machine-1/rounds/round-2-eager.json", "machine-1/logs/run-7-steps.jsonl.gz")]

def rows(rounds=ROUNDS):
    out = []
    for name, rj, sj in rounds:
        res = json.load(open(f"{D}/{rj}"))
        flex_run = next(t["run_id"] for t in res["targets"] if t["label"] == "flex")
        assert f"run-{flex_run}-" in sj, (name, flex_run, sj)
        steps = load_steps(f"{D}/{sj}")
        bursts, _ = assign(steps, plan(res))
        for r in res["sweep"]:
            for i in range(r["repeats"]):
                row = {"round": name, "engine": r["target"], "batch": r["batch"], "rep": i,
                       "spread_ms": r["ttft_spread_ms_samples"][i],
                       "tpot_req_p50_ms": r["tpot_req_p50_samples"][i],
                       "stream_wall_ms": r["decode_s_samples"][i] * 1000,
                       "prefill_wall_ms": r["prefill_s_samples"][i] * 1000,
                       "row_ttft_p50_ms": r["ttft_p50_ms"], "row_prefill_ms": r["prefill_s"] * 1000}
                if r["target"] == "flex":
                    for kind, streamed in (("S", True), ("N", False)):
                        b = next(b for b in bursts if b["name"] == f"b{r['batch']}" and b["rep"] == i
                                 and b["streamed"] == streamed)
                        ss = [steps[j] for j in b["steps"]]
                        pre = [s for s in ss if s["num_prefill_tokens"]]
                        row[f"split_{kind}"] = [s["num_prefill_tokens"] for s in pre]
                        row[f"dec_{kind}"] = [s["num_decode_reqs"] for s in pre]
                        row[f"k_{kind}"] = pre[0]["num_prefill_tokens"] / 1024
                        row[f"steps_{kind}"] = ss
                out.append(row)
    return out

if __name__ == "__main__":
    rs = rows(ROUNDS + EXTRA)
    for b in (4, 16):
        print(f"\n=== batch {b}")
        print(f"{'round':10s} {'engine':13s} rep  spread  tpotp50  strwall  prewall  rowp50 | flex split streamed / non-streamed")
        for r in rs:
            if r["batch"] != b: continue
            extra = f"| S {r['split_S']} dec {r['dec_S']}  N {r['split_N']}" if r["engine"] == "flex" else ""
            print(f"{r['round']:10s} {r['engine']:13s} {r['rep']}  {r['spread_ms']:6.1f}  {r['tpot_req_p50_ms']:6.2f}  "
                  f"{r['stream_wall_ms']:6.1f}  {r['prefill_wall_ms']:6.1f}  {r['row_ttft_p50_ms']:6.1f} {extra}")
