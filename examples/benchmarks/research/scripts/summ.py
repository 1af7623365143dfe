"""Summarise experiments/results/*.json into a markdown table (rules in REPORT.md)."""
import glob, json, os, sys
import numpy as np
R = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

def load(task, opt):
    p = os.path.join(R, f"{task}__{opt}.json")
    return json.load(open(p)) if os.path.exists(p) else None

def fmt(x):
    return f"{x:.3g}" if isinstance(x, (float, np.floating)) else str(x)

def stoch_row(r):
    lrs = np.array(r["lrs"]); fl = np.array(r["final_loss"]); l0 = np.array(r["loss0"])
    mets = np.array(r["mets"]); steps = np.array(r["eval_steps"])
    bad = ~np.isfinite(fl) | (fl > l0)               # diverged: non-finite or above the start
    nonfin = ~np.isfinite(fl)
    sel = np.where(np.isfinite(fl[:, 0]), fl[:, 0], np.inf)
    i = int(np.argmin(sel))                            # best lr on seed 0 by final train loss
    edge = i in (0, len(lrs) - 1)
    reach = []
    for s in range(mets.shape[1]):
        m = mets[i, s]
        ok = (m <= r["target"]) if r["metric"] == "gap" else (m >= r["target"])
        ok &= np.isfinite(m)
        reach.append(int(steps[np.argmax(ok)]) if ok.any() else None)
    got = [x for x in reach if x is not None]
    stt = (f"{int(np.median(got)) if len(got)==3 else '-'} [{min(got)},{max(got)}]" if got else "- (0/3)")
    if 0 < len(got) < 3: stt = f"{sorted(got)} ({len(got)}/3)"
    fm = mets[i, :, -1]
    upper = bad[len(lrs)//2:].any(axis=1).sum()
    return dict(lr=lrs[i], edge=edge, steps=stt, final=f"{np.median(fm):.4g} [{fm.min():.4g},{fm.max():.4g}]",
                floss=f"{np.median(fl[i]):.4g}", ndiv=f"{int(bad.any(axis=1).sum())}/{len(lrs)} (nan {int(nonfin.any(axis=1).sum())}; upper half {upper})")

def det_row(r):
    lrs = np.array(r["lrs"]); fs = np.array(r["fs"]); first = np.array(r["first"]); fin = np.array(r["finite"])
    last = fs[:, -1]
    nonfin = ~fin.all(axis=1) | ~np.isfinite(fs).all(axis=1)
    sel = np.where(np.isfinite(last) & ~nonfin, last, np.inf)
    conv = (first >= 0) & ~nonfin
    # Best lr by final f; ties (final f <= 1e-12, float32 round-off level, or equal) go to
    # the lr that reached the target first.
    tie = (sel <= max(sel.min(), 1e-12))
    key = np.where(tie, np.where(conv, first, 10**8), 10**9)
    i = int(np.argmin(key)); edge = i in (0, len(lrs)-1)
    fast = np.where(conv, first, 10**9); j = int(np.argmin(fast))
    fastest = f"; fastest lr {lrs[j]:.3g}: {first[j]}" if conv.any() else ""
    return dict(lr=lrs[i], edge=edge, steps=(str(first[i]) if first[i] >= 0 else "-") + fastest, final=f"{last[i]:.3g}",
                floss=f"{last[i]:.3g}", ndiv=f"{int(nonfin.sum())}/{len(lrs)} nonfinite; {int(conv.sum())} lrs reach target, finite 50k")

def main(tasks, opts):
    print("| task | optimizer | best lr | steps to target med [min,max] | final metric med [min,max] | final train loss | diverged lrs |")
    print("|---|---|---|---|---|---|---|")
    for t in tasks:
        for o in opts:
            r = load(t, o)
            if r is None: continue
            row = det_row(r) if t in ("rosenbrock", "quadratic") else stoch_row(r)
            e = " (EDGE)" if row["edge"] else ""
            print(f"| {t} | {o} | {row['lr']:.3g}{e} | {row['steps']} | {row['final']} | {row['floss']} | {row['ndiv']} |")

if __name__ == "__main__":
    tasks = sys.argv[1].split(",") if len(sys.argv) > 1 else ["mnist1d_mlp","mnist1d_cnn","logreg","rosenbrock","quadratic"]
    opts = sys.argv[2].split(",") if len(sys.argv) > 2 else sorted({os.path.basename(p).split("__")[1][:-5] for p in glob.glob(R+"/*.json")})
    main(tasks, opts)
