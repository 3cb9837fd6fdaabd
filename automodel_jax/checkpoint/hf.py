"""Hugging Face checkpoints in and out: streaming safetensors load onto shardings, and sharded export.

The name map is one table, `LEAF_TO_HF`: our parameter path `a.b.q_proj.kernel` is HF's `a.b.q_proj.weight`
transposed; `embedding` and `scale` are HF's `weight` as they are; `bias` is `bias`. A scanned model's stacked
parameter `model.layers.self_attn.q_proj.kernel` [L, in, out] holds one HF tensor per layer,
`model.layers.{i}.self_attn.q_proj.weight` (`hf_tensors`); load writes each into its slice of the stacked array on the
devices, export reads each slice back.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from automodel_jax.checkpoint.safetensors_io import (DTYPES, CheckpointError, SafetensorsFile, dtype_name,
                                                     write_file)
from automodel_jax.models.params import flatten, layer_path, path_str, pure_dict, stacked_at, unflatten
from automodel_jax.models.base import CausalLM, HFSource, family_config
from automodel_jax.parallel.sharding import DEFAULT_RULES, make_mesh, param_shardings

log = logging.getLogger("automodel_jax.checkpoint")

LEAF_TO_HF = {"kernel": ("weight", True), "embedding": ("weight", False), "scale": ("weight", False),
              "bias": ("bias", False)}
# Tensors HF names or lays out outside that rule, by the end of the name the rule gives: {suffix: (HF suffix,
# transposed?)}. Gemma 3's projector weight is a bare [in, out] parameter; SigLIP's patch conv kernel is kept in HF's
# [out, in, kh, kw] layout.
HF_EXCEPTIONS = {"mm_input_projection_weight.weight": ("mm_input_projection_weight", False),
                 "patch_embedding.weight": ("patch_embedding.weight", False)}
# Other key layouts that transformers also loads, by model_type: (pattern, replacement) applied in order to a
# checkpoint's tensor names gives ours (Gemma 3: the runtime names `model.language_model.*`, `lm_head.weight`,
# `model.vision_tower.*`, and published checkpoints' `vision_tower.vision_model.*`; ours are what transformers 5
# save_pretrained writes: `language_model.model.*`, `language_model.lm_head.*`, `vision_tower.*`).
HF_KEY_ALIASES = {"gemma3": ((r"^model\.language_model\.", "language_model.model."),
                             (r"^lm_head\.", "language_model.lm_head."),
                             (r"^model\.(vision_tower|multi_modal_projector)\.", r"\1."),
                             (r"^vision_tower\.vision_model\.", "vision_tower."))}
# Buffers that old HF checkpoints carry but that are recomputed, never learned.
IGNORED_HF_KEYS = re.compile(r".*\.rotary_emb\.inv_freq$")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", CHAT_TEMPLATE_FILE, "chat_template.json")
# A VLM's processor (image processor settings, processor class and options); copied with the tokenizer files.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
# Bytes of checkpoint tensors a load has on their way to the devices at once, and the largest piece of a tensor it
# transfers in one go (see `Placing` and `row_pieces`).
HOST_BYTES_IN_FLIGHT = 512 << 20
PIECE_BYTES = 128 << 20


def hf_name(path: tuple) -> tuple[str, bool]:
    """(HF tensor name, transposed?) for one of our parameter paths."""
    leaf, transpose = LEAF_TO_HF[path[-1]]
    name = path_str(path[:-1] + (leaf,))
    for suffix, (hf_suffix, hf_transpose) in HF_EXCEPTIONS.items():
        if name == suffix or name.endswith("." + suffix):
            return name[:len(name) - len(suffix)] + hf_suffix, hf_transpose
    return name, transpose


def hf_tensors(path: tuple, shape: tuple) -> list[tuple[str, bool, int | None]]:
    """(HF tensor name, transposed?, layer) of every HF tensor our parameter `path` of `shape` holds: one, with layer
    None, or for a stacked path of scanned layers [L, ...] one per layer i, which is the slice [i]."""
    if stacked_at(path) is None:
        return [(*hf_name(path), None)]
    return [(*hf_name(layer_path(path, i)), i) for i in range(shape[0])]


def our_key(name: str, model_type: str | None) -> str:
    """A checkpoint tensor name in our key layout (see HF_KEY_ALIASES)."""
    for pattern, replacement in HF_KEY_ALIASES.get(model_type, ()):
        name = re.sub(pattern, replacement, name)
    return name


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A local HF checkpoint directory, or a Hub name resolved through the HF cache (downloading when online)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists() or str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
        raise FileNotFoundError(f"model path {str(path)!r} is not a checkpoint directory; pass a local HF "
                                f"checkpoint directory or a Hub name such as 'meta-llama/Llama-3.2-1B'")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(path), allow_patterns=HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - any Hub failure becomes one clear line
        raise FileNotFoundError(f"model {str(path)!r} is not a local directory and could not be fetched from the "
                                f"Hugging Face Hub ({type(e).__name__}); download it first or pass a local path")


def read_hf_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing config.json; an HF checkpoint directory needs config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})")


class CheckpointTensors:
    """Every tensor of a single-file or sharded safetensors checkpoint, by name, opened lazily."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (directory / f).is_file()]
            if missing:
                raise CheckpointError(f"{index}: lists shard {missing[0]} which is missing from {directory}")
        elif single.is_file():
            files = ["model.safetensors"]
        else:
            pickles = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            hint = (f"found only {pickles[0]} (pickle), which is never loaded; convert it with transformers: "
                    f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
                    if pickles else "no model.safetensors or model.safetensors.index.json")
            raise CheckpointError(f"{directory}: {hint}")
        self.files = {name: SafetensorsFile(directory / name) for name in files}
        self.where = {}
        for f in self.files.values():
            for key in f.keys():
                if key in self.where:
                    raise CheckpointError(f"{directory}: tensor {key} is stored in both {self.where[key].path.name} "
                                          f"and {f.path.name}, so which one is meant is unclear; keep it in one shard")
                self.where[key] = f

    def names(self):
        return self.where.keys()

    def get(self, name: str) -> tuple[np.ndarray, Path]:
        f = self.where[name]
        return f.get(name), f.path

    def release(self, name: str, rows: slice | None = None) -> None:
        self.where[name].release(name, rows)


