"""VLM data on the real SROIE receipts and mllm_demo chats, through the embedded Gemma 3 and Qwen2.5-VL processors."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from automodel_jax.data import IGNORE, DataError
from automodel_jax.data import vlm, vlm_batches
from automodel_jax.recipes.vlm import embedded
from reference import DATA

VLM = DATA / "vlm"
SROIE = VLM / "sroie_small"
MLLM = VLM / "mllm_demo" / "mllm_demo.json"
MODEL_TYPES = ("gemma3", "qwen2_5_vl")
END_OF_TURN = {"gemma3": "<end_of_turn>\n", "qwen2_5_vl": "<|im_end|>\n"}


@pytest.fixture(scope="module", params=MODEL_TYPES)
def built(request, tmp_path_factory):
    """(model type, build_processor's info, the processor reloaded from disk)."""
    directory = tmp_path_factory.mktemp(request.param)
    info = embedded.build_processor(request.param, directory)
    return request.param, info, vlm.load_processor(directory)


def labelled_runs(sample):
    """Each maximal run of labelled positions -> the ids of the tokens it predicts."""
    labels = sample["labels"]
    runs, current = [], []
    for t, label in enumerate(labels):
        if label != IGNORE:
            current.append(int(label))
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def assert_sample(processor, info, sample, answers, num_images):
    """Shifted; labels exactly on the assistant answers (+ end of turn); image tokens never labelled and complete."""
    model_type = info["model_type"]
    ids, labels = sample["input_ids"], sample["labels"]
    assert ids.dtype == labels.dtype == np.int32 and ids.shape == labels.shape
    kept = labels[:-1] != IGNORE
    np.testing.assert_array_equal(labels[:-1][kept], ids[1:][kept])
    runs = [processor.tokenizer.decode(run) for run in labelled_runs(sample)]
    assert runs == [a.strip() + END_OF_TURN[model_type] for a in answers]
    image_ids = vlm.image_token_ids(processor)
    assert not np.isin(labels, image_ids).any()
    soft = info["image_token_index"] if model_type == "gemma3" else info["image_token_id"]
    if model_type == "gemma3":
        assert sample["pixel_values"].shape == (num_images, 3, info["image_size"], info["image_size"])
        assert (ids == soft).sum() == num_images * info["mm_tokens_per_image"]
    else:
        grid = sample["image_grid_thw"]
        assert grid.shape == (num_images, 3) and sample["pixel_values"].shape == (grid.prod(1).sum(), info["patch_dim"])
        assert (ids == soft).sum() == grid.prod(1).sum() // info["spatial_merge_size"] ** 2
    np.testing.assert_array_equal(sample["token_type_ids"], (ids == soft).astype(np.int32))


def test_processor_reloads_with_its_special_tokens(built):
    model_type, info, processor = built
    assert vlm.processor_model_type(processor) == model_type
    tokenizer = processor.tokenizer
    assert info["vocab_size"] == len(tokenizer.get_vocab()) == {"gemma3": 265, "qwen2_5_vl": 263}[model_type]
    if model_type == "gemma3":
        from transformers import AutoProcessor, Gemma3Processor
        assert isinstance(AutoProcessor.from_pretrained(tokenizer.name_or_path), Gemma3Processor)
        assert tokenizer.convert_tokens_to_ids("<image_soft_token>") == info["image_token_index"]
        assert tokenizer.boi_token_id == info["boi_token_index"]
        assert tokenizer.image_token_id == info["image_token_index"]
    else:
        assert processor.image_token_id == info["image_token_id"]
        assert tokenizer.convert_tokens_to_ids("<|vision_start|>") == info["vision_start_token_id"]
    text = "héllo, 世界 <s_total>9.00</s_total>"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


@pytest.mark.assets
def test_sroie_receipts_learn_the_json2token_answer(built):
    model_type, info, processor = built
    ds = vlm.build_vlm_dataset(dict(kind="cord", path=str(SROIE), limit=8), processor, seq_len=512,
                               truncation="error")
    rows = [json.loads(line) for line in (SROIE / "metadata.jsonl").read_text().splitlines()[:8]]
    assert len(ds) == 8 and ds.stats["samples"] == 8
    for row, sample in zip(rows, ds):
        gt = json.loads(row["ground_truth"])["gt_parse"]
        answer = "".join(f"<s_{k}>{gt[k]}</s_{k}>" for k in sorted(gt, reverse=True))
        assert_sample(processor, info, sample, [answer], num_images=1)


@pytest.mark.assets
def test_mllm_demo_chats_label_every_assistant_turn(built):
    model_type, info, processor = built
    ds = vlm.build_vlm_dataset(dict(kind="vlm_chat", path=str(MLLM)), processor, seq_len=1024, truncation="error")
    rows = json.loads(MLLM.read_text(encoding="utf-8"))
    assert len(ds) == len(rows) == 6
    for row, sample in zip(rows, ds):
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert_sample(processor, info, sample, answers, num_images=len(row["images"]))


def test_openai_content_parts_with_inline_images(built):
    model_type, info, processor = built
    red, blue = Image.new("RGB", (40, 30), "red"), Image.new("RGB", (30, 50), "blue")
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": red}, {"type": "text", "text": "A?"},
                                                        {"type": "image"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "red then blue"}]}],
             "images": [blue]}]
    ds = vlm.encode_rows("inline", processor, rows, seq_len=256, truncation="error")
    assert_sample(processor, info, ds[0], ["red then blue"], num_images=2)


