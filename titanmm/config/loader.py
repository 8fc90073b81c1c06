"""TOML file + `--section.key=value` overrides -> a validated JobConfig.

Everything that can be checked without building a model is checked here, once, with messages
naming the offending key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tomllib
import types
import typing
from pathlib import Path

from titanmm.config.job_config import JobConfig


class ConfigError(ValueError):
    """A configuration problem; the message names the key."""


def _field_types(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value, typ):
    """Check / convert `value` to the annotated type `typ`; strings (from the CLI) are parsed."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        return _coerce(key, value, args[0])
    if origin is list:
        (item,) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {typ}")


def _apply(config: JobConfig, section: str, key: str, value, where: str) -> None:
    sections = _field_types(JobConfig)
    if section not in sections:
        raise ConfigError(f"unknown section [{section}] in {where}; known: {sorted(sections)}")
    section_obj = getattr(config, section)
    fields = _field_types(type(section_obj))
    if key not in fields:
        raise ConfigError(f"unknown key {section}.{key} in {where}; known keys of [{section}]: {sorted(fields)}")
    setattr(section_obj, key, _coerce(f"{section}.{key}", value, fields[key]))


def _parse_overrides(argv: list[str]) -> list[tuple[str, str]]:
    out = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"cannot parse command-line argument {arg!r}; expected --section.key=value")
        if "=" in arg:
            name, value = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a value")
            name, value = arg[2:], argv[i + 1]
            i += 1
        out.append((name, value))
        i += 1
    return out


def load_config(path: str | None = None, overrides: list[str] | None = None,
                world_size: int | None = None) -> JobConfig:
    """Load a TOML file, apply `--section.key=value` overrides and validate."""
    config = JobConfig()
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"top-level key {section!r} in {path} must be a [section] table")
            for key, value in table.items():
                _apply(config, section, key, value, path)
    for name, value in _parse_overrides(overrides or []):
        section, key = name.split(".", 1)
        _apply(config, section, key, value, "the command line")
    validate(config, world_size)
    return config


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} = {value!r}; expected one of {list(choices)}")


def _positive(key: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} = {value} must be {'>= 0' if allow_zero else '> 0'}")


