"""Assign FlexQuant step telemetry to the client bursts of `flexquant bench`'s fixed order, by cumulative
prefill tokens (bursts are sequential, so burst boundaries fall on step boundaries):
  warm-up: W non-streamed bursts of 16 x 1024 tokens (W = target's warmup_bursts)
  sweep:   for batch in (1, 4, 16): 5 x [non-streamed burst (max_tokens=1), streamed burst (max_tokens=16)]
  online:  Poisson arrivals (rest)
Usage: python3 bursts.py ROUND.json STEPS.jsonl.gz  -> prints JSON list of bursts."""
import gzip, json, sys

PROMPT = 1024

def load_steps(path):
    return [json.loads(l) for l in gzip.open(path, "rt")]

def plan(results, target="flex"):
    t = next(t for t in results["targets"] if t["label"] == target)
    spec = results["spec"]
    out = [("warmup", min(16, 16), False, i) for i in range(t["warmup_bursts"][0])]
    for b in spec["batches"]:
        reps = spec["repeats_small"] if b <= 16 else spec["repeats_large"]
        for r in range(reps):
            out.append((f"b{b}", b, False, r))
            out.append((f"b{b}", b, True, r))
    return out

def assign(steps, bursts):
    """Return per burst the list of step indices (prefill steps and following decode-only steps)."""
    res, i, n = [], 0, len(steps)
    for name, batch, streamed, rep in bursts:
        need = batch * PROMPT
        # skip decode-only steps of the previous burst
        while i < n and steps[i]["num_prefill_tokens"] == 0:
            if res: res[-1]["steps"].append(i)
            i += 1
        got, idx = 0, []
        while got < need:
            s = steps[i]
            got += s["num_prefill_tokens"]
            idx.append(i); i += 1
        if got != need:
            raise SystemExit(f"misaligned at {name} rep {rep}: {got} != {need} (step {steps[i-1]['step']})")
        res.append({"name": name, "batch": batch, "streamed": streamed, "rep": rep, "steps": idx})
    # trailing decode-only steps of the last sweep burst
    while i < n and steps[i]["num_prefill_tokens"] == 0:
        res[-1]["steps"].append(i); i += 1
    return res, i

if __name__ == "__main__":
    results = json.load(open(sys.argv[1]))
    steps = load_steps(sys.argv[2])
    res, rest = assign(steps, plan(results))
    for b in res:
        ss = [steps[j] for j in b["steps"]]
        pre = [(s["num_prefill_tokens"], s["num_decode_reqs"]) for s in ss if s["num_prefill_tokens"]]
        print(b["name"], "S" if b["streamed"] else "N", b["rep"], len(ss), pre)
    print("online steps:", len(steps) - rest)
