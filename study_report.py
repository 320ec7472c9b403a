# Aggregate a study over seeds: the paper's claims judged on declared endpoints with paired tests (exact sign-flip
# p-values, Holm's correction, an equivalence test), and rliable's descriptive statistics (IQM and mean with
# stratified-bootstrap CIs, probability of improvement, learning curves and q trajectories with CI bands).
"""Reads either the runs' own files (each policy's matrix.csv from evaluate_matrix.py and each fine-tune's
metrics.jsonl, listed in {results_dir}/study.json, which `study.py` writes) or, where the runs are not on this machine,
the per-seed tables a report wrote before (evaluations.csv and curves.csv in the results folder), so a committed study
is re-judged without training. Scores are normalized (0 = uniform random policy, 100 = expert reference). Every
bootstrap uses a fixed random state and every test is exact, so the same inputs give identical tables.

    python study_report.py --results-dir results/study-hopper

The decision rule (docs/study.md, "How the claims are judged"): each claim has one primary endpoint and comparison,
declared in CLAIMS below before any study ran; the arms of a seed share that seed's offline policy, so each comparison
is a paired difference X − Y per seed. A claim gets a verdict only from at least MIN_SEEDS paired seeds.
"""

import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import numpy as np
import tyro

from robust_o2o.cli import UserError
from robust_o2o.files import write_text
from study_tools.claims import (
    ADAPTIVE,
    ADV_FIXED,
    ALPHA,
    EVAL_CONDITIONS,
    KEPT_CONDITIONS,
    LINEAR,
    NORMAL_FT,
    OFFLINE,
    RANDOM_FT,
    SCRATCH,
    endpoint_values,
    in_report_order,
    is_averaged,
    judge,
    on_seeds,
)
from study_tools.costs import (
    chains_section,
    costs_and_source,
    costs_section,
    load_extension,
    stages_elsewhere,
    unlisted_chains,
    whole_cost_section,
)
from study_tools.curves import curricula_section, efficiency_section, poi, poi_reps
from study_tools.evidence import claim_rows
from study_tools.loading import (
    ReportError,
    csv_inputs,
    evaluated,
    load,
    missing_curves,
    plain_td3_reference,
    seed_ranges,
)
from study_tools.plots import plot_curves, plot_heatmap
from study_tools.tables import (
    attack_budgets,
    claims_section,
    fmt,
    interval,
    iqm_and_mean,
    matrix_section,
    paired_section,
    per_seed_tables,
    reference_section,
    score_table,
    to_csv,
)


@dataclass
class Args:
    results_dir: str = "results/study-medium"
    """the study's results folder: holds study.json (written by study.py); the report goes beside it"""
    runs_root: str | None = None
    """folder the runs' paths in study.json are relative to (if unset: the one study.py ran in)"""
    source: Literal["auto", "runs", "csv"] = "auto"
    """runs: read the runs' files; csv: the per-seed evaluations.csv and curves.csv in --results-dir; auto: the runs
    when any is on this machine, else the CSVs"""
    reps: int = 10_000
    """bootstrap replications of the descriptive tables (P(X > Y) and the curves' bands use a fifth, at least 200)"""
    confidence: float = 0.95
    """coverage of the confidence intervals"""
    alpha: float = ALPHA
    """family-wise error rate of the verdicts (Holm across the claims); a study that looks at its data twice (its
    protocol's extension rule) uses a smaller one per look, e.g. Pocock's 0.0294 for two looks"""
    seeds: tuple[int, ...] = ()
    """only these seeds (all if unset): e.g. a study's first look, rebuilt once later seeds' chains are in"""
    first_look_seeds: tuple[int, ...] = ()
    """a second look (the protocol's extension rule): the seeds the first look judged. A claim decided on them keeps
    that verdict and enters Holm's step-down with its first-look p; the others are judged on every seed"""
    extensions: tuple[str, ...] = ()
    """results folders of this study's extensions (more seeds run by study.py with a --results-dir of their own, their
    chains/ files copied into this folder's): each one's study.json, and its stage_costs.csv where its runs are not on
    this machine (the report writes it there when they are); their stages' costs join the report's cost section"""
    out_dir: str | None = None
    """folder for the report, its tables and plots (if unset: --results-dir), e.g. to keep a first look beside the
    second; the study's per-seed tables stay in --results-dir and always hold every seed, whatever --seeds selects"""


