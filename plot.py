"""
Pictures of PPO runs, from their metrics files (out_dir/ppo_metrics.jsonl): matplotlib is needed
here and nowhere else.

    python plot.py out out/kl0                     # runs overlaid: score, gold, KL, length per iteration
    python plot.py runs/kl* --out=overopt.png --kind=overopt    # gold and proxy score against sqrt(KL)

--kind=training (default) | overopt; --out=FILE.png (default training.png or overopt.png).

The over-optimisation picture (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization",
Fig. 1): every evaluation of every run is a point at d = sqrt(KL(policy || reference)), the KL per
response in nats; gold (the labeler, the truth) and proxy (the reward model PPO optimised) against d.
"""
import json
import math
import os

from util import UserError, main_guard


def read_metrics(run_dir):
    """The train and eval lines of run_dir/ppo_metrics.jsonl, as two lists of dicts, each with its "iter".
    Checked here, before matplotlib is imported, so that a file with nothing to draw is one line naming it
    (it drew empty axes and exited 0) with or without matplotlib."""
    path = os.path.join(run_dir, "ppo_metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file (a run directory of ppo.py holds one)")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError:
                raise UserError(f"{path}:{n}: not a JSON line") from None
            if isinstance(r, dict) and r.get("kind") in ("train", "eval"):
                if not isinstance(r.get("iter"), (int, float)) or isinstance(r["iter"], bool):
                    raise UserError(f'{path}:{n}: no number "iter" in this {r["kind"]} line (ppo.py writes one on every line)')
                rows.append(r)
    if not rows:
        raise UserError(f"{path}: no train or eval lines to plot (ppo.py writes one per iteration, the first after its first evaluation)")
    rows = {(r["kind"], r["iter"]): r for r in rows}  # a resumed run's repeats: the last wins
    rows = sorted(rows.values(), key=lambda r: r["iter"])
    return [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "eval"]


def label(run_dir):
    """A run's legend: its directory and the settings that tell the runs apart."""
    try:
        with open(os.path.join(run_dir, "ppo_eval.json")) as f:
            cfg = json.load(f)["cfg"]
        return f"{run_dir} (kl_coef {cfg['kl_coef']:g}, {cfg.get('advantage', 'gae')}, seed {cfg['seed']})"
    except (OSError, ValueError, KeyError):
        return run_dir


def plot_training(runs, out, plt):
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    panels = [("score", "reward-model score (proxy)"), ("gold", "gold score (labeler)"),
              ("kl", "KL per token (k1)"), ("length", "response length (tokens)")]
    for ax, (key, title) in zip(axes.flat, panels):
        for run_dir, (train, evals) in runs.items():
            rows = [r for r in train if key in r]
            line, = ax.plot([r["iter"] for r in rows], [r[key] for r in rows], lw=1, alpha=0.8, label=label(run_dir))
            ev = [r for r in evals if key in r]  # held-out evaluations, as dots in the run's colour
            ax.plot([r["iter"] for r in ev], [r[key] for r in ev], "o", color=line.get_color(), ms=4)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("PPO iteration (lines: rollouts; dots: held-out evaluations)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=80)


def plot_overopt(runs, out, plt):
    fig, ax = plt.subplots(figsize=(7, 5))
    for run_dir, (_, evals) in runs.items():
        ev = [r for r in evals if all(k in r for k in ("gold", "score", "kl_seq"))]
        if not ev:
            raise UserError(f"{run_dir}: no gold scores in its evaluations (the built-in task has the gold labeler)")
        d = [math.sqrt(max(r["kl_seq"], 0.0)) for r in ev]
        line, = ax.plot(d, [r["gold"] for r in ev], "o-", label=f"gold, {label(run_dir)}")
        ax.plot(d, [r["score"] for r in ev], "s--", mfc="none", color=line.get_color(), alpha=0.7)
    ax.set_xlabel("sqrt(KL(policy || reference)) per response, nats^0.5")
    ax.set_ylabel("score (solid: gold; dashed, hollow: reward model)")
    ax.set_title("over-optimisation: the proxy keeps rising, does gold?", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=80)


def main(argv):
    opts = {"out": "", "kind": "training"}
    dirs = []
    for a in argv:
        if a.startswith("--"):
            k, _, v = a[2:].partition("=")
            if k not in opts:
                raise UserError(f"unknown option --{k}; valid: --out=FILE.png, --kind=training|overopt")
            opts[k] = os.path.expanduser(v)
        else:
            dirs.append(os.path.expanduser(a))
    if not dirs:
        raise UserError("usage: python plot.py RUN_DIR [RUN_DIR ...] [--out=FILE.png] [--kind=training|overopt]")
    if opts["kind"] not in ("training", "overopt"):
        raise UserError(f"--kind={opts['kind']}: expected training or overopt")
    runs = {d: read_metrics(d) for d in dirs}
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no screen needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plot.py needs matplotlib: pip install matplotlib") from None
    out = opts["out"] or f"{opts['kind']}.png"
    (plot_training if opts["kind"] == "training" else plot_overopt)(runs, out, plt)
    print(f"wrote {out}")


if __name__ == "__main__":
    main_guard(main, usage=__doc__)