def validate(config: JobConfig, world_size: int | None = None) -> None:
    """Reject impossible settings before any model is built."""
    from titanmm.models import MODEL_SPECS
    from titanmm.models.attention import SDPA_BACKENDS

    c = config
    trainable = ("llama", "vlm")
    if c.model.name not in trainable:
        raise ConfigError(f"model.name = {c.model.name!r}; the trainer takes {list(trainable)}")
    flavors = MODEL_SPECS[c.model.name].flavors
    unknown = [b for b in c.model.sdpa_backends if b not in SDPA_BACKENDS]
    if unknown or len(set(c.model.sdpa_backends)) != len(c.model.sdpa_backends):
        raise ConfigError(f"model.sdpa_backends = {c.model.sdpa_backends}: expected distinct names from "
                          f"{sorted(SDPA_BACKENDS)}")
    if not c.model.hf_config and c.model.flavor not in flavors:
        raise ConfigError(f"model.flavor = {c.model.flavor!r} is not a {c.model.name} flavor; known: {sorted(flavors)}")
    _positive("model.n_layers", c.model.n_layers, allow_zero=True)
    _validate_multimodal(c)
    _choice("training.single_device_mixed_precision", c.training.single_device_mixed_precision, ("autocast", "fsdp"))
    _choice("training.frozen_params_dtype", c.training.frozen_params_dtype, ("param", "bfloat16", "float16", "float32"))
    _choice("optimizer.name", c.optimizer.name, ("AdamW", "Adam"))
    _choice("optimizer.implementation", c.optimizer.implementation, ("fused", "foreach", "for-loop", "compiled"))
    _positive("optimizer.lr", c.optimizer.lr, allow_zero=True)
    _choice("lr_scheduler.decay_type", c.lr_scheduler.decay_type, ("cosine", "linear", "constant", "wsd"))
    _positive("lr_scheduler.warmup_steps", c.lr_scheduler.warmup_steps, allow_zero=True)
    if not 0.0 <= c.lr_scheduler.decay_ratio <= 1.0:
        raise ConfigError(f"lr_scheduler.decay_ratio = {c.lr_scheduler.decay_ratio} must be in [0, 1]")
    if c.lr_scheduler.min_lr > c.optimizer.lr:
        raise ConfigError(f"lr_scheduler.min_lr = {c.lr_scheduler.min_lr} exceeds optimizer.lr = {c.optimizer.lr}")
    for key in ("steps", "seq_len", "local_batch_size"):
        _positive(f"training.{key}", getattr(c.training, key))
    _positive("training.max_consecutive_nonfinite", c.training.max_consecutive_nonfinite)
    _positive("training.max_norm", c.training.max_norm, allow_zero=True)
    _validate_loss_chunks(c)
    for key in ("mixed_precision_param", "mixed_precision_reduce"):
        _choice(f"training.{key}", getattr(c.training, key), ("bfloat16", "float16", "float32"))
    if not c.model.hf_config and c.training.seq_len > language_model_args(flavors[c.model.flavor]).max_seq_len:
        raise ConfigError(f"training.seq_len = {c.training.seq_len} exceeds the max_seq_len "
                          f"{language_model_args(flavors[c.model.flavor]).max_seq_len} of model.flavor = "
                          f"{c.model.flavor!r}")
    p = c.parallelism
    for key in ("data_parallel_replicate_degree", "tensor_parallel_degree", "pipeline_parallel_degree",
                "context_parallel_degree"):
        _positive(f"parallelism.{key}", getattr(p, key))
    if p.data_parallel_shard_degree == 0 or p.data_parallel_shard_degree < -1:
        raise ConfigError(f"parallelism.data_parallel_shard_degree = {p.data_parallel_shard_degree}; "
                          "expected -1 or a positive integer")
    _validate_context_parallel(c)
    _validate_pipeline(c)
    _choice("parallelism.fsdp_reshard_after_forward", p.fsdp_reshard_after_forward, ("default", "always", "never"))
    _choice("activation_checkpoint.mode", c.activation_checkpoint.mode, ("none", "full", "selective", "memory_budget"))
    if c.activation_checkpoint.mode == "memory_budget":
        if not c.compile.enable:
            raise ConfigError("activation_checkpoint.mode = 'memory_budget' needs compile.enable = true (the compiler "
                              "decides what to recompute)")
        if not 0.0 <= c.activation_checkpoint.memory_budget <= 1.0:
            raise ConfigError(f"activation_checkpoint.memory_budget = {c.activation_checkpoint.memory_budget}; "
                              "expected a fraction in [0, 1]")
    if c.activation_checkpoint.all_matmuls_blocks < -1:
        raise ConfigError(f"activation_checkpoint.all_matmuls_blocks = {c.activation_checkpoint.all_matmuls_blocks}; "
                          "expected -1 (every block) or a number of blocks")
    sac = c.activation_checkpoint.selective_ac_option
    if sac not in ("op", "op_all_matmuls") and not (sac.isdigit() and int(sac) > 0):
        raise ConfigError(f"activation_checkpoint.selective_ac_option = {sac!r}; expected 'op', 'op_all_matmuls' or "
                          "a positive integer")
    _validate_float8(c.float8)
    _choice("compile.mix_order_reduction", c.compile.mix_order_reduction, ("auto", "on", "off"))
    if c.compile.enable_async_tensor_parallel and not (c.compile.enable and p.tensor_parallel_degree > 1):
        raise ConfigError("compile.enable_async_tensor_parallel = true needs compile.enable = true and "
                          f"parallelism.tensor_parallel_degree > 1 (it is {p.tensor_parallel_degree})")
    _choice("checkpoint.async_mode", c.checkpoint.async_mode, ("disabled", "async"))
    _positive("checkpoint.interval", c.checkpoint.interval)
    _positive("checkpoint.keep_latest_k", c.checkpoint.keep_latest_k, allow_zero=True)
    if c.checkpoint.initial_load_path and c.checkpoint.initial_load_hf:
        raise ConfigError("checkpoint.initial_load_path and checkpoint.initial_load_hf are both set; choose one")
    _positive("metrics.log_freq", c.metrics.log_freq)
    _validate_eval(c)
    _validate_profiling(c)
    if world_size is not None:
        validate_degrees(config, world_size)


