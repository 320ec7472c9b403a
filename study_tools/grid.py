"""The study's grid: the scales' budgets, and the expansion of envs × seeds × conditions × curricula (plus the
offline-only and from-scratch baselines) into the stage commands of the four stage scripts, as a DAG."""

import os
from dataclasses import dataclass, field

# Stage budgets per scale. medium: a behaviour policy at D4RL's medium level (a third of the expert reference) and
# budgets under which the fine-tuned and offline-only policies differ, sized for a 5-seed Hopper study in one sitting
# on 2 CPU cores (docs/study.md, "What the medium scale costs").
SCALES = {
    "tiny": dict(
        namespace="local-tiny",
        collect="--levels medium --num-transitions 1000 --max-train-steps 1500 --learning-starts 500".split()
        + "--batch-size 64 --eval-freq 500 --eval-episodes 2 --ref-episodes 3".split()
        + "--medium-target-return 50 --max-episode-steps 100".split(),
        pretrain="--total-steps 200 --eval-freq 100 --eval-episodes 2 --batch-size 64".split(),
        de="--num-perturbations 1 --popsize 4 --maxiter 2 --de-episodes 2 --eval-episodes 2 --random-draws 2".split(),
        finetune="--total-steps 300 --eval-freq 150 --eval-episodes 2 --batch-size 64".split(),
        scratch_starts=100,
        evaluate="--eval-episodes 2".split(),
    ),
    "small": dict(  # a weak "medium" (return ~200 where D4RL's Hopper medium is ~1400): exercises every stage
        namespace="local-quick",
        collect="--levels random medium --num-transitions 50000 --max-train-steps 40000 --learning-starts 5000".split()
        + "--eval-freq 5000 --eval-episodes 5 --ref-episodes 20 --medium-target-return 200".split(),
        pretrain="--total-steps 10000 --eval-freq 2500 --eval-episodes 5".split(),
        de="--num-perturbations 3 --maxiter 10".split(),
        finetune="--total-steps 20000 --eval-freq 5000 --eval-episodes 5".split(),
        scratch_starts=5000,
        evaluate="--eval-episodes 10".split(),
    ),
    "medium": dict(  # sized so that 5 Hopper seeds finish in one sitting (~2 hours) on 2 cores after the dataset
        namespace="local-medium",
        collect="--levels medium --num-transitions 200000 --max-train-steps 400000 --strict-targets".split(),
        pretrain="--total-steps 20000 --eval-freq 5000 --eval-episodes 10".split(),
        de="--num-perturbations 3 --maxiter 10".split(),
        finetune="--total-steps 30000 --eval-freq 5000 --eval-episodes 10".split(),
        scratch_starts=10000,
        evaluate=[],
    ),
    "decisive": dict(  # the 100k study's budgets (docs/protocol.md §4): TD3+BC past its plateau, 100k fine-tuning
        namespace="local-medium",  # steps, the final matrix at its defaults (30 episodes, fresh attacks with every
        tag="decisive",  # setting of the precomputed one); the medium dataset, its own runs
        collect="--levels medium --num-transitions 200000 --max-train-steps 400000 --strict-targets".split(),
        pretrain="--total-steps 50000 --eval-freq 5000 --eval-episodes 10".split(),
        de="--de-episodes 2".split(),  # K, popsize and generations at their defaults; episodes cut for cost (§6)
        finetune="--total-steps 100000 --eval-freq 5000 --eval-episodes 10".split(),
        scratch_starts=10000,
        evaluate=[],
    ),
    "decisive2": dict(  # part 2's budgets (docs/protocol-part2.md): decisive's, plus the policies of the last 4
        namespace="local-medium",  # evaluations kept and evaluated on held-out episodes (averaged endpoints); no
        tag="decisive2",  # fresh attack where no endpoint reads it (scratch: claim 2 reads its learning curve)
        collect="--levels medium --num-transitions 200000 --max-train-steps 400000 --strict-targets".split(),
        pretrain="--total-steps 50000 --eval-freq 5000 --eval-episodes 10".split(),
        de="--de-episodes 2".split(),
        finetune="--total-steps 100000 --eval-freq 5000 --eval-episodes 10 --keep-checkpoints 4".split(),
        scratch_starts=10000,
        evaluate="--kept-episodes 10".split(),
        scratch_evaluate=["--no-fresh-attack"],
    ),
    "paper": dict(
        namespace="local",
        collect=[],
        pretrain="--total-steps 5000000".split(),
        de=[],
        finetune="--total-steps 1000000".split(),
        scratch_starts=25000,
        evaluate=[],
    ),
}


@dataclass
class Stage:
    id: str
    kind: str  # dataset, pretrain, attack, finetune, evaluate
    script: str
    argv: list
    deps: list
    env_id: str
    seed: int | None = None
    resume_file: str | None = None  # exists -> the stage continues with --resume
    fresh: list = field(default_factory=list)  # flags for a fresh start
    done_file: str | None = None  # for a dataset: exists (and resume_file does not) -> finished outside the study
    gpu: bool = False
    policy: dict | None = None  # evaluate stages: what the report needs to know of the policy
    ns: str = ""  # the scale's Minari namespace: markers and logs live in runs/_study/{ns}/


def env_short(env_id: str) -> str:
    return env_id.split("-")[0].lower()