def _abstract_model(cls, cfg, dtype, param_dtype):
    abstract = nnx.eval_shape(lambda: cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shapes = {tuple(p): (leaf.shape, leaf.dtype) for p, leaf in flatten(pure_dict(state)).items()}
    return abstract, graphdef, shapes


@jax.jit(static_argnames=("transpose", "dtype", "sharding"))
def _to_param(pieces, *, transpose, dtype, sharding):
    x = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)
    return jax.lax.with_sharding_constraint((x.T if transpose else x).astype(dtype), sharding)


@jax.jit(static_argnames=("shape", "dtype", "sharding"))
def _stacked_zeros(*, shape, dtype, sharding):
    """A stacked parameter's array [L, ...] allocated on its sharding, for `_put_layer` to fill."""
    return jax.lax.with_sharding_constraint(jnp.zeros(shape, dtype), sharding)


@functools.partial(jax.jit, static_argnames=("transpose", "sharding"), donate_argnums=0)
def _put_layer(stacked, pieces, layer, *, transpose, sharding):
    """`stacked` [L, ...] (donated: updated in place) with slice [layer] replaced by one layer's HF tensor from
    `pieces` (joined, transposed and cast as `_to_param` does), and a scalar that is ready once `pieces` were read."""
    x = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)
    x = (x.T if transpose else x).astype(stacked.dtype)
    out = jax.lax.dynamic_update_slice_in_dim(stacked, x[None], layer, axis=0)
    return jax.lax.with_sharding_constraint(out, sharding), x.ravel()[0]


def row_pieces(shape: tuple[int, ...], itemsize: int, rows_split: bool) -> list[slice | None]:
    """The row ranges (axis 0) a tensor is transferred in, each at most PIECE_BYTES, or [None] (whole): only when the
    devices do not split axis 0 (not `rows_split`), so that each device joins its pieces without communication."""
    row_bytes = math.prod(shape[1:]) * itemsize
    if not shape or rows_split or shape[0] * row_bytes <= PIECE_BYTES:
        return [None]
    step = max(1, PIECE_BYTES // row_bytes)
    return [slice(i, min(i + step, shape[0])) for i in range(0, shape[0], step)]


def _is_head(name: str) -> bool:
    """Whether `name` is an output head's weight (`lm_head.weight`, a VLM's `language_model.lm_head.weight`)."""
    return name == "lm_head.weight" or name.endswith(".lm_head.weight")


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _untie_stored_head(directory: Path, tensors: CheckpointTensors, on_disk: dict) -> bool:
    """For a config that ties the output head to the input embedding, settle a stored head as transformers does:
    the only one of the pair stored -> it is the shared weight; equal to the embedding -> tied (nothing is lost);
    different -> untied, with a warning naming both (True). Edits `on_disk` ({our name: stored name}) to match."""
    head = next((n for n in on_disk if _is_head(n)), None)
    if head is None:
        return False
    embed = head[:-len("lm_head.weight")] + "model.embed_tokens.weight"
    if embed not in on_disk:
        on_disk[embed] = on_disk.pop(head)
        return False
    a, b = tensors.get(on_disk[head])[0], tensors.get(on_disk[embed])[0]
    same = a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))
    for name in (on_disk[head], on_disk[embed]):  # the comparison read both: their pages go until they are loaded
        tensors.release(name)
    if same:
        del on_disk[head]
        return False
    log.warning("%s: config.json ties %s to %s (tie_word_embeddings), but the checkpoint stores both with different "
                "values; they are loaded untied, as transformers does. Set tie_word_embeddings=false in config.json "
                "to silence this warning", directory, on_disk[head], on_disk[embed])
    return True