VLM_PARTS = ("lm", "vision", "projector")


def _validate_loss_chunks(c: JobConfig) -> None:
    chunk, key = c.training.loss_chunk_tokens, "training.loss_chunk_tokens"
    _positive(key, chunk, allow_zero=True)
    if chunk == 0:
        return
    p = c.parallelism
    clashes = [f"{name} = {value}" for name, value in (
        ("parallelism.tensor_parallel_degree", p.tensor_parallel_degree),
        ("parallelism.pipeline_parallel_degree", p.pipeline_parallel_degree)) if value > 1]
    if c.multimodal.loss_scaling == "sqrt_length":
        clashes.append('multimodal.loss_scaling = "sqrt_length" (per-token loss weights)')
    if c.float8.enable and "output" not in c.float8.filter_fqns:
        clashes.append('float8.enable with "output" not in float8.filter_fqns (an FP8 output layer)')
    if clashes:
        raise ConfigError(f"{key} = {chunk} (the output layer computing the loss) does not go with "
                          + ", ".join(clashes) + f"; set {key} = 0")


def _validate_multimodal(c: JobConfig) -> None:
    """model.freeze, training.dataset of a vlm, and the [multimodal] section."""
    from titanmm.data.chat import CHAT_TEMPLATES
    from titanmm.data.vlm_data import LOSS_SCALINGS, TASKS

    vlm = c.model.name == "vlm"
    if c.model.freeze:
        if not vlm:
            raise ConfigError(f"model.freeze = {c.model.freeze}: freezing parts applies to model.name = 'vlm' "
                              f"(got {c.model.name!r})")
        for part in c.model.freeze:
            _choice("model.freeze", part, VLM_PARTS)
        if set(c.model.freeze) == set(VLM_PARTS):
            raise ConfigError(f"model.freeze = {c.model.freeze} freezes every parameter: nothing would train")
    if vlm and c.training.dataset != "mock":
        validate_energon_dataset(c.training.dataset)
    m = c.multimodal
    if m.chat_template:
        _choice("multimodal.chat_template", m.chat_template, tuple(CHAT_TEMPLATES))
    elif vlm and c.training.dataset != "mock" and not c.model.hf_config:
        from titanmm.data.vlm_data import default_chat_template
        from titanmm.models import MODEL_SPECS

        if default_chat_template(MODEL_SPECS["vlm"].flavors[c.model.flavor]) is None:
            raise ConfigError(f"multimodal.chat_template is empty and model.flavor = {c.model.flavor!r} has no "
                              f"default; choose one of {sorted(CHAT_TEMPLATES)}")
    _choice("multimodal.task", m.task, TASKS)
    _choice("multimodal.loss_scaling", m.loss_scaling, LOSS_SCALINGS)
    if m.loss_scaling != "token" and not vlm:
        raise ConfigError(f"multimodal.loss_scaling = {m.loss_scaling!r} applies to model.name = 'vlm' "
                          f"(got {c.model.name!r})")
    for key in ("max_tiles", "num_workers", "shuffle_buffer_size", "max_samples_per_sequence"):
        _positive(f"multimodal.{key}", getattr(m, key), allow_zero=True)
    _positive("multimodal.packing_buffer_size", m.packing_buffer_size)
    if m.packing and not c.training.document_masking:
        raise ConfigError("multimodal.packing = true needs training.document_masking = true (packed samples must "
                          "not attend to each other)")


