"""study.py (the grid on Ray: DAG order, resume after a killed driver, failure isolation) and study_report.py
(rliable aggregation checked against values computed by hand)."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import study
import study_report as sr
from conftest import ROOT, free_port, run_script
from study_tools import claims, costs, loading, tables

CONDS = ("normal", "random", "adversarial", "transfer")


def fake_study(root: Path, scores: dict, seeds=tuple(range(1, 9)), steps=(0, 5000, 10000)):
    """A study folder with the files the report reads: one matrix.csv per policy and metrics.jsonl per fine-tune.
    scores: policy label -> (init, condition, curriculum, fn(seed, eval condition) -> normalized score, or None for a
    condition the matrix left out), and optionally a fifth fn for the `{condition}@kept` rows of part 2."""
    policies = []
    for label, (init, cond, curr, fn, *kept) in scores.items():
        for seed in seeds:
            run = f"runs/{label.replace(' ', '_')}_{seed}"
            (root / run).mkdir(parents=True)
            matrix = root / run / "matrix.csv"
            with open(matrix, "w", newline="") as f:
                w = csv.DictWriter(
                    f,
                    fieldnames=[
                        "policy",
                        "seed",
                        "env_id",
                        "eval_condition",
                        "mean_return",
                        "normalized_mean",
                        "checkpoint",
                        "attack_budget",
                    ],
                )
                w.writeheader()
                cells = [(c, fn(seed, c)) for c in CONDS]
                cells += [(c + "@kept", kept[0](seed, c)) for c in CONDS] if kept else []
                for c, value in ((c, v) for c, v in cells if v is not None):
                    w.writerow(
                        {
                            "policy": label,
                            "seed": seed,
                            "env_id": "Hopper-v5",
                            "eval_condition": c,
                            "mean_return": 10 * value,
                            "normalized_mean": value,
                            "checkpoint": f"{run}/checkpoint.pt",
                            "attack_budget": "K=2 maxiter=3 popsize=4 episodes=2",
                        }
                    )
            stage = "pretrain" if label == claims.OFFLINE else "finetune"
            if stage == "finetune":
                with open(root / run / "metrics.jsonl", "w") as f:
                    for i, s in enumerate(steps):
                        frac = i / (len(steps) - 1)
                        row = {"step": s, "curriculum/q": 0.1 + 0.4 * frac}
                        for c in ("normal", "random", "adversarial"):
                            row[f"eval/{c}_normalized"] = (
                                fn(seed, c) or fn(seed, "transfer")
                            ) * frac  # 0–100, as td3_adv_finetune.py logs it
                            row[f"eval/{c}_return"] = 10 * row[f"eval/{c}_normalized"]
                        if s > 0:  # the realized exposure is logged from the first evaluation after step 0
                            row["charts/perturbed_fraction"] = row["charts/perturbed_step_fraction"] = 0.25
                        f.write(json.dumps(row) + "\n")
            policies.append(
                {
                    "env_id": "Hopper-v5",
                    "seed": seed,
                    "run_dir": run,
                    "stage": stage,
                    "matrix": str(matrix.relative_to(root)),
                    "init": init,
                    "finetune_condition": cond,
                    "curriculum": curr,
                }
            )
    res = root / "results"
    res.mkdir()
    (res / "study.json").write_text(
        json.dumps(
            {
                "study": "fake",
                "scale": "tiny",
                "env_ids": ["Hopper-v5"],
                "seeds": list(seeds),
                "epsilon": 0.3,
                "policies": policies,
                "runs_root": str(root),
            }
        )
    )
    return res


def test_report_iqm_cis_paired_tests_and_verdicts_match_hand_computed_values(tmp_path):
    x = np.array([3.0, 9.0, 1.0, 4.0, 7.0, 20.0, 5.0, 11.0])  # IQM of 8 runs: trim 2 at each end -> mean of 4, 5, 7, 9
    scores = {
        claims.OFFLINE: ("offline", "", "", lambda s, c: 50.0 if c == "normal" else 30.0),
        claims.ADV_FIXED: ("offline", "adversarial", "fixed", lambda s, c: 60.0 + x[s - 1]),
        claims.ADAPTIVE: ("offline", "adversarial", "adaptive", lambda s, c: 60.0 + x[s - 1]),
        claims.NORMAL_FT: ("offline", "normal", "fixed", lambda s, c: 80.0 if c == "normal" else 20.0),
        claims.SCRATCH: ("scratch", "adversarial", "adaptive", lambda s, c: 5.0),
    }
    res = fake_study(tmp_path, scores)
    (tmp_path / "runs" / "_study").mkdir()  # two finished fine-tunes' markers: the report states what the stages cost
    for i, wall in enumerate((120.0, 240.0)):
        (tmp_path / "runs" / "_study" / f"finetune__Hopper-v5__{i}.json").write_text(
            json.dumps({"argv": [], "wall_s": wall})
        )
    sr.main(sr.Args(results_dir=str(res), reps=2000))
    rows = {(r["policy"], r["eval_condition"]): r for r in csv.DictReader(open(res / "scores.csv"))}
    adv = rows[(claims.ADV_FIXED, "adversarial")]
    assert float(adv["iqm"]) == pytest.approx(60 + np.mean([4, 5, 7, 9]), abs=1e-4)
    assert float(adv["mean"]) == pytest.approx(60 + x.mean(), abs=1e-4)
    # the CI of the mean against a percentile bootstrap written out by hand (the same resampling of 8 runs)
    rng = np.random.default_rng(0)
    boot = (60 + x)[rng.integers(0, 8, size=(20000, 8))].mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    assert float(adv["mean_lo"]) == pytest.approx(lo, abs=0.4) and float(adv["mean_hi"]) == pytest.approx(hi, abs=0.4)
    from scipy.stats import trim_mean  # the IQM's CI the same way: the 25 %-trimmed mean of each resample

    boot_iqm = trim_mean((60 + x)[rng.integers(0, 8, size=(20000, 8))], 0.25, axis=1)
    lo, hi = np.percentile(boot_iqm, [2.5, 97.5])
    assert float(adv["iqm_lo"]) == pytest.approx(lo, abs=0.4) and float(adv["iqm_hi"]) == pytest.approx(hi, abs=0.4)
    off = rows[(claims.OFFLINE, "normal")]  # identical seeds: a zero-width interval
    assert float(off["iqm_lo"]) == float(off["iqm"]) == float(off["iqm_hi"]) == 50.0
    # claim 1's paired test by hand: d = 60 + x − 30 > 0 in all 8 seeds, so p = 2 / 2^8; Holm over the 2 judged claims
    paired = {(r["role"], r["x"], r["y"]): r for r in csv.DictReader(open(res / "paired.csv"))}
    c1 = paired[("claim 1", claims.ADV_FIXED, claims.OFFLINE)]
    d = 30 + x
    half = 2.364624 * d.std(ddof=1) / np.sqrt(8)  # t(7, 0.975)
    assert float(c1["mean_difference"]) == pytest.approx(d.mean(), rel=1e-5) and int(c1["seeds"]) == 8
    assert float(c1["lo"]) == pytest.approx(d.mean() - half, rel=1e-5) and float(c1["p"]) == pytest.approx(
        2 / 256, rel=1e-4
    )
    report = (res / "report.md").read_text()
    assert "Status: complete" in report
    assert "| finetune | 2 | 3.0 min | 2.0 min | 4.0 min | 0.10 h | – | 0 |" in report and "0.10 core-hours" in report
    assert "1. Adversarial fine-tuning is more robust than offline-only" in report
    assert "Holm-adjusted p = 0.016: **supported**" in report  # claims 1 and 2: 2 × 2/256
    verdicts = [ln.rsplit("**", 2)[-2] for ln in report.splitlines() if ln[:2] in ("1.", "2.") and "**" in ln]
    assert verdicts == ["supported", "supported"] and "not measured: no paired fine-tuned random (fixed)" in report
    assert (
        "| Hopper-v5 | fine-tuned adversarial (fixed) | 8 |" in report
        and "| 0.25 [0.25, 0.25] | 0.25 [0.25, 0.25] |" in report
    )
    assert "budget: K=2 maxiter=3 popsize=4 episodes=2" in report
    for name in ("curves.png", "q_trajectory.png", "heatmap.png", "poi.csv"):
        assert (res / name).stat().st_size > 0
    per_seed = list(csv.DictReader(open(res / "evaluations.csv")))  # the inputs, one row per (policy, seed, condition)
    assert len(per_seed) == len(scores) * 8 * len(claims.EVAL_CONDITIONS)
    assert {
        float(r["normalized_mean"])
        for r in per_seed
        if r["policy"] == claims.ADV_FIXED and r["eval_condition"] == "adversarial"
    } == set(60 + x)
    assert {r["policy"] for r in csv.DictReader(open(res / "curves.csv"))} == {
        claims.ADV_FIXED,
        claims.ADAPTIVE,
        claims.NORMAL_FT,
        claims.SCRATCH,
    }
    # reproducible: the same inputs give the same files (at fewer resamples, which only the CIs above needed)
    sr.main(sr.Args(results_dir=str(res), reps=200))
    first = {p.name: p.read_bytes() for p in res.iterdir() if p.suffix in (".md", ".csv")}
    sr.main(sr.Args(results_dir=str(res), reps=200))
    assert first == {p.name: p.read_bytes() for p in res.iterdir() if p.suffix in (".md", ".csv")}
    # the committed files alone rebuild the same report: the runs gone, the per-seed CSVs read instead
    import shutil

    shutil.rmtree(tmp_path / "runs")
    sr.main(sr.Args(results_dir=str(res), reps=200))
    again = {p.name: p.read_bytes() for p in res.iterdir() if p.suffix in (".md", ".csv")}
    assert again["paired.csv"] == first["paired.csv"] and again["scores.csv"] == first["scores.csv"]
    assert again["report.md"].replace(b"per-seed CSVs in this folder", b"runs") == first["report.md"]


TWO_ARMS = {  # offline-only and adversarial fine-tuning, enough for claim 1 (the scores as fake_study takes them)
    claims.OFFLINE: ("offline", "", "", lambda s, c: 30.0 + s),
    claims.ADV_FIXED: ("offline", "adversarial", "fixed", lambda s, c: 40.0 + (s * 7) % 5),
}


def test_seeds_rebuilds_a_first_look_once_later_chains_are_in(tmp_path):
    """--seeds: the report of a subset of seeds is the report of a study that had only those seeds (the first look of
    a study whose extension's chains sit in the same folder)."""
    scores = {
        claims.OFFLINE: ("offline", "", "", lambda s, c: 30.0 + s),
        claims.ADV_FIXED: ("offline", "adversarial", "fixed", lambda s, c: 40.0 + (s * 7) % 5 - (30 if s > 8 else 0)),
    }
    both = fake_study(tmp_path / "all", scores, seeds=tuple(range(1, 11)))
    only = fake_study(tmp_path / "first", scores, seeds=tuple(range(1, 9)))
    sr.main(sr.Args(results_dir=str(both), reps=200, seeds=tuple(range(1, 9))))
    sr.main(sr.Args(results_dir=str(only), reps=200))
    for name in ("paired.csv", "scores.csv"):
        assert (both / name).read_text() == (only / name).read_text(), name
    evaluations = (both / "evaluations.csv").read_text()  # the study's per-seed table keeps every seed
    assert {ln.split(",")[2] for ln in evaluations.splitlines()[1:]} == {str(s) for s in range(1, 11)}
    (both / "chains").mkdir()
    for seed in range(1, 11):  # a finished chain's provenance, as study.py writes it
        chain = {"env_id": "Hopper-v5", "seed": seed, "commit": "abc", "machine": "vm", "stages": 9, "wall_s": 60.0}
        (both / "chains" / f"Hopper-v5__seed{seed}.json").write_text(json.dumps({**chain, "finished": 0.0}))
    sr.main(sr.Args(results_dir=str(both), reps=200, seeds=tuple(range(1, 9))))
    report = (both / "report.md").read_text()
    assert "8 chains, 0.13 core-hours" in report
    assert "--seeds 1 2 3 4 5 6 7 8`" in report and "X higher in 8 of 8 seeds" in report
    sr.main(sr.Args(results_dir=str(both), reps=200))  # all ten: seeds 9 and 10 undo claim 1
    assert "X higher in 8 of 10 seeds" in (both / "report.md").read_text()
    with pytest.raises(sr.ReportError, match="none of --seeds 11-12"):
        sr.main(sr.Args(results_dir=str(both), reps=200, seeds=(11, 12)))


def test_out_dir_keeps_a_first_look_beside_the_study_report(tmp_path):
    """--out-dir: the report, its tables and plots go to another folder; the study's own files are not touched."""
    res = fake_study(tmp_path / "study", TWO_ARMS, seeds=tuple(range(1, 7)))
    sr.main(sr.Args(results_dir=str(res), reps=200))
    before = {p.name: p.read_bytes() for p in res.iterdir() if p.is_file()}
    first = res / "first-look"
    sr.main(sr.Args(results_dir=str(res), reps=200, seeds=(1, 2, 3, 4), out_dir=str(first)))
    assert {p.name: p.read_bytes() for p in res.iterdir() if p.is_file()} == before
    assert {"report.md", "paired.csv", "scores.csv", "curves.png", "heatmap.png"} <= {p.name for p in first.iterdir()}
    report = (first / "report.md").read_text()
    assert f"--seeds 1 2 3 4 --out-dir {first}`" in report and "X higher in 4 of 4 seeds" in report
    sr.main(sr.Args(results_dir=str(res), reps=200, source="csv", out_dir=str(first)))
    assert f"Read from the per-seed CSVs in `{res}`." in (first / "report.md").read_text()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(sr.ReportError, match="is a file; name a folder"):
        sr.main(sr.Args(results_dir=str(res), reps=200, out_dir=str(tmp_path / "a-file")))


def test_an_extensions_stage_costs_join_the_report_and_are_kept_for_a_fresh_clone(tmp_path):
    """--extensions: a second look's report states what the first study's stages and the extension's cost, one table
    each and their sum; the extension's table is kept in its folder, so a clone without the runs builds the same."""
    res = fake_study(tmp_path, TWO_ARMS, seeds=(1, 2, 3, 4))
    manifest = json.loads((res / "study.json").read_text())
    manifest |= {"namespace": "ns", "commands": {f"finetune:Hopper-v5:{s}": [] for s in (1, 2, 3, 4)}}
    (res / "study.json").write_text(json.dumps(manifest))
    ext = tmp_path / "results-ext"
    ext.mkdir()
    commands = {f"finetune:Hopper-v5:{s}": [] for s in (5, 6)} | {"attack:Hopper-v5:6": []}
    (ext / "study.json").write_text(
        json.dumps({**manifest, "study": "fake-ext", "seeds": [5, 6], "policies": [], "commands": commands})
    )
    markers = tmp_path / "runs" / "_study" / "ns"
    markers.mkdir(parents=True)
    for stage, wall in [(f"finetune__Hopper-v5__{s}", 600.0) for s in (1, 2, 3, 4)] + [
        (f"finetune__Hopper-v5__{s}", 1200.0) for s in (5, 6)
    ]:
        (markers / f"{stage}.json").write_text(json.dumps({"argv": [], "wall_s": wall}))
    (markers / "attack__Hopper-v5__6.json").write_text(json.dumps({"argv": [], "wall_s": 90.0, "ran_on": "gpu-box"}))
    sr.main(sr.Args(results_dir=str(res), reps=200, extensions=(str(ext),)))
    report = (res / "report.md").read_text()
    costs = report[report.index("## What the stages cost") :]
    assert "**This study's own stages:**" in costs and "**The extension `fake-ext` (seeds 5-6):**" in costs
    assert "| finetune | 4 | 10.0 min |" in costs and "| finetune | 2 | 20.0 min |" in costs
    total = "The study and its extension together: 1.33 core-hours of wall time on the study's CPU machines."
    assert total in costs  # 4 x 600 s + 2 x 1200 s
    assert "Not in the table: 1 stage(s) ran on gpu-box" in costs and f"--extensions {ext}`" in report
    assert (ext / "stage_costs.csv").is_file() and "attack:Hopper-v5:6" in (ext / "stages_elsewhere.csv").read_text()
    shutil.rmtree(tmp_path / "runs" / "_study")  # a fresh clone: no markers, the committed tables
    sr.main(sr.Args(results_dir=str(res), reps=200, extensions=(str(ext),)))
    assert (res / "report.md").read_text() == report
    with pytest.raises(sr.ReportError, match="study.json not found; name the folder"):
        sr.main(sr.Args(results_dir=str(res), reps=200, extensions=(str(tmp_path / "nowhere"),)))
    unfinished = [{**manifest["policies"][0], "seed": seed, "run_dir": f"runs/ext_{seed}"} for seed in (5, 6)]
    extension = json.loads((ext / "study.json").read_text()) | {"policies": unfinished}
    (ext / "study.json").write_text(json.dumps(extension))  # two policies whose chains have no rows here yet
    sr.main(sr.Args(results_dir=str(res), reps=200, extensions=(str(ext),)))
    assert "Status: PARTIAL: 8 of 10 policies evaluated" in (res / "report.md").read_text()


def test_a_report_read_from_the_chains_on_the_study_s_machine_keeps_its_stage_costs_for_a_fresh_clone(tmp_path):
    """The last report of a study is built from its committed chain files (--source csv) on the machine whose markers
    time its stages: it writes stage_costs.csv, so a clone without the runs builds the same report."""
    res = fake_study(tmp_path, TWO_ARMS, seeds=(1, 2, 3, 4))
    manifest = json.loads((res / "study.json").read_text())
    manifest |= {"namespace": "ns", "commands": {f"finetune:Hopper-v5:{s}": [] for s in (1, 2, 3, 4)}}
    (res / "study.json").write_text(json.dumps(manifest))
    sr.main(sr.Args(results_dir=str(res), reps=200))  # writes the per-seed tables a --source csv report reads
    markers = tmp_path / "runs" / "_study" / "ns"
    markers.mkdir(parents=True)
    for s in (1, 2, 3, 4):
        (markers / f"finetune__Hopper-v5__{s}.json").write_text(json.dumps({"argv": [], "wall_s": 600.0}))
    sr.main(sr.Args(results_dir=str(res), reps=200, source="csv"))
    report = (res / "report.md").read_text()
    assert "| finetune | 4 | 10.0 min |" in report and (res / "stage_costs.csv").is_file()
    shutil.rmtree(tmp_path / "runs")  # a fresh clone: no runs, no markers
    sr.main(sr.Args(results_dir=str(res), reps=200, source="csv"))
    assert (res / "report.md").read_text() == report


def test_a_second_look_counts_policies_per_chain_and_costs_unlisted_chains_by_their_totals(tmp_path):
    """An extension resumed on a new machine lists only its remaining seeds: the status counts the listed policies per
    (env, seed) chain (rows of chains no manifest lists do not make up for a listed chain that has none), and those
    unlisted chains' costs come from their chains/*.json."""
    res = fake_study(tmp_path, TWO_ARMS, seeds=tuple(range(1, 9)))
    sr.main(sr.Args(results_dir=str(res), reps=200))  # writes the per-seed tables the csv source reads
    manifest = json.loads((res / "study.json").read_text())
    policies = manifest["policies"]
    (res / "study.json").write_text(json.dumps({**manifest, "policies": [p for p in policies if p["seed"] <= 4]}))
    ext = tmp_path / "results-ext"
    ext.mkdir()
    listed = [p for p in policies if p["seed"] in (7, 8)] + [{**policies[0], "seed": 9, "run_dir": "runs/ext_9"}]
    (ext / "study.json").write_text(
        json.dumps({**manifest, "study": "fake-ext", "seeds": [7, 8, 9], "policies": listed})
    )
    cost = {"stage": "finetune", "runs": 3, "mean_s": 1200.0, "min_s": 1200.0, "max_s": 1200.0, "total_s": 3600.0}
    (ext / "stage_costs.csv").write_text(tables.to_csv([{**cost, "cpu_s": "", "resumed": 0, "untimed": 0}]))
    (res / "chains").mkdir()
    for seed in (5, 6):  # in no manifest: the extension's first seeds, their manifest lost with their machine
        chain = {"env_id": "Hopper-v5", "seed": seed, "commit": "abc", "machine": "old-vm", "stages": 9}
        (res / "chains" / f"Hopper-v5__seed{seed}.json").write_text(
            json.dumps({**chain, "wall_s": 900.0, "finished": 0})
        )
    args = sr.Args(results_dir=str(res), reps=200, source="csv", extensions=(str(ext),))
    sr.main(args)
    report = (res / "report.md").read_text()
    assert "Status: PARTIAL: 12 of 13 policies evaluated" in report  # 16 policies have rows, but not seed 9's
    costs = report[report.index("## What the stages cost") : report.index("## The chains")]
    assert "**Chains that no manifest here lists (Hopper-v5 seeds 5-6):**" in costs
    assert "2 chains, 18 stages, 0.50 core-hours of stage wall time on old-vm." in costs
    assert "The study and its extension and the chains no manifest lists together: " in costs
    (ext / "study.json").write_text(
        json.dumps({**manifest, "study": "fake-ext", "seeds": [7, 8], "policies": listed[:-1]})
    )
    sr.main(args)
    assert "Status: complete: every policy of the study is evaluated." in (res / "report.md").read_text()
    sr.main(sr.Args(results_dir=str(res), reps=200, source="csv", seeds=(1, 2, 3, 4)))  # a first look: none unlisted
    assert "no manifest" not in (res / "report.md").read_text()


def test_one_seed_judges_no_claim(tmp_path, capsys):
    scores = {
        claims.OFFLINE: ("offline", "", "", lambda s, c: 50.0),
        claims.ADV_FIXED: ("offline", "adversarial", "fixed", lambda s, c: 90.0),
    }
    res = fake_study(tmp_path, scores, seeds=(1,))
    sr.main(sr.Args(results_dir=str(res), reps=200))
    printed, report = capsys.readouterr().out, (res / "report.md").read_text()
    claim_lines = [ln for ln in report.splitlines() if ln[:2] in ("1.", "2.", "3.", "4.")]
    assert len(claim_lines) == 4 and "not judged: 1 paired seed(s)" in printed
    for text in [printed] + claim_lines:  # no verdict word in what is printed or in any claim's line
        assert not any(w in text for w in ("supported", "contradicted", "inconclusive")), text


def test_a_one_seed_interval_is_rliables_without_the_resampling(monkeypatch):
    """One run per array: the report skips the bootstrap (every resample is the data) and gives what rliable gives."""
    from rliable import library as rly
    from rliable import metrics

    one = {"a": np.array([[0.4, 0.9]]), "b": np.array([[0.7]])}
    pair = {"pair": (np.array([[0.2, 0.5]]), np.array([[0.3, 0.1]]))}
    for scores, func in [(one, tables.iqm_and_mean), (pair, metrics.probability_of_improvement)]:
        got = tables.interval(scores, func, 300, 0.9)
        point, ci = rly.get_interval_estimates(scores, func, reps=300, confidence_interval_size=0.9)
        for k in scores:
            assert np.array_equal(got[k][0], np.atleast_1d(point[k]))
            assert np.array_equal(got[k][1], np.atleast_1d(ci[k][0]))
            assert np.array_equal(got[k][2], np.atleast_1d(ci[k][1]))
    calls = []
    counted = lambda x: calls.append(1) or tables.iqm_and_mean(x)  # noqa: E731
    tables.interval(one, counted, 300, 0.9)
    assert len(calls) == 2  # one call per array, not 300 resamples
    tables.interval({"two runs": np.array([[0.4], [0.9]])}, counted, 300, 0.9)
    assert len(calls) > 300  # two runs: the bootstrap proper


def test_report_labels_a_partial_study_and_refuses_an_empty_one(tmp_path):
    scores = {
        claims.OFFLINE: ("offline", "", "", lambda s, c: 50.0),
        claims.ADAPTIVE: ("offline", "adversarial", "adaptive", lambda s, c: 55.0),
    }
    res = fake_study(tmp_path, scores, seeds=(1, 2))
    os.remove(tmp_path / "runs" / f"{claims.ADAPTIVE.replace(' ', '_')}_2" / "matrix.csv")
    sr.main(sr.Args(results_dir=str(res), reps=200))
    report = (res / "report.md").read_text()
    assert "PARTIAL: 3 of 4 policies evaluated" in report
    assert f"Reproduce with `python study_report.py --results-dir {res}`." in report
    sr.main(sr.Args(results_dir=str(res), reps=200, alpha=0.0294))  # a second look's α is part of the command
    assert (
        f"Reproduce with `python study_report.py --results-dir {res} --alpha 0.0294`."
        in (res / "report.md").read_text()
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "study_report.py"), "--results-dir", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and proc.stderr.strip().startswith("error:") and "study.py" in proc.stderr


def test_the_chains_table_lists_seeds_in_numeric_order(tmp_path):
    (tmp_path / "chains").mkdir()
    for seed in (10, 2, 1):
        chain = {"env_id": "Hopper-v5", "seed": seed, "commit": "a" * 40, "machine": "vm (2 cores)", "stages": 15}
        chain |= {"wall_s": 3600.0, "cpu_s": 3000.0, "finished": 1.8e9}
        (tmp_path / "chains" / f"Hopper-v5__seed{seed}.json").write_text(json.dumps(chain))
    rows = [line for line in costs.chains_section(str(tmp_path)) if line.startswith("| Hopper-v5 |")]
    assert [int(row.split("|")[2]) for row in rows] == [1, 2, 10]


def test_the_grid_expands_to_the_paper_conditions_in_dag_order(tmp_path):
    stages = study.build_stages(study.Args(), str(tmp_path))
    ids = [s.id for s in stages]
    assert len(ids) == len(set(ids))
    for i, s in enumerate(stages):  # every dependency comes earlier in the list
        assert all(ids.index(d) < i for d in s.deps), s.id
    ft = sorted(s.id.split(":")[-1] for s in stages if s.kind == "finetune" and s.seed == 1)
    assert ft == [
        "offline-adversarial-adaptive",
        "offline-adversarial-fixed",
        "offline-adversarial-linear",
        "offline-normal-fixed",
        "offline-random-fixed",
        "scratch-adversarial-adaptive",
    ]
    for s in stages:  # claim 3's arms differ only in the condition: the same fixed q
        if s.kind == "finetune" and s.id.endswith("-fixed"):
            assert s.argv[s.argv.index("--q") + 1] == "0.5"
    assert sum(s.kind == "dataset" for s in stages) == 1 and sum(s.kind == "pretrain" for s in stages) == 5
    assert sum(s.kind == "evaluate" for s in stages) == 5 * 7  # offline-only + six fine-tunes, per seed
    proc = subprocess.run(
        [sys.executable, str(ROOT / "study.py"), "--scale", "tiny", "--seeds", "1", "--dry-run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and "td3_adv_finetune.py" in proc.stdout and not (tmp_path / "runs").exists()


def _outputs(stage, root: Path) -> list:
    """The files a finished stage wrote."""
    if stage.kind == "dataset":
        return [p for p in Path(stage.done_file).rglob("*") if p.is_file()]
    flag = {"pretrain": "--run-name", "finetune": "--run-name", "attack": "--output", "evaluate": "--output-dir"}[
        stage.kind
    ]
    path = stage.argv[stage.argv.index(flag) + 1]
    path = root / "runs" / path if flag == "--run-name" else root / path
    return [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]


def _markers(root: Path) -> dict:
    return {p.name: json.loads(p.read_text()) for p in (root / "runs" / "_study" / "local-tiny").glob("*.json")}


def test_tiny_study_on_ray_survives_a_killed_driver_and_isolates_a_failing_stage(tmp_path, ray_head):
    """One env, two seeds, two fine-tune conditions at the tiny scale. Seed 2's TD3+BC run folder holds a corrupt
    checkpoint, so that stage fails: its dependents are skipped while seed 1 finishes. A Ray head already runs on this
    machine throughout: the first driver starts a private Ray beside it (as run_pipeline.sh's does; joining the head
    once failed) and is killed (SIGKILL) mid-study; the second joins the head by --ray-address 127.0.0.1:PORT with the
    head's token, redoes no finished stage and leaves their files untouched."""
    address, token = ray_head
    env = {**os.environ, "MINARI_DATASETS_PATH": str(tmp_path / "minari"), "OMP_NUM_THREADS": "1"}
    bad = tmp_path / "runs" / "local-tiny-hopper-medium-v0__td3_bc_offline__2"
    bad.mkdir(parents=True)
    (bad / "checkpoint.pt").write_bytes(b"not a checkpoint")
    cmd = [
        sys.executable,
        str(ROOT / "study.py"),
        "--scale",
        "tiny",
        "--seeds",
        "1",
        "2",
        "--finetune-conditions",
        "normal",
        "--curricula",
        "adaptive",
        "--no-scratch",
        "--results-dir",
        "results/t",
        "--reps",
        "200",
    ]
    driver = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    deadline = time.time() + 240
    while len(_markers(tmp_path)) < 3 and time.time() < deadline and driver.poll() is None:
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    driver.wait()
    first = _markers(tmp_path)
    assert len(first) >= 3, driver.stdout.read()
    stages = {
        os.path.basename(study.marker_path(s)): s
        for s in study.build_stages(
            study.Args(
                scale="tiny", seeds=(1, 2), finetune_conditions=("normal",), curricula=("adaptive",), scratch=False
            ),
            str(tmp_path / "minari"),
        )
    }
    outputs = {p: p.stat().st_mtime_ns for name in first for p in _outputs(stages[name], tmp_path)}
    assert outputs

    on_the_head = [*cmd, "--ray-address", address]
    proc = subprocess.run(
        on_the_head, cwd=tmp_path, env={**env, "RAY_AUTH_TOKEN": token}, capture_output=True, text=True, timeout=600
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert f"{len(first)} of 15 stages finished earlier: skipped" in out
    assert "failed: pretrain:Hopper-v5:2: error:" in out and "unreadable" in out
    assert "skipped (an input failed): attack:Hopper-v5:2" in out
    markers = _markers(tmp_path)
    assert all(markers[k] == v for k, v in first.items())  # finished stages were not redone ...
    assert all(p.stat().st_mtime_ns == t for p, t in outputs.items())  # ... and their files are untouched
    assert sorted(markers) == sorted(n for n, s in stages.items() if s.seed in (None, 1))
    for name, m in markers.items():  # nothing started before its inputs were finished
        for d in stages[name].deps:
            assert (
                m["started"]
                >= markers[os.path.basename(study.marker_path(next(s for s in stages.values() if s.id == d)))][
                    "finished"
                ]
            ), (name, d)
    report = (tmp_path / "results" / "t" / "report.md").read_text()
    assert "PARTIAL: 3 of 6 policies evaluated" in report
    # seed 1's chain finished: its per-seed rows and provenance are in the results folder, ready to commit
    chains = tmp_path / "results" / "t" / "chains"
    assert sorted(p.name for p in chains.iterdir()) == [
        "Hopper-v5__seed1.json",
        "Hopper-v5__seed1__curves.csv",
        "Hopper-v5__seed1__evaluations.csv",
    ]
    meta = json.loads((chains / "Hopper-v5__seed1.json").read_text())
    assert meta["stages"] == 7 and meta["wall_s"] > 0 and meta["cpu_s"] > 0 and len(meta["commit"]) >= 40
    assert "cores" in meta["machine"]
    assert len(list(csv.DictReader(open(chains / "Hopper-v5__seed1__evaluations.csv")))) == 3 * 4
    assert "| Hopper-v5 | 1 |" in report and "## The chains: what produced each" in report


def test_run_stage_resumes_where_state_is_left_reports_the_error_line_and_flags_a_killed_process(tmp_path):
    log = str(tmp_path / "logs" / "s.log")
    echo = [sys.executable, "-c", "import sys; print(sys.argv[1:])"]
    assert study.run_stage(echo, "state.pt", ["--overwrite"], str(tmp_path), {}, log)["flags"] == ["--overwrite"]
    (tmp_path / "state.pt").write_bytes(b"")
    res = study.run_stage(echo, "state.pt", ["--overwrite"], str(tmp_path), {}, log)
    assert res["returncode"] == 0 and res["flags"] == ["--resume"] and res["error"] is None
    assert "['--resume']" in open(log).read()
    fail = [sys.executable, "-c", "import sys; print('working'); sys.exit('error: the dataset is gone; make it again')"]
    res = study.run_stage(fail, None, [], str(tmp_path), {}, log)
    assert res["returncode"] == 1 and res["error"] == "error: the dataset is gone; make it again"
    killed = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    with pytest.raises(study.StageKilled):  # Ray retries the task on this exception; the retry resumes
        study.run_stage(killed, None, [], str(tmp_path), {}, log)


def test_an_attempt_killed_with_its_driver_still_counts_in_the_stage_cost(tmp_path):
    log = str(tmp_path / "logs" / "s.log")
    burn = [sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 3: pass"]
    driver = (  # a study driver (here: one run_stage call) that a session's end kills mid-stage
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); import study; "
        f"study.run_stage({burn!r}, None, [], {str(tmp_path)!r}, {{}}, {log!r}, heartbeat_s=0.2)"
    )
    proc = subprocess.Popen([sys.executable, "-c", driver])
    attempts = Path(study.attempts_path(log))
    deadline = time.time() + 60
    while (
        time.time() < deadline
        and proc.poll() is None
        and not (attempts.exists() and json.loads(attempts.read_text())[-1]["cpu_s"] >= 1.0)
    ):
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    first = json.loads(attempts.read_text())
    assert len(first) == 1 and 1.0 <= first[0]["cpu_s"] <= first[0]["wall_s"] + 0.5 < 60
    quick = [sys.executable, "-c", "print('done')"]
    res = study.run_stage(quick, None, [], str(tmp_path), {}, log, heartbeat_s=0.2)  # the next session's attempt
    assert res["returncode"] == 0 and len(res["attempts"]) == 2 and res["attempts"][0] == first[0]
    assert res["wall_s"] == pytest.approx(first[0]["wall_s"] + res["attempts"][1]["wall_s"])
    assert res["cpu_s"] == pytest.approx(first[0]["cpu_s"] + res["attempts"][1]["cpu_s"])
    assert 0 < res["attempts"][1]["cpu_s"] < 1.0  # the quick command's own CPU time, read back when it exits


def test_stage_costs_count_every_attempt_and_estimate_the_ones_an_older_driver_did_not_time(tmp_path):
    folder = tmp_path / "runs" / "_study" / "ns"
    (folder / "logs").mkdir(parents=True)
    attempts = [{"started": 0.0, "flags": [], "wall_s": 100.0, "cpu_s": 90.0}, {"wall_s": 200.0, "cpu_s": 150.0}]
    markers = {  # two markers from before attempts were timed (one of them ran twice) and one that times its two
        "finetune__Hopper-v5__1": {"argv": [], "wall_s": 600.0},
        "finetune__Hopper-v5__2": {"argv": [], "wall_s": 60.0},
        "finetune__Hopper-v5__3": {"argv": [], "wall_s": 300.0, "cpu_s": 240.0, "attempts": attempts},
    }
    for name, marker in markers.items():
        (folder / f"{name}.json").write_text(json.dumps(marker))
    (folder / "logs" / "finetune__Hopper-v5__2.log").write_text("\n$ python td3.py\n...\n$ python td3.py --resume\n")
    (folder / "logs" / "finetune__Hopper-v5__1.log").write_text("\n$ python td3.py\n10%|█ | 1/10 [00:01<$ \n")
    (folder / "finetune__Hopper-v5__11.json").write_text(json.dumps({"argv": [], "wall_s": 5000.0}))
    ours = {"namespace": "ns", "commands": {f"finetune:Hopper-v5:{seed}": [] for seed in (1, 2, 3)}}
    (cost,) = costs.stage_costs(ours, str(tmp_path), str(tmp_path))  # seed 11's stage belongs to another study
    assert (cost["runs"], cost["total_s"], cost["resumed"], cost["untimed"]) == (3, 960.0, 2, 1)
    assert cost["cpu_s"] is None  # not every marker has it
    assert cost["estimate_s"] == 600.0 + 300.0 + (600.0 + 300.0) / 2  # stage 2 at the mean of the complete ones
    text = "\n".join(costs.costs_section([cost]))
    assert "| finetune | 3 | 5.3 min | 1.0 min | 10.0 min | 0.27 h | – | 2 |" in text
    assert "1 stage(s) ran in several attempts" in text and "about 0.38 core-hours" in text
    (tmp_path / "stage_costs.csv").write_text(tables.to_csv([cost]))  # the committed copy reads back the same
    assert costs.stage_costs({"namespace": "elsewhere"}, str(tmp_path), str(tmp_path)) == [cost]
    (tmp_path / "stage_costs.csv").write_text("stage,runs,mean_s,min_s,max_s,total_s\nattack,1,5,5,5,5\n")
    (old,) = costs.stage_costs({"namespace": "elsewhere"}, str(tmp_path), str(tmp_path))  # written by an older report
    assert (old["total_s"], old["cpu_s"], old["untimed"], old["estimate_s"]) == (5.0, None, 0, 5.0)
    (tmp_path / "stage_costs.csv").write_text(
        tables.to_csv([{**cost, "runs": 4}])
    )  # the study ran on a machine now gone
    assert costs.stage_costs(ours, str(tmp_path), str(tmp_path))[0]["runs"] == 4  # 3 markers here: the table knows more
    (tmp_path / "stage_costs.csv").write_text(tables.to_csv([{**cost, "runs": 2}]))
    assert costs.costs_and_source(ours, str(tmp_path), str(tmp_path)) == ([cost], True)


def test_a_medium_dataset_below_its_target_is_refused_and_one_above_it_is_taken(tmp_path):
    stage = next(
        s for s in study.build_stages(study.Args(scale="medium", seeds=(1,)), str(tmp_path)) if s.kind == "dataset"
    )
    meta = Path(stage.done_file) / "data" / "metadata.json"
    meta.parent.mkdir(parents=True)
    cmd = [sys.executable, stage.script, *stage.argv]
    for ret, ok in ((700.0, False), (1549.3, True)):  # Minari's own fields are plain strings, ours JSON-encoded
        meta.write_text(
            json.dumps(
                {
                    "dataset_id": "local-medium/hopper/medium-v0",
                    "policy_eval_return": json.dumps(ret),
                    "collect_args": json.dumps({"medium_target_return": None}),
                }
            )
        )
        if ok:
            assert study.is_done(stage, cmd)
        else:
            with pytest.raises(SystemExit, match="below the medium target 1078.1"):
                study.is_done(stage, cmd)


def test_the_decisive_scale_is_the_protocol_s_budgets():
    """docs/protocol.md §4 in force: a change to these budgets is an amendment there first."""
    from study_tools import grid

    sc = grid.SCALES["decisive"]

    def flag(stage, name):
        return sc[stage][sc[stage].index(name) + 1]

    assert (flag("pretrain", "--total-steps"), flag("finetune", "--total-steps")) == ("50000", "100000")
    assert (flag("finetune", "--eval-freq"), flag("finetune", "--eval-episodes")) == ("5000", "10")
    assert sc["de"] == ["--de-episodes", "2"] and sc["evaluate"] == [] and sc["scratch_starts"] == 10000
    assert sc["namespace"] == "local-medium" and sc["tag"] == "decisive"


def test_the_decisive2_scale_is_part_1_s_budgets_with_kept_policies_and_no_unread_attack():
    """docs/protocol-part2.md §4: part 1's budgets, plus the last 4 evaluations' policies kept by every fine-tune and
    evaluated on 10 held-out episodes each, and no fresh attack on the scratch arm (no endpoint reads it)."""
    from study_tools import grid

    one, two = grid.SCALES["decisive"], grid.SCALES["decisive2"]
    assert {k: two[k] for k in ("namespace", "collect", "pretrain", "de", "scratch_starts")} == {
        k: one[k] for k in ("namespace", "collect", "pretrain", "de", "scratch_starts")
    }
    assert two["finetune"] == one["finetune"] + ["--keep-checkpoints", "4"] and two["tag"] == "decisive2"
    assert two["evaluate"] == ["--kept-episodes", "10"] and two["scratch_evaluate"] == ["--no-fresh-attack"]
    stages = study.build_stages(study.Args(scale="decisive2", env_ids=("HalfCheetah-v5",), seeds=(3,)), "/nowhere")
    evaluations = {s.policy["init"] + s.policy["curriculum"]: s.argv for s in stages if s.kind == "evaluate"}
    assert sum("--no-fresh-attack" in argv for argv in evaluations.values()) == 1
    assert "--no-fresh-attack" in evaluations["scratchadaptive"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"seeds": (1, 1)}, "must not repeat"),
        ({"num_cpus": 0}, "no stage could start"),
        ({"num_cpus": 1, "cpus_per_task": 2}, "no stage could start"),
        ({"results_dir": "a-file"}, "is a file"),
    ],
)
def test_an_impossible_grid_is_refused_up_front(bad, message, tmp_path, monkeypatch):
    """A grid that would hang (no CPU for any stage), mix two chains (a repeated seed) or write into a file ends in
    one line before Ray starts or anything is written."""
    import study

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(SystemExit, match=message):
        study.main(study.Args(**{"scale": "tiny", "seeds": (1,), **bad}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def small_study(root: Path):
    scores = {
        claims.OFFLINE: ("offline", "", "", lambda s, c: 50.0 + s),
        claims.ADAPTIVE: ("offline", "adversarial", "adaptive", lambda s, c: 55.0 + s),
    }
    return fake_study(root, scores, seeds=(1, 2))


def first_finetune(root: Path) -> Path:
    return root / "runs" / f"{claims.ADAPTIVE.replace(' ', '_')}_1"


def edit(path: Path, old: str, new: str):
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


BAD_STUDY_FILES = {  # what a user's disk or editor can do to a study's files -> a word the error line must hold
    "a fine-tune's log missing": (lambda r: os.remove(first_finetune(r) / "metrics.jsonl"), "metrics.jsonl"),
    "a torn log line": (lambda r: edit(first_finetune(r) / "metrics.jsonl", '"step": 10000', '"st'), "metrics.jsonl"),
    "a NaN in a learning curve": (
        lambda r: edit(
            first_finetune(r) / "metrics.jsonl", '"eval/normal_normalized": 56.0', '"eval/normal_normalized": NaN'
        ),
        "non-finite",
    ),
    "a string in a learning curve": (
        lambda r: edit(first_finetune(r) / "metrics.jsonl", '"curriculum/q": 0.5', '"curriculum/q": "half"'),
        "metrics.jsonl",
    ),
    "a matrix without its score column": (
        lambda r: edit(first_finetune(r) / "matrix.csv", "normalized_mean", "normalised"),
        "matrix.csv",
    ),
    "a word for a return": (lambda r: edit(first_finetune(r) / "matrix.csv", ",560.0,", ",lots,"), "matrix.csv"),
    "a NaN return": (lambda r: edit(first_finetune(r) / "matrix.csv", ",560.0,", ",nan,"), "non-finite score"),
    "an infinite score": (lambda r: edit(first_finetune(r) / "matrix.csv", ",56.0,", ",inf,"), "non-finite score"),
    "a truncated manifest": (
        lambda r: (r / "results" / "study.json").write_text((r / "results" / "study.json").read_text()[:100]),
        "study.json",
    ),
    "a manifest without its policies": (
        lambda r: edit(r / "results" / "study.json", '"policies"', '"pols"'),
        "'policies'",
    ),
    "a policy entry without its matrix": (lambda r: edit(r / "results" / "study.json", '"matrix"', '"m"'), "matrix"),
}


@pytest.mark.parametrize("case", list(BAD_STUDY_FILES))
def test_the_report_refuses_damaged_inputs_in_one_line_and_writes_nothing(case, tmp_path):
    res = small_study(tmp_path)
    BAD_STUDY_FILES[case][0](tmp_path)
    before = sorted(os.listdir(res))
    with pytest.raises(sr.ReportError, match=BAD_STUDY_FILES[case][1]):
        sr.main(sr.Args(results_dir=str(res), reps=200))
    assert sorted(os.listdir(res)) == before  # nothing written, so nothing says "complete"


@pytest.mark.parametrize("flags", [["--reps", "0"], ["--confidence", "1.5"], ["--alpha", "0.7"]])
def test_the_report_refuses_impossible_settings_in_one_line(flags, tmp_path):
    res = small_study(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "study_report.py"), "--results-dir", str(res), *flags],
        capture_output=True,
        text=True,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:") and flags[0] in lines[0]
    assert os.listdir(res) == ["study.json"]


def test_damaged_committed_tables_are_refused_too(tmp_path):
    """The per-seed CSVs a report reads when the runs are gone: a NaN or a torn row is refused, never aggregated."""
    res = small_study(tmp_path)
    sr.main(sr.Args(results_dir=str(res), reps=200))
    shutil.rmtree(tmp_path / "runs")
    edit(res / "evaluations.csv", ",570,57,", ",570,nan,")
    with pytest.raises(sr.ReportError, match="non-finite score"):
        sr.main(sr.Args(results_dir=str(res), reps=200))
    edit(res / "evaluations.csv", ",570,nan,", ",570,57,")
    text = (res / "curves.csv").read_text().splitlines()
    (res / "curves.csv").write_text("\n".join([*text[:-1], text[-1][: len(text[-1]) // 2]]) + "\n")
    with pytest.raises(sr.ReportError, match="curves.csv"):
        sr.main(sr.Args(results_dir=str(res), reps=200))


def test_a_cluster_that_does_not_answer_is_one_line_within_seconds(tmp_path):
    """Ray itself retries an unreachable address for minutes, silently."""
    started, closed = time.time(), free_port()
    cmd = ["--scale", "tiny", "--seeds", "1", "--ray-address", f"127.0.0.1:{closed}", "--results-dir", "results/t"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "study.py"), *cmd], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and "nothing answers" in lines[0], proc.stderr
    assert time.time() - started < 60 and os.listdir(tmp_path) == []


def test_a_p_below_one_in_a_thousand_is_printed_not_rounded_to_zero(tmp_path):
    assert [tables.p_text(p) for p in (0.0123, 0.001, 2 / 2**12, 2 / 2**20)] == ["0.012", "0.001", "0.0005", "2e-06"]
    scores = {
        claims.OFFLINE: ("offline", "", "", lambda s, c: 30.0 + s),
        claims.ADV_FIXED: ("offline", "adversarial", "fixed", lambda s, c: 60.0 + s % 3),
    }
    res = fake_study(tmp_path, scores, seeds=tuple(range(1, 13)))
    sr.main(sr.Args(results_dir=str(res), reps=200))
    report = (res / "report.md").read_text()
    assert "p = 0.0005, X higher in 12 of 12 seeds" in report and "sign-flip p 0.0005 |" in report


def test_the_report_names_what_a_plain_td3_reaches_beside_claim_2_when_the_study_has_the_runs(tmp_path):
    """plain_td3_reference.csv (benchmarks/plain_td3_reference.py) in the results folder: one descriptive paragraph
    after the claims, with each run's online AUC and final score and the scratch arm's mean AUC; without the file the
    report has no such paragraph; a malformed file is one line."""
    scores = {
        sr.OFFLINE: ("offline", "", "", lambda s, c: 30.0),
        sr.SCRATCH: ("scratch", "adversarial", "adaptive", lambda s, c: 10.0 + s),
    }
    res = fake_study(tmp_path, scores, seeds=(1, 2))
    sr.main(sr.Args(results_dir=str(res), reps=200))
    assert "plain TD3" not in (res / "report.md").read_text()
    header = "env_id,seed,total_steps,learning_starts,online_auc,final_normalized,final_return,run\n"
    rows = "Hopper-v5,1,100000,10000,17.88,34.56,4012.0,ref1\nHopper-v5,2,100000,10000,19.49,41.98,4932.6,ref2\n"
    (res / "plain_td3_reference.csv").write_text(header + rows)
    sr.main(sr.Args(results_dir=str(res), reps=200))
    report = (res / "report.md").read_text()
    paragraph = next(p for p in report.split("\n\n") if "A plain TD3 at the same budget (Hopper-v5" in p)
    assert "seed 1: 17.9 (final 34.6), seed 2: 19.5 (final 42.0)" in paragraph and "100,000 steps" in paragraph
    scratch_auc = [r for r in csv.DictReader(open(res / "curves.csv")) if r["policy"] == sr.SCRATCH]
    assert "the scratch arm's" in paragraph and scratch_auc
    assert report.index("A plain TD3") < report.index("## Paired differences")
    assert "wall time" not in paragraph  # a file written before the runs' wall time was kept
    timed = "env_id,seed,total_steps,learning_starts,online_auc,final_normalized,final_return,wall_s,run\n"
    rows = (
        "Hopper-v5,1,100000,10000,17.88,34.56,4012.0,748.4,ref1\nHopper-v5,2,100000,10000,19.49,41.98,4932.6,756.4,r2\n"
    )
    (res / "plain_td3_reference.csv").write_text(timed + rows)
    sr.main(sr.Args(results_dir=str(res), reps=200))
    assert "They took 748 and 756 s of wall time" in (res / "report.md").read_text()
    (res / "plain_td3_reference.csv").write_text(header + "Hopper-v5,one,100000,10000,1,2,3,ref\n")
    with pytest.raises(sr.ReportError, match="plain_td3_reference.csv is malformed"):
        sr.main(sr.Args(results_dir=str(res), reps=200))


def test_the_plain_td3_reference_reads_a_finished_plain_run_with_its_wall_time_and_refuses_any_other(
    hopper_checkpoint, hopper_perturbations, tmp_path
):
    tiny = ["--checkpoint", hopper_checkpoint, "--total-steps", "60", "--eval-freq", "30", "--eval-episodes", "1"]
    tiny += ["--batch-size", "16", "--learning-starts", "20"]
    plain = ["--init", "scratch", "--finetune-condition", "normal", "--run-name", "plain"]
    for flags in (plain, ["--run-name", "adversarial"]):
        proc = run_script("td3_adv_finetune.py", *tiny, *flags, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    bench, out = "benchmarks/plain_td3_reference.py", str(tmp_path / "ref.csv")
    proc = run_script(bench, "--runs", "runs/plain", "--output", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (row,) = list(csv.DictReader(open(out)))
    metrics = [json.loads(line) for line in open(tmp_path / "runs" / "plain" / "metrics.jsonl")]
    evals = [r for r in metrics if "eval/normal_normalized" in r]
    assert float(row["online_auc"]) == pytest.approx(np.mean([r["eval/normal_normalized"] for r in evals[1:]]))
    assert float(row["final_normalized"]) == pytest.approx(evals[-1]["eval/normal_normalized"])
    assert float(row["wall_s"]) == pytest.approx(60 / [r for r in metrics if "charts/sps" in r][-1]["charts/sps"])
    proc = run_script(bench, "--runs", "runs/plain", "runs/adversarial", "--output", out, cwd=tmp_path)
    assert proc.returncode != 0 and "runs/adversarial is not a plain TD3 run" in proc.stderr


def test_part_2_judges_normal_and_random_on_the_kept_policies_and_robustness_on_the_final_one(tmp_path):
    """Where the matrices hold `{condition}@kept` rows (part 2, docs/protocol-part2.md §2a), normal and random average
    the fine-tune's kept policies; robustness stays the final policy's (its fresh attack was found against it alone,
    so the kept policies' attack rows are descriptive); offline-only keeps its final evaluation; part 1's final-policy
    normal and the retained share (final robustness ÷ final normal) are secondary. Planted: the final policy's normal
    is unlucky (below offline-only's), the kept ones' are not; the kept policies' attack rows are far below the final
    policy's, and must not reach claim 1."""
    scores = {
        claims.OFFLINE: ("offline", "", "", lambda s, c: 40.0 if c == "normal" else 10.0 + s % 3),
        claims.ADV_FIXED: (
            "offline",
            "adversarial",
            "fixed",
            lambda s, c: {"normal": 30.0, "random": 28.0, "adversarial": 20.0 + s % 2, "transfer": 25.0}[c],
            lambda s, c: {"normal": 60.0, "random": 55.0, "adversarial": 3.0, "transfer": 4.0}[c],
        ),
        claims.SCRATCH: (  # no fresh attack on scratch: no adversarial rows at all
            "scratch",
            "adversarial",
            "adaptive",
            lambda s, c: None if c == "adversarial" else 8.0,
            lambda s, c: None if c == "adversarial" else 9.0,
        ),
    }
    res = fake_study(tmp_path, scores, seeds=tuple(range(1, 11)))
    sr.main(sr.Args(results_dir=str(res), reps=200))
    paired = {(r["role"], r["x"], r["y"], r["endpoint"]): r for r in csv.DictReader(open(res / "paired.csv"))}
    claim1 = paired[("claim 1", claims.ADV_FIXED, claims.OFFLINE, "robustness")]
    robustness = [min(20.0 + s % 2, 25.0) - (10.0 + s % 3) for s in range(1, 11)]
    assert float(claim1["mean_difference"]) == pytest.approx(np.mean(robustness)) and claim1["x_higher"] == "10"
    normal = paired[("secondary", claims.ADV_FIXED, claims.OFFLINE, "normal")]
    assert float(normal["mean_difference"]) == pytest.approx(60.0 - 40.0)
    assert not any(e == "robustness (final)" for *_, e in paired)  # robustness is the final policy's already
    retained = paired[("secondary", claims.ADV_FIXED, claims.OFFLINE, "retained")]
    shares = [min(20.0 + s % 2, 25.0) / 30.0 - (10.0 + s % 3) / 40.0 for s in range(1, 11)]
    assert float(retained["mean_difference"]) == pytest.approx(np.mean(shares), abs=1e-6)
    report = (res / "report.md").read_text()
    row = next(ln for ln in report.splitlines() if "| retained |" in ln)  # a share: two decimals, not "+0.4 [+0.4, …"
    assert f"| {np.mean(shares):+.2f} [" in row, row
    assert "1. Adversarial fine-tuning is more robust" in report and "**supported**" in report.split("## Paired")[0]
    assert "## T1b: policy × evaluation condition, Hopper-v5, averaged over the kept policies" in report
    assert "averaged over a fine-tune's kept policies" in report  # the endpoints' definitions are part 2's
    t1 = report.split("## T1: ")[1].split("## T1b")[0]
    assert next(ln for ln in t1.splitlines() if ln.startswith(f"| {claims.SCRATCH}")).split("|")[5].strip() == "–"
    evaluations = list(csv.DictReader(open(res / "evaluations.csv")))
    assert {r["eval_condition"] for r in evaluations} == set(CONDS) | {c + "@kept" for c in CONDS}
    again = loading.load_csvs(str(res))[0]  # the committed tables judge alike
    assert {r["eval_condition"] for r in again} == set(CONDS) | {c + "@kept" for c in CONDS}


def test_a_study_is_complete_only_with_every_file_its_claims_read_and_an_extension_must_be_one(tmp_path):
    """A curves file lost beside its evaluations turns claim 2 into 'not measured': the status then says PARTIAL and
    names what is missing, never 'complete'. --extensions refuses the study's own folder (its policies would count
    twice) and a study of another ε."""
    res = fake_study(tmp_path, TWO_ARMS)
    sr.main(sr.Args(results_dir=str(res), reps=200))
    assert "Status: complete" in (res / "report.md").read_text()
    (res / "curves.csv").unlink()
    sr.main(sr.Args(results_dir=str(res), reps=200, source="csv"))
    status = next(ln for ln in (res / "report.md").read_text().splitlines() if ln.startswith("Status:"))
    assert "PARTIAL" in status and "without their learning curve" in status and claims.ADV_FIXED in status
    with pytest.raises(sr.ReportError, match="is the study itself"):
        sr.main(sr.Args(results_dir=str(res), reps=200, source="csv", extensions=(str(res),)))
    other = fake_study(tmp_path / "other", TWO_ARMS, seeds=(9, 10))
    manifest = json.loads((other / "study.json").read_text())
    (other / "study.json").write_text(json.dumps({**manifest, "epsilon": 0.5}))
    with pytest.raises(sr.ReportError, match="epsilon 0.5"):
        sr.main(sr.Args(results_dir=str(res), reps=200, source="csv", extensions=(str(other),)))


def test_a_damaged_marker_or_matrix_is_one_line(tmp_path, monkeypatch):
    """A 0-byte stage marker (a disk that filled as it was written) and a damaged matrix.csv met while exporting a
    finished chain each end in one line naming the file, not a traceback."""
    monkeypatch.chdir(tmp_path)
    stages = study.build_stages(study.Args(scale="tiny", seeds=(1,)), str(tmp_path / "store"))
    stage = next(s for s in stages if s.kind == "pretrain")
    os.makedirs(os.path.dirname(study.marker_path(stage)))
    Path(study.marker_path(stage)).write_text("")
    with pytest.raises(SystemExit, match=r"^error: the marker of finished stage pretrain:Hopper-v5:1 .* is damaged"):
        study.is_done(stage, ["python", *stage.argv])
    for s in (s for s in stages if s.kind == "evaluate"):
        os.makedirs(os.path.dirname(s.policy["matrix"]), exist_ok=True)
        Path(s.policy["matrix"]).write_text("policy,seed\n1,x\n")  # no env_id column
    with pytest.raises(SystemExit, match=r"^error: chain Hopper-v5 seed 1 cannot be exported: .*matrix.csv"):
        study.export_chain(str(tmp_path / "results"), "Hopper-v5", 1, stages, str(tmp_path))
    assert not (tmp_path / "results").exists()


def test_a_live_service_that_is_not_ray_is_one_line_within_the_timeout(tmp_path):
    """A --ray-address where a TCP service accepts connections but never speaks Ray (a web server, a database): Ray
    would wait forever, silently. Within --ray-timeout, one line naming the address, and nothing written."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = []
    threading.Thread(target=lambda: [accepted.append(server.accept()) for _ in range(16)], daemon=True).start()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    cmd = ["--scale", "tiny", "--seeds", "1", "--ray-address", address, "--ray-timeout", "5", "--results-dir", "r"]
    started = time.time()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "study.py"), *cmd], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    server.close()
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith(f"error: {address} accepts"), proc.stderr
    assert "--ray-timeout" in lines[0] and time.time() - started < 60 and os.listdir(tmp_path) == []


def test_the_whole_study_cost_adds_the_work_outside_its_chains_and_refuses_a_malformed_table(tmp_path):
    (tmp_path / "chains").mkdir()
    for seed, cpu_s in ((1, 3600.0), (2, 7200.0)):
        chain = {"env_id": "Hopper-v5", "seed": seed, "commit": "a" * 40, "machine": "vm (2 cores)", "stages": 15}
        chain |= {"wall_s": 9000.0, "cpu_s": cpu_s, "finished": 1.8e9}
        (tmp_path / "chains" / f"Hopper-v5__seed{seed}.json").write_text(json.dumps(chain))
    assert costs.whole_cost_section(str(tmp_path), planned=3) == []  # no costs_outside_chains.csv: no section
    table = tmp_path / costs.OUTSIDE_CHAINS
    table.write_text("item,core_s,measured_as,source\ndataset,1800,CPU,time\npilot,5400,CPU,chains/x.json\n")
    text = "\n".join(costs.whole_cost_section(str(tmp_path), planned=3))
    assert "| the study's 2 chains | 3.00 |" in text and "| dataset | 0.50 | CPU | time |" in text
    assert "The whole study so far (2 of its 3 chains): **5.00 core-hours**." in text
    assert "so far" not in "\n".join(costs.whole_cost_section(str(tmp_path), planned=2))  # every chain is in
    assert costs.whole_cost_section(str(tmp_path), planned=3, seeds=(1,)) == []  # a report on some seeds only
    for bad in ("item,core_s\ndataset,1800\n", "item,core_s,measured_as,source\ndataset,lots,CPU,time\n"):
        table.write_text(bad)
        with pytest.raises(loading.ReportError, match="costs_outside_chains.csv"):
            costs.whole_cost_section(str(tmp_path), planned=3)
    table.write_text("item,core_s,measured_as,source\ndataset,-5,CPU,time\n")
    with pytest.raises(loading.ReportError, match="negative"):
        costs.whole_cost_section(str(tmp_path), planned=3)
    table.write_text("item,core_s,measured_as,source\ndataset,1800,CPU,time\n")
    res = fake_study(tmp_path / "study", TWO_ARMS, seeds=(1, 2))  # the report adds the section after its chains
    shutil.copytree(tmp_path / "chains", res / "chains")
    shutil.copy(table, res / costs.OUTSIDE_CHAINS)
    sr.main(sr.Args(results_dir=str(res), reps=50))
    assert "The whole study: **3.50 core-hours**." in (res / "report.md").read_text()
