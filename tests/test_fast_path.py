"""The fast path computes the same updates as the plain eager reference; its flags; the benchmark at a tiny size.

Tolerance: after 8 updates from the same weights and the same random draws, losses and parameters agree to 1e-5
(absolute, on values of order 1). The differences are float32 rounding: one batched matmul vs two, fused vs looped
Adam. The compiled path is held to the same tolerance.
"""

import copy
import re
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_one_line_error, assert_usage_error, run_cli, run_script

sys.path.insert(0, str(ROOT / "benchmarks"))
import fast_path as fp  # noqa: E402

import td3_adv_finetune as ft  # noqa: E402
import td3_bc_offline as tb  # noqa: E402

TOL = 1e-5


def nets(obs_dim=11, act_dim=3, seed=0):
    torch.manual_seed(seed)
    return tb.Actor(obs_dim, act_dim, -np.ones(act_dim), np.ones(act_dim)), tb.Critic(obs_dim, act_dim)


def assert_same_params(ref: fp.ReferenceTD3, actor, critic):
    for p_ref, p in zip(ref.actor.parameters(), actor.net.parameters()):
        torch.testing.assert_close(p_ref, p, atol=TOL, rtol=0)
    for i, c in enumerate(ref.critics):
        for j in (0, 2, 4):
            torch.testing.assert_close(c[j].weight.T, critic.net[j].weight[i], atol=TOL, rtol=0)
            torch.testing.assert_close(c[j].bias, critic.net[j].bias[i, 0], atol=TOL, rtol=0)


def run_both(args: tb.Args, steps: int = 8):
    actor, critic = nets()
    data = fp.synthetic_data(2000, 11, 3)
    ref, ref_step = fp.reference_offline(actor, critic, data, args)
    project, step = fp.project_offline(actor, critic, data, args)
    torch.manual_seed(7)
    ref_logs = [ref_step(i) for i in range(1, steps + 1)]
    torch.manual_seed(7)
    logs = [{k: v.item() for k, v in step(i).items()} for i in range(1, steps + 1)]
    for i, (a, b) in enumerate(zip(ref_logs, logs), 1):
        assert a["critic_loss"] == pytest.approx(b["critic_loss"], abs=TOL), i
        if "actor_loss" in a:
            assert a["actor_loss"] == pytest.approx(b["actor_loss"], abs=TOL), i
    assert_same_params(ref, project[0], project[1])
    assert ref_logs[0]["critic_loss"] != ref_logs[-1]["critic_loss"]  # it did train
    return ref, project


def test_td3_bc_fast_path_matches_the_eager_reference():
    ref, (actor, critic, actor_target, critic_target) = run_both(tb.Args(log_freq=4))
    for p_ref, p in zip(ref.actor_target.parameters(), actor_target.net.parameters()):  # Polyak averaging too
        torch.testing.assert_close(p_ref, p, atol=TOL, rtol=0)


def test_compiled_td3_bc_update_matches_the_eager_reference():
    run_both(tb.Args(compile=True, log_freq=4), steps=6)
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cudagraph_td3_bc_update_matches_eager_on_cuda():
    """One transition and no target noise: every batch is the same whatever the RNG draws (graph replays advance the
    CUDA generator differently from eager calls), so the two paths must agree to float rounding."""
    actor, critic = nets()
    data = fp.synthetic_data(1, 11, 3)
    results = []
    for kw in ({}, {"cudagraphs": True}):
        args = tb.Args(log_freq=4, policy_noise=0.0, **kw)
        (a, c, _, _), step = fp.project_offline(actor, critic, data, args, torch.device("cuda"))
        losses = [step(i)["critic_loss"].item() for i in range(1, 9)]  # 2 eager warm-up calls, capture, 6 replays
        results.append((losses, [p.detach().cpu() for p in [*a.parameters(), *c.parameters()]]))
    for other in results[1:]:
        np.testing.assert_allclose(results[0][0], other[0], atol=1e-4)
        for p, q in zip(results[0][1], other[1]):
            torch.testing.assert_close(p, q, atol=1e-4, rtol=0)


