"""Where and at what cost the study ran: each stage's CPU and wall time from the study's markers (or the stage_costs.csv
a report left), the chains' provenance (commit, machine, wall time), stages run on another machine, and the study's
extensions."""

import csv
import glob
import os
import time
from collections import Counter, defaultdict

import numpy as np

from study_tools.loading import ReportError, check_manifest, read_json, seed_ranges

STAGE_KINDS = ("dataset", "pretrain", "attack", "finetune", "evaluate")


def stage_costs(manifest: dict, root: str, results_dir: str) -> list:
    """What each kind of stage cost, from the study's markers (runs/_study/{namespace}/*.json) when they are here,
    else from the stage_costs.csv an earlier report wrote. -> one dict per kind, times in seconds."""
    return costs_and_source(manifest, root, results_dir)[0]


def costs_and_source(manifest: dict, root: str, results_dir: str) -> tuple:
    """stage_costs() and whether they come from the markers (else from stage_costs.csv). The markers win unless the
    table counts more stages: a study finished on a machine that is gone shares its dataset's stage (the namespace)
    with an extension resumed on a new one, and that one marker must not replace the committed table.

    A marker times every attempt of its stage (study.py keeps them, with those killed when a session ended). Markers
    written before attempts were timed hold the last attempt only; such a stage that ran in more than one attempt
    (more than one command line in its log) is counted as "untimed", and the estimate replaces its time by the mean
    of the stages of its kind whose time is complete (where none is, its last attempt stays)."""
    by = defaultdict(list)
    for path, _, marker in study_markers(manifest, root):
        if "ran_on" in marker:
            continue  # run on a lent machine (benchmarks/device_chains.py): not this machine's core-hours
        if "attempts" in marker:
            attempts, timed = len(marker["attempts"]), True
        else:
            log = os.path.join(os.path.dirname(path), "logs", os.path.basename(path)[: -len(".json")] + ".log")
            attempts, timed = 1, False
            if os.path.exists(log):
                with open(log, errors="replace") as f:
                    attempts = max(1, sum(line.startswith("$ ") for line in f))
        by[os.path.basename(path).split("__")[0]].append((marker["wall_s"], marker.get("cpu_s"), attempts, timed))
    saved = read_stage_costs(os.path.join(results_dir, "stage_costs.csv"))
    if not by or sum(map(len, by.values())) < sum(c["runs"] for c in saved):
        return saved, False
    costs = []
    for kind in (k for k in STAGE_KINDS if by[k]):
        wall = np.array([w for w, _, _, _ in by[kind]])
        cpu = [c for _, c, _, _ in by[kind]]
        untimed = np.array([n > 1 and not timed for _, _, n, timed in by[kind]])
        complete = wall[~untimed]
        estimate = complete.sum() + untimed.sum() * complete.mean() if len(complete) else wall.sum()
        costs.append(
            {
                "stage": kind,
                "runs": len(wall),
                "mean_s": float(wall.mean()),
                "min_s": float(wall.min()),
                "max_s": float(wall.max()),
                "total_s": float(wall.sum()),
                "cpu_s": float(sum(cpu)) if None not in cpu else None,
                "resumed": sum(n > 1 for _, _, n, _ in by[kind]),
                "untimed": int(untimed.sum()),
                "estimate_s": float(estimate),
            }
        )
    return costs, True


def study_markers(manifest: dict, root: str) -> list:
    """(path, stage id, marker) of each finished stage of this study (runs/_study/{namespace}/*.json). The namespace's
    markers are shared with every study on the same dataset (an extension's seeds, run beside it), so only the stages
    in the manifest's commands count, where it lists them."""
    folder = os.path.join(root, "runs", "_study", manifest.get("namespace", ""))
    ours = manifest.get("commands")
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        stage = os.path.basename(path)[: -len(".json")].replace("__", ":")
        if not ours or stage in ours:
            out.append((path, stage, read_json(path)))
    return out


def stages_elsewhere(manifest: dict, root: str, results_dir: str) -> list:
    """The study's stages that ran on another machine (benchmarks/device_chains.py adopts them with a marker that
    says where), from the markers when they are here, else from the stages_elsewhere.csv an earlier report wrote.
    -> one dict per stage: stage, env_id, seed, ran_on, wall_s."""
    out = []
    for _, stage, marker in study_markers(manifest, root):
        if "ran_on" in marker:
            parts = stage.split(":")[1:] if stage.startswith("evaluate:") else stage.split(":")
            out.append(
                {
                    "stage": stage,
                    "env_id": parts[1],
                    "seed": int(parts[2]),
                    "ran_on": marker["ran_on"],
                    "wall_s": marker["wall_s"],
                }
            )
    if out or not os.path.isfile(os.path.join(results_dir, "stages_elsewhere.csv")):
        return out
    with open(os.path.join(results_dir, "stages_elsewhere.csv")) as f:
        return [{**r, "seed": int(r["seed"]), "wall_s": float(r["wall_s"])} for r in csv.DictReader(f)]