def _untied_config(hf_config: dict) -> dict:
    """`hf_config` with tie_word_embeddings false (top level, and in text_config where a VLM keeps it)."""
    untied = {**hf_config, "tie_word_embeddings": False}
    if "tie_word_embeddings" in (hf_config.get("text_config") or {}):
        untied["text_config"] = {**hf_config["text_config"], "tie_word_embeddings": False}
    return untied


def _check_tensor_names(directory: Path, model_class: str, expected: set, on_disk: dict) -> None:
    """CheckpointError naming the tensors the model needs but the checkpoint lacks, or the checkpoint has but the
    model lacks: transformers would initialise the first randomly and drop the second, with a warning."""
    missing = sorted(expected - set(on_disk))
    if len(missing) == 1 and _is_head(missing[0]):
        raise CheckpointError(f"{directory}: config.json has tie_word_embeddings=false but the checkpoint has no "
                              f"{missing[0]} (transformers would initialise it randomly); set tie_word_embeddings="
                              f"true in config.json if the output head is the input embedding, or use the complete "
                              f"checkpoint")
    if missing:
        raise CheckpointError(f"{directory}: the checkpoint lacks {len(missing)} tensor(s) that the {model_class} of "
                              f"its config.json needs: {_names(missing)} (transformers would initialise them "
                              f"randomly); use the complete checkpoint, or the config.json it was saved with")
    unexpected = sorted(on_disk[n] for n in on_disk if n not in expected)
    if unexpected:
        raise CheckpointError(f"{directory}: the checkpoint has {len(unexpected)} tensor(s) that the {model_class} of "
                              f"its config.json does not: {_names(unexpected)} (transformers would drop them); use "
                              f"the config.json the checkpoint was saved with, or a checkpoint without them")