def test_finetune_update_matches_the_eager_td3_reference():
    """td3_adv_finetune's update (no BC term, Q1-only actor loss, actor-only gradients) against plain TD3."""
    actor, critic = nets()
    ref = fp.ReferenceTD3(actor, critic)  # alpha=None: TD3
    args = ft.Args()
    actor, critic = copy.deepcopy(actor), copy.deepcopy(critic)
    actor_target, critic_target = copy.deepcopy(actor), copy.deepcopy(critic)
    dev = torch.device("cpu")
    update_critic, update_actor = ft.make_update(
        actor,
        critic,
        actor_target,
        critic_target,
        ft.adam(actor.parameters(), 3e-4, dev),
        ft.adam(critic.parameters(), 3e-4, dev),
        args,
    )
    data = fp.synthetic_data(1000, 11, 3)
    for i in range(1, 9):
        batch = [
            data[k][torch.arange(i * 50, i * 50 + 256) % 1000]
            for k in ("obs", "actions", "rewards", "next_obs", "terminations")
        ]
        torch.manual_seed(i)
        log = ref.update(i, *batch)
        torch.manual_seed(i)
        critic_loss, _ = update_critic(*batch)
        assert log["critic_loss"] == pytest.approx(critic_loss.item(), abs=TOL)
        if i % 2 == 0:
            assert log["actor_loss"] == pytest.approx(update_actor(batch[0]).item(), abs=TOL)
    assert_same_params(ref, actor, critic)


def test_critic_q1_is_the_first_of_the_twin_heads():
    _, critic = nets()
    obs, act = torch.randn(5, 11), torch.randn(5, 3)
    torch.testing.assert_close(critic.q1(obs, act), critic(obs, act)[0])


def test_adam_flags_survive_loading_a_state_dict():
    actor, _ = nets()
    opt = torch.optim.Adam(actor.parameters(), lr=1e-3)  # what an older checkpoint holds: unfused
    actor(torch.randn(4, 11)).sum().backward()
    opt.step()
    fused = tb.adam(actor.parameters(), 1e-3, torch.device("cpu"))
    tb.load_module_states({"actor_optimizer": fused}, {"actor_optimizer": opt.state_dict()}, torch.device("cpu"))
    assert all(g["fused"] for g in fused.param_groups)  # the loader sets this run's flags again
    fused.step()  # the fused kernel accepts the loaded state


def test_fast_path_flags_are_checked(tmp_path):
    """In-process, through the scripts' entry point."""
    args = ["--dataset-id", "local/none/none-v0", "--total-steps", "1"]
    if not torch.cuda.is_available():
        assert_one_line_error(run_cli("td3_bc_offline.py", *args, "--cudagraphs", cwd=tmp_path), "--cudagraphs", "CUDA")
    assert_one_line_error(
        run_cli("td3_bc_offline.py", *args, "--compile", "--cudagraphs", cwd=tmp_path),
        "--compile",
        "--cudagraphs alone",
    )
    assert_one_line_error(
        run_cli("td3_adv_finetune.py", "--compile", "--cudagraphs", cwd=tmp_path), "--compile", "--cudagraphs alone"
    )
    assert_usage_error(
        run_cli("td3_bc_offline.py", *args, "--matmul-precision", "fp8", cwd=tmp_path), "--matmul-precision"
    )
    assert_usage_error(run_cli("td3_adv_finetune.py", "--matmul-precision", "fp8", cwd=tmp_path), "--matmul-precision")
    assert not (tmp_path / "runs").exists()


def test_fast_path_benchmark_runs_at_tiny_size():
    proc = run_script(
        "benchmarks/fast_path.py",
        "--updates",
        "20",
        "--finetune-steps",
        "300",
        "--learning-starts",
        "100",
        "--de-steps",
        "300",
        "--no-extra",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ") and "×" in ln]
    assert "machine:" in proc.stdout
    # 2 TD3+BC rows on CPU (+4 on CUDA: reference and 3 variants), 2 fine-tuning (+1 on CUDA: CUDA graphs), 3 DE rows
    assert len(rows) == 7 + 5 * torch.cuda.is_available(), proc.stdout
    for row in rows:
        assert float(row.split("|")[2].replace(",", "")) > 0 and row.rstrip(" |").endswith("×")


def test_fast_path_profile_reports_the_gemm_share():
    proc = run_script("benchmarks/fast_path.py", "--profile", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("fast path, exact fp32")][0]
    total, gemm, share = (
        float(x) for x in re.findall(r"([0-9.]+) ms per update.* GEMMs ([0-9.]+) ms \(([0-9]+)%\)", line)[0]
    )
    assert 0 < gemm < total and abs(share - 100 * gemm / total) <= 1, line  # the share is the printed times' ratio
    assert float(re.findall(r"runs at ([0-9.]+) GFLOP/s", line)[0]) > 0
