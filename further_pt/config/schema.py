"""Schemas: the types of every recipe key, and no defaults.

Every field is ``MISSING``: all defaults live in ``recipes/``, so a recipe that
forgets a key fails validation naming it, and nothing here can silently differ
from what a recipe says. OmegaConf checks types against these dataclasses when
config.py merges a recipe into them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass
class FromScratchSchema:
    """A new BERT built from a config, with a WordPiece tokenizer trained on the corpus."""

    vocab_size: int = MISSING
    hidden_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    intermediate_size: int = MISSING
    max_position_embeddings: int = MISSING  # >= data.max_seq_length; 512 lets fine-tuning use 512
    lowercase: bool = MISSING
    tokenizer_training_docs: int = MISSING  # documents read to train the tokenizer


@dataclass
class ExtendVocabSchema:
    """Domain vocabulary: frequent corpus words the tokenizer splits become new tokens."""

    max_new_tokens: int = MISSING
    min_frequency: int = MISSING


@dataclass
class ModelSchema:
    name_or_path: str | None = MISSING
    tokenizer: str | None = MISSING
    trust_remote_code: bool = MISSING
    attn_implementation: str | None = MISSING
    from_scratch: FromScratchSchema | None = MISSING
    extend_vocab: ExtendVocabSchema | None = MISSING  # pretraining only; null = off


@dataclass
class PretrainDataSchema:
    train_files: list[Any] = MISSING  # paths/globs/hf:/builtin: strings, or dataset mappings
    source_weights: list[float] | None = MISSING
    txt_documents: str = MISSING  # "line" or "blank_line"
    text_column: str = MISSING
    max_seq_length: int = MISSING
    short_seq_prob: float = MISSING
    max_documents: int | None = MISSING
    cache_dir: str | None = MISSING
    preprocessing_workers: Any = MISSING  # "auto" or an int >= 1
    dataloader_workers: int = MISSING
    group_by_length: bool = MISSING
    eval_files: list[Any] | None = MISSING  # held-out documents; or eval_fraction; null: none
    eval_fraction: float | None = MISSING  # a seeded share of train_files' documents
    streaming: bool = MISSING  # read, tokenize and pack on the fly (corpora larger than the disk)


@dataclass
class PretrainEvalSchema:
    """Held-out MLM loss and perplexity during pretraining."""

    every_steps: int = MISSING
    batch_size: int = MISSING
    max_sequences: int = MISSING


@dataclass
class HeadWarmupSchema:
    """Newly initialised heads learn alone (encoder frozen) before the whole model trains."""

    steps: Any = MISSING  # "auto" or an int >= 0
    auto_steps: int = MISSING
    lr: float = MISSING


@dataclass
class ObjectiveSchema:
    nsp: bool = MISSING
    masked_lm_prob: float = MISSING
    max_predictions_per_seq: int = MISSING
    masking: str = MISSING  # token | whole_word | span
    span_geometric_p: float = MISSING
    span_max_words: int = MISSING
    head_warmup: HeadWarmupSchema = field(default_factory=lambda: HeadWarmupSchema())


@dataclass
class OptimizerSchema:
    """The AdamW, clipping, precision and logging keys both loops share under ``train``."""

    weight_decay: float = MISSING
    adam_beta1: float = MISSING
    adam_beta2: float = MISSING
    adam_epsilon: float = MISSING
    max_grad_norm: float = MISSING
    mixed_precision: str | None = MISSING
    max_nonfinite_steps: int = MISSING
    log_every_steps: int = MISSING
    collective_timeout_s: float = MISSING
    fast_cpu_dropout: bool = MISSING
    global_batch_size: int | None = MISSING
    ddp_comm_hook: str | None = MISSING  # null | bf16 | fp16: DDP's gradient all-reduce dtype
    stop_check_every_steps: int = MISSING
    tf32: bool = MISSING
    compile: bool = MISSING
    trackers: Any = MISSING  # a list of Accelerate trackers (tensorboard, wandb, mlflow, ...);
    # [] / none / null: none. Any, not list[str]: `train.trackers=wandb` (one name) is a list too


@dataclass
class PretrainTrainSchema(OptimizerSchema):
    max_steps: int = MISSING
    batch_size: int = MISSING
    gradient_accumulation_steps: int = MISSING
    lr: float = MISSING
    warmup_steps: int = MISSING
    short_run_warmup_ratio: float = MISSING  # the warm-up's share of a run shorter than it


@dataclass
class CheckpointSchema:
    every_steps: int | None = MISSING  # null: at the end of every epoch
    keep_last: int = MISSING


@dataclass
class HubSchema:
    """Publishing to the Hugging Face Hub."""

    model_id: str | None = MISSING  # null: no upload
    private: bool = MISSING
    revision: str | None = MISSING  # a branch; null: main
    strategy: str = MISSING  # end | every_checkpoint


@dataclass
class PretrainCheckpointSchema(CheckpointSchema):
    keep_best_by: str | None = MISSING  # null | eval_loss


@dataclass
class PretrainSchema:
    output_dir: str = MISSING
    overwrite_output_dir: bool = MISSING
    seed: int = MISSING
    model: ModelSchema = field(default_factory=ModelSchema)
    data: PretrainDataSchema = field(default_factory=PretrainDataSchema)
    objective: ObjectiveSchema = field(default_factory=ObjectiveSchema)
    train: PretrainTrainSchema = field(default_factory=PretrainTrainSchema)
    eval: PretrainEvalSchema = field(default_factory=PretrainEvalSchema)
    checkpoint: PretrainCheckpointSchema = field(default_factory=PretrainCheckpointSchema)
    hub: HubSchema = field(default_factory=HubSchema)


@dataclass
class FinetuneDataSchema:
    train_file: str | None = MISSING
    eval_file: str | None = MISSING
    text_column: str = MISSING
    text_pair_column: str | None = MISSING
    label_column: str = MISSING
    max_seq_length: int = MISSING
    truncation: str = MISSING  # head | tail | head_tail | segments
    head_tokens: Any = MISSING  # "auto" or an int
    max_segments: int = MISSING
    cache_dir: str | None = MISSING
    dataloader_workers: int = MISSING
    group_by_length: bool = MISSING
    invalid_rows: str = MISSING  # error | skip
    max_train_examples: int | None = MISSING


@dataclass
class TaskSchema:
    name: str = MISSING
    train_file: str = MISSING
    eval_file: str | None = MISSING
    text_column: str = MISSING
    label_column: str = MISSING


@dataclass
class TaskKindSchema:
    """What a row's label is: one class, a list of classes, or a number to predict."""

    kind: str = MISSING  # single_label | multi_label | regression
    threshold: Any = MISSING  # multi_label: a float in (0, 1), or "tune"