@pytest.mark.assets
def test_batches_have_static_shapes(built):
    model_type, info, processor = built
    ds = vlm.build_vlm_dataset(dict(kind="vlm_chat", path=str(MLLM)), processor, seq_len=1024, truncation="error")
    collate = vlm_batches.make_collator(ds, seq_len=1024, pad_id=info["pad_token_id"], max_images=3,
                                max_patches=3 * 64 if model_type == "qwen2_5_vl" else None)
    loader = vlm_batches.make_vlm_loader(ds, collate, batch_size=4, seed=0, drop_remainder=False, num_epochs=1)
    batches = list(loader)
    assert len(batches) == 2
    shapes = {k: (v.shape, v.dtype) for k, v in batches[0].items()}
    assert all({k: (v.shape, v.dtype) for k, v in b.items()} == shapes for b in batches)
    b = batches[1]  # rows 4 and 5, then two padding rows
    assert shapes["input_ids"] == ((4, 1024), np.int32) and shapes["image_mask"] == ((4, 3), np.bool_)
    assert (b["labels"][2:] == IGNORE).all() and (b["segment_ids"][2:] == 0).all() and not b["image_mask"][2:].any()
    if model_type == "gemma3":
        assert shapes["pixel_values"] == ((4, 3, 3, 64, 64), np.float32)
    else:
        assert shapes["pixel_values"] == ((4, 192, info["patch_dim"]), np.float32)
        assert shapes["image_grid_thw"] == ((4, 3, 3), np.int32) and shapes["patch_mask"] == ((4, 192), np.bool_)
        n = b["image_grid_thw"].prod(-1).sum(-1)
        np.testing.assert_array_equal(b["patch_mask"].sum(-1), n)
    for row, k in enumerate(b["image_mask"].sum(-1)):  # image blocks in the text match the real images
        assert (b["input_ids"][row] == vlm.image_start_id(processor)).sum() == k


@pytest.mark.assets
def test_truncation_never_cuts_through_an_image(built):
    model_type, info, processor = built
    cfg = dict(kind="vlm_chat", path=str(MLLM), limit=1)  # <image> Q A, then Q<image> A
    full = vlm.build_vlm_dataset(cfg, processor, seq_len=1024, truncation="error")[0]
    second = np.flatnonzero(full["input_ids"] == vlm.image_start_id(processor))[1]
    with pytest.raises(DataError, match=r"mllm_demo.json row 0: .* exceed data.seq_len"):
        vlm.build_vlm_dataset(cfg, processor, seq_len=int(second) + 3, truncation="error")
    with pytest.raises(DataError, match="no sample is left"):
        vlm.build_vlm_dataset(cfg, processor, seq_len=int(second) + 3, truncation="drop")
    ds = vlm.build_vlm_dataset(cfg, processor, seq_len=int(second) + 3, truncation="truncate")
    sample = ds[0]
    assert ds.stats["images_cut"] == 1 and vlm.num_images(sample) == 1
    assert len(sample["input_ids"]) == second  # cut back to where the second image starts
    assert not np.isin(sample["input_ids"], vlm.image_token_ids(processor))[second - 3:].any()


