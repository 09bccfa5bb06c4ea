"""The typed run config: MindSpore Transformers' YAML keys as dataclasses, with their rules.

Each section is a dataclass; `typed.build` rejects unknown keys and wrong types. Rules that tie
several keys together live in each class's `_validate`. Keys MindSpore Transformers has but this
runtime does not use are accepted (so real YAML files load) and listed in docs/runtime.md.
Pure Python (no MindSpore).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from ..errors import ConfigError

logger = logging.getLogger(__name__)

RUN_MODES = ("train", "finetune", "predict")
CKPT_FORMATS = ("ckpt", "safetensors")
DEVICE_TARGETS = ("CPU", "Ascend", "GPU")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


@dataclass
class ContextConfig:
    """`context:` — MindSpore context. Only device_target, mode and runtime_num_threads are used."""

    mode: int = 1                      # 0 GRAPH_MODE, 1 PYNATIVE_MODE (this runtime runs PyNative)
    device_target: str = "CPU"
    device_id: int = 0
    max_device_memory: Optional[str] = None
    max_call_depth: Optional[int] = None
    save_graphs: Union[bool, int] = False
    save_graphs_path: Optional[str] = None
    jit_config: Dict[str, Any] = field(default_factory=dict)
    jit_level: Optional[str] = None
    memory_optimize_level: Optional[str] = None
    runtime_num_threads: Optional[int] = None
    enable_graph_kernel: bool = False
    graph_kernel_flags: Optional[str] = None
    ascend_config: Dict[str, Any] = field(default_factory=dict)
    mempool_block_size: Optional[str] = None
    affinity_cpu_list: Any = None
    deterministic: Optional[str] = None
    pynative_synchronize: bool = False

    def _validate(self, where: str) -> None:
        _require(self.device_target in DEVICE_TARGETS,
                 f"config key '{_key(where, 'device_target')}' must be one of {DEVICE_TARGETS}, "
                 f"got {self.device_target!r}")
        _require(self.mode in (0, 1), f"config key '{_key(where, 'mode')}' must be 0 (GRAPH_MODE) "
                 f"or 1 (PYNATIVE_MODE), got {self.mode!r}")


@dataclass
class ParallelSection:
    """`parallel:` — MindSpore auto-parallel context keys. Accepted so real YAML files load;
    only `enable_parallel_optimizer` (default for parallel_config.optimizer_shard) and
    `strategy_ckpt_save_file` (rewritten to {output_dir}/strategy/ckpt_strategy_rank_{r}.ckpt,
    as MindSpore Transformers does) have an effect. Explicit TP/DP replaces auto-parallel."""

    parallel_mode: Union[int, str] = 1
    gradients_mean: bool = False
    enable_alltoall: bool = False
    full_batch: bool = True
    search_mode: Optional[str] = None
    enable_parallel_optimizer: bool = False
    strategy_ckpt_save_file: str = "./ckpt_strategy.ckpt"
    strategy_ckpt_load_file: Optional[str] = None
    strategy_ckpt_config: Dict[str, Any] = field(default_factory=dict)
    parallel_optimizer_config: Dict[str, Any] = field(default_factory=dict)
    pipeline_config: Dict[str, Any] = field(default_factory=dict)
    dataset_strategy: Any = None
    device_num: Optional[int] = None
    loss_repeated_mean: Optional[bool] = None
    auto_pipeline: bool = False
    dump_local_norm: bool = False
    comm_fusion: Dict[str, Any] = field(default_factory=dict)
    enable_alltoall_fusion: Optional[bool] = None


@dataclass
class ParallelConfigSection:
    """`parallel_config:` — the distributed strategy. dp × mp × pp must equal the world size."""

    data_parallel: int = 1
    model_parallel: int = 1
    context_parallel: int = 1
    expert_parallel: int = 1
    pipeline_stage: int = 1
    micro_batch_num: int = 1
    seq_split_num: int = 1
    use_seq_parallel: bool = False
    optimizer_shard: Optional[bool] = None    # None: follow parallel.enable_parallel_optimizer
    gradient_aggregation_group: int = 4
    vocab_emb_dp: bool = True
    context_parallel_algo: Optional[str] = None
    ulysses_degree_in_cp: int = 1
    mem_coeff: Optional[float] = None

    @property
    def device_num(self) -> int:
        """How many ranks the strategy needs (dp × mp × pp)."""
        return self.data_parallel * self.model_parallel * self.pipeline_stage

    def _validate(self, where: str) -> None:
        for name in ("data_parallel", "model_parallel", "pipeline_stage", "micro_batch_num",
                     "gradient_aggregation_group"):
            _require(getattr(self, name) >= 1,
                     f"config key '{_key(where, name)}' must be >= 1, got {getattr(self, name)}")
        for name in ("context_parallel", "expert_parallel"):
            _require(getattr(self, name) == 1,
                     f"config key '{_key(where, name)}' = {getattr(self, name)} is not supported by "
                     f"this runtime (dense Llama-family models with dp/mp/pp only): set it to 1")
        _require(self.micro_batch_num >= self.pipeline_stage or self.pipeline_stage == 1,
                 f"config key '{_key(where, 'micro_batch_num')}' ({self.micro_batch_num}) must be "
                 f">= pipeline_stage ({self.pipeline_stage})")


@dataclass
class RunnerConfig:
    """`runner_config:` — how long and how wide to train.

    `train_steps` (new key): stop after this many optimizer steps (0 = epochs × steps per epoch).
    """

    epochs: int = 1
    batch_size: int = 1
    sink_mode: bool = True
    sink_size: int = 1
    gradient_accumulation_steps: int = 1
    train_steps: int = 0
    stop_step: int = 0

    def _validate(self, where: str) -> None:
        for name in ("epochs", "batch_size", "sink_size", "gradient_accumulation_steps"):
            _require(getattr(self, name) >= 1,
                     f"config key '{_key(where, name)}' must be >= 1, got {getattr(self, name)}")
        _require(self.train_steps >= 0, f"config key '{_key(where, 'train_steps')}' must be >= 0")


@dataclass
class RunnerWrapperConfig:
    """`runner_wrapper:` — MFTrainOneStepCell options. Only use_clip_grad/max_grad_norm are used
    (fp32 training on CPU needs no loss scaling; scale_sense is accepted and ignored)."""

    type: str = "MFTrainOneStepCell"
    scale_sense: Any = None
    use_clip_grad: bool = True
    max_grad_norm: float = 1.0
    local_norm: bool = False


@dataclass
class DataLoaderConfig:
    """`train_dataset.data_loader:` — a MindRecord file or folder read by MindDataset."""

    type: str = "MindDataset"
    dataset_dir: str = ""
    shuffle: bool = True
    num_samples: Optional[int] = None

    def _validate(self, where: str) -> None:
        _require(self.type == "MindDataset",
                 f"config key '{_key(where, 'type')}': only MindDataset (MindRecord) is supported, "
                 f"got {self.type!r}; convert your data with `python -m mindformers_st.data`")


@dataclass
class DatasetConfig:
    """`train_dataset:` — columns, batching and workers of the training data."""

    data_loader: DataLoaderConfig = field(default_factory=DataLoaderConfig)
    input_columns: List[str] = field(default_factory=lambda: ["input_ids"])
    output_columns: Optional[List[str]] = None
    construct_args_key: Optional[List[str]] = None
    num_parallel_workers: int = 1
    python_multiprocessing: bool = False
    drop_remainder: bool = True
    batch_size: Optional[int] = None
    repeat: int = 1
    numa_enable: bool = False
    prefetch_size: int = 1
    seed: Optional[int] = None
    pad_token_id: Optional[int] = None


@dataclass
class ArchConfig:
    """`model.arch:` — which registered model class to build (None: LlamaForCausalLM, or the
    family of an HF `load_checkpoint` folder)."""

    type: Optional[str] = None


@dataclass
class ModelSection:
    """`model:` — the architecture name and its model_config (validated by the model's config
    class from mindformers_st.models, which knows its own keys)."""

    arch: ArchConfig = field(default_factory=ArchConfig)
    model_config: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TokenizerConfig:
    """`processor.tokenizer:` — `tokenizer_file` (new key) or a `vocab_file` ending in .json names
    a Hugging Face `tokenizer.json` read with the `tokenizers` library."""

    type: Optional[str] = None
    tokenizer_file: Optional[str] = None
    vocab_file: Optional[str] = None
    merges_file: Optional[str] = None
    unk_token: Optional[str] = None
    bos_token: Optional[str] = None
    eos_token: Optional[str] = None
    pad_token: Optional[str] = None
    add_bos_token: Optional[bool] = None
    add_eos_token: Optional[bool] = None
    model_max_length: Optional[int] = None
    chat_template: Optional[str] = None
    auto_register: Optional[str] = None


@dataclass
class ProcessorConfig:
    """`processor:` — the tokenizer (and MindSpore Transformers' processor type, ignored)."""

    type: Optional[str] = None
    return_tensors: Optional[str] = None
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


# ---- callbacks --------------------------------------------------------------------------------

@dataclass
class MFLossMonitorConfig:
    """`{type: MFLossMonitor}` — logs loss, lr, grad norm and throughput every `per_print_times` steps."""

    type: str = "MFLossMonitor"
    per_print_times: int = 1
    learning_rate: Any = None
    micro_batch_num: Optional[int] = None
    micro_batch_interleave_num: Optional[int] = None
    origin_epochs: Optional[int] = None
    dataset_size: Optional[int] = None
    initial_epoch: Optional[int] = None
    initial_step: Optional[int] = None
    global_batch_size: Optional[int] = None
    gradient_accumulation_steps: Optional[int] = None
    check_for_nan_in_loss_and_grad: bool = False

    def _validate(self, where: str) -> None:
        _require(self.per_print_times >= 1,
                 f"config key '{_key(where, 'per_print_times')}' must be >= 1")
        from .unused_keys import NO_EFFECT_LOSS_MONITOR
        warn_no_effect(self, NO_EFFECT_LOSS_MONITOR, where)


@dataclass
class CheckpointMonitorConfig:
    """`{type: CheckpointMonitor}` — when and how to save (MindSpore Transformers' keys and defaults)."""

    type: str = "CheckpointMonitor"
    prefix: str = "CKP"
    directory: Optional[str] = None
    save_checkpoint_steps: int = 1
    save_checkpoint_seconds: int = 0
    keep_checkpoint_max: int = 5
    keep_checkpoint_per_n_minutes: int = 0
    integrated_save: bool = True
    save_network_params: bool = False
    save_trainable_params: bool = False
    async_save: bool = False
    checkpoint_format: str = "ckpt"
    remove_redundancy: bool = False
    saved_network: Any = None
    append_info: Any = None
    enc_key: Any = None
    enc_mode: str = "AES-GCM"
    exception_save: bool = False
    global_batch_size: Optional[int] = None
    embedding_size: int = 4096
    embedding_local_norm_threshold: float = 1.0
    use_checkpoint_health_monitor: bool = False
    health_ckpts_record_dir: Optional[str] = None

    def _validate(self, where: str) -> None:
        _require(bool(self.prefix) and "/" not in self.prefix and "\\" not in self.prefix,
                 f"config key '{_key(where, 'prefix')}' must be a non-empty name without '/', "
                 f"got {self.prefix!r}")
        _require(self.checkpoint_format in CKPT_FORMATS,
                 f"config key '{_key(where, 'checkpoint_format')}' must be one of {CKPT_FORMATS}, "
                 f"got {self.checkpoint_format!r}")
        _require(not (self.remove_redundancy and self.checkpoint_format != "safetensors"),
                 f"config key '{_key(where, 'remove_redundancy')}': de-redundant saving needs "
                 f"checkpoint_format: safetensors (got {self.checkpoint_format!r})")
        _require(self.save_checkpoint_steps >= 1,
                 f"config key '{_key(where, 'save_checkpoint_steps')}' must be >= 1, "
                 f"got {self.save_checkpoint_steps}")
        _require(self.keep_checkpoint_max >= 1,
                 f"config key '{_key(where, 'keep_checkpoint_max')}' must be >= 1, "
                 f"got {self.keep_checkpoint_max}")
        _require(self.save_checkpoint_seconds >= 0 and self.keep_checkpoint_per_n_minutes >= 0,
                 f"config keys '{_key(where, 'save_checkpoint_seconds')}' and "
                 f"'{_key(where, 'keep_checkpoint_per_n_minutes')}' must be >= 0")
        _require(self.enc_key is None,
                 f"config key '{_key(where, 'enc_key')}': " + (
                     "safetensors files are never encrypted (MindSpore encrypts checkpoint_format "
                     "'ckpt' only)" if self.checkpoint_format == "safetensors" else
                     "MindSpore takes a bytes key, which a YAML value cannot be; pass "
                     "enc_key=b'...' to mindformers_st.CheckpointMonitor in Python"))
        _require(self.saved_network is None,
                 f"config key '{_key(where, 'saved_network')}': MindSpore takes a network object "
                 f"(nn.Cell), which a YAML value cannot be; pass saved_network=<cell> to "
                 f"mindformers_st.CheckpointMonitor in Python")
        warn_no_effect(self, NO_EFFECT_MONITOR, where)


# Keys MindSpore Transformers has that this runtime does not implement: accepted so their
# configs load, and warned about BY NAME whenever set to anything but their default (never
# silently ignored). key -> why it has no effect here.
NO_EFFECT_TOP_LEVEL = {
    "use_legacy": "only the legacy (MindFormers 1.x) model implementations exist here (the checkpoint "
                  "layout is chosen by use_legacy_format)",
}
NO_EFFECT_MONITOR = {
    # As MindSpore Transformers' trainer, which replaces these three with its own values:
    "use_checkpoint_health_monitor": "the top-level use_checkpoint_health_monitor switches the "
                                     "health monitor on",
    "embedding_size": "the embedding size is model_config hidden_size x vocab_size",
    "health_ckpts_record_dir": "health_ckpts.json is written in output_dir",
    "enc_mode": "it applies only with enc_key, which a YAML file cannot set",
    "save_checkpoint_seconds": "saves are collective, so they follow save_checkpoint_steps "
                               "(a clock would differ between ranks)",
    "keep_checkpoint_per_n_minutes": "the saves kept are the last keep_checkpoint_max",
}


def warn_no_effect(obj, table, where: str) -> None:
    """Warn, naming the key, for each key of `table` that `obj` sets to a non-default value."""
    defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING
                else f.default_factory() for f in dataclasses.fields(obj)}
    for key, why in table.items():
        value = getattr(obj, key)
        if value != defaults.get(key) and value is not None:
            logger.warning("config key '%s' = %r has no effect here: %s", _key(where, key), value, why)