def read_stage_costs(path: str) -> list:
    """stage_costs.csv as a report wrote it (one written before attempts were timed has only the wall times)."""
    if not os.path.isfile(path):
        return []

    def value(row: dict, key: str) -> float | None:
        return float(row[key]) if row.get(key) else None

    with open(path) as f:
        return [
            {
                "stage": r["stage"],
                "runs": int(r["runs"]),
                **{k: value(r, k) for k in ("mean_s", "min_s", "max_s", "total_s", "cpu_s")},
                "resumed": int(r.get("resumed") or 0),
                "untimed": int(r.get("untimed") or 0),
                "estimate_s": value(r, "estimate_s" if "estimate_s" in r else "total_s"),
            }
            for r in csv.DictReader(f)
        ]


def hours(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds / 3600:.2f} h"


def costs_section(costs: list, elsewhere: list = (), extensions: list = (), unlisted: list = ()) -> list:
    """The stages' costs; with extensions (more seeds run as studies of their own), one table per study and the sum;
    chains that no manifest lists (unlisted_chains) count by their chains' totals."""
    if not costs and not elsewhere and not extensions and not unlisted:
        return []
    out = [
        "## What the stages cost",
        "",
        "Time of each finished stage over all its attempts (a stage interrupted by a session's end continues from "
        "its resume state), from the study's markers (`runs/_study/`); each stage ran on one core with one torch "
        "thread, beside other stages and other work on the same machine, so its wall time exceeds its CPU time.",
        "",
    ]
    if not extensions and not unlisted:
        return out + cost_table(costs, elsewhere) + [""]
    studies = [("this study's own stages", costs, elsewhere)] + [
        (f"the extension `{e['study']}` (seeds {seed_ranges(e['seeds'])})", e["costs"], e["elsewhere"])
        for e in extensions
    ]
    for label, study_costs, study_elsewhere in studies:
        out += [f"**{label[0].upper() + label[1:]}:**", ""] + cost_table(study_costs, study_elsewhere) + [""]
    every = [c for _, study_costs, _ in studies for c in study_costs]
    by_chains = sum(c["wall_s"] for c in unlisted) / 3600
    total = sum(c["total_s"] for c in every) / 3600 + by_chains
    estimate = sum(c["estimate_s"] for c in every) / 3600 + by_chains
    if unlisted:
        envs = sorted({c["env_id"] for c in unlisted})
        which = "; ".join(
            f"{env} seeds {seed_ranges([c['seed'] for c in unlisted if c['env_id'] == env])}" for env in envs
        )
        machines = ", ".join(sorted({c["machine"] for c in unlisted}))
        out += [
            f"**Chains that no manifest here lists ({which}):** their study.json and stage markers are not here (lost "
            "with the machine that ran them, or never copied), so they count by their chains' own totals "
            f'(`chains/*.json`, each in "The chains" below): {len(unlisted)} chains, '
            f"{sum(c['stages'] for c in unlisted)} stages, {by_chains:.2f} core-hours of stage wall time on "
            f"{machines}.",
            "",
        ]
    parts = [f"its extension{'s' if len(extensions) > 1 else ''}"] * bool(extensions)
    who = " and ".join(parts + ["the chains no manifest lists"] * bool(unlisted))
    return out + [
        f"The study and {who} together: {total:.2f} core-hours of wall time on the study's CPU machines"
        + (f" (about {estimate:.2f} counting the earlier attempts as above)." if estimate > total else "."),
        "",
    ]


def unlisted_chains(results_dir: str, listed: list, seeds=()) -> list:
    """The finished chains (finished_chains) whose (env, seed) none of the listed policies (the manifests' `policies`)
    has: e.g. an extension's first seeds, whose manifest and markers were lost with the machine that ran them before
    they were committed, the extension resumed with the remaining seeds."""
    chains_listed = {(p["env_id"], p["seed"]) for policies in listed for p in policies}
    return [c for c in finished_chains(results_dir, seeds) if (c["env_id"], c["seed"]) not in chains_listed]


CHAIN_KEYS = {
    "env_id": str,
    "seed": int,
    "commit": str,
    "machine": str,
    "stages": int,
    "wall_s": (int, float),
    "finished": (int, float),
}


