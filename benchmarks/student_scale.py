"""The student at scale (issue 18, section 4): CPU per received packet as the bank grows 1 -> 70
tasks, and memory per device.

One device holds its own task (its training features are the plausibility check's reference)
and receives the other tasks' signed packets one by one, in a seeded random order.  Per packet
it measures process CPU time (BLAS on one thread, so CPU time is the work done) of:

* ``receive``: decode, signature, ROM and rollback checks, structure validation, and the
  plausibility check (scale + capture against everything stored), then the bank's atomic store;
* ``plausibility``: the check alone (part of ``receive``);
* ``store``: the bank ``put`` alone (part of ``receive``);
* ``mapper_<kind>``: the device's task mapper rebuilt over the new bank (what ``Device.mapper``
  does on the next classify after a bank change), for each mapper kind.

Two arms run in fresh processes, one after the other: ``incremental`` (this tree's
``BankPlausibility``) and ``rebuild`` (the check as it was at ``--control-rev``: the bank's
records reloaded and the check rebuilt on every bank change, every reference point re-scored
against every stored task on every packet).  Memory: the process RSS after each packet, and the
bytes held by the check and the mappers.

    flock /work/cache/heavy.lock python benchmarks/student_scale.py --features FEATURES_DIR FEATURES_MORE_DIR \\
        --cache CACHE_DIR
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy loads
    os.environ[_var] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, md_table, update_readme, write_result  # noqa: E402
from skill_scale import learned, load_tasks, log, mapper_kinds, scrub_command  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONTROL_REV = "ff937d5"  # the last commit with the rebuild-per-packet plausibility check


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def old_plausibility(rev: str):
    """``PlausibilityCheck`` as it was at ``rev``, loaded from git into its own module."""
    # ``rev`` predates the runtime's sub-packages: its flat module names are mapped to today's
    old = subprocess.run(["git", "show", f"{rev}:runtime/plausibility.py"], cwd=REPO, capture_output=True, text=True)
    path = "runtime/plausibility.py" if old.returncode == 0 else "runtime/mapping/plausibility.py"
    src = old.stdout if old.returncode == 0 else subprocess.run(
        ["git", "show", f"{rev}:{path}"], cwd=REPO, check=True, capture_output=True, text=True).stdout
    src = re.sub(r"^from \.(\w+) import", lambda m: f"from skill_edge.runtime.{FLAT_TO_PACKAGE.get(m[1], m[1])} import",
                 src, flags=re.M)
    mod = types.ModuleType("skill_edge.runtime._plausibility_control")
    mod.__package__ = "skill_edge.runtime"
    sys.modules[mod.__name__] = mod
    exec(compile(src, f"{rev}:{path}", "exec"), mod.__dict__)
    return mod.PlausibilityCheck


#: Where the modules a flat-layout plausibility.py imports live now.
FLAT_TO_PACKAGE = {"anchors": "mapping.anchors", "mapper": "mapping.mapper", "gmm": "mapping.gmm",
                   "identity": "knowledge.identity", "knowledge": "knowledge.records"}


class RebuildBankPlausibility:
    """``sync.BankPlausibility`` as it was at the control revision: on every bank change all records
    are read and the check is rebuilt (excluding the newcomer's identity)."""

    def __init__(self, bank, reference_features, check_cls) -> None:
        self.bank, self.reference_features, self.cls = bank, reference_features, check_cls
        self._key, self._check = (), None

    def __call__(self, knowledge):
        identity = (knowledge.task, knowledge.meta.agent_id)
        key = (identity, *((e.key, e.content_hash) for e in self.bank.entries()))
        if self._check is None or key != self._key:
            existing = [k for k in self.bank.load_all() if (k.task, k.meta.agent_id) != identity]
            self._check = self.cls(self.reference_features, existing)
            self._key = key
        return self._check(knowledge)

    def nbytes(self) -> int:
        c = self._check
        if c is None:
            return 0
        cached = getattr(c, "_scatter_cache", None)  # its D x D scatter sums, like the incremental one's
        return sum(x.nbytes for x in c.points.values()) + (cached[1].sxx.nbytes if cached else 0)


def check_nbytes(plaus) -> int:
    c = getattr(plaus, "_check", None)
    if c is None:
        return 0
    n = sum(x.nbytes for x in c.points.values())
    n += sum(a.nbytes for t in getattr(c, "_gmmc_top", {}).values() for a in (t.s1, t.s2, t.i1, t.i2))
    st = getattr(c, "_maha_stats", None)
    return n + (st.sxx.nbytes if st is not None else 0)


def run_arm(args) -> None:
    """One arm in this (fresh) process; writes its rows as JSON to ``args.arm_out``."""
    from skill_edge.runtime.knowledge.bank import KnowledgeBank
    from skill_edge.runtime.exchange.keys import DeviceKey, TrustStore
    from skill_edge.runtime.mapping.mapper import build_mapper
    from skill_edge.runtime.exchange.packet import PacketCodec
    from skill_edge.runtime.exchange.receive import PacketReceiver
    from skill_edge.runtime.exchange.sync import BankPlausibility

    kinds = mapper_kinds()
    tasks = load_tasks(args.features)
    knowledge = learned(tasks, args.cache, args.rom, kinds, newest=True)  # what skill_scale.py learned last
    order = np.random.default_rng(args.seed).permutation(len(tasks))[: args.tasks]
    own_i = int(order[0])
    home = Path(tempfile.mkdtemp(prefix=f"student-{args.arm}-"))
    bank = KnowledgeBank(home / "bank")
    teacher = DeviceKey.generate()
    trust = TrustStore(home / "trust")
    trust.add("teachers", teacher.public_key)
    own = dataclasses.replace(knowledge[own_i], meta=dataclasses.replace(knowledge[own_i].meta, agent_id="me"))
    bank.put(own, own=True)
    reference = {own.task: (tasks[own_i].x_train, tasks[own_i].s_train)}
    codec = PacketCodec(args.budget)
    packets = []
    for n, i in enumerate(order[1:]):
        k = dataclasses.replace(knowledge[i], meta=dataclasses.replace(knowledge[i].meta, agent_id=f"teacher{n:03d}"))
        packets.append((tasks[i].name, codec.encode(k, teacher)))
    del tasks, knowledge, k  # the harness's features of every task: what a device never holds
    import gc

    gc.collect()
    if args.arm == "incremental":
        plaus = BankPlausibility(bank, reference)
    else:
        plaus = RebuildBankPlausibility(bank, reference, old_plausibility(args.control_rev))
    clock = {"plausibility": 0.0, "store": 0.0}
    # The rebuild arm runs its (quadratic) check only at --rebuild-at bank sizes; elsewhere it replays the
    # incremental arm's decision so that both banks grow alike (its rows there are marked "replayed").
    replay = json.loads(Path(args.decisions).read_text()) if args.decisions else None
    state = {"replayed": False}

    def timed_plausibility(k):
        stored = len(bank.entries())
        if replay is not None and stored not in args.rebuild_at:
            state["replayed"] = True
            ok, why = replay[k.task]
            return ok, why
        t0 = time.process_time()
        try:
            return plaus(k)
        finally:
            clock["plausibility"] = time.process_time() - t0

    def store(packet, data):
        t0 = time.process_time()
        bank.put(packet.knowledge, packet_bytes=data)
        clock["store"] = time.process_time() - t0

    receiver = PacketReceiver(trust, own.meta.rom_fingerprint, home / "receive", plausibility=timed_plausibility,
                              codec=codec, bank=bank)
    rows = []
    rss0 = rss_mb()
    for name, data in packets:
        stored = len(bank.entries())
        clock["plausibility"] = clock["store"] = 0.0
        state["replayed"] = False
        t0, w0 = time.process_time(), time.perf_counter()
        res = receiver.receive(data, on_accept=store)
        row = {"task": name, "stored_before": stored, "decision": res.status, "reason": res.reason[-160:],
               "bytes": len(data), "receive_cpu_s": time.process_time() - t0, "receive_wall_s": time.perf_counter() - w0,
               "plausibility_cpu_s": clock["plausibility"], "store_cpu_s": clock["store"],
               "replayed": state["replayed"]}
        mapper_bytes = 0
        for kind in kinds:
            t1 = time.process_time()
            m = build_mapper(kind, bank.load_all())
            row[f"mapper_{kind}_cpu_s"] = time.process_time() - t1
            mapper_bytes += m.nbytes()
            del m
        row["total_cpu_s"] = row["receive_cpu_s"] + sum(row[f"mapper_{k}_cpu_s"] for k in kinds)
        row["rss_mb"] = rss_mb()
        row["rss_growth_mb"] = row["rss_mb"] - rss0
        row["check_mb"] = check_nbytes(plaus) / 2**20 if args.arm == "incremental" else plaus.nbytes() / 2**20
        row["mappers_mb"] = mapper_bytes / 2**20
        row["bank_mb"] = sum(f.stat().st_size for f in (home / "bank").rglob("*") if f.is_file()) / 2**20
        rows.append(row)
        log(f"{args.arm}: {stored:3d} stored, {name}: {res.status}, receive {row['receive_cpu_s']:.3f} s "
            f"(plausibility {row['plausibility_cpu_s']:.3f}), mappers "
            f"{sum(row[f'mapper_{k}_cpu_s'] for k in kinds):.3f} s, RSS {row['rss_mb']:.0f} MB")
    decisions = {r["task"]: (r["decision"] == "accepted", r["reason"]) for r in rows}
    out = {"arm": args.arm, "rows": rows, "decisions": decisions, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "own_task": own.task, "kinds": kinds, "packet_step": codec.decode(packets[0][1]).plan.step}
    Path(args.arm_out).write_text(json.dumps(out, default=float))


def fit_growth(x: np.ndarray, y: np.ndarray) -> dict:
    """y = a + b T + c T^2 by least squares, and the plain line, over the stored-task counts."""
    c2 = np.polyfit(x, y, 2)
    c1 = np.polyfit(x, y, 1)
    return {"quadratic": {"c_T2": float(c2[0]), "b_T": float(c2[1]), "a": float(c2[2])},
            "linear": {"b_T": float(c1[0]), "a": float(c1[1])}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=Path, nargs="+", required=True)
    ap.add_argument("--cache", type=Path, required=True, help="learned heads and anchors (skill_scale.py's cache)")
    ap.add_argument("--rom", type=Path, default=REPO / "models/rom/efficientnet_lite0")
    ap.add_argument("--tasks", type=int, default=71, help="own task + tasks - 1 received packets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", default=None, help="packet budget, e.g. 256KB (default: the codec's)")
    ap.add_argument("--arms", nargs="+", default=["incremental", "rebuild"])
    ap.add_argument("--control-rev", default=CONTROL_REV)
    ap.add_argument("--rebuild-at", type=int, nargs="*", default=[1, 2, 5, 10, 20, 30, 40, 50, 60, 70],
                    help="bank sizes at which the rebuild arm runs its check (it replays the other arm's elsewhere)")
    ap.add_argument("--arm", help=argparse.SUPPRESS)
    ap.add_argument("--decisions", help=argparse.SUPPRESS)
    ap.add_argument("--arm-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.arm:
        run_arm(args)
        return 0
    arms = {}
    for arm in args.arms:
        out = Path(tempfile.mkstemp(suffix=f"-{arm}.json")[1])
        replay = []
        if arm == "rebuild" and "incremental" in arms:
            dec = Path(tempfile.mkstemp(suffix="-decisions.json")[1])
            dec.write_text(json.dumps(arms["incremental"]["decisions"]))
            replay = ["--decisions", str(dec), "--rebuild-at", *map(str, args.rebuild_at)]
        cmd = [sys.executable, __file__, "--arm", arm, "--arm-out", str(out), *replay,
               "--features", *map(str, args.features),
               "--cache", str(args.cache), "--rom", str(args.rom), "--tasks", str(args.tasks), "--seed", str(args.seed),
               "--control-rev", args.control_rev] + (["--budget", args.budget] if args.budget else [])
        log(f"arm {arm}")
        subprocess.run(cmd, check=True)
        arms[arm] = json.loads(out.read_text())
    summary = {}
    for arm, a in arms.items():
        rows = [r for r in a["rows"] if not r.get("replayed")]
        x = np.array([r["stored_before"] for r in rows], np.float64)
        summary[arm] = {
            "measured_packets": len(rows),
            "accepted": sum(r["decision"] == "accepted" for r in rows),
            "quarantined": sum(r["decision"] == "quarantined" for r in rows),
            "sum_total_cpu_s": float(sum(r["total_cpu_s"] for r in rows)),
            "sum_plausibility_cpu_s": float(sum(r["plausibility_cpu_s"] for r in rows)),
            "peak_rss_mb": a["peak_rss_mb"],
            "growth_plausibility_s": fit_growth(x, np.array([r["plausibility_cpu_s"] for r in rows])),
            "growth_total_s": fit_growth(x, np.array([r["total_cpu_s"] for r in rows])),
        }
    decisions_equal = None
    if {"incremental", "rebuild"} <= set(arms):
        inc = {r["task"]: r["decision"] for r in arms["incremental"]["rows"]}
        measured = [r for r in arms["rebuild"]["rows"] if not r.get("replayed")]
        decisions_equal = {"packets_compared": len(measured),
                           "equal": all(inc[r["task"]] == r["decision"] for r in measured)}
    result = {"tasks": args.tasks, "seed": args.seed, "control_rev": args.control_rev, "budget": args.budget,
              "blas_threads": 1, "decisions_equal": decisions_equal, "summary": summary, "arms": arms}
    scrub_command(write_result("student_scale", result), args.features, args.cache)
    plot(result, RESULTS / "student_scale.png")
    (RESULTS / "student_scale.md").write_text("# The student at scale\n\n" + markdown(result) + "\n")
    log(json.dumps(summary, indent=1))
    return 0


def markdown(result: dict) -> str:
    """Per-packet CPU at a few bank sizes, per arm, with the growth fits and memory."""
    lines = []
    for arm, a in result["arms"].items():
        rows = {r["stored_before"]: r for r in a["rows"] if not r.get("replayed")}
        ks = sorted(rows)
        pick = sorted({ks[0], *[k for k in (5, 10, 20, 35, 50) if k in rows], ks[-1]})
        kinds = a["kinds"]
        table = [[k, rows[k]["decision"], f"{rows[k]['total_cpu_s']:.2f}", f"{rows[k]['receive_cpu_s']:.2f}",
                  f"{rows[k]['plausibility_cpu_s']:.2f}", f"{rows[k]['store_cpu_s']:.3f}",
                  *[f"{rows[k][f'mapper_{m}_cpu_s']:.2f}" for m in kinds], f"{rows[k]['rss_mb']:.0f}",
                  f"{rows[k]['check_mb']:.1f}", f"{rows[k]['mappers_mb']:.1f}", f"{rows[k]['bank_mb']:.1f}"]
                 for k in pick]
        sm = result["summary"][arm]
        q = sm["growth_plausibility_s"]["quadratic"]
        lines += [f"**{arm}** ({sm['accepted']} accepted, {sm['quarantined']} quarantined; {sm['sum_total_cpu_s']:.0f} "
                  f"CPU s for the {sm['measured_packets']} packets measured, {sm['sum_plausibility_cpu_s']:.0f} of them in "
                  f"the check; "
                  f"peak RSS {sm['peak_rss_mb']:.0f} MB; check CPU per packet ~ {q['a']:.3f} + {q['b_T']:.4f} T "
                  f"+ {q['c_T2']:.6f} T^2 s)", "",
                  md_table(["stored", "decision", "CPU s total", "receive", "of it: check", "of it: store",
                            *[f"{m} mapper" for m in kinds], "RSS MB", "check MB", "mappers MB", "bank MB"], table), ""]
    if result.get("decisions_equal") is not None:
        lines.append(f"Same decision for every packet in both arms: {result['decisions_equal']}.")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    plt.rcParams.update({"font.size": 12, "axes.titlesize": 13, "legend.fontsize": 10})
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5.2))
    style = {"incremental": "-", "rebuild": "--"}
    for arm, a in result["arms"].items():
        rows = [r for r in a["rows"] if not r.get("replayed")]
        x = [r["stored_before"] for r in rows]
        ax.plot(x, [r["total_cpu_s"] for r in rows], style.get(arm, "-"), color="C0", lw=2,
                label=f"{arm}: whole packet (receive + store + mappers)")
        ax.plot(x, [r["plausibility_cpu_s"] for r in rows], style.get(arm, "-"), color="C1", lw=2,
                label=f"{arm}: plausibility check")
        for i, k in enumerate(a["kinds"]):
            ax.plot(x, [r[f"mapper_{k}_cpu_s"] for r in rows], style.get(arm, "-"), color=f"C{2 + i}", lw=1.2,
                    label=f"{arm}: {k} mapper rebuild")
        bx.plot(x, [r["rss_mb"] for r in rows], style.get(arm, "-"), color="C0", lw=2, label=f"{arm}: process RSS")
        bx.plot(x, [r["bank_mb"] for r in rows], style.get(arm, "-"), color="C1", lw=2, label=f"{arm}: bank on disk")
        bx.plot(x, [r["mappers_mb"] + r["check_mb"] for r in rows], style.get(arm, "-"), color="C2", lw=2,
                label=f"{arm}: mappers + check arrays")
    for a_ in (ax, bx):
        a_.set_xlabel("tasks already stored when the packet arrives")
        a_.xaxis.set_major_locator(MaxNLocator(integer=True))
        a_.grid(alpha=0.3)
        a_.legend(fontsize=9)
    ax.set_ylabel("CPU seconds per received packet (1 BLAS thread)")
    ax.set_title("Student CPU per packet")
    bx.set_ylabel("MB")
    bx.set_title("Student memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
