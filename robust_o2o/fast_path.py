"""The update's fast path (benchmarks/fast_path.py measures it): fused Adam, the CUDA-graph capture, and the flags'
checks. The scripts show what --compile and --cudagraphs do to their update; the mechanics live here."""

from dataclasses import dataclass
from typing import Literal

import torch

from robust_o2o.cli import UserError


@dataclass
class FastPathOptions:
    """The device and fast-path flags this module reads from a training script's Args, declared once:
    td3_bc_offline.py's and td3_adv_finetune.py's Args extend it. The defaults are exact fp32 and run anywhere."""

    cuda: bool = True
    """use CUDA when available"""
    compile: bool = False
    """torch.compile the two halves of the update"""
    cudagraphs: bool = False
    """capture the two halves of the update in CUDA graphs (CUDA only; capturable fused Adam; not with --compile)"""
    matmul_precision: Literal["highest", "high", "medium"] = "highest"
    """torch.set_float32_matmul_precision: highest (fp32), high (TF32 on CUDA), medium (bf16 matmuls: CUDA, CPUs
    with AMX)"""


def adam(params, lr: float, device: torch.device, capturable: bool = False) -> torch.optim.Adam:
    """Adam with the fused kernel (CPU and CUDA): one kernel for all parameters instead of a loop of small ops."""
    return torch.optim.Adam(params, lr=lr, fused=device.type in ("cpu", "cuda"), capturable=capturable)


def set_adam_flags(opt: torch.optim.Adam, device: torch.device, capturable: bool):
    """load_state_dict restores the saved group flags and step placement; set this run's instead."""
    fused = device.type in ("cpu", "cuda")
    for g in opt.param_groups:
        g.update(fused=fused, foreach=None, capturable=capturable)
    for st in opt.state.values():
        if "step" in st:  # fused and capturable Adam keep the step count on the parameters' device
            st["step"] = st["step"].to(device if fused or capturable else "cpu", torch.float32)


class CudaGraph:
    """Run `fn` eagerly (on a side stream) for its first `warmup` calls, which are real updates, then capture it in a
    CUDA graph and replay it: inputs are copied into static tensors; outputs are static tensors, overwritten by the
    next call. `fn` must have static shapes and no host syncs (LeanRL's recipe, without the dependency)."""

    def __init__(self, fn, warmup: int = 2):
        self.fn, self.warmup, self.calls, self.graph = fn, warmup, 0, None

    def __call__(self, *inputs):
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = self.fn(*inputs)
            torch.cuda.current_stream().wait_stream(stream)
            return out
        if self.graph is None:  # capture records the kernels without running them; the replay below runs them
            self.static_inputs = [x.clone() for x in inputs]
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_outputs = self.fn(*self.static_inputs)
        for static, x in zip(self.static_inputs, inputs):
            static.copy_(x)
        self.graph.replay()
        return self.static_outputs


def setup_fast_path(args):
    """Refuse flags that cannot work here, set the fp32 matmul precision, and make a compiled update draw the same
    random numbers as the eager one for the same seed (inductor's fallback_random)."""
    if args.compile and args.cudagraphs:
        raise UserError(
            "--compile with --cudagraphs is not supported: inductor compiles again inside the CUDA-graph "
            "capture and fails there (seen on an H200); use --cudagraphs alone on CUDA"
        )
    if args.cudagraphs and not (args.cuda and torch.cuda.is_available()):
        raise UserError("--cudagraphs needs a CUDA device; drop the flag on this machine (use --compile instead)")
    torch.set_float32_matmul_precision(args.matmul_precision)
    if args.compile:
        import torch._inductor.config as inductor_config  # loads inductor only when compiling

        inductor_config.fallback_random = True
