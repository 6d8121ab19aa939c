import json, glob, statistics as st, collections
for b in ["before-a171a38", "after-d364812"]:
    vals = collections.defaultdict(list)   # (subject, workload) -> samples
    ratio = collections.defaultdict(list)  # (subject, workload) -> per-round ratio to raw-redis
    for f in sorted(glob.glob(f"e2e-{b}-*.json")):
        d = json.load(open(f))
        per = {}
        for r in d["results"]:
            s = [x["msgs_per_sec"] for x in r["samples"]]
            vals[(r["subject"], r["workload"])] += s
            per[(r["subject"], r["workload"])] = s
        for (subj, w), s in per.items():
            raw = per.get(("raw-redis", w))
            if subj.startswith("ferrymq-redis") and raw:
                ratio[(subj, w)] += [a / b for a, b in zip(s, raw)]
    print("==", b)
    for k in sorted(vals):
        print(f"  {k[0]:24} {k[1]:8} median {st.median(vals[k]):>12,.0f}  n={len(vals[k])}")
    for k in sorted(ratio):
        print(f"  ratio {k[0]:24} {k[1]:8} median-of-round-ratios {st.median(ratio[k]):.2f}  ratio-of-medians {st.median(vals[k])/st.median(vals[('raw-redis',k[1])]):.2f}")
