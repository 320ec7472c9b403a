"""benchmarks/device_chains.py: a study's chains run without Ray on a lent machine, then handed back to the study.
The stage scripts are stubs here (the real ones are smoke-run by the other tests); what is tested is the order,
the argv each stage runs with, the deadline, what comes back and the markers the study's driver reads."""

import json
import os
import sys

import pytest

import study
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import device_chains as dc  # noqa: E402

STUB = """import os, sys, time
argv = sys.argv[1:]
val = lambda flag: argv[argv.index(flag) + 1]
name = os.path.basename(sys.argv[0])
if name in ("td3_bc_offline.py", "td3_adv_finetune.py"):
    if "adaptive" in val("--run-name"):
        time.sleep(60)  # outlives the deadline
    run = os.path.join("runs", val("--run-name"))
    os.makedirs(run)
    for f in ("args.json", "checkpoint.pt", "metrics.jsonl", "state.pt", ".lock"):
        open(os.path.join(run, f), "w").write(" ".join(argv))
elif name == "de_perturbations.py":
    open(val("--output"), "w").write("npz")
    open(val("--output").replace(".npz", ".png"), "w").write("png")
else:
    os.makedirs(val("--output-dir"))
    open(os.path.join(val("--output-dir"), "matrix.csv"), "w").write(" ".join(argv))
"""


def decisive_study(seeds=(19,)):
    """The decisive scale's stages and the manifest study.py writes for them (no scratch arm, as the extension)."""
    args = study.Args(scale="decisive", seeds=seeds, scratch=False, behaviour_seed=2)
    stages = study.build_stages(args, "/nonexistent")
    commands = {s.id: [os.path.join(study.HERE, s.script), *s.argv] for s in stages}
    manifest = {"env_ids": ["Hopper-v5"], "namespace": study.run_tag(args), "commit": "abc", "commands": commands}
    return stages, manifest


def test_stages_run_on_cuda_with_more_workers_and_return_what_the_study_reads():
    stages, manifest = decisive_study()
    ids = dc.stage_ids(manifest["commands"], "Hopper-v5", 19)
    chain = {s.id for s in stages if s.seed == 19}
    assert {ids["pretrain"], ids["attack"], *ids["finetunes"], *ids["evaluations"]} == chain
    assert len(ids["finetunes"]) == 5 and len(ids["evaluations"]) == 6
    for s in stages:
        if s.seed != 19:
            continue
        study_argv = manifest["commands"][s.id]
        ran = dc.argv_to_run(s.id, study_argv, gpu=True, workers=6, smoke=False)
        assert ran[0] == s.script
        if s.kind in ("pretrain", "finetune"):
            assert ran == [s.script, *[a for a in s.argv if a != "--no-cuda"], "--cuda", "--cudagraphs"]
        else:  # CPU stages: only the worker count changes
            assert ran == [s.script, *dc.replace_flag(s.argv, "--num-workers", "6")]
            assert s.argv[s.argv.index("--num-workers") + 1] == "1"
        assert dc.argv_to_run(s.id, study_argv, gpu=False, workers=1, smoke=False) == [s.script, *s.argv]
        if s.kind == "evaluate":  # what it evaluates, and what the report reads, come back
            assert study_argv[study_argv.index("--output-dir") + 1] == os.path.dirname(s.policy["matrix"])
            trained = s.id.removeprefix("evaluate:")
            back = dc.outputs(trained, manifest["commands"][trained])
            assert os.path.join(s.policy["run_dir"], "checkpoint.pt") in back
            assert os.path.join(s.policy["run_dir"], "metrics.jsonl") in back
            assert not any(f.endswith(("state.pt", ".lock")) for f in back)
        if s.kind == "attack":
            assert dc.outputs(s.id, study_argv)[0] == study_argv[study_argv.index("--output") + 1]