@dataclass
class OnRequestExitConfig:
    """`{type: OnRequestExit}` — MindSpore's graceful-exit callback, as MindSpore Transformers
    configures it: with `use_graceful_exit: True`, SIGTERM or `config_file` holding
    `{"GracefulExit": 1}` stops the run after the current step; `save_ckpt` saves that step
    through the CheckpointMonitor first (trainer/stop.py)."""

    type: str = "OnRequestExit"
    save_ckpt: bool = True
    save_mindir: bool = False
    file_name: str = "Net"
    directory: str = "./"
    config_file: Optional[str] = None
    sig: Any = None

    def _validate(self, where: str) -> None:
        _require(self.sig in (None, 15, "SIGTERM", "signal.SIGTERM"),
                 f"config key '{_key(where, 'sig')}': only SIGTERM (15) asks for a graceful "
                 f"exit here, got {self.sig!r}")
        warn_no_effect(self, NO_EFFECT_ON_REQUEST_EXIT, where)


NO_EFFECT_ON_REQUEST_EXIT = {
    "save_mindir": "no MindIR is exported",
    "file_name": "the step is saved by the CheckpointMonitor, with its prefix",
    "directory": "the step is saved by the CheckpointMonitor, in its directory",
}


@dataclass
class SummaryMonitorConfig:
    """`{type: SummaryMonitor}` / `{type: ProfileMonitor}` — accepted, no effect on this runtime."""

    type: str = "SummaryMonitor"
    options: Dict[str, Any] = field(default_factory=dict)


