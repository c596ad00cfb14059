"""The one config tree: frozen dataclasses with a help string per field.

A YAML file gives any subset of the tree; `--section.field value` options override it; every leaf
is an option of `icl-scale run --help`. The resolved config is saved in the run dir and hashed; the
hash (over the fields that change results) goes into every output file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from icl_scale.errors import UserError
from icl_scale.settings import CLIP_MODES, SETTINGS, VARIANTS
from icl_scale.tasks.spec import TASKS

ALL_TASKS = tuple(TASKS)   # a new TaskSpec in tasks/spec.py is a new choice here


def knob(default, help: str, result: bool = True, choices: tuple | None = None, parse: str | None = None, **kw):
    """A config field; `result=False` marks fields that cannot change any output value; `parse`
    names a function of _PARSERS that turns its value into a canonical one."""
    meta = {"help": help, "result": result, "choices": choices, "parse": parse}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass(frozen=True)
class ModelConfig:
    name: str = knob("smollm2-135m", "model: an offline alias (smollm2-135m), a tiny test "
                     "model (tiny-gpt2, tiny-llama), a Hugging Face hub id, or a local model dir")
    attn: str = knob("sdpa", "attention kernel under the capture wrapper", choices=("sdpa", "eager"))
    dtype: str = knob("float32", "parameter dtype", choices=("float32", "bfloat16", "float16"))
    max_length: int = knob(2048, "max prompt length in tokens (capped by the model's own maximum)")
    cache_dir: str = knob("~/.cache/icl_scale", "where converted offline models are kept", result=False)
    untrained: bool = knob(False, "untrained-model control: attention and MLP weights re-initialised with each "
                           "run seed (one random network per seed), "
                           "embeddings and norms kept")


@dataclass(frozen=True)
class DataConfig:
    tasks: tuple[str, ...] = knob(ALL_TASKS, "tasks to run, comma-separated", choices=ALL_TASKS)
    source: str = knob("offline", "default data source for every task: offline (packages and data_dir), "
                       "hub (Hugging Face hub ids), files (files_dir/<task>/<split>.jsonl|csv|parquet)",
                       choices=("offline", "hub", "files"))
    task_sources: tuple[str, ...] = knob((), "per-task source overrides, e.g. cb=files,sst2=hub")
    data_dir: str = knob("../shared/data", "dir with cb/{train,val}.jsonl and sst2/stsa.binary.dev "
                         "(offline source)")
    files_dir: str = knob("data", "dir with <task>/<split>.{jsonl,csv,parquet} (files source)")
    k: int = knob(32, "demonstrations drawn per (task, seed) before the greedy fit to max_length")
    eval_max: int = knob(2000, "eval examples per task (at most the task's eval size, 2000 for the largest)")
    seeds: tuple[int, ...] = knob((1,), "run seeds (demonstration draw), comma-separated")
    task_seeds: str = knob("", "per-task seeds over data.seeds, e.g. 'sst2=2,3,4;cb=3,4,5' (a YAML mapping "
                           "task: [seeds] works too)", parse="task_seeds")
    orders: int = knob(1, "demonstration orders per seed: ICL and FT also run on orders − 1 seeded permutations of "
                       "the same demonstrations (the same permutation for both); the report gives the spread over "
                       "orders beside the spread over draws")
    label_noise: float = knob(0.0, "label switching: fraction of the demonstrations whose label is corrupted "
                              "(the same corrupted set for ICL and FT)")
    label_noise_mode: str = knob("flip", "flip: label y becomes (y+1) mod n_labels; permute: the chosen "
                                 "demonstrations' labels are shuffled among themselves", choices=("flip", "permute"))


@dataclass(frozen=True)
class EvalConfig:
    methods: tuple[str, ...] = knob(("zsl", "icl"), "settings: zsl, icl, and the finetuned model evaluated "
                                    "zero-shot after standard (ft), layer-causal (ft_lc), layer-causal with its own "
                                    "clipping (ft_lc_clip: finetune.lc_clip) or linearized (ft_lin) FT",
                                    choices=SETTINGS)   # the live registry: an entry added there is a choice
    record_position: str = knob("prediction", "where activations are recorded: the position that "
                                "predicts the answer, or the first answer token (the reference's choice)",
                                choices=("prediction", "answer"))
    capture: bool = knob(True, "record per-layer attention outputs and pre-softmax scores")
    learners: bool = knob(False, "learner baselines: kNN and logistic regression trained on the demonstrations' frozen "
                          "sentence representations; the report gives how often ICL agrees with each, beside FT")
    calibration: str = knob("none", "calibrated scoring reported beside the plain one: the mean option distribution "
                            "of content-free inputs scored after the same prefix is divided out; contextual: 'N/A', "
                            "'', '[MASK]' (Zhao et al. 2021); domain: random words of the demonstrations (Fei et al. "
                            "2023)", choices=("none", "contextual", "domain"))
    batch_size: int = knob(1, "queries per forward after the cached prefix (left-padded, one shared copy of the "
                           "prefix); 0: automatic, found once per scoring pass (the fastest per query that fits, "
                           "recorded in the shard manifests). 1 makes every record bit-identical whatever the world "
                           "size; larger batches agree to float rounding", result=False)
    max_batch: int = knob(64, "the largest batch the automatic batch size tries", result=False)


@dataclass(frozen=True)
class FinetuneConfig:
    train: str = knob("kv", "trained parameters: attention key/value projections (the study), all attention "
                      "projections, or everything", choices=("kv", "attn", "all"))
    optimizer: str = knob("sgd", "plain SGD (the study) or AdamW, both without weight decay", choices=("sgd", "adamw"))
    lrs: tuple[str, ...] = knob((), "per-task learning-rate overrides, e.g. sst2=1e-3,cb=0.05 (default: the "
                                "reference's per-task rates)")
    demos: str = knob("icl", "train on the demonstrations the ICL prompt fitted (icl) or on all k drawn (all)",
                      choices=("icl", "all"))
    clip: str = knob("none", "gradient clipping of the trained parameters",
                     choices=CLIP_MODES)
    clip_value: float = knob(1.0, "clipping threshold (an L2 norm, or the largest |element| for elem_clamp and "
                             "linf_rescale)")
    lc_clip: str = knob("layer_l2", "clipping of the ft_lc_clip setting: global_l2 (the whole gradient's L2 norm), "
                        "layer_l2 (each layer's L2 norm: the revisited paper's run), elem_clamp (each element to "
                        "[-v, v]), linf_rescale (the whole gradient scaled so its largest element is v: the paper "
                        "text's 'L-infinity')", choices=CLIP_MODES[1:])
    lc_clip_value: float = knob(12.0, "clipping threshold of the ft_lc_clip setting")
    lr_search: bool = knob(False, "select each task's learning rate on a dev split held out of train: the "
                           "standard-FT model of every grid point (and every seed) scored zero-shot on it; the best "
                           "mean accuracy wins, ties the smaller rate")
    lr_grid: tuple[float, ...] = knob((0.01, 0.03, 0.1, 0.3, 1.0, 3.0), "learning-rate search grid, as multiples "
                                      "of the task's rate (finetune.lrs or the reference's)")
    lr_dev_size: int = knob(64, "dev examples of the learning-rate search per task (out of train, never an eval "
                            "example nor any seed's demonstration)")
    lr_select: str = knob("task", "task: the standard-FT search picks one rate for every FT setting of the task "
                          "(as in the papers); setting: each FT setting searches with its own loss",
                          choices=("task", "setting"))
    deepspeed: str = knob("", "DeepSpeed JSON (ds_configs/zero2.json, zero2_offload.json, zero3_offload.json) to "
                          "run finetuning under a ZeRO engine; empty: plain PyTorch on every rank")


@dataclass(frozen=True)
class OutputConfig:
    run_dir: str = knob("runs/default", "run directory (config, shards, logs)", result=False)
    report_dir: str = knob("reports", "where <run>.md is written", result=False)
    shard_mb: float = knob(16.0, "flush a shard once its records reach this many MiB", result=False)
    record_dtype: str = knob("float32", "dtype of the recorded attention outputs and scores: float32, or float16 "
                             "(half the shard size, but it rounds away FT updates below ~1e-3 of ‖h‖)",
                             choices=("float32", "float16"))
    save_ft_weights: bool = knob(False, "save the trained parameters after each finetuning job (δ for linearized "
                                 "FT) to ft/<task>/<setting>/seed<s>.safetensors", result=False)
    trackers: tuple[str, ...] = knob((), "experiment trackers fed through accelerate's tracking API: tensorboard "
                                     "(<run_dir>/trackers/rank<r>/), wandb (where installed); FT loss and per-layer "
                                     "gradient norms per step, per-job accuracy and similarity figures, the config",
                                     result=False, choices=("tensorboard", "wandb"))


@dataclass(frozen=True)
class SuiteConfig:
    variants: tuple[str, ...] = knob(("base",), "variants of `icl-scale suite`, each a run of its own in "
                                     "<run_dir>/<variant>: base, label_switch (data.label_noise set to "
                                     "suite.label_switch), untrained (model.untrained)", result=False,
                                     choices=tuple(VARIANTS))
    label_switch: float = knob(0.5, "fraction of demonstrations the label_switch variant corrupts", result=False)


@dataclass(frozen=True)
class SweepConfig:
    models: tuple[str, ...] = knob((), "models of `icl-scale sweep`, each as model.name takes it (empty: model.name); "
                                   "'name=ds_configs/x.json' finetunes that model under its own DeepSpeed config",
                                   result=False)
    k: tuple[int, ...] = knob((), "demonstrations drawn (data.k) of `icl-scale sweep` (empty: data.k)", result=False)


@dataclass(frozen=True)
class ReportConfig:
    exclude_diverged: bool = knob(False, "leave FT runs flagged diverged (last loss above the first, or non-finite) "
                                  "out of every mean and average; they stay flagged in the tables", result=False)
    example_rows: int = knob(50, "rows of each task's page of the per-example view (examples/<task>.md); "
                             "examples.csv holds every example", result=False)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    suite: SuiteConfig = field(default_factory=SuiteConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


_SECTION_TYPES = {"model": ModelConfig, "data": DataConfig, "eval": EvalConfig, "finetune": FinetuneConfig,
                  "output": OutputConfig, "suite": SuiteConfig, "sweep": SweepConfig, "report": ReportConfig}
PRESETS = Path(__file__).parent / "presets"


def leaves():
    """Yield (dotted name, field, base type) for every knob of the tree."""
    for section, cls in _SECTION_TYPES.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield f"{section}.{f.name}", f, hints[f.name]


def _parse_task_seeds(name: str, value) -> str:
    """'sst2=2,3,4;cb=3' or {sst2: [2, 3, 4], cb: 3} → the canonical 'sst2=2,3,4;cb=3'."""
    if isinstance(value, dict):
        items = [(str(t), v if isinstance(v, (list, tuple)) else [v]) for t, v in value.items()]
    elif isinstance(value, str):
        items = []
        for part in filter(None, (p.strip() for p in value.split(";"))):
            task, eq, seeds = part.partition("=")
            if not eq:
                raise UserError(f"config field {name}: {part!r} is not <task>=<seed>,<seed>,...")
            items.append((task.strip(), [x.strip() for x in seeds.split(",") if x.strip()]))
    else:
        raise UserError(f"config field {name}: {value!r} is not 'task=seeds;...' nor a mapping")
    out = []
    for task, seeds in items:
        if task not in ALL_TASKS:
            raise UserError(f"config field {name}: unknown task {task!r} (known: {', '.join(ALL_TASKS)})")
        try:
            ints = [int(s) for s in seeds if not isinstance(s, bool) and float(s) == int(s)]
        except (TypeError, ValueError):
            ints = []
        if not seeds or len(ints) != len(seeds) or min(ints) < 0 or len(set(ints)) != len(ints):
            raise UserError(f"config field {name}: task {task}: {seeds!r} is not a list of distinct seeds >= 0")
        out.append(f"{task}={','.join(map(str, ints))}")
    return ";".join(out)


_PARSERS = {"task_seeds": _parse_task_seeds}


def _coerce(name: str, value, typ, choices, parse: str | None = None):
    """Turn a YAML or command-line value into the field's type, or raise a UserError naming the field."""
    if parse:
        return _PARSERS[parse](name, value)
    origin = typing.get_origin(typ)
    try:
        if origin is tuple:
            (item,) = {a for a in typing.get_args(typ) if a is not Ellipsis}
            items = value.split(",") if isinstance(value, str) else list(value)
            out = tuple(_coerce(name, v.strip() if isinstance(v, str) else v, item, choices)
                        for v in items if v != "")
            return out
        if typ is bool:
            if isinstance(value, bool):
                return value
            low = str(value).lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ in (int, float) and isinstance(value, bool):
            raise ValueError
        out = typ(value)
        if typ is int and isinstance(value, float) and out != value:
            raise ValueError
        if typ is float and not math.isfinite(out):   # nan and inf: never a threshold, rate or size
            raise UserError(f"config field {name}: {value!r} is not a finite number")
    except (ValueError, TypeError):
        raise UserError(f"config field {name}: {value!r} is not a valid {getattr(typ, '__name__', typ)}") from None
    if choices and out not in choices:
        raise UserError(f"config field {name}: {out!r} is not one of {', '.join(map(str, choices))}")
    return out


