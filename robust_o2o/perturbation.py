"""How the stages share a perturbation without sharing its code (docs/forking.md). Each stage script declares its own
PERTURBATION: what δ perturbs (the executed action or the observation the policy sees) and how (its apply function
and the model names it takes). The code that plays a policy (the lockstep evaluator, DE's workers, the videos) applies
the perturbation it is handed: the calling script's own, or a fork's that the user names on the command line
(--perturbation-from my_fork.py). A checkpoint and a δ set record which perturbation made them (target, model and a
fingerprint of the apply function's source), so a reader whose perturbation differs refuses in one line."""

import hashlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from robust_o2o.cli import UserError

TARGETS = ("action", "observation")


@dataclass(frozen=True)
class Perturbation:
    target: str  # "action": the env executes apply(a, δ); "observation": the policy sees apply(s, δ)
    models: tuple  # the perturbation_model names that apply accepts
    apply: Callable  # (x [..., n], δ [..., n], low [n], high [n], perturbation_model) -> perturbed x, row-wise

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"a perturbation's target must be one of {TARGETS} (got {self.target!r})")

    @property
    def code(self) -> str:
        """A fingerprint of the apply function's source: verbatim copies share it, an edited copy does not."""
        return hashlib.sha256(inspect.getsource(self.apply).encode()).hexdigest()[:16]

    def width(self, obs_dim: int, act_dim: int) -> int:
        """The number of entries of δ."""
        return act_dim if self.target == "action" else obs_dim

    def seen(self, obs, delta, low, high, model: str):
        """The observation the policy acts on."""
        return self.apply(obs, delta, low, high, model) if self.target == "observation" else obs

    def executed(self, action, delta, low, high, model: str):
        """The action the env executes."""
        return self.apply(action, delta, low, high, model) if self.target == "action" else action

    def record(self, model: str) -> dict:
        """What a checkpoint or a δ set stores about the perturbation that made it."""
        return {"perturbation_target": self.target, "perturbation_model": model, "perturbation_code": self.code}

    def check(self, record: dict, what: str, script: str):
        """Refuse, in one line, a file made under another perturbation than this one. Files written before records
        held a target or a fingerprint were made by this project's action perturbation."""
        target, model = str(record.get("perturbation_target", "action")), str(record.get("perturbation_model"))
        code = record.get("perturbation_code")
        if target == self.target and model in self.models and (code is None or str(code) == self.code):
            return
        raise UserError(
            f"{what} was made under the perturbation ({target}, {model}, code {code}), but {script} applies "
            f"({self.target}, one of {'/'.join(self.models)}, code {self.code}); pass --perturbation-from with the "
            f"script that declares it (the fork that trained the policy)"
        )


def from_script(path: str) -> Perturbation:
    """The PERTURBATION a stage script (a fork) declares, imported from the file the user named. Only a path given on
    the command line is imported: no file a stage reads names code to run."""
    if not os.path.isfile(path):
        raise UserError(f"--perturbation-from {path}: no such file; name the fork's script")
    name = "perturbation_from_" + hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name].PERTURBATION
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise UserError(f"--perturbation-from {path}: importing it failed ({type(e).__name__}: {e})") from None
    perturbation = getattr(module, "PERTURBATION", None)
    if not isinstance(perturbation, Perturbation):
        raise UserError(f"--perturbation-from {path} declares no PERTURBATION = Perturbation(...) (docs/forking.md)")
    sys.modules[name] = module
    return perturbation


def chosen(own: Perturbation, perturbation_from: str | None) -> Perturbation:
    """The calling script's own PERTURBATION, or the one the fork named by --perturbation-from declares."""
    return own if perturbation_from is None else from_script(perturbation_from)
