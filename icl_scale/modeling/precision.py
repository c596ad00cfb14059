"""The precision of a run: the model in `model.dtype`, the trained key/value projections in float32.

A learning rate of 1e-5 times a gradient moves a weight by far less than bfloat16's resolution
(8 bits of mantissa) — stepped in bfloat16, most updates would round away. So the modules that own
a trained parameter are held in float32 whole: their input is cast up, their output back to the
model's dtype, and their weights, gradients, updates (and the linearized model's δ) are float32.
Under ZeRO-3 with a checkpoint partitioned at load the parameters stay in the model's dtype;
DeepSpeed's optimizer then steps float32 master copies of them and the forward uses their rounding.
Option scores are always computed in float32 (log-softmax of float32 logits).
"""

from __future__ import annotations

import torch

from icl_scale.modeling.params import Trained, partitioned


def _cast_floats(x, dtype):
    if torch.is_tensor(x) and x.is_floating_point():
        return x.to(dtype)
    if isinstance(x, tuple):
        return tuple(_cast_floats(v, dtype) for v in x)
    return x


def _owners(model, trained: list[Trained]) -> list[torch.nn.Module]:
    """The modules that hold a trained parameter directly."""
    ids = {id(t.param) for t in trained}
    return [m for m in model.modules() if any(id(p) in ids for p in m.parameters(recurse=False))]


def keep_trained_fp32(model, trained: list[Trained]) -> dict:
    """Hold the trained parameters' modules in float32 (see the module doc); returns the run's
    precision record: model dtype, trained dtype, the dtype the trained weights are applied in."""
    dtype = next(model.parameters()).dtype
    record = {"model": str(dtype).removeprefix("torch."), "option_scores": "float32"}
    if not trained or dtype == torch.float32:
        return record | ({"trained": "float32", "trained_forward": "float32"} if trained else {})
    if partitioned(model):   # ZeRO-3 at load: DeepSpeed's fp32 master copies
        return record | {"trained": "float32 (DeepSpeed master copies)", "trained_forward": record["model"]}
    for module in _owners(model, trained):
        module.float()   # in place: the Parameter objects (and their gradient-mask hooks) are kept
        module.register_forward_pre_hook(lambda m, args: _cast_floats(args, torch.float32))
        module.register_forward_hook(lambda m, args, out, d=dtype: _cast_floats(out, d), prepend=True)
    return record | {"trained": "float32", "trained_forward": "float32"}
