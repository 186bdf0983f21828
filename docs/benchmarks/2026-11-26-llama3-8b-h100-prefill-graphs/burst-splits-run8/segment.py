"""Segment FlexQuant step telemetry into client bursts (idle gaps) and print each burst's steps."""
import gzip, json, sys

IDLE = 0.05  # StepTelemetry.IDLE_GAP_S; duration_ms of a step followed by a gap > this is end - start

def load(path):
    return [json.loads(l) for l in gzip.open(path, "rt")]

def bursts(steps, gap_s=0.02):
    """Group steps into bursts: a new burst starts where a step begins more than gap_s after the
    previous step's recorded end (ts + duration_ms)."""
    out, cur = [], [steps[0]]
    for a, b in zip(steps, steps[1:]):
        end = a["ts"] + a["duration_ms"] / 1000
        if b["ts"] - end > gap_s:
            out.append(cur); cur = []
        cur.append(b)
    out.append(cur)
    return out

if __name__ == "__main__":
    steps = load(sys.argv[1])
    for i, bu in enumerate(bursts(steps)):
        pre = [s for s in bu if s["num_prefill_tokens"] > 0]
        t0 = bu[0]["ts"]
        desc = " ".join(f"[{s['num_prefill_tokens']}p+{s['num_decode_reqs']}d {s['duration_ms']:.1f}ms @{(s['ts']-t0)*1000:.1f}{'' if s['cudagraph'] else ' E'}]" for s in pre)
        ndec = sum(1 for s in bu if s["num_prefill_tokens"] == 0)
        gap = (bu[0]["ts"] - (prev_end)) * 1000 if i else float('nan')
        prev_end = bu[-1]["ts"] + bu[-1]["duration_ms"] / 1000
        print(f"{i:3d} gap_before={gap:8.1f}ms steps={len(bu):3d} dec_only={ndec:3d} span={(prev_end-t0)*1000:7.1f}ms prefill: {desc}")