@dataclass
class HeadSchema:
    pooling: str = MISSING  # cls | pooler | cls_raw | mean | max | concat
    layers: list[int] = MISSING
    layer_combine: str = MISSING  # concat | mean | max
    segment_pooling: str = MISSING  # mean | max | attention
    dropout: float = MISSING


@dataclass
class FinetuneTrainSchema(OptimizerSchema):
    epochs: int = MISSING
    early_stopping_patience: int | None = MISSING  # null: train every epoch
    batch_size: int = MISSING
    gradient_accumulation_steps: int = MISSING
    lr: float = MISSING
    head_lr: float = MISSING
    layer_decay: float = MISSING
    schedule: str = MISSING  # stlr | linear | cosine | constant
    warmup_ratio: float = MISSING
    stlr_cut_frac: float = MISSING
    stlr_ratio: float = MISSING
    unfreeze: str = MISSING  # none | epoch | steps
    unfreeze_every_steps: int | None = MISSING
    freeze_encoder: bool = MISSING
    class_weights: Any = MISSING  # null | balanced | {label: weight}: weighted cross-entropy


@dataclass
class EvalSchema:
    metric: str = MISSING  # auto, or one of the task kind's (config.tasks.EVAL_METRICS)
    every_steps: int | None = MISSING  # null: at the end of every epoch
    batch_size: int = MISSING


