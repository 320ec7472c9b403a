"""Shared plumbing of the stage scripts, one module per concern (each stage imports a few names from each):

- cli: the entry point and the errors a user can fix
- files: atomic writes
- formats: the checkpoint and perturbations files, checked on load
- runs: the run folder, its lock, logs, seeding and resume point
- resume: the generator, env, network and optimizer states a resume restores
- fast_path: fused Adam and CUDA-graph capture
- replay: a replay ring on the training device that saves and restores itself
- datasets: Minari datasets, written and read as flat transitions
- evaluation: the method's evaluation protocol (score scale, returns under the perturbation conditions)
- video and plots: --capture-video and the figures

Each stage script holds its own networks, perturbation model, losses and loop, readable top to bottom.
"""
