"""File contracts between stages: the schema tables in docs/file_contracts.md are exactly what the scripts write."""
import re
import subprocess
import sys

import pytest
import torch

import td3_bc_offline as tb
from conftest import ROOT


def documented_checkpoint_keys(name: str = "checkpoint") -> set:
    text = (ROOT / "docs" / "file_contracts.md").read_text()
    table = text.split(f"<!-- {name}-schema:start -->")[1].split(f"<!-- {name}-schema:end -->")[0]
    keys = set()
    for line in table.splitlines()[2:]:
        first_cell = line.split("|")[1]
        keys |= set(re.findall(r"`([a-z_]+)`", first_cell))
    return keys


def test_readme_schema_matches_written_checkpoint(hopper_datasets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tb.main(tb.Args(dataset_id=hopper_datasets["random"], total_steps=4, eval_freq=4, eval_episodes=1, batch_size=8,
                    cuda=False, run_name="schema"))
    ckpt = tb.load_checkpoint("runs/schema/checkpoint.pt")
    assert set(ckpt) == documented_checkpoint_keys() | documented_checkpoint_keys("td3bc-resume")
    assert ckpt["format"] == tb.CHECKPOINT_FORMAT and ckpt["format_version"] == tb.CHECKPOINT_VERSION
    assert ckpt["stage"] == "td3_bc_offline"


def test_benchmark_script_runs_at_tiny_size():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "measure_stages.py"), "--env-id",
                           "InvertedPendulum-v5", "--transitions", "500", "--train-steps", "600", "--updates", "200",
                           "--de-steps", "300"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| TD3+BC updates/s" in proc.stdout and "machine:" in proc.stdout
    assert "DE population evaluation" in proc.stdout


def test_checkpoint_acts_identically_in_every_stage_script(hopper_checkpoint):
    """The Actor is copied into each stage script: a checkpoint written by td3_bc_offline.py must load and give
    bit-identical actions in all of them."""
    import de_perturbations as de
    import td3_adv_finetune as ft
    ckpt = tb.load_checkpoint(hopper_checkpoint)
    obs = (torch.randn(64, ckpt["obs_dim"]) * 3 - ckpt["obs_mean"]) / ckpt["obs_std"]
    reference = tb.actor_from_checkpoint(ckpt)(obs)
    import evaluate_matrix as em
    for module in (de, ft, em):
        other = module.Actor(ckpt["obs_dim"], ckpt["act_dim"], ckpt["action_low"], ckpt["action_high"], ckpt["hidden_dim"])
        other.load_state_dict(module.load_checkpoint(hopper_checkpoint)["actor"])
        assert torch.equal(other(obs), reference), module.__name__


def test_every_script_loads_checkpoints_with_the_one_safe_loader(tmp_path):
    import de_perturbations as de
    import evaluate_matrix as em
    import runtime
    import td3_adv_finetune as ft
    for module in (tb, de, ft, em):
        assert module.load_checkpoint is runtime.load_checkpoint and module.UserError is runtime.UserError
    with pytest.raises(runtime.UserError, match="not found.*td3_bc_offline.py"):
        runtime.load_checkpoint(str(tmp_path / "none.pt"))


def test_readme_perturbation_schema_matches_written_npz(hopper_checkpoint, tmp_path):
    import numpy as np

    import de_perturbations as de
    out = tmp_path / "p.npz"
    de.main(de.Args(checkpoint=hopper_checkpoint, output=str(out), num_perturbations=1, popsize=4, maxiter=1,
                    de_episodes=1, eval_episodes=1, random_draws=2, max_episode_steps=10, num_workers=1))
    text = (ROOT / "docs" / "file_contracts.md").read_text()
    table = text.split("<!-- perturbations-schema:start -->")[1].split("<!-- perturbations-schema:end -->")[0]
    documented = set()
    for line in table.splitlines()[2:]:
        documented |= set(re.findall(r"`([a-z_0-9]+)`", line.split("|")[1]))
    assert set(np.load(out, allow_pickle=False).files) == documented


def test_network_classes_are_identical_copies():
    """Critic and Actor source in the stage scripts is a verbatim copy of td3_bc_offline.py's."""
    import inspect

    import de_perturbations as de
    import td3_adv_finetune as ft
    for cls in ("Actor", "VectorizedLinear", "Critic"):
        for module in (de, ft):
            if hasattr(module, cls):
                assert inspect.getsource(getattr(module, cls)) == inspect.getsource(getattr(tb, cls)), (module.__name__, cls)
    for fn in ("td_target", "soft_update"):
        assert inspect.getsource(getattr(ft, fn)) == inspect.getsource(getattr(tb, fn)), fn
    import collect_dataset as cd
    import runtime  # the plumbing is shared, not copied: every script uses the one module's objects
    for module in (tb, ft, cd):
        assert module.UserError is runtime.UserError and module.rng_state is runtime.rng_state
    for fn in ("perturb_action", "ActionPerturbation"):
        assert inspect.getsource(getattr(ft, fn)) == inspect.getsource(getattr(de, fn)), fn
    # plumbing shared, not copied: the default checkpoint, the dataset reader, the lockstep evaluator, the run folder
    assert ft.default_checkpoint is de.default_checkpoint is runtime.default_checkpoint
    assert ft.dataset_to_transitions is tb.dataset_to_transitions is runtime.dataset_to_transitions
    assert ft.open_run is tb.open_run and ft.Run is tb.Run and ft.first_nonfinite is tb.first_nonfinite
    assert ft.PERTURBATION_MODELS == de.PERTURBATION_MODELS == runtime.PERTURBATION_MODELS  # runtime validates files with it
    import evaluate_matrix as em
    assert de.PERTURBATION_FORMAT is runtime.PERTURBATION_FORMAT  # one file format, one loader, one hash
    assert ft.load_perturbations is em.load_perturbations is runtime.load_perturbations
    assert de.sha256_file is ft.sha256_file is em.sha256_file is runtime.sha256_file and de.save_npz is runtime.save_npz
    assert inspect.getsource(em.Actor) == inspect.getsource(tb.Actor)
    assert inspect.getsource(em.perturb_action) == inspect.getsource(de.perturb_action)
    assert em.rollout_batch is de.rollout_batch is ft.rollout_batch is runtime.rollout_batch


def test_readme_finetune_schema_matches_written_checkpoint(hopper_checkpoint, hopper_perturbations, tmp_path, monkeypatch):
    import td3_adv_finetune as ft
    monkeypatch.chdir(tmp_path)
    ft.main(ft.Args(checkpoint=hopper_checkpoint, total_steps=4, eval_freq=4, eval_episodes=1, batch_size=8, cuda=False,
                    run_name="schema"))
    ckpt = tb.load_checkpoint("runs/schema/checkpoint.pt")
    text = (ROOT / "docs" / "file_contracts.md").read_text()
    table = text.split("<!-- finetune-schema:start -->")[1].split("<!-- finetune-schema:end -->")[0]
    added = set()
    for line in table.splitlines()[2:]:
        added |= set(re.findall(r"`([a-z_0-9]+)`", line.split("|")[1]))
    assert set(ckpt) == documented_checkpoint_keys() | added
    state = torch.load("runs/schema/state.pt", weights_only=True)
    assert set(state) == set(ckpt) | documented_checkpoint_keys("finetune-state")
