"""Dataset builders: config section -> TokenizedDataset of shifted samples, fit to seq_len.

Samples are tokenized once, up front: the data sets used for fine-tuning fit in host memory, the truncation/drop
counts are known before training starts, and the loader can index samples without any further work.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import ml_collections
from ml_collections import config_dict
import numpy as np

from automodel_jax.data.encoding import (IGNORE, bos_ids, encode_chat, encode_prompt_answer, normalize_messages, shift,
                                         token_ids)
from automodel_jax.data.sources import DataError, load_rows, require_columns

logger = logging.getLogger(__name__)

TRUNCATION_MODES = ("truncate", "drop")
# Losing more than this share of a dataset's rows to seq_len is a warning; a suggested seq_len fits KEEP_FRACTION.
WARN_LOST_FRACTION, KEEP_FRACTION = 0.05, 0.95


class TokenizedDataset(Sequence):
    """Samples ({input_ids, labels} int32 arrays, labels already shifted) plus how fitting them to seq_len went:
    `stats` (counts) and `spans` (int [rows, 2]: each row's untruncated length and first loss position, -1 if none)."""

    def __init__(self, name: str, samples: list[dict[str, np.ndarray]], stats: dict[str, int], spans: np.ndarray):
        self.name, self.samples, self.stats, self.spans = name, samples, stats, spans

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def loss_span(sample: dict[str, np.ndarray]) -> tuple[int, int]:
    """(length, position of the first label that carries loss, or -1) of an untruncated shifted sample."""
    supervised = np.flatnonzero(sample["labels"] != IGNORE)
    return len(sample["input_ids"]), int(supervised[0]) if len(supervised) else -1


def fit_samples(name: str, encoded: Iterable[tuple[list[int], list[bool]]], seq_len: int,
                truncation: str) -> TokenizedDataset:
    """Shift each (ids, supervised) pair; truncate or drop those longer than seq_len; drop those left without loss.
    How many rows that lost is judged by `check_fit`."""
    if truncation not in TRUNCATION_MODES:
        raise DataError(f"data.truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if seq_len < 1:
        raise DataError(f"data.seq_len must be positive, got {seq_len}")
    stats = {"rows": 0, "samples": 0, "truncated": 0, "dropped_too_long": 0, "dropped_no_loss": 0}
    samples, spans = [], []
    for ids, supervised in encoded:
        stats["rows"] += 1
        sample = shift(ids, supervised)
        spans.append(loss_span(sample))
        if len(sample["input_ids"]) > seq_len:
            if truncation == "drop":
                stats["dropped_too_long"] += 1
                continue
            stats["truncated"] += 1
            sample = {k: v[:seq_len] for k, v in sample.items()}
        if not (sample["labels"] != IGNORE).any():
            stats["dropped_no_loss"] += 1
            continue
        samples.append(sample)
    stats["samples"] = len(samples)
    return TokenizedDataset(name, samples, stats, np.asarray(spans, np.int64).reshape(-1, 2))


def check_fit(dataset, seq_len: int, truncation: str, min_kept_fraction: float,
              context: int | None = None) -> None:
    """Say how fitting `dataset` (TokenizedDataset or VLMDataset) to seq_len went: one INFO line when at most
    WARN_LOST_FRACTION of its rows were lost, a WARNING with hints computed from the rows and the settings when more
    were, a DataError when none, or fewer than `min_kept_fraction` (data.min_kept_fraction) of them, are left."""
    stats, rows, kept = dataset.stats, dataset.stats["rows"], dataset.stats["samples"]
    counts = (f"{stats['truncated']} truncated, {stats['dropped_too_long']} dropped as too long, "
              f"{stats['dropped_no_loss']} dropped with no loss tokens")
    summary = f"dataset {dataset.name}: {kept} of {rows} rows kept at seq_len {seq_len} ({counts})"
    if rows - kept <= WARN_LOST_FRACTION * rows:
        logger.info(summary)
        return
    hints = "; ".join(fit_hints(dataset.spans, seq_len, truncation, context))
    if kept == 0:
        raise DataError(f"dataset {dataset.name}: no sample is left after fitting to seq_len {seq_len} (of {rows} "
                        f"rows: {counts}); {hints}")
    if kept < min_kept_fraction * rows:
        raise DataError(f"{summary}, fewer than data.min_kept_fraction={min_kept_fraction:g} of them; {hints}; or "
                        "set data.min_kept_fraction=0 to train on what is left")
    logger.warning("%s; %s", summary, hints)


def fit_hints(spans: np.ndarray, seq_len: int, truncation: str, context: int | None = None) -> list[str]:
    """What would keep more rows, from each row's (length, first loss position) and the settings in force; a
    longer seq_len is suggested only up to the model's `context` (positions) when it is given."""
    length, first_loss = spans[:, 0], spans[:, 1]
    has_loss = first_loss >= 0
    hints = []
    too_long = has_loss & (length > seq_len)
    if too_long.any():
        ordered = np.sort(length[has_loss])  # the smallest length that fits KEEP_FRACTION of them:
        fits = int(ordered[max(int(np.ceil(KEEP_FRACTION * len(ordered) - 1e-9)) - 1, 0)])
        if context is not None and fits > context > seq_len:  # the longest the model takes
            share = float(np.mean(ordered <= context))
            hints.append(f"data.seq_len={context} (the model's context) would fit {share:.0%} of the rows whole")
        elif fits > seq_len and (context is None or fits <= context):
            hints.append(f"data.seq_len={fits} would fit {KEEP_FRACTION:.0%} of the rows whole")
        reachable = int((too_long & (first_loss < seq_len)).sum())
        if truncation == "drop" and reachable:
            hints.append(f"data.truncation='truncate' would keep {reachable} of the {int(too_long.sum())} rows "
                         f"longer than seq_len {seq_len} (cut to it)")
        cut_off = int((too_long & (first_loss >= seq_len)).sum())
        if truncation == "truncate" and cut_off:
            hints.append(f"{cut_off} rows have all their loss tokens after token {seq_len}, so truncation leaves them "
                         "nothing to learn")
    if not has_loss.all():
        hints.append(f"{int((~has_loss).sum())} rows have no loss tokens at all (empty answers or no assistant "
                     "turn): fix those rows")
    return hints


def build_instruction(cfg, tokenizer, seq_len: int, truncation: str) -> TokenizedDataset:
    """Column-mapped prompt/answer rows; `columns` maps template names (plus the required `answer`) to columns."""
    columns = dict(cfg.columns or {})
    fields = [k for k in columns if k != "answer"]
    if "answer" not in columns or not fields:
        raise DataError(f"data `columns` must map 'answer' and at least one prompt field to columns, got {columns}")
    rows = load_rows(cfg.path, cfg.split, cfg.limit)
    require_columns(rows, {column: f"columns.{k}" for k, column in columns.items()}, cfg.path)
    template = cfg.prompt_template
    if template is None:  # NeMo Automodel's default: context and question joined by spaces, then a space
        if not set(fields) <= {"context", "question"}:
            raise DataError(f"columns {fields} need a prompt_template (the default only knows context and question)")
        template = " ".join(f"{{{k}}}" for k in ("context", "question") if k in fields) + " "

    def encode(row):
        values = {k: "" if row[column] is None else str(row[column]) for k, column in columns.items()}
        try:
            prompt = template.format_map({k: values[k] for k in fields})
        except KeyError as e:
            raise DataError(f"prompt_template uses {{{e.args[0]}}}, which is not among the mapped columns "
                            f"{fields}") from e
        return encode_prompt_answer(tokenizer, prompt, values["answer"])

    encoded = map(encode, rows)
    return fit_samples(cfg.path, encoded, seq_len, truncation)


def build_squad(cfg, tokenizer, seq_len: int, truncation: str) -> TokenizedDataset:
    """SQuAD as NeMo Automodel's make_squad_dataset: loss on the first gold answer (stripped) and the EOS."""
    rows = load_rows(cfg.path, cfg.split, cfg.limit)
    require_columns(rows, dict.fromkeys(["context", "question", "answers"]), cfg.path)
    encoded = (encode_prompt_answer(tokenizer, f"Context: {row['context']} Question: {row['question']} Answer: ",
                                    row["answers"]["text"][0].strip() if row["answers"]["text"] else "")
               for row in rows)
    return fit_samples(cfg.path, encoded, seq_len, truncation)


def build_hellaswag(cfg, tokenizer, seq_len: int, truncation: str) -> TokenizedDataset:
    """HellaSwag as NeMo Automodel's SFT preprocessor: BOS + ctx + the gold ending, tokenized apart, loss on the ending.

    As there, the ending is tokenized on its own (SentencePiece tokenizers then start it with a word boundary) and
    no EOS follows it.
    """
    rows = load_rows(cfg.path, cfg.split, cfg.limit)
    require_columns(rows, dict.fromkeys(["ctx", "endings", "label"]), cfg.path)

    def encode(row):
        if str(row["label"]) not in {str(i) for i in range(len(row["endings"]))}:
            raise DataError(f"{cfg.path}: row {row.get('ind')} has no usable gold label ({row['label']!r}); "
                            "HellaSwag's test split is unlabelled, use train or validation")
        context = bos_ids(tokenizer) + token_ids(tokenizer, row["ctx"])
        ending = token_ids(tokenizer, row["endings"][int(row["label"])])
        return context + ending, [False] * len(context) + [True] * len(ending)

    return fit_samples(cfg.path, map(encode, rows), seq_len, truncation)


def build_chat(cfg, tokenizer, seq_len: int, truncation: str) -> TokenizedDataset:
    """Message lists through a chat template (the config's, else the tokenizer's); loss on assistant turns only."""
    template = cfg.chat_template or tokenizer.chat_template
    if not template:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no chat template: set the dataset's "
                        "`chat_template` to a Jinja template string")
    column = cfg.messages_column
    rows = load_rows(cfg.path, cfg.split, cfg.limit)
    require_columns(rows, {column: "messages_column"}, cfg.path)
    encoded = (encode_chat(tokenizer, normalize_messages(row[column], f"{cfg.path} row {i}"), template)
               for i, row in enumerate(rows))
    return fit_samples(cfg.path, encoded, seq_len, truncation)


def training_chat_template(data_cfg) -> str | None:
    """The chat template a run trains with in place of its tokenizer's (data.train.chat_template of a chat dataset),
    else None. Exports write it into their tokenizer files, so serving uses the prompt format of training."""
    train = data_cfg.train
    return train.get("chat_template") if train.get("kind") == "chat" else None


def build_mock(cfg, tokenizer, seq_len: int, truncation: str) -> TokenizedDataset:
    """Seeded uniform random tokens, full rows of seq_len with loss everywhere: for throughput benchmarks."""
    vocab_size = cfg.vocab_size or len(tokenizer)
    rng = np.random.default_rng(cfg.seed)
    tokens = rng.integers(0, vocab_size, (cfg.num_samples, seq_len + 1)).tolist()
    encoded = ((ids, [True] * len(ids)) for ids in tokens)
    return fit_samples("mock", encoded, seq_len, truncation)


BUILDERS: dict[str, Callable[..., TokenizedDataset]] = {
    "instruction": build_instruction, "squad": build_squad, "hellaswag": build_hellaswag, "chat": build_chat,
    "mock": build_mock,
}


def check_dataset_config(ds_cfg, where: str = "dataset") -> dict:
    """A dataset section (`data.train`, ...) with its kind's defaults filled in; DataError naming `where` for an
    unknown kind or setting (checked before anything is built, and again by `build_dataset`)."""
    given = dict(ds_cfg)
    if given.get("kind") not in BUILDERS:
        raise DataError(f"{where}: unknown dataset kind {given.get('kind')!r}: use one of {sorted(BUILDERS)}")
    cfg = dataset_defaults(given["kind"], path="", split="train")
    unknown = sorted(set(given) - set(cfg))
    if unknown:
        raise DataError(f"{where}: unknown dataset setting(s) {unknown}: the known ones are {sorted(cfg)}")
    cfg.update(given)
    return cfg


def build_dataset(ds_cfg, tokenizer, seq_len: int, truncation: str,
                  min_kept_fraction: float = 0.1, context: int | None = None) -> TokenizedDataset:
    """Dispatch on `ds_cfg.kind`; see data_defaults() for the keys each kind reads. Rows lost to seq_len are reported
    by `check_fit` (a DataError when fewer than `min_kept_fraction` of them are kept; its hints suggest no seq_len
    past the model's `context`, in positions, when given)."""
    cfg = check_dataset_config(ds_cfg)
    dataset = BUILDERS[cfg["kind"]](ml_collections.ConfigDict(cfg), tokenizer, seq_len, truncation)
    check_fit(dataset, seq_len, truncation, min_kept_fraction, context)
    return dataset


def resolve_pad_id(tokenizer, pad_token_id: int | None = None, pad_with_eos: bool = True) -> int:
    """The id that fills padding: the config's, else the tokenizer's, else (by default) EOS.

    Padding never carries loss (labels -100) and is masked out of attention (segment id 0), so reusing EOS is safe;
    it is what HF and NeMo Automodel users usually do for tokenizers without a pad token (Llama, stories260K).
    """
    if pad_token_id is not None:  # checked against the model's embedding table by check_vocabulary
        return pad_token_id
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if pad_with_eos and tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    fix = ("set data.pad_token_id, or data.pad_with_eos=True" if not pad_with_eos
           else "set data.pad_token_id (it has no EOS token to pad with either)")
    raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no pad token: {fix}")


def dataset_defaults(kind: str, path: str, split: str) -> dict:
    """Every key any builder reads, so configs can override any of them from the command line."""
    optional = config_dict.placeholder  # None by default, but typed so `--config.data.train.limit=400` works
    return dict(kind=kind, path=path, split=split, limit=optional(int),
                columns=dict(context="context", question="question", answer="answer"), prompt_template=optional(str),
                messages_column="messages", chat_template=optional(str), num_samples=1024, seed=0,
                vocab_size=optional(int))


def data_defaults() -> ml_collections.ConfigDict:
    """The `data` config section: SQuAD from the Hub, answer-only loss, no packing, EOS as pad when none is set,
    training samples reshuffled each epoch (seeded by the run's seed; shuffle=False keeps the file's order)."""
    return ml_collections.ConfigDict(dict(
        train=dataset_defaults("squad", "rajpurkar/squad", "train"),
        validation=dataset_defaults("squad", "rajpurkar/squad", "validation"),
        seq_len=512, truncation="truncate", packing=False, pad_token_id=config_dict.placeholder(int), pad_with_eos=True,
        shuffle=True,
        min_kept_fraction=0.1,  # fitting to seq_len must keep at least this share of each dataset's rows (0: any)
    ))