def validate_energon_dataset(path: str, key: str = "training.dataset") -> None:
    """`path` is a folder prepared by `energon prepare` (it has `.nv-meta/`) or an energon metadataset .yaml."""
    where = Path(path).expanduser()
    kinds = ("'mock', a folder prepared by `energon prepare` (with .nv-meta/, e.g. the output of "
             "`python -m titanmm.data.convert_llava`) or an energon metadataset .yaml")
    if not where.exists():
        raise ConfigError(f"{key} = {path!r} does not exist; for model.name = 'vlm' it is {kinds}")
    if where.is_dir():
        if not (where / ".nv-meta" / "dataset.yaml").is_file() and not (where / ".nv-meta" / "index.sqlite").is_file():
            raise ConfigError(f"{key} = {path!r} is a folder without .nv-meta/ (not prepared for energon): run "
                              f"`energon prepare {path}` or convert LLaVA data with titanmm.data.convert_llava")
    elif where.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"{key} = {path!r} is a {where.suffix or 'suffix-less'} file; for model.name = 'vlm' it "
                          f"is {kinds}")


def _validate_pipeline(c: JobConfig) -> None:
    from titanmm.models import MODEL_SPECS
    from titanmm.parallel.pipeline import SCHEDULES, SINGLE_STAGE_SCHEDULES, ZERO_BUBBLE_SCHEDULES, stage_layers

    p = c.parallelism
    _choice("parallelism.pipeline_parallel_schedule", p.pipeline_parallel_schedule, tuple(SCHEDULES))
    _positive("parallelism.pipeline_parallel_microbatch_size", p.pipeline_parallel_microbatch_size)
    for key in ("layers_per_stage", "first_stage_less_layers", "last_stage_less_layers"):
        _positive(f"parallelism.pipeline_parallel_{key}", getattr(p, f"pipeline_parallel_{key}"), allow_zero=True)
    if p.pipeline_parallel_degree == 1:
        return
    pp, schedule, mb = p.pipeline_parallel_degree, p.pipeline_parallel_schedule, p.pipeline_parallel_microbatch_size
    if c.training.local_batch_size % mb:
        raise ConfigError(f"training.local_batch_size = {c.training.local_batch_size} is not a multiple of "
                          f"parallelism.pipeline_parallel_microbatch_size = {mb}")
    n_mb = c.training.local_batch_size // mb
    if n_mb < pp:
        raise ConfigError(f"training.local_batch_size / parallelism.pipeline_parallel_microbatch_size = {n_mb} "
                          f"microbatches cannot fill parallelism.pipeline_parallel_degree = {pp} stages; "
                          f"give the pipeline at least {pp}")
    if schedule not in SINGLE_STAGE_SCHEDULES and schedule != "ZBVZeroBubble" and n_mb % max(1, n_mb // pp):
        raise ConfigError(f"parallelism.pipeline_parallel_schedule = {schedule!r} runs microbatches in rounds of "
                          f"parallelism.pipeline_parallel_degree = {pp}: {n_mb} microbatches (training.local_batch_size"
                          f" / parallelism.pipeline_parallel_microbatch_size) must be a multiple of {n_mb // pp} "
                          f"rounds; use a multiple of {pp}")
    if schedule in ZERO_BUBBLE_SCHEDULES and c.compile.enable:
        raise ConfigError(f"parallelism.pipeline_parallel_schedule = {schedule!r} splits backward into input and "
                          "weight gradients, which torch.compile'd blocks do not support; set compile.enable = false "
                          "or use 1F1B / Interleaved1F1B")
    if c.model.hf_config:  # the model's shape is known only when it is built; the trainer checks then
        return
    args = language_model_args(MODEL_SPECS[c.model.name].flavors[c.model.flavor])
    if args.tie_word_embeddings:
        raise ConfigError(f"parallelism.pipeline_parallel_degree = {pp}: model.flavor = {c.model.flavor!r} ties "
                          "the output layer to the token embedding, which pipeline stages would separate")
    try:
        layers = stage_layers(p, c.model.n_layers or args.n_layers)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if c.model.name == "vlm" and p.tensor_parallel_degree > 1 and not layers[0]:
        raise ConfigError("a vision-language model under tensor parallelism needs a language-model block on the "
                          "first pipeline stage (it splits the sequence there); lower "
                          "parallelism.pipeline_parallel_first_stage_less_layers")


def _validate_context_parallel(c) -> None:
    p, cp = c.parallelism, c.parallelism.context_parallel_degree
    _choice("parallelism.context_parallel_rotate_method", p.context_parallel_rotate_method, ("allgather", "alltoall"))
    if cp == 1:
        return
    if c.training.document_masking:
        raise ConfigError(f"parallelism.context_parallel_degree = {cp} needs training.document_masking = false "
                          "(ring attention runs SDPA's causal kernels, which take no per-document mask)")
    chunk = 2 * cp * p.tensor_parallel_degree
    if c.training.seq_len % chunk:
        raise ConfigError(f"training.seq_len = {c.training.seq_len} must be divisible by 2 * "
                          f"parallelism.context_parallel_degree * tensor_parallel_degree = {chunk} (load-balanced "
                          "context-parallel chunks, then sequence-parallel shards)")
    if p.data_parallel_replicate_degree > 1:
        raise ConfigError(f"parallelism.context_parallel_degree = {cp} with data_parallel_replicate_degree = "
                          f"{p.data_parallel_replicate_degree}: HSDP with context parallelism is not supported; use "
                          "data_parallel_shard_degree")
    if p.pipeline_parallel_degree > 1:
        raise ConfigError(f"parallelism.context_parallel_degree = {cp} with pipeline_parallel_degree = "
                          f"{p.pipeline_parallel_degree}: context parallelism inside pipeline stages is not supported")


def _validate_float8(f) -> None:
    from titanmm.parallel.float8 import RECIPES

    _choice("float8.recipe", f.recipe, RECIPES)
    if f.backend == "te":
        raise ConfigError("float8.backend = 'te': Transformer Engine is not offered (its modules do not compose "
                          "with DTensor TP / FSDP2 / DCP here); use float8.backend = 'torchao'")
    _choice("float8.backend", f.backend, ("torchao",))
    if f.enable:
        try:
            import torchao.float8  # noqa: F401
        except ImportError:
            raise ConfigError("float8.enable = true needs torchao: pip install 'torchao>=0.18' (pinned with torch) "
                              "or pip install -e '.[float8]'") from None


def _validate_eval(c: JobConfig) -> None:
    """The [eval] section (online captioning evaluation)."""
    import os
    import shutil

    e = c.eval
    for key in ("interval", "num_samples", "max_new_tokens", "batch_size"):
        _positive(f"eval.{key}", getattr(e, key))
    if not e.enable:
        return
    if c.model.name != "vlm":
        raise ConfigError(f"eval.enable = true captions images: it needs model.name = 'vlm' (got {c.model.name!r})")
    p = c.parallelism
    for key in ("tensor_parallel_degree", "pipeline_parallel_degree", "context_parallel_degree"):
        if getattr(p, key) > 1:
            raise ConfigError(f"eval.enable = true with parallelism.{key} = {getattr(p, key)}: online evaluation "
                              "runs on data-parallel layouts (FSDP / HSDP) only")
    if not os.path.isfile(e.dataset):
        raise ConfigError(f"eval.dataset = {e.dataset!r} is not a file (a Karpathy split or COCO captions JSON)")
    if e.image_folder and not os.path.isdir(e.image_folder):
        raise ConfigError(f"eval.image_folder = {e.image_folder!r} is not a folder")
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise ConfigError("eval.enable = true needs pycocoevalcap for CIDEr: pip install -e '.[eval]'") from None
    if shutil.which("java") is None:
        raise ConfigError("eval.enable = true needs Java (pycocoevalcap's PTB tokenizer runs in it)")


def _validate_profiling(c: JobConfig) -> None:
    """The [profiling] section: each profiled window (wait, warmup, active steps) must fit in profile_freq steps."""
    p = c.profiling
    for key in ("profile_freq", "profiler_active", "snapshot_max_entries"):
        _positive(f"profiling.{key}", getattr(p, key))
    _positive("profiling.profiler_warmup", p.profiler_warmup, allow_zero=True)
    if p.enable_profiling and p.profiler_warmup + p.profiler_active > p.profile_freq:
        raise ConfigError(f"profiling.profiler_warmup + profiling.profiler_active = "
                          f"{p.profiler_warmup + p.profiler_active} exceeds profiling.profile_freq = {p.profile_freq}: "
                          "each window of warm-up and recorded steps must fit within profile_freq steps")


def language_model_args(args):
    """The TransformerArgs of a language model or of a VLM's language model."""
    return getattr(args, "lm", args)


def resolved_dp_shard(p, world_size: int) -> int:
    """data_parallel_shard_degree with -1 resolved against the world size (p: the [parallelism] section)."""
    others = p.data_parallel_replicate_degree * p.tensor_parallel_degree * p.pipeline_parallel_degree * \
        p.context_parallel_degree
    if p.data_parallel_shard_degree == -1:
        if world_size % others:
            raise ConfigError(
                f"world size {world_size} is not divisible by data_parallel_replicate_degree * tensor_parallel_degree"
                f" * pipeline_parallel_degree * context_parallel_degree = {others}")
        return world_size // others
    return p.data_parallel_shard_degree


def validate_degrees(config: JobConfig, world_size: int) -> None:
    p = config.parallelism
    dp_shard = resolved_dp_shard(p, world_size)
    total = p.data_parallel_replicate_degree * dp_shard * p.tensor_parallel_degree * p.pipeline_parallel_degree * \
        p.context_parallel_degree
    if total != world_size:
        raise ConfigError(
            f"parallelism degrees multiply to {total} (data_parallel_replicate_degree={p.data_parallel_replicate_degree}"
            f" * data_parallel_shard_degree={dp_shard} * tensor_parallel_degree={p.tensor_parallel_degree} * "
            f"pipeline_parallel_degree={p.pipeline_parallel_degree}) but the world size is {world_size}")
    dp = p.data_parallel_replicate_degree * dp_shard
    t = config.training
    if t.global_batch_size != -1:
        if t.global_batch_size <= 0 or t.global_batch_size % (t.local_batch_size * dp):
            raise ConfigError(f"training.global_batch_size = {t.global_batch_size} must be a positive multiple of "
                              f"training.local_batch_size * data-parallel degree = {t.local_batch_size * dp}")
    if not config.model.hf_config:
        from titanmm.models import MODEL_SPECS

        args = language_model_args(MODEL_SPECS[config.model.name].flavors[config.model.flavor])
        tp = p.tensor_parallel_degree
        if args.n_kv_heads % tp or args.n_heads % tp:
            raise ConfigError(f"parallelism.tensor_parallel_degree = {tp} does not divide n_heads={args.n_heads} "
                              f"and n_kv_heads={args.n_kv_heads} of model.flavor = {config.model.flavor!r}")
    if p.tensor_parallel_degree > 1 and t.seq_len % p.tensor_parallel_degree:
        raise ConfigError(f"training.seq_len = {t.seq_len} must be divisible by parallelism.tensor_parallel_degree"
                          f" = {p.tensor_parallel_degree} (sequence parallel splits the sequence)")


def config_to_dict(config: JobConfig) -> dict:
    return dataclasses.asdict(config)


def parse_args(argv: list[str] | None = None) -> tuple[str | None, list[str], bool]:
    parser = argparse.ArgumentParser(prog="python -m titanmm.train", add_help=True,
                                     description="Train a titanmm model. Any --section.key=value overrides the TOML.")
    parser.add_argument("--config", "--job.config_file", dest="config", default=None, help="TOML file")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    known, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return known.config, rest, known.print_config


def format_config(config: JobConfig) -> str:
    return json.dumps(config_to_dict(config), indent=2)