def checked_chain(chain, path: str) -> dict:
    """A chain's provenance file with every key the report reads, or one line naming it."""
    bad = [k for k, kind in CHAIN_KEYS.items() if not isinstance(chain, dict) or not isinstance(chain.get(k), kind)]
    if bad:
        raise ReportError(f"{path} lacks {', '.join(bad)} or holds another type; copy the chain's file from the study")
    return chain


def finished_chains(results_dir: str, seeds=()) -> list:
    """The provenance of each finished chain (chains/*.json, written by study.py), in (env, seed) order (seed 10 after
    seed 9, not after seed 1). --seeds: the report's seeds only."""
    chains = [checked_chain(read_json(p), p) for p in sorted(glob.glob(os.path.join(results_dir, "chains", "*.json")))]
    chains = [c for c in chains if not seeds or c["seed"] in seeds]
    return sorted(chains, key=lambda c: (c["env_id"], c["seed"]))


def cost_table(costs: list, elsewhere: list) -> list:
    out = [
        "| stage | runs | mean wall | min | max | wall, all runs | CPU, all runs | run in several attempts |",
        "|---|---|---|---|---|---|---|---|",
    ]
    out += [
        f"| {c['stage']} | {c['runs']} | {c['mean_s'] / 60:.1f} min | {c['min_s'] / 60:.1f} min | "
        f"{c['max_s'] / 60:.1f} min | {hours(c['total_s'])} | {hours(c['cpu_s'])} | {c['resumed']} |"
        for c in costs
    ]
    cpu = [c["cpu_s"] for c in costs]
    total = f"All stages together: {sum(c['total_s'] for c in costs) / 3600:.2f} core-hours of wall time"
    out += ["", total + (f", {sum(cpu) / 3600:.2f} CPU-hours." if None not in cpu else ".")]
    untimed = sum(c["untimed"] for c in costs)
    if untimed:
        out += [
            "",
            f"{untimed} stage(s) ran in several attempts under a study.py that timed only the last attempt, so the "
            f"totals above leave out their earlier attempts. Counting each of them at the mean of the stages of its "
            f"kind whose time is complete, the stages cost about {sum(c['estimate_s'] for c in costs) / 3600:.2f} "
            "core-hours of wall time.",
        ]
    for machine in sorted({e["ran_on"] for e in elsewhere}):
        mine = [e for e in elsewhere if e["ran_on"] == machine]
        kinds = Counter(e["stage"].split(":")[0] for e in mine)
        out += [
            "",
            f"Not in the table: {len(mine)} stage(s) ran on {machine} (benchmarks/device_chains.py; training stages "
            f"with `--cuda --cudagraphs`, DE and evaluations with more workers, each argv otherwise the study's), "
            f"{sum(e['wall_s'] for e in mine) / 60:.1f} min of stage wall time there in all: "
            + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
            + ". The argv each ran with is in its marker (`argv_ran`).",
        ]
    return out


def chains_section(results_dir: str, elsewhere: list = (), seeds=()) -> list:
    """Which commit, machine and time produced each (env, seed) chain (chains/*.json, written by study.py; its machine
    is the driver's, so the stages that ran on another machine are named beside it)."""
    chains = finished_chains(results_dir, seeds)
    if not chains:
        return []
    timed = all(c.get("cpu_s") is not None for c in chains)  # chains/*.json from a study.py that timed attempts
    out = [
        "## The chains: what produced each",
        "",
        "| env | seed | commit | machine | stages | wall time of its stages | CPU time | finished (UTC) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    out += [
        f"| {c['env_id']} | {c['seed']} | "
        f"`{c['commit'][:12]}{'+dirty' if c['commit'].endswith('+dirty') else ''}` | "
        f"{c['machine']}{elsewhere_note(c, elsewhere)} | {c['stages']} | {hours(c['wall_s'])} | "
        f"{hours(c.get('cpu_s'))} | "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(c['finished']))} |"
        for c in chains
    ]
    total = f"{len(chains)} chains, {sum(c['wall_s'] for c in chains) / 3600:.2f} core-hours of stages in all"
    if elsewhere:
        total += f" (counting {sum(e['wall_s'] for e in elsewhere) / 3600:.2f} h of stages on another machine)"
    if timed:
        total += f" ({sum(c['cpu_s'] for c in chains) / 3600:.2f} CPU-hours)"
    else:
        total += " (their last attempts only where a stage ran in several: see the section above)"
    return out + ["", total + ", each stage on one core.", ""]


# The work a study needed besides its chains, one row each: item, core_s, measured_as, source
OUTSIDE_CHAINS = "costs_outside_chains.csv"


