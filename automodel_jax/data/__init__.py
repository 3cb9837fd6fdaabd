"""Data: tokenized SFT datasets (answer-only labels, already shifted) and a resumable grain loader."""
from automodel_jax.data.builders import (BUILDERS, TokenizedDataset, build_dataset, check_dataset_config, check_fit,
                                         data_defaults, dataset_defaults, fit_samples, resolve_pad_id)
from automodel_jax.data.encoding import IGNORE, check_vocabulary
from automodel_jax.data.loader import BatchIterator, make_loader
from automodel_jax.data.sources import DataError, load_rows

__all__ = ["BUILDERS", "BatchIterator", "DataError", "IGNORE", "TokenizedDataset", "build_dataset", "check_dataset_config",
           "check_fit",
           "check_vocabulary", "data_defaults", "dataset_defaults", "fit_samples", "load_rows", "make_loader",
           "resolve_pad_id"]