@dataclass
class FinetuneSchema:
    output_dir: str = MISSING
    overwrite_output_dir: bool = MISSING
    seed: int = MISSING
    model: ModelSchema = field(default_factory=ModelSchema)
    data: FinetuneDataSchema = field(default_factory=FinetuneDataSchema)
    tasks: list[TaskSchema] | None = MISSING
    task: TaskKindSchema = field(default_factory=TaskKindSchema)
    head: HeadSchema = field(default_factory=HeadSchema)
    train: FinetuneTrainSchema = field(default_factory=FinetuneTrainSchema)
    eval: EvalSchema = field(default_factory=EvalSchema)
    checkpoint: CheckpointSchema = field(default_factory=CheckpointSchema)
    hub: HubSchema = field(default_factory=HubSchema)


@dataclass
class ExperimentTaskSchema:
    train_file: str = MISSING
    eval_file: str = MISSING
    text_column: str = MISSING
    label_column: str = MISSING
    # single_label | multi_label | regression; null (an experiment file from before task
    # kinds, without the key): single_label
    kind: str | None = None


@dataclass
class CorporaSchema:
    within_task: list[str] | None = MISSING  # null: the task's training text
    in_domain: list[str] = MISSING
    cross_domain: list[str] = MISSING
    selected: list[str] | None = None  # `further-pt select`'s output: the `selected` variant


@dataclass
class StageSchema:
    recipe: str = MISSING
    overrides: list[str] = MISSING


@dataclass
class SizeOverridesSchema:
    """Fine-tuning overrides for one training-set size (e.g. more epochs for 400 examples)."""

    size: int | None = MISSING
    overrides: list[str] = MISSING


@dataclass
class FinetuneStageSchema:
    recipe: str = MISSING
    overrides: list[str] = MISSING
    by_size: list[SizeOverridesSchema] = MISSING


@dataclass
class PretrainStageSchema:
    overrides: list[str] = MISSING


@dataclass
class ForgettingSchema:
    docs: int = MISSING
    in_domain_docs: int = MISSING
    max_seq_length: int = MISSING


@dataclass
class LinearSchema:
    """The ``linear`` variant: TF-IDF (word + char n-grams) + logistic regression, fixed values."""

    C: float = MISSING  # inverse regularisation strength, fixed a priori (not tuned on dev)
    word_ngrams: list[int] = MISSING  # [min, max]
    char_ngrams: list[int] = MISSING  # [min, max]


@dataclass
class AblationSchema:
    """One more further-pretrained variant: a variant's pretraining with extra overrides."""

    name: str = MISSING  # the row's key, e.g. itpt_no_warmup
    variant: str = MISSING  # itpt | idpt | cdpt: the corpus and recipe it starts from
    overrides: list[str] = MISSING  # pretraining overrides on top of pretrain.overrides
    # the training sizes it is fine-tuned at (a subset of train_sizes); null: every size
    train_sizes: list[int | None] | None = None


@dataclass
class ExperimentSchema:
    output_dir: str = MISSING
    seeds: list[int] = MISSING
    variants: list[str] = MISSING
    ablations: list[AblationSchema] = MISSING
    train_sizes: list[int | None] = MISSING  # labelled training examples per run; null = all
    base_model: str | None = MISSING
    general_pretraining: StageSchema | None = MISSING
    task: ExperimentTaskSchema = field(default_factory=ExperimentTaskSchema)
    corpora: CorporaSchema = field(default_factory=CorporaSchema)
    pretrain: PretrainStageSchema = field(default_factory=PretrainStageSchema)
    finetune: FinetuneStageSchema = field(default_factory=FinetuneStageSchema)
    forgetting: ForgettingSchema = field(default_factory=ForgettingSchema)
    linear: LinearSchema = field(default_factory=LinearSchema)
    launcher: list[str] = MISSING


# Nulls a run refuses: of each group, one key must be set (the validators say which is
# missing). ``further-pt config`` marks the first key of a group whose keys are all null as
# not set, beside the ``???`` keys, so a recipe read before its data names what a run needs.
REQUIRED_ONE_OF: dict[type, list[tuple[str, ...]]] = {
    PretrainSchema: [("model.name_or_path", "model.from_scratch")],
    FinetuneSchema: [("data.train_file", "tasks")],
    ExperimentSchema: [("base_model", "general_pretraining")],
}