CALLBACK_TYPES = {
    "MFLossMonitor": MFLossMonitorConfig,
    "CheckpointMonitor": CheckpointMonitorConfig,
    "OnRequestExit": OnRequestExitConfig,
}


def build_callback(data: Any, where: str):
    """One `callbacks:` entry -> its typed config (ConfigError for an unknown `type`)."""
    from .typed import build  # local: typed imports nothing from here

    if not isinstance(data, dict) or "type" not in data:
        raise ConfigError(f"config key '{where}' must be a mapping with a 'type' key "
                          f"(one of {', '.join(CALLBACK_TYPES)}), got {data!r}")
    kind = str(data["type"])
    cls = CALLBACK_TYPES.get(kind)
    if cls is None:
        raise ConfigError(f"config key '{where}.type': unknown callback {kind!r}; "
                          f"supported: {', '.join(CALLBACK_TYPES)}")
    return build(cls, data, where)


# ---- the whole file ---------------------------------------------------------------------------

# Top-level keys of MindSpore Transformers YAML files that this runtime accepts and ignores.
IGNORED_TOP_LEVEL = (
    "trainer", "train_dataset_task", "eval_dataset", "eval_dataset_task", "eval_callbacks",
    "metric", "recompute_config", "moe_config", "profile", "profile_start_step",
    "profile_stop_step", "profile_communication", "profile_memory", "init_start_profile",
    "layer_scale", "layer_decay", "lr_scale", "micro_batch_interleave_num", "swap_config",
    "auto_tune", "filepath_prefix", "autotune_per_step", "remote_save_url", "do_eval",
    "eval_step_interval", "eval_epoch_interval",
    "monitor_config", "tensorboard", "wrapper", "adapter_id",
    "model_name", "trust_remote_code",
)