class Placing:
    """Pieces of tensors on their way from the mapped files to the devices, at most `budget` bytes of them at once.

    While a piece is placed its host pages are resident, and a GPU runtime stages a pinned copy of them for the
    transfer (a pool that keeps its largest size); once the devices hold it, its `release` drops those pages. Several
    pieces in flight keep reading the next overlapped with transferring the last, and the host holds about
    max(budget, largest piece) of the checkpoint at any time.
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.pending: list[tuple[jax.Array, int, Callable[[], None]]] = []
        self.bytes = 0

    def make_room(self, nbytes: int) -> None:
        """Wait for the oldest pieces in flight until `nbytes` more fit in the budget (or none is left)."""
        while self.pending and self.bytes + nbytes > self.budget:
            placed, size, release = self.pending.pop(0)
            placed.block_until_ready()
            release()
            self.bytes -= size

    def add(self, placed: jax.Array, nbytes: int, release: Callable[[], None]) -> None:
        self.pending.append((placed, nbytes, release))
        self.bytes += nbytes

    def drain(self) -> None:
        self.make_room(self.budget + 1)


def load_pretrained(path, *, dtype=jnp.float32, param_dtype=jnp.float32, mesh=None, rules=DEFAULT_RULES,
                    model_overrides: dict | None = None) -> CausalLM:
    """Build the model for `path`'s config and stream its safetensors onto the mesh (one device when mesh is None).

    Each tensor is mapped from disk and placed in HF layout and source dtype onto its target sharding (a device reads
    only its own slice; a large tensor goes in row pieces, see `row_pieces`), then joined, transposed and cast on the
    devices; the host holds about HOST_BYTES_IN_FLIGHT of the checkpoint at a time (`Placing`), never all of it.
    """
    directory = resolve_checkpoint_dir(path)
    hf_config = read_hf_config(directory)
    cls, cfg = family_config(hf_config, str(directory / "config.json"), model_overrides)
    tensors = CheckpointTensors(directory)
    on_disk = {our_key(n, hf_config.get("model_type")): n for n in tensors.names()}
    if cfg.tie_word_embeddings and _untie_stored_head(directory, tensors, on_disk):
        cfg, hf_config = dataclasses.replace(cfg, tie_word_embeddings=False), _untied_config(hf_config)
    mesh = mesh or make_mesh()
    abstract, graphdef, shapes = _abstract_model(cls, cfg, dtype, param_dtype)
    shardings = param_shardings(abstract, {p: s for p, (s, _) in shapes.items()}, mesh, rules)
    expected = {name: (p, transpose, layer) for p, (shape, _) in shapes.items()
                for name, transpose, layer in hf_tensors(p, shape)}
    _check_tensor_names(directory, cls.__name__, set(expected),
                        {n: on_disk[n] for n in on_disk if not IGNORED_HF_KEYS.match(n)})
    params, source_dtypes = {}, []
    placing = Placing(HOST_BYTES_IN_FLIGHT)
    for name, (path_, transpose, layer) in expected.items():
        view, file = tensors.get(on_disk[name])
        shape, target_dtype = shapes[path_]
        spec = tuple(shardings[path_].spec) + (None,) * (len(shape) - len(shardings[path_].spec))
        if layer is not None:  # one layer's slice of a stacked parameter (the layer axis is never sharded)
            shape, spec = shape[1:], spec[1:]
        hf_shape = tuple(reversed(shape)) if transpose else tuple(shape)
        if view.shape != hf_shape:
            raise CheckpointError(f"{file}: tensor {on_disk[name]} has shape {list(view.shape)} but config.json "
                                  f"implies {list(hf_shape)}")
        hf_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
            *(reversed(spec) if transpose else spec)))
        pieces = []
        for rows in row_pieces(hf_shape, view.itemsize, hf_sharding.shard_shape(hf_shape)[:1] != hf_shape[:1]):
            piece = view if rows is None else view[rows]
            placing.make_room(piece.nbytes)
            pieces.append(jax.make_array_from_callback(piece.shape, hf_sharding,
                                                       lambda idx, v=piece: np.asarray(v[idx])))
            placing.add(pieces[-1], piece.nbytes, functools.partial(tensors.release, on_disk[name], rows))
        if layer is None:
            params[path_] = done = _to_param(tuple(pieces), transpose=transpose, dtype=target_dtype,
                                             sharding=shardings[path_])
        else:
            if path_ not in params:
                params[path_] = _stacked_zeros(shape=shapes[path_][0], dtype=target_dtype, sharding=shardings[path_])
            params[path_], done = _put_layer(params[path_], tuple(pieces), jnp.int32(layer), transpose=transpose,
                                             sharding=shardings[path_])
        # On a CPU a piece may alias the file's pages, which the conversion then reads again: they go once it is done.
        placing.add(done, 0, functools.partial(tensors.release, on_disk[name], None))
        source_dtypes.append((name, dtype_name(view.dtype)))
    placing.drain()
    model = nnx.merge(graphdef, unflatten(params))
    model.hf_source = HFSource(str(directory), json.dumps(hf_config), tuple(sorted(source_dtypes)))
    return model


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", size, re.I)
    if not m:
        raise ValueError(f"max_shard_size {size!r} is not a size such as '5GB' or '500MB'")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))


def host_array(x: jax.Array) -> np.ndarray:
    """All of `x` on this host (a collective when it spans processes: every process must call it)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def refuse_non_empty(out_dir, overwrite: bool,
                     fix: str = "choose another directory or pass overwrite=True (--overwrite) to replace it",
                     what: str = "output directory") -> Path:
    """The one check that nothing is overwritten: a non-empty `out_dir` is an error unless `overwrite`."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{what} {out} is not empty; {fix}")
    return out


def prepare_output_dir(out_dir, overwrite: bool) -> Path:
    """Refuse a non-empty directory unless overwrite; return a fresh temporary sibling to write into. It is made
    with the umask's default mode (as transformers' directories are), not tempfile's private 0700, because it is
    renamed into the output that servers running as other users read."""
    out = refuse_non_empty(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def commit_output_dir(tmp: Path, out_dir) -> None:
    """Swap the finished temporary directory in, so a failed export never leaves a half-written checkpoint."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)


def _path_order(path: tuple) -> tuple:
    """Sort key of a parameter path as nnx orders its state: names alphabetically, list indices numerically."""
    return tuple((0, k, "") if isinstance(k, int) else (1, 0, str(k)) for k in path)