def check_args(args: Args) -> str:
    """Refuse settings no report can use, before anything is read. -> the report's folder"""
    if args.reps < 1 or not 0 < args.confidence < 1 or not 0 < args.alpha < 0.5:
        raise ReportError(
            f"--reps must be >= 1, --confidence in (0, 1) and --alpha in (0, 0.5) (got {args.reps}, "
            f"{args.confidence} and {args.alpha})"
        )
    out_dir = args.out_dir or args.results_dir
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ReportError(f"--out-dir {out_dir} is a file; name a folder")
    return out_dir


def selected(rows: list, curves: dict, seeds: tuple) -> tuple:
    """The rows and curves of --seeds (all without it). -> (rows, curves)"""
    if not seeds:
        return rows, curves
    keep = set(seeds)
    rows = [r for r in rows if r["seed"] in keep]
    curves = defaultdict(dict, {k: {s: c for s, c in by.items() if s in keep} for k, by in curves.items()})
    if not rows:
        raise ReportError(f"none of --seeds {seed_ranges(seeds)} is in this study")
    return rows, curves


def descriptive(rows: list, envs: list, values: dict, R: int, C: float) -> tuple:
    """rliable's IQM and mean with stratified-bootstrap CIs of every (group, policy, condition), robustness included.
    -> (per-env score arrays, {(group, policy, condition): ((iqm, mean), lo, hi, n)})"""
    table = score_table(rows, envs)
    for (env, pol, endpoint), by_seed in values.items():  # robustness joins the descriptive tables
        if endpoint == "robustness" and by_seed:
            table.setdefault((pol, "robustness"), {})[env] = np.array([[by_seed[s]] for s in sorted(by_seed)])
    est = {}
    for (pol, cond), arrs in table.items():
        for g, (p, lo, hi) in interval(dict(arrs), iqm_and_mean, R, C).items():
            est[(g, pol, cond)] = (p, lo, hi, arrs[g].shape[0])
    return table, est


def study_status(listed: list, study_rows: list, study_curves: dict) -> str:
    """complete, or PARTIAL with what is missing: a policy not yet evaluated, or a fine-tune without its learning
    curve (claim 2 reads the curves)."""
    n_done, n_total = evaluated(listed, study_rows)
    no_curve = missing_curves(study_rows, study_curves)
    if no_curve:
        return (
            f"PARTIAL: {len(no_curve)} fine-tune(s) evaluated without their learning curve (first: {no_curve[0]}); "
            "restore its curves file (chains/*__curves.csv) or its metrics.jsonl; do not cite"
        )
    if n_done >= n_total:
        return "complete: every policy of the study is evaluated"
    return f"PARTIAL: {n_done} of {n_total} policies evaluated; the study is still running or failed; do not cite"


def reads_chains(results_dir: str, source: str) -> bool:
    """Whether the report reads the finished chains' own files (chains/*__evaluations.csv)."""
    return source != "runs" and csv_inputs(results_dir)[0][0].endswith("__evaluations.csv")


def header(args: Args, manifest: dict, status: str, source: str, out_dir: str) -> list:
    """The report's title, status, provenance and the command that rebuilds it."""
    same_folder = os.path.abspath(out_dir) == os.path.abspath(args.results_dir)
    csv_folder = "per-seed CSVs in this folder" if same_folder else f"per-seed CSVs in `{args.results_dir}`"
    if reads_chains(args.results_dir, source):
        where = "" if same_folder else f" of `{args.results_dir}`"
        csv_folder = f"finished chains' per-seed CSVs{where} (`chains/*__evaluations.csv`, `chains/*__curves.csv`)"
    driver = (
        [
            f"The study's driver last ran at commit `{manifest['commit']}` on {manifest['machine']}; each chain's own "
            f'commit and machine are in "The chains" below.',
            "",
        ]
        if "commit" in manifest
        else []
    )
    return [
        f"# Study `{manifest['study']}` ({manifest['scale']} scale, ε = {manifest['epsilon']})",
        "",
        f"Status: {status}.",
        "",
        *driver,
        f"Read from the {'runs' if source == 'runs' else csv_folder}. Scores are normalized "
        f"(0 = uniform random policy, 100 = expert reference). Reproduce with `python study_report.py --results-dir "
        f"{args.results_dir}{' --source csv' if args.source == 'csv' else ''}"
        f"{f' --alpha {args.alpha:g}' if args.alpha != ALPHA else ''}"
        f"{' --seeds ' + ' '.join(map(str, args.seeds)) if args.seeds else ''}"
        f"{' --first-look-seeds ' + ' '.join(map(str, args.first_look_seeds)) if args.first_look_seeds else ''}"
        f"{' --extensions ' + ' '.join(args.extensions) if args.extensions else ''}"
        f"{f' --out-dir {args.out_dir}' if args.out_dir else ''}`.",
        "",
    ]


