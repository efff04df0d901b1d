"""The learning rules: what each costs per step, and (given a finished sweep) the field's table.

Speed (always): one copy of the sweep's model per rule (same weights, same
batch, fused AdamW), each with its rule attached, trained in ONE process and
interleaved round by round, so load from anything else falls on all alike; the
median over rounds of each rule's seconds per step and its ratio to backprop's
(the median of per-round paired ratios) are printed. Targets (issue 19): FA,
sign-symmetry and KP within +15% of BP; DFA at most BP's cost. Two more rows
put the real Telemetry probe of the training loop on FA's steps: every step a
telemetry step with the alignment passes (the worst case), and telemetry off
(`every: 0`: the loop's probe is a no-op object, nothing runs), whose ratio to
FA alone must be 1 to the noise.

Table (`--sweep sweeps/<id>`, a finished `configs/sweeps/learning-rules.yaml`):
per rule the whole-val loss (mean, 95% t interval), Welch's test against BP
with Holm's correction over the 8 comparisons and the difference in nats with
its interval, the final alignment angles (mean over layers of the last
telemetry step's grad_angle and b_w_angle, mean over seeds), seconds per step
from the runs' own manifests; then which literature orderings held; `--plots
DIR` draws val loss with bands and the angles over training.

    .venv/bin/python benchmarks/bench_learning_rules.py [--rounds 5] [--steps 6]
    .venv/bin/python benchmarks/bench_learning_rules.py --sweep sweeps/<id> --plots docs

One configuration of the sweep was run (the file's); no rule was tuned.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import torch
from machine import describe

from lmlab.config import from_dict
from lmlab.hooks.manager import ExperimentHooks
from lmlab.records import MetricsLog, read_manifest, read_metrics
from lmlab.train.distributed import setup
from lmlab.train.optim import build_optimizer
from lmlab.train.telemetry import Telemetry

RULES = {
    "bp": [],
    "fa": [{"name": "feedback_alignment", "at": "blocks.*"}],
    "usf": [{"name": "sign_symmetry", "at": "blocks.*", "mode": "usf"}],
    "brsf": [{"name": "sign_symmetry", "at": "blocks.*", "mode": "brsf"}],
    "frsf": [{"name": "sign_symmetry", "at": "blocks.*", "mode": "frsf"}],
    "kp": [{"name": "kolen_pollack", "at": "blocks.*"}],
    "dfa-block": [{"name": "dfa", "at": "blocks.*", "granularity": "block"}],
    "dfa-sublayer": [{"name": "dfa", "at": "blocks.*", "granularity": "sublayer"}],
    "shallow": [{"name": "shallow", "at": "blocks.*"}],
}
MODEL = {"n_layer": 4, "n_head": 4, "d_model": 64, "d_ff": 256}  # the sweep's
B, T, VOCAB = 16, 128, 97


class Arm:
    """One rule on its own copy of the model, with its optimizer and (maybe) telemetry."""

    def __init__(self, name: str, base: torch.nn.Module, rules: list, telemetry_every: int | None,
                 tmp: Path) -> None:
        self.name = name
        cfg = from_dict({"model": MODEL, "data": {"block_size": T},
                         "hooks": {"backward": rules},
                         "telemetry": {"every": telemetry_every or 0, "attention": False,
                                       "logits": False},
                         "train": {"device": "cpu"}})
        self.adapter = copy.deepcopy(base)
        self.hooks = ExperimentHooks(cfg.hooks, self.adapter).attach()
        self.opt = build_optimizer(self.adapter, cfg.train, torch.device("cpu"))
        self.tel = (Telemetry(cfg.telemetry, self.adapter, setup("cpu"),
                              MetricsLog(tmp / f"{name}.jsonl", enabled=False))
                    if telemetry_every is not None else None)
        self.step, self.times = 0, []

    def run(self, x: torch.Tensor, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step += 1
            probe = self.tel.probe(self.step) if self.tel else None
            logits = self.adapter(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB),
                                                     x[:, 1:].reshape(-1))
            loss.backward()
            if probe:
                probe.before_update(x[:, :-1])
            self.opt.step()
            if probe:
                probe.after_update()
            self.opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) / steps


def speed(rounds: int, steps: int) -> None:
    import tempfile

    from lmlab.model.build import build_adapter

    torch.manual_seed(0)
    base = build_adapter(from_dict({"model": MODEL, "data": {"block_size": T}}), VOCAB)
    x = torch.randint(0, VOCAB, (B, T + 1), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        arms = [Arm(n, base, r, None, Path(tmp)) for n, r in RULES.items()]
        arms += [Arm("fa + telemetry off", base, RULES["fa"], 0, Path(tmp)),
                 Arm("fa + alignment every step", base, RULES["fa"], 1, Path(tmp))]
        for arm in arms:
            arm.run(x, 1)  # warm-up
        for r in range(rounds):
            for arm in arms if r % 2 == 0 else arms[::-1]:
                arm.times.append(arm.run(x, steps))
    bp = arms[0].times
    print(f"\nSeconds per training step, model {MODEL}, batch {B} x {T}, {rounds} rounds x "
          f"{steps} steps, interleaved (median; ratio = median of per-round ratios to bp)")
    print(f"{'rule':28} {'s/step':>8} {'vs bp':>7}  target")
    for arm in arms:
        ratio = statistics.median(a / b for a, b in zip(arm.times, bp, strict=True))
        target = {"fa": 1.15, "usf": 1.15, "brsf": 1.15, "frsf": 1.15, "kp": 1.15,
                  "dfa-block": 1.0, "dfa-sublayer": 1.0}.get(arm.name)
        if arm.name == "fa + telemetry off":
            ratio = statistics.median(a / b for a, b in zip(arm.times, arms[1].times,
                                                              strict=True))
            note = "vs fa alone: no cost expected"
        else:
            note = ("" if target is None else
                    f"<= {target:.2f}: {'met' if ratio <= target else 'NOT met'}")
        print(f"{arm.name:28} {statistics.median(arm.times):8.4f} {ratio:7.3f}  {note}")


# --- the table of a finished sweep -------------------------------------------------------

def last_telemetry(run_dir: Path) -> dict[str, float]:
    tel = [r for r in read_metrics(run_dir) if r.get("kind") == "telemetry"]
    return tel[-1] if tel else {}


def _mean(values: list[float], digits: int) -> str:
    return f"{statistics.mean(values):.{digits}f}" if values else "-"


def mean_of(record: dict, prefix: str) -> float | None:
    vals = [v for k, v in record.items() if k.startswith(prefix)]
    return sum(vals) / len(vals) if vals else None


def table(sweep_dir: Path, plots: Path | None) -> None:
    from lmlab.runs.aggregate import aggregate, format_aggregate
    from lmlab.sweeps import folder
    from lmlab.sweeps.report import _blocks

    index = folder.load(sweep_dir)
    blocks, missing = _blocks(index)
    result = aggregate(blocks, index["baseline"], "final_val")
    for w in missing + result["warnings"]:
        print("warning:", w)
    rows = result["blocks"][""]
    groups = blocks[""]
    print(f"\nSweep {index['sweep_id']}: {folder.counts(index)}")
    print("| rule | n | whole-val loss (95% CI) | vs bp: diff nats (95% CI), p, Holm p | "
          "grad angle ° | B-W angle ° | s/step |")
    print("|---|---|---|---|---|---|---|")
    means = {}
    for name, r in rows.items():
        if not r["n"]:
            print(f"| {name} | 0 | - | - | - | - | - |")
            continue
        runs = [x for x in groups[name] if x["run_id"] in r["runs"]]
        tels = [last_telemetry(Path(x["dir"])) for x in runs]
        ga = [a for t in tels if (a := mean_of(t, "grad_angle/")) is not None]
        bw = [a for t in tels if (a := mean_of(t, "b_w_angle/")) is not None]
        sps = []
        for x in runs:
            m = read_manifest(Path(x["dir"]))
            f, c = m.get("final") or {}, m["config"]
            tok = c["train"]["batch_size"] * c["train"].get("grad_accum", 1) * \
                c["data"]["block_size"]
            if f.get("tokens_per_s"):
                sps.append(tok / f["tokens_per_s"])
        means[name] = r["mean"]
        ci = f"[{r['ci'][0]:.4f}, {r['ci'][1]:.4f}]" if r["ci"] else r["note"]
        d = r.get("vs_baseline")
        vs = "-" if d is None or d["ci"] is None else (
            f"{d['diff']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}], p={d['p']:.2g}, "
            f"Holm p={d.get('p_adjusted', d['p']):.2g}")
        print(f"| {name} | {r['n']} | {r['mean']:.4f} {ci} | {vs} | {_mean(ga, 1)} | "
              f"{_mean(bw, 1)} | {_mean(sps, 3)} |")
    print("\n" + format_aggregate(result))
    print("\nLiterature orderings (on the means; '<' means lower loss):")
    orders = [("Launay et al. 2020", ["bp", "dfa-block", "dfa-sublayer", "shallow"])]
    orders += [("Akrout et al. 2019", ["kp", mode, "fa"]) for mode in ("usf", "brsf", "frsf")]
    for label, order in orders:
        have = [n for n in order if means.get(n) is not None]
        held = all(means[a] <= means[b] for a, b in zip(have, have[1:], strict=False))
        print(f"  {label}: {' < '.join(have)}: {'holds' if held else 'does NOT hold'} "
              f"({', '.join(f'{n} {means[n]:.4f}' for n in have)})")
    if "kp" in means and "bp" in means and rows.get("kp", {}).get("vs_baseline"):
        d = rows["kp"]["vs_baseline"]
        print(f"  KP ≈ BP: {d['verdict']}")
    if plots is not None:
        draw(groups, rows, plots)


def draw(groups: dict, rows: dict, out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lmlab.runs.aggregate import mean_curve

    fig = Figure(figsize=(12, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    for i, (name, rs) in enumerate(groups.items()):
        rs = [r for r in rs if r["run_id"] in rows[name]["runs"] and r["curve"]]
        if not rs:
            continue
        xs, mean, lo, hi = mean_curve(rs, 0)
        left.plot(xs, mean, color=f"C{i % 10}", label=f"{name} (n={len(rs)})", lw=1.3)
        left.fill_between(xs, lo, hi, color=f"C{i % 10}", alpha=0.2, lw=0)
        curves = []
        for r in rs:
            tel = [t for t in read_metrics(Path(r["dir"])) if t.get("kind") == "telemetry"]
            pts = [(t["step"], mean_of(t, "grad_angle/")) for t in tel]
            curves.append([p for p in pts if p[1] is not None])
        if curves and curves[0]:
            steps = [s for s, _ in curves[0]]
            avg = [statistics.mean(c[j][1] for c in curves if len(c) > j)
                   for j in range(len(steps))]
            right.plot(steps, avg, color=f"C{i % 10}", label=name, lw=1.3)
    left.set(xlabel="step", ylabel="whole-val loss (nats/char)",
             title="val loss, mean and 95% interval over seeds")
    left.set_ylim(1.8, 3.6)  # a t interval from 2 seeds is wide: keep the means readable
    right.set(xlabel="step", ylabel="degrees",
              title="rule's gradient vs backprop's, mean over layers and seeds")
    right.axhline(90, color="grey", lw=0.8, ls="--")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "learning_rules.png", format="png")
    print(f"plot: {out / 'learning_rules.png'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sweep", type=Path, help="a finished learning-rules sweep folder")
    p.add_argument("--plots", type=Path, help="folder for learning_rules.png (with --sweep)")
    p.add_argument("--no-speed", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(describe())
    if not args.no_speed:
        speed(args.rounds, args.steps)
    if args.sweep:
        table(args.sweep, args.plots)
    print(f"load avg at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