def test_finished_stages_are_adopted_and_the_driver_skips_them(tmp_path, monkeypatch):
    stages, manifest = decisive_study()
    work, files, root = tmp_path / "lent", tmp_path / "back", tmp_path / "study"
    work.mkdir()
    root.mkdir()
    for script in ("td3_bc_offline.py", "de_perturbations.py", "td3_adv_finetune.py", "evaluate_matrix.py"):
        (work / script).write_text(STUB)
    (tmp_path / "study.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(work)
    run = ["run", "--manifest", str(tmp_path / "study.json"), "--seeds", "19", "--out", str(files)]
    assert dc.main([*run, "--deadline", "5", "--eval-estimate", "1", "--attack-workers", "3"]) == 0

    records = json.loads((files / "stages.json").read_text())
    adaptive = "finetune:Hopper-v5:19:offline-adversarial-adaptive"
    assert records[adaptive]["returncode"] != 0  # stopped at the deadline
    assert f"evaluate:{adaptive}" not in records  # nothing downstream of it started
    finished = {k for k, r in records.items() if r["returncode"] == 0}
    assert len(finished) == 11  # TD3+BC, DE, 4 fine-tunes and 5 evaluations
    attack = records["attack:Hopper-v5:19"]
    assert attack["argv"] == manifest["commands"]["attack:Hopper-v5:19"]
    assert attack["argv_ran"][attack["argv_ran"].index("--num-workers") + 1] == "3"
    assert records["pretrain:Hopper-v5:19"]["argv_ran"][-2:] == ["--cuda", "--cudagraphs"]
    assert all(r["smoke"] is False and r["manifest_commit"] == "abc" for r in records.values())

    adopt = ["adopt", "--files", str(files), "--runs-root", str(root), "--manifest", str(tmp_path / "study.json")]
    assert dc.main(adopt) == 0
    monkeypatch.chdir(root)
    cmds = manifest["commands"]
    for s in stages:
        if s.seed == 19:
            assert (s.id in finished) == (
                os.path.exists(study.marker_path(s)) and study.is_done(s, [sys.executable, *cmds[s.id]])
            )
    marker = json.loads(open(study.marker_path(next(s for s in stages if s.kind == "pretrain"))).read())
    assert marker["ran_on"] and marker["argv_ran"][-1] == "--cudagraphs" and marker["flags"] == []
    offline = next(s.policy for s in stages if s.id == "evaluate:pretrain:Hopper-v5:19")
    assert (root / offline["run_dir"] / "checkpoint.pt").exists()
    assert not (root / offline["run_dir"] / "state.pt").exists()
    stopped = next(s.policy for s in stages if s.id == f"evaluate:{adaptive}")
    assert not (root / stopped["run_dir"]).exists()
    assert (root / os.path.dirname(offline["matrix"]) / "matrix.csv").exists()

    with pytest.raises(SystemExit, match="adopt nothing twice"):
        dc.main(adopt)
    smoke = {k: {**r, "smoke": True} for k, r in records.items()}
    (files / "stages.json").write_text(json.dumps(smoke))
    with pytest.raises(SystemExit, match="--smoke budgets"):
        dc.main([*adopt[:4], str(tmp_path / "elsewhere"), *adopt[5:]])

    # the report: these stages are not this machine's core-hours, and each chain says which of its stages ran where
    from study_tools import costs, tables

    local = os.path.join(study.marker_path(next(s for s in stages if s.id == f"evaluate:{adaptive}")))
    with open(local, "w") as f:
        json.dump({"argv": manifest["commands"][f"evaluate:{adaptive}"], "wall_s": 300.0}, f)
    (cost,) = costs.stage_costs(manifest, str(root), str(tmp_path))
    assert (cost["stage"], cost["runs"], cost["total_s"]) == ("evaluate", 1, 300.0)
    elsewhere = costs.stages_elsewhere(manifest, str(root), str(tmp_path))
    assert sorted(e["stage"] for e in elsewhere) == sorted(finished)
    assert {(e["env_id"], e["seed"]) for e in elsewhere} == {("Hopper-v5", 19)}
    text = "\n".join(costs.costs_section([cost], elsewhere))
    assert f"Not in the table: 11 stage(s) ran on {records[adaptive]['ran_on']}" in text
    assert "1 attack, 5 evaluate, 4 finetune, 1 pretrain" in text
    (tmp_path / "chains").mkdir()
    chain = {"env_id": "Hopper-v5", "seed": 19, "commit": "abc", "machine": "vm", "stages": 12, "wall_s": 3600.0}
    (tmp_path / "chains" / "Hopper-v5__seed19.json").write_text(json.dumps({**chain, "finished": 0.0}))
    text = "\n".join(costs.chains_section(str(tmp_path), elsewhere))
    assert f"| vm; 11 of its stages on {records[adaptive]['ran_on']} | 12 |" in text
    (tmp_path / "stages_elsewhere.csv").write_text(tables.to_csv(elsewhere))  # a fresh clone reads the committed copy
    again = costs.stages_elsewhere({"namespace": "gone"}, str(root), str(tmp_path))
    assert [{**e, "wall_s": pytest.approx(e["wall_s"], rel=1e-5)} for e in elsewhere] == again