DERIVED_WRITES = ("background", "first")


@dataclass
class RunConfig:
    """The whole run config (`--config` YAML + CLI flags), MindSpore Transformers' keys."""

    seed: int = 0
    output_dir: str = "./output"
    run_mode: str = "train"
    use_parallel: bool = False
    load_checkpoint: str = ""
    load_ckpt_format: str = "ckpt"
    auto_trans_ckpt: bool = False
    remove_redundancy: bool = False
    src_strategy_path_or_dir: str = ""
    # auto_trans_ckpt on rank_x/ weights: cut straight from the rank files, no unified_checkpoint
    direct_reshard: bool = False
    # ms_safetensors / unified_checkpoint of an online conversion or merge: "background" (the
    # load reads the sources, the folder is written while training runs) or "first"
    derived_write: str = "background"
    # checksums of the bytes read: True ("read": every tensor read whole), "full", False
    verify_checksums: Union[bool, str] = True
    resume_training: Union[bool, str] = False
    only_save_strategy: bool = False
    transform_process_num: int = 1
    load_ckpt_async: bool = False
    # every block several ranks need is read once and shared (None: on under use_parallel)
    balanced_load: Optional[bool] = None
    ignore_data_skip: bool = False
    data_skip_steps: Optional[int] = None
    resume_by_last_timestamp_ckpt: Optional[bool] = None
    # SIGTERM: finish the step, save and commit it, exit 0 (trainer/stop.py)
    use_graceful_exit: bool = False
    use_legacy: bool = True
    # False: CheckpointMonitor saves in MindSpore Transformers 2.x's Checkpoint 2.0 layout
    use_legacy_format: bool = True
    pretrained_model_dir: str = ""
    # rank 0 appends each committed save to {output_dir}/health_ckpts.json (CheckpointMonitor)
    use_checkpoint_health_monitor: bool = False
    predict_data: List[str] = field(default_factory=list)
    predict_batch_size: Optional[int] = None
    context: ContextConfig = field(default_factory=ContextConfig)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    parallel_config: ParallelConfigSection = field(default_factory=ParallelConfigSection)
    runner_config: RunnerConfig = field(default_factory=RunnerConfig)
    runner_wrapper: RunnerWrapperConfig = field(default_factory=RunnerWrapperConfig)
    optimizer: Dict[str, Any] = field(default_factory=lambda: {"type": "AdamW"})
    lr_schedule: Dict[str, Any] = field(default_factory=lambda: {"type": "ConstantWarmUpLR"})
    train_dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelSection = field(default_factory=ModelSection)
    processor: ProcessorConfig = field(default_factory=ProcessorConfig)
    # typed callback configs, built by config.load (not by the generic builder)
    callbacks: List[Any] = field(default_factory=list, init=False)
    # MindSpore Transformers keys accepted and ignored (see IGNORED_TOP_LEVEL)
    ignored: Dict[str, Any] = field(default_factory=dict, init=False)

    # -- derived views ----------------------------------------------------------------------
    @property
    def optimizer_shard(self) -> bool:
        """parallel_config.optimizer_shard, or parallel.enable_parallel_optimizer when unset."""
        if self.parallel_config.optimizer_shard is not None:
            return bool(self.parallel_config.optimizer_shard)
        return bool(self.parallel.enable_parallel_optimizer)

    def callback(self, kind: str):
        """The first callback config of type `kind`, or None."""
        for cb in self.callbacks:
            if cb.type == kind:
                return cb
        return None

    def _validate(self, where: str) -> None:
        _require(self.run_mode in RUN_MODES,
                 f"config key 'run_mode' must be one of {RUN_MODES}, got {self.run_mode!r}")
        _require(self.derived_write in DERIVED_WRITES,
                 f"config key 'derived_write' must be one of {DERIVED_WRITES}, "
                 f"got {self.derived_write!r}")
        _require(self.load_ckpt_format in CKPT_FORMATS,
                 f"config key 'load_ckpt_format' only supports 'ckpt' or 'safetensors', "
                 f"got {self.load_ckpt_format!r}")
        _require(self.transform_process_num >= 1, "config key 'transform_process_num' must be >= 1")
        _require(self.verify_checksums in (True, False, "read", "full", "off"),
                 f"config key 'verify_checksums' must be True, False or 'full', got "
                 f"{self.verify_checksums!r}")
        if isinstance(self.resume_training, str) and not self.resume_training:
            self.resume_training = False
        self.load_checkpoint = self.load_checkpoint.rstrip("/") if self.load_checkpoint != "/" \
            else self.load_checkpoint
        _require(self.data_skip_steps is None or self.data_skip_steps >= 0,
                 f"config key 'data_skip_steps' must be >= 0, got {self.data_skip_steps}")
        if not self.load_checkpoint and self.pretrained_model_dir:
            # As MindSpore Transformers (Trainer._check_config_rules): an empty load_checkpoint
            # takes pretrained_model_dir when it holds safetensors weights.
            import glob
            if glob.glob(os.path.join(self.pretrained_model_dir, "*.safetensors")):
                logger.info("load_checkpoint is empty: loading pretrained_model_dir %s",
                            self.pretrained_model_dir)
                self.load_checkpoint = self.pretrained_model_dir.rstrip("/")
            else:
                logger.warning("config key 'pretrained_model_dir' = %r holds no *.safetensors "
                               "file: it has no effect", self.pretrained_model_dir)
        warn_no_effect(self, NO_EFFECT_TOP_LEVEL, "")
        if self.predict_batch_size is not None:
            _require(self.predict_batch_size >= 1, "config key 'predict_batch_size' must be >= 1")
        pc = self.parallel_config
        if not self.use_parallel and pc.device_num != 1 and not self.only_save_strategy:
            # As MindSpore Transformers: a stand-alone run ignores the distributed strategy.
            logger.warning("use_parallel is False: ignoring parallel_config (data_parallel=%d, "
                           "model_parallel=%d, pipeline_stage=%d) and running on one device",
                           pc.data_parallel, pc.model_parallel, pc.pipeline_stage)
            pc.data_parallel = pc.model_parallel = pc.pipeline_stage = 1
            pc.micro_batch_num = 1