def save_pretrained(model: CausalLM, out_dir, *, overwrite: bool = False, max_shard_size: int | str = "5GB",
                    params: dict | None = None, chat_template: str | None = None) -> None:
    """Write `model` (or `params`, a {path: array} override such as merged LoRA weights) as an HF checkpoint, with
    the source's tokenizer files (`chat_template` replacing theirs: see copy_tokenizer_files).

    Tensors are gathered one at a time; only process 0 writes; dtypes follow the source checkpoint when known.
    """
    budget = _parse_size(max_shard_size)
    primary = jax.process_index() == 0
    tmp = prepare_output_dir(out_dir, overwrite) if primary else None
    try:
        flat = flatten(pure_dict(model, nnx.Param)) if params is None else params
        source_dtypes = dict(model.hf_source.dtypes)
        entries = []
        for path, x in flat.items():
            if path[-1] not in LEAF_TO_HF:
                continue
            for name, transpose, layer in hf_tensors(path, x.shape):
                dtype = DTYPES[source_dtypes[name]] if name in source_dtypes else np.dtype(x.dtype)
                shape = x.shape if layer is None else x.shape[1:]
                entries.append((name, tuple(reversed(shape)) if transpose else tuple(shape), dtype, path, transpose,
                                layer))
        # In the order of the per-layer paths (an unrolled model's own order), so that a scanned model's files are
        # byte for byte the unrolled model's.
        entries.sort(key=lambda e: _path_order(e[3] if e[5] is None else layer_path(e[3], e[5])))
        shards, current, size = [], [], 0
        for entry in entries:
            nbytes = int(np.prod(entry[1])) * entry[2].itemsize
            if current and size + nbytes > budget:
                shards.append(current)
                current, size = [], 0
            current.append(entry)
            size += nbytes
        shards.append(current)
        by_name = {e[0]: e for e in entries}

        def fetch(name):
            _, _, dtype, path, transpose, layer = by_name[name]
            x = flat[path] if layer is None else flat[path][layer]
            return host_array((x.T if transpose else x).astype(dtype))

        weight_map, total = {}, 0
        for k, shard in enumerate(shards, 1):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            if primary:
                write_file(tmp / fname, [(e[0], e[1], e[2]) for e in shard], fetch)
            else:
                for e in shard:
                    fetch(e[0])
            for e in shard:
                weight_map[e[0]] = fname
                total += int(np.prod(e[1])) * e[2].itemsize
        if primary:
            _write_metadata(model, tmp, weight_map, total, len(shards), chat_template)
            commit_output_dir(tmp, out_dir)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_metadata(model: CausalLM, out: Path, weight_map: dict, total: int, n_shards: int,
                    chat_template: str | None) -> None:
    if n_shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    source = Path(model.hf_source.directory) if model.hf_source.directory else None
    config = json.loads(model.hf_source.config_json) if model.hf_source.config_json else None
    if config is None:
        raise CheckpointError("model has no HF config to export; build it with from_pretrained or from_config")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = source / "generation_config.json" if source else None
    if gen is not None and gen.is_file():
        shutil.copyfile(gen, out / "generation_config.json")
    else:
        keys = ("bos_token_id", "eos_token_id", "pad_token_id")
        text = config.get("text_config") or {}  # a VLM keeps its special token ids there
        ids = {k: config[k] if k in config else text[k] for k in keys if k in config or k in text}
        (out / "generation_config.json").write_text(json.dumps(ids) + "\n")
    copy_tokenizer_files(source, out, chat_template)


def copy_tokenizer_files(source: Path | None, out: Path, chat_template: str | None = None) -> list[str]:
    """Copy the tokenizer, chat template and (VLM) processor files that `source` has into `out`; returns their names.
    A None source (a model built from a config) copies nothing.

    `chat_template` (the one a run trained with, if it replaced the tokenizer's) becomes the exported tokenizer's:
    written to chat_template.jinja, which transformers reads before tokenizer_config.json's `chat_template`, and
    put in that key too where the source has it (older readers), so the two never disagree."""
    copied = [name for name in TOKENIZER_FILES + PROCESSOR_FILES if source is not None and (source / name).is_file()]
    for name in copied:
        shutil.copyfile(source / name, out / name)
    if chat_template is not None:
        (out / CHAT_TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
        config_file = out / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        if "chat_template" in config:
            config["chat_template"] = chat_template
            config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        copied = sorted({*copied, CHAT_TEMPLATE_FILE})
    return copied