def outside_chains(results_dir: str) -> list:
    """The work the study needed besides its chains (the dataset, a cost pilot, reference runs), one row each, from
    costs_outside_chains.csv in its results folder, or [] without that file."""
    path = os.path.join(results_dir, OUTSIDE_CHAINS)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))
    fix = "give each row item, core_s (seconds, >= 0), measured_as and source"
    try:
        out = [{**r, "core_s": float(r["core_s"])} for r in rows]
        if any(not (r["item"] and r["measured_as"] and r["source"] and r["core_s"] >= 0) for r in out):
            raise ValueError("a row has an empty field or a negative or NaN core_s")
    except (KeyError, TypeError, ValueError) as e:
        raise ReportError(f"{path} is malformed ({type(e).__name__}: {e}); {fix}") from None
    return out


def whole_cost_section(results_dir: str, planned: int, seeds=()) -> list:
    """What the whole study cost: its chains' CPU time (chains/*.json) and the work outside them that it needed
    (outside_chains), summed; [] for a report on some seeds only (--seeds), without costs_outside_chains.csv, or
    with a chain from a study.py that did not time its CPU."""
    outside = outside_chains(results_dir)
    chains = finished_chains(results_dir)
    if seeds or not outside or any(c.get("cpu_s") is None for c in chains):
        return []
    chain_s = sum(c["cpu_s"] for c in chains)
    so_far = "" if len(chains) >= planned else f" so far ({len(chains)} of its {planned} chains)"
    out = [
        "## What the whole study cost",
        "",
        f"Its chains and the work outside them that it needed (`{OUTSIDE_CHAINS}`), in core-hours.",
        "",
        "| work | core-hours | measured as | source |",
        "|---|---|---|---|",
        f"| the study's {len(chains)} chains | {chain_s / 3600:.2f} | CPU time of every attempt of their stages | "
        "`chains/*.json` |",
    ]
    out += [f"| {r['item']} | {r['core_s'] / 3600:.2f} | {r['measured_as']} | {r['source']} |" for r in outside]
    total = chain_s + sum(r["core_s"] for r in outside)
    return out + ["", f"The whole study{so_far}: **{total / 3600:.2f} core-hours**.", ""]


def elsewhere_note(chain: dict, elsewhere: list) -> str:
    mine = [e for e in elsewhere if (e["env_id"], e["seed"]) == (chain["env_id"], chain["seed"])]
    machines = sorted({e["ran_on"] for e in mine})
    return "".join(f"; {sum(e['ran_on'] == m for e in mine)} of its stages on {m}" for m in machines)


def load_extension(folder: str, runs_root: str | None, study: dict, results_dir: str) -> dict:
    """An extension of the study (its seeds run by study.py with a results folder of their own): its name, seeds and
    stages' costs, from its markers when its runs are here, else from the stage_costs.csv a report wrote there. It
    must be another folder than the study's, of the study's envs, ε and scale, with no arm the study lacks."""
    path = os.path.join(folder, "study.json")
    if os.path.abspath(folder) == os.path.abspath(results_dir):
        raise ReportError(
            f"--extensions {folder} is the study itself (its policies would count twice); name only the "
            "extensions' own results folders"
        )
    if not os.path.isfile(path):
        raise ReportError(f"--extensions {folder}: {path} not found; name the folder study.py wrote the extension to")
    manifest = read_json(path)
    check_manifest(manifest, path)
    for key in ("env_ids", "epsilon", "scale"):
        if manifest[key] != study[key] and not (key == "env_ids" and set(manifest[key]) <= set(study[key])):
            raise ReportError(
                f"--extensions {folder} was run with {key} {manifest[key]!r}, the study with {study[key]!r}: it is "
                "not an extension of this study; report it on its own"
            )
    arms = {(p.get("init"), p.get("finetune_condition"), p.get("curriculum")) for p in study["policies"]}
    extra = {(p.get("init"), p.get("finetune_condition"), p.get("curriculum")) for p in manifest["policies"]} - arms
    if extra:
        raise ReportError(
            f"--extensions {folder} has an arm the study lacks ({'-'.join(str(x) for x in sorted(extra)[0])}): it is "
            "not an extension of this study; report it on its own"
        )
    root = runs_root or manifest["runs_root"]
    costs, from_markers = costs_and_source(manifest, root, folder)
    if not costs:
        raise ReportError(
            f"--extensions {folder}: no stage costs (neither its runs' markers under {root} nor {folder}/"
            "stage_costs.csv); pass --runs-root, or copy stage_costs.csv from where the report was built"
        )
    return {
        "folder": folder,
        "study": manifest["study"],
        "seeds": manifest.get("seeds", []),
        "costs": costs,
        "elsewhere": stages_elsewhere(manifest, root, folder),
        "from_markers": from_markers,
        "policies": manifest["policies"],
    }