def build(file_values: dict | None = None, overrides: dict | None = None, source: str = "config") -> RunConfig:
    """Resolve defaults <- YAML values <- overrides, type-check and validate."""
    values: dict[str, dict] = {s: {} for s in _SECTION_TYPES}
    for section, body in (file_values or {}).items():
        if section not in _SECTION_TYPES:
            raise UserError(f"{source}: unknown section {section!r} (known: {', '.join(_SECTION_TYPES)})")
        if not isinstance(body, dict):
            raise UserError(f"{source}: section {section!r} must be a mapping")
        values[section].update(body)
    for dotted, v in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        values.setdefault(section, {})[key] = v
    known = {name: (f, typ) for name, f, typ in leaves()}
    parts = {}
    for section, cls in _SECTION_TYPES.items():
        kwargs = {}
        for key, v in values[section].items():
            name = f"{section}.{key}"
            if name not in known:
                raise UserError(f"{source}: unknown field {name}")
            f, typ = known[name]
            kwargs[key] = _coerce(name, v, typ, f.metadata["choices"], f.metadata["parse"])
        parts[section] = cls(**kwargs)
    cfg = RunConfig(**parts)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    d = cfg.data
    if not d.tasks:
        raise UserError("config field data.tasks: no task given")
    if d.k < 0:
        raise UserError(f"config field data.k: {d.k} must be >= 0")
    if d.eval_max < 1:
        raise UserError(f"config field data.eval_max: {d.eval_max} must be >= 1")
    if not 0.0 <= d.label_noise <= 1.0:
        raise UserError(f"config field data.label_noise: {d.label_noise} must be in [0, 1]")
    if not d.seeds:
        raise UserError("config field data.seeds: no seed given")
    if min(d.seeds) < 0:
        raise UserError(f"config field data.seeds: {min(d.seeds)} must be >= 0")
    if len(set(d.seeds)) != len(d.seeds):
        raise UserError(f"config field data.seeds: repeated seed in {d.seeds}")
    for item in d.task_sources:
        task, _, src = item.partition("=")
        if task not in ALL_TASKS or src not in ("offline", "hub", "files"):
            raise UserError(f"config field data.task_sources: {item!r} is not <task>=<offline|hub|files>")
    if cfg.model.max_length < 8:
        raise UserError(f"config field model.max_length: {cfg.model.max_length} is too small")
    if cfg.eval.batch_size < 0:
        raise UserError(f"config field eval.batch_size: {cfg.eval.batch_size} must be >= 1, or 0 (automatic)")
    if cfg.eval.max_batch < 1:
        raise UserError(f"config field eval.max_batch: {cfg.eval.max_batch} must be >= 1")
    if not cfg.eval.methods:
        raise UserError("config field eval.methods: no method given")
    if cfg.data.orders < 1:
        raise UserError(f"config field data.orders: {cfg.data.orders} must be >= 1")
    if cfg.report.example_rows < 0:
        raise UserError(f"config field report.example_rows: {cfg.report.example_rows} must be >= 0")
    if any(k < 1 for k in cfg.sweep.k) or len(set(cfg.sweep.k)) != len(cfg.sweep.k):
        raise UserError(f"config field sweep.k: {cfg.sweep.k} must be distinct values >= 1")
    engines = {m.partition("=")[2] or cfg.finetune.deepspeed for m in cfg.sweep.models} - {""}
    if len(engines) > 1:
        raise UserError(f"config field sweep.models: DeepSpeed configs {', '.join(sorted(engines))}: one per launch "
                        "(accelerate makes one engine configuration per process); sweep them in separate launches")
    for item in cfg.finetune.lrs:
        task, _, value = item.partition("=")
        try:
            ok = task in ALL_TASKS and math.isfinite(float(value)) and float(value) > 0
        except ValueError:
            ok = False
        if not ok:
            raise UserError(f"config field finetune.lrs: {item!r} is not <task>=<finite learning rate > 0>")
    f = cfg.finetune
    if not f.lr_grid:
        raise UserError("config field finetune.lr_grid: no learning-rate multiple given")
    for m in f.lr_grid:
        if not (0 < m < float("inf")):
            raise UserError(f"config field finetune.lr_grid: {m} must be a finite multiple > 0")
    if len(set(f.lr_grid)) != len(f.lr_grid):
        raise UserError(f"config field finetune.lr_grid: repeated multiple in {f.lr_grid}")
    if f.lr_dev_size < 1:
        raise UserError(f"config field finetune.lr_dev_size: {f.lr_dev_size} must be >= 1")
    if cfg.finetune.clip_value <= 0:
        raise UserError(f"config field finetune.clip_value: {cfg.finetune.clip_value} must be > 0")
    if not 0.0 < cfg.suite.label_switch <= 1.0:
        raise UserError(f"config field suite.label_switch: {cfg.suite.label_switch} must be in (0, 1]")
    if not cfg.suite.variants:
        raise UserError("config field suite.variants: no variant given")
    if cfg.finetune.lc_clip_value <= 0:
        raise UserError(f"config field finetune.lc_clip_value: {cfg.finetune.lc_clip_value} must be > 0")
    if cfg.output.shard_mb <= 0:
        raise UserError(f"config field output.shard_mb: {cfg.output.shard_mb} must be > 0")