def write_cord(tmp_path, files: dict[str, bytes | None]):
    """An imagefolder with one row per file (None: the file is missing)."""
    rows = []
    for name, data in files.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        rows.append({"file_name": name, "ground_truth": json.dumps({"gt_parse": {"total": "1.00"}})})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.assets
def test_bad_rows_name_the_row_and_the_file(built, tmp_path):
    _, _, processor = built
    good = (SROIE / "img" / "000.jpg").read_bytes()
    write_cord(tmp_path, {"a.jpg": good, "b.jpg": None})
    with pytest.raises(DataError, match=rf"{tmp_path}/metadata.jsonl row 1: image file {tmp_path}/b.jpg does not"):
        vlm.build_vlm_dataset(dict(kind="cord", path=str(tmp_path)), processor, seq_len=512, truncation="error")
    write_cord(tmp_path, {"a.jpg": good, "b.jpg": good, "c.jpg": good[:200]})
    with pytest.raises(DataError, match=rf"metadata.jsonl row 2: cannot read image {tmp_path}/c.jpg"):
        vlm.build_vlm_dataset(dict(kind="cord", path=str(tmp_path)), processor, seq_len=512, truncation="error")

    rows = json.loads(MLLM.read_text(encoding="utf-8"))[:3]
    for r in rows:
        r["images"] = [str(MLLM.parent / p) for p in r["images"]]
    bad = [json.loads(json.dumps(rows)) for _ in range(3)]
    bad[0][1]["messages"][0]["content"] += "<image>"  # more placeholders than images
    bad[1][2]["images"].append(bad[1][2]["images"][0])  # more images than placeholders
    bad[2][2]["messages"][1]["content"] = "  "  # empty assistant turn
    for rows_, match in zip(bad, ["row 1: 2 image placeholder.* but 1 image", "row 2: 1 image placeholder.* but 2",
                                  "row 2: an assistant turn is empty"]):
        path = tmp_path / "chat.json"
        path.write_text(json.dumps(rows_))
        with pytest.raises(DataError, match=rf"{path} {match}"):
            vlm.build_vlm_dataset(dict(kind="vlm_chat", path=str(path)), processor, seq_len=1024, truncation="error")


def test_rendered_task_is_deterministic_and_held_out(built, tmp_path, monkeypatch):
    model_type, info, processor = built
    monkeypatch.setenv("AUTOMODEL_JAX_CACHE", str(tmp_path))
    train = embedded.task_scenes("train")
    assert train == embedded.task_scenes("train")
    held = {embedded._key(s) for split in ("validation", "pretrain-validation") for _, s in embedded.task_scenes(split)}
    trained = {embedded._key(s) for split in ("train", "pretrain") for _, s in embedded.task_scenes(split)}
    assert not held & trained
    assert {t for t, _ in train} == set(embedded.TASKS)
    path = embedded.materialize("embedded:shapes/validation")
    assert embedded.materialize("embedded:shapes/validation") == path
    ds = vlm.build_vlm_dataset(dict(kind="vlm_chat", path=path, limit=16), processor, seq_len=192, truncation="error")
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()[:16]]
    for row, sample in zip(rows, ds):
        assert_sample(processor, info, sample, [row["messages"][1]["content"]], num_images=1)
    image = Image.open(Path(path).parent / rows[0]["images"][0])
    assert image.size == (embedded.CANVAS, embedded.CANVAS)
    task, scene = embedded.task_scenes("validation")[0]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(embedded.render(scene)))