def namespace(args) -> str:
    """The scale's Minari namespace; a behaviour seed other than 1 gets its own datasets (suffix -b{seed})."""
    ns = SCALES[args.scale]["namespace"]
    return ns if args.behaviour_seed == 1 else f"{ns}-b{args.behaviour_seed}"


def run_tag(args) -> str:
    """What names the study's runs and markers: the dataset namespace, plus the scale's tag where two scales share
    one dataset (decisive reuses medium's) so that their runs never collide."""
    tag = SCALES[args.scale].get("tag")
    return namespace(args) + (f"-{tag}" if tag else "")


def build_stages(args, store: str) -> list:
    """The DAG in an order that finishes one (env, seed) chain before the next where the CPUs allow."""
    sc, ns, tag = SCALES[args.scale], namespace(args), run_tag(args)
    gpu = ["--cuda"] if args.cuda else ["--no-cuda"]
    track = ["--track"] if args.track else []
    workers = ["--num-workers", str(args.cpus_per_task)]
    stages = []
    for env_id in args.env_ids:
        dataset = f"{ns}/{env_short(env_id)}/medium-v0"
        ds = Stage(
            f"dataset:{env_id}",
            "dataset",
            "collect_dataset.py",
            ["--env-id", env_id, "--namespace", ns, "--seed", str(args.behaviour_seed), *sc["collect"], *gpu],
            [],
            env_id,
            resume_file=f"runs/collect_dataset__{ns}-{env_short(env_id)}-v0/state.pt",
            fresh=["--overwrite"],
            done_file=os.path.join(store, dataset),
        )
        stages.append(ds)
        for seed in args.seeds:
            run = f"runs/{tag}-{env_short(env_id)}-medium-v0__td3_bc_offline__{seed}"
            ckpt, npz = f"{run}/checkpoint.pt", f"{run}/perturbations.npz"
            pre = Stage(
                f"pretrain:{env_id}:{seed}",
                "pretrain",
                "td3_bc_offline.py",
                ["--dataset-id", dataset, "--seed", str(seed), "--run-name", run[5:], *sc["pretrain"], *gpu, *track],
                [ds.id],
                env_id,
                seed,
                resume_file=ckpt,
                fresh=["--overwrite"],
                gpu=args.cuda,
            )
            att = Stage(
                f"attack:{env_id}:{seed}",
                "attack",
                "de_perturbations.py",
                [
                    "--checkpoint",
                    ckpt,
                    "--output",
                    npz,
                    "--epsilon",
                    str(args.epsilon),
                    "--seed",
                    str(seed),
                    *sc["de"],
                    *workers,
                    *track,
                ],
                [pre.id],
                env_id,
                seed,
                resume_file=npz + ".state.npz",
                fresh=["--overwrite"] if args.overwrite else [],  # else an existing set is refused, never replaced
            )
            stages += [pre, att]
            policies = [(pre, run, {"init": "offline", "finetune_condition": "", "curriculum": ""})]
            specs = [("offline", c, "fixed") for c in args.finetune_conditions]
            specs += [
                ("offline", "adversarial", c) for c in args.curricula if ("offline", "adversarial", c) not in specs
            ]
            if args.scratch:
                specs.append(("scratch", "adversarial", "adaptive"))
            for init, cond, curr in specs:
                name = f"{tag}-{env_id}__td3_adv_finetune__{init}-{cond}-{curr}__{seed}"
                extra = ["--learning-starts", str(sc["scratch_starts"])] if init == "scratch" else []
                extra += ["--q", str(args.q)] if curr == "fixed" else []
                ft = Stage(
                    f"finetune:{env_id}:{seed}:{init}-{cond}-{curr}",
                    "finetune",
                    "td3_adv_finetune.py",
                    [
                        "--checkpoint",
                        ckpt,
                        "--perturbations",
                        npz,
                        "--seed",
                        str(seed),
                        "--run-name",
                        name,
                        "--init",
                        init,
                        "--finetune-condition",
                        cond,
                        "--curriculum",
                        curr,
                        *sc["finetune"],
                        *extra,
                        *gpu,
                        *track,
                    ],
                    [att.id],
                    env_id,
                    seed,
                    resume_file=f"runs/{name}/state.pt",
                    fresh=["--overwrite"],
                    gpu=args.cuda,
                )
                stages.append(ft)
                policies.append((ft, f"runs/{name}", {"init": init, "finetune_condition": cond, "curriculum": curr}))
            for st, run_dir, info in policies:
                out = f"runs/{tag}-study-eval/{os.path.basename(run_dir)}"
                stages.append(
                    Stage(
                        f"evaluate:{st.id}",
                        "evaluate",
                        "evaluate_matrix.py",
                        [
                            "--checkpoints",
                            f"{run_dir}/checkpoint.pt",
                            "--output-dir",
                            out,
                            *sc["evaluate"],
                            *(sc.get("scratch_evaluate", []) if info["init"] == "scratch" else []),
                            *workers,
                        ],
                        [st.id, att.id],
                        env_id,
                        seed,
                        policy={
                            "env_id": env_id,
                            "seed": seed,
                            "run_dir": run_dir,
                            "stage": st.kind,
                            "matrix": f"{out}/matrix.csv",
                            **info,
                        },
                    )
                )
    for s in stages:
        s.ns = tag
    return stages