def source_for(cfg: RunConfig, task: str) -> str:
    for item in cfg.data.task_sources:
        name, _, src = item.partition("=")
        if name == task:
            return src
    return cfg.data.source


def seeds_for(cfg: RunConfig, task: str) -> tuple[int, ...]:
    """The task's seeds: data.task_seeds where it names the task, else data.seeds."""
    for item in filter(None, cfg.data.task_seeds.split(";")):
        name, _, seeds = item.partition("=")
        if name == task:
            return tuple(int(s) for s in seeds.split(","))
    return cfg.data.seeds


def describe_seeds(cfg: RunConfig) -> str:
    """'1, 2, 3', or per task where data.task_seeds sets them: 'sst2 2, 3, 4; cb 3, 4, 5'."""
    per_task = {t: seeds_for(cfg, t) for t in cfg.data.tasks}
    if len(set(per_task.values())) == 1:
        return ", ".join(map(str, next(iter(per_task.values()))))
    return "; ".join(f"{t} {', '.join(map(str, s))}" for t, s in per_task.items())


def lr_for(cfg: RunConfig, task: str, default: float) -> float:
    for item in cfg.finetune.lrs:
        name, _, value = item.partition("=")
        if name == task:
            return float(value)
    return default


def _read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{what} {path}: not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{what} {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UserError(f"{what} {path}: top level must be a mapping of sections")
    return values


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load(path: str | None, overrides: dict | None = None, preset: str | None = None) -> RunConfig:
    """defaults ← preset (icl_scale/presets/<name>.yaml) ← config file ← --section.field overrides."""
    values: dict = {}
    if preset:
        if preset not in presets():
            raise UserError(f"option --preset: {preset!r} is not one of {', '.join(presets())}")
        values = _read_yaml(PRESETS / f"{preset}.yaml", "preset")
    if path:
        for section, body in _read_yaml(Path(path), "config file").items():
            if isinstance(body, dict) and isinstance(values.get(section), dict):
                values[section] = values[section] | body
            else:
                values[section] = body
    return build(values, overrides, source=str(path or (f"preset {preset}" if preset else "config")))


def to_dict(cfg: RunConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def result_dict(cfg: RunConfig) -> dict:
    """The fields that can change any output value; the config hash covers exactly these."""
    full = to_dict(cfg)
    out: dict = {}
    for name, f, _ in leaves():
        if f.metadata["result"]:
            section, key = name.split(".")
            out.setdefault(section, {})[key] = full[section][key]
    return out


def config_hash(cfg: RunConfig) -> str:
    return hash_of(result_dict(cfg))


def hash_of(result_fields: dict) -> str:
    """The config hash of a result dict (`result_dict`)."""
    return hashlib.sha256(json.dumps(result_fields, sort_keys=True).encode()).hexdigest()[:16]


def diff_fields(old: dict, new: dict) -> list[str]:
    """Dotted names of result fields that differ between two result dicts."""
    names = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        names += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return names


def with_variant(cfg: RunConfig, variant: str) -> RunConfig:
    """The config of one suite variant: the changes its registry entry sets (settings.VARIANTS)."""
    values = to_dict(cfg)
    for dotted, value in VARIANTS[variant].sets:
        if isinstance(value, str) and value.startswith("@"):   # read from another field
            section, key = value[1:].split(".")
            value = values[section][key]
        section, key = dotted.split(".")
        values[section][key] = value
    return build(values, source=f"suite variant {variant}")