POI_PAIRS = [
    (ADV_FIXED, OFFLINE),
    (ADAPTIVE, OFFLINE),
    (ADV_FIXED, NORMAL_FT),
    (ADV_FIXED, RANDOM_FT),
    (ADAPTIVE, LINEAR),
    (ADAPTIVE, SCRATCH),
]


def poi_section(table: dict, groups: list, R: int, C: float) -> tuple:
    """rliable's probability of improvement of the pairs the claims compare, descriptive. -> (lines, CSV rows)"""
    out = [
        "## Probability of improvement P(X > Y) [CI] (rliable, descriptive)",
        "",
        "| X | Y | group | " + " | ".join(EVAL_CONDITIONS) + " |",
        "|---|---|---|" + "---|" * len(EVAL_CONDITIONS),
    ]
    poi_rows = []
    for x, y in POI_PAIRS:
        for g in groups:
            vals = {c: poi(table, x, y, c, g, R, C) for c in EVAL_CONDITIONS}
            if all(v is None for v in vals.values()):
                continue
            out.append(
                f"| {x} | {y} | {g} | "
                + " | ".join("–" if v is None else fmt(*v, digits=2) for v in vals.values())
                + " |"
            )
            poi_rows += [
                {"x": x, "y": y, "group": g, "eval_condition": c, "poi": v[0], "lo": v[1], "hi": v[2]}
                for c, v in vals.items()
                if v is not None
            ]
    out += [
        "",
        f"{poi_reps(R)} stratified-bootstrap replications. Descriptive only: the verdicts above rest on the paired "
        f"tests.",
        "",
    ]
    return out, poi_rows


def write_inputs(args: Args, source: str, study: tuple, costs: tuple, elsewhere: list, extensions: list):
    """The report's inputs, per seed, beside study.json, and the stages' costs wherever they were read from the
    markers (each extension's in its folder), so the report can be rebuilt without the runs."""
    study_rows, study_curves = study
    costs, from_markers = costs
    if source == "runs" or reads_chains(args.results_dir, source):  # every seed the report read, in one table each
        order = in_report_order({r["policy"] for r in study_rows} | {k[1] for k in study_curves})
        evaluations, curve_table = per_seed_tables(study_rows, study_curves, order.index)
        write_text(os.path.join(args.results_dir, "evaluations.csv"), evaluations)
        write_text(os.path.join(args.results_dir, "curves.csv"), curve_table)
    if from_markers:  # also for a report read from the chains' files on the machine that ran the study
        if costs:
            write_text(os.path.join(args.results_dir, "stage_costs.csv"), to_csv(costs))
        if elsewhere:
            write_text(os.path.join(args.results_dir, "stages_elsewhere.csv"), to_csv(elsewhere))
    for x in (x for x in extensions if x["from_markers"]):
        write_text(os.path.join(x["folder"], "stage_costs.csv"), to_csv(x["costs"]))
        if x["elsewhere"]:
            write_text(os.path.join(x["folder"], "stages_elsewhere.csv"), to_csv(x["elsewhere"]))


def main(args: Args):
    import matplotlib

    matplotlib.use("Agg")
    out_dir = check_args(args)
    manifest, source, study_rows, study_curves = load(args)
    extensions = [load_extension(folder, args.runs_root, manifest, args.results_dir) for folder in args.extensions]
    rows, curves = selected(study_rows, study_curves, args.seeds)  # the per-seed tables keep every seed
    envs = [e for e in manifest["env_ids"] if any(r["env_id"] == e for r in rows)]
    groups, R, C = envs + (["all envs"] if len(envs) > 1 else []), args.reps, args.confidence
    values = endpoint_values(rows, curves)
    table, est = descriptive(rows, envs, values, R, C)
    policies = in_report_order({k[0] for k in table})
    listed = [manifest["policies"]] + [x["policies"] for x in extensions]  # a second look waits for them all
    status = study_status(listed, study_rows, study_curves)
    first_look = None
    if args.first_look_seeds:
        if not any(set(args.first_look_seeds) & set(by_seed) for by_seed in values.values()):
            raise ReportError(f"none of --first-look-seeds {seed_ranges(args.first_look_seeds)} is in this study")
        first_look = judge(on_seeds(values, args.first_look_seeds), envs, C, args.alpha)
    judged = judge(values, envs, C, args.alpha, first_look)

    out = header(args, manifest, status, source, out_dir) + claims_section(judged, C, args.alpha, args.first_look_seeds)
    out += reference_section(plain_td3_reference(args.results_dir), values, envs)
    section, paired_rows = paired_section(values, envs, C, args.alpha)
    out += section
    section, csv_rows = matrix_section(groups, policies, est, R, C, attack_budgets(rows, manifest))
    out += section
    if is_averaged(values):
        section, kept_rows = matrix_section(groups, policies, est, R, C, "", KEPT_CONDITIONS)
        out, csv_rows = out + section, csv_rows + kept_rows
    section, poi_rows = poi_section(table, groups, R, C)
    out += section + curricula_section(envs, est, curves, C) + efficiency_section(curves, policies, R, C)
    root = args.runs_root or manifest["runs_root"]
    (costs, from_markers), study_elsewhere = (
        costs_and_source(manifest, root, args.results_dir),
        stages_elsewhere(manifest, root, args.results_dir),
    )
    elsewhere = [e for e in study_elsewhere if not args.seeds or e["seed"] in args.seeds]
    out += costs_section(costs, elsewhere, extensions, unlisted_chains(args.results_dir, listed, args.seeds))
    out += chains_section(args.results_dir, elsewhere + [e for x in extensions for e in x["elsewhere"]], args.seeds)
    out += whole_cost_section(args.results_dir, len(manifest["env_ids"]) * len(manifest["seeds"]), args.seeds)

    os.makedirs(out_dir, exist_ok=True)  # TRY NOT TO MODIFY: the outputs, each written atomically
    plot_curves(out_dir, envs, curves, policies, est, R, C)
    plot_heatmap(os.path.join(out_dir, "heatmap.png"), groups[-1], policies, est, C)
    write_text(os.path.join(out_dir, "scores.csv"), to_csv(csv_rows))
    write_text(os.path.join(out_dir, "paired.csv"), to_csv(paired_rows) if paired_rows else "")
    complete, second_look = status.startswith("complete"), bool(args.first_look_seeds)
    write_text(os.path.join(out_dir, "claims.csv"), to_csv(claim_rows(judged, C, args.alpha, complete, second_look)))
    write_inputs(args, source, (study_rows, study_curves), (costs, from_markers), study_elsewhere, extensions)
    if poi_rows:
        write_text(os.path.join(out_dir, "poi.csv"), to_csv(poi_rows))
    write_text(os.path.join(out_dir, "report.md"), "\n".join(out) + "\n")
    print(f"Study {manifest['study']}: {status}.")
    for e in judged:
        print(f"  claim {e['claim'].number} ({e['env']}): {e['status']}")
    print(f"wrote {out_dir}/report.md, claims.csv, paired.csv, scores.csv, poi.csv and plots")


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except ReportError as e:
        sys.exit(f"error: {e}")
    except UserError as e:  # an atomic write that failed (robust_o2o.files): it names the file
        sys.exit(f"error: {e}; the report is not complete: pass a writable --out-dir")
    except OSError as e:  # a read-only or full --out-dir: one line naming the file (each file is written atomically)
        sys.exit(
            f"error: could not write {e.filename or 'the report'} ({e.strerror or type(e).__name__}); the report is "
            "not complete there: free disk space or pass a writable --out-dir"
        )
    except KeyboardInterrupt:
        sys.exit("error: interrupted; the report is not complete: run it again")
