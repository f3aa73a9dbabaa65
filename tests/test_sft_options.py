"""SFTConfig options a TRL user passes to recipes/sft.py, checked against what TRL promises for them:
`--padding_free` (with and without `--packing`) and `--data_seed` for a shuffled stream; and the error for an image
path given relative to a folder that `--image_root` does not name."""

import sys
from pathlib import Path

import pytest
import torch

from recipes.sft_data import BadSampleError
from recipes.sft_data.easy_vqa import write_easy_vqa_sft
from recipes.sft_data.formats import to_sft_sample

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures.sft_runs import build, sft_argv  # noqa: E402

IGNORE = -100
_build = build


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_easy_vqa_sft(folder, limit=8, turns=2, layout="messages")
    return folder


def _argv(output_dir, data, model, *extra):
    return sft_argv(output_dir, data / "train.jsonl", data, "--max_steps", 2, "--per_device_train_batch_size", 3,
                    "--learning_rate", "1e-3", "--max_length", 256, "--save_strategy", "no", "--logging_steps", 1,
                    *extra, model=model)


def _losses(trainer):
    return torch.tensor([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])


def _hand_loss(model, padded):
    """Mean next-token NLL over the supervised tokens of a padded batch, each row run on its own, unpadded."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    images = iter(padded["pixel_values"])
    for ids, labels, mask in zip(padded["input_ids"], padded["labels"], padded["attention_mask"]):
        length = int(mask.sum())
        ids, labels = ids[:length], labels[:length]
        pixels = torch.stack([next(images) for _ in range(int((ids == model.config.image_token_id).sum())
                                                          // model.config.num_image_tokens)])
        logits = model(input_ids=ids[None], pixel_values=pixels, use_cache=False).logits[0, :-1]
        total += torch.nn.functional.cross_entropy(logits.double(), labels[1:], ignore_index=IGNORE, reduction="sum")
        count += int((labels[1:] != IGNORE).sum())
    return total / count


def test_padding_free_lays_the_batch_out_in_one_row_with_the_padded_loss(base_dir, data, tmp_path):
    """TRL's `padding_free`: the batch's conversations end to end in one row, positions restarting per conversation,
    no padding; the loss is the padded batch's (recomputed by hand from the model's logits, row by row)."""
    padded_trainer = _build(*_argv(tmp_path / "padded", data, base_dir))
    free_trainer = _build(*_argv(tmp_path / "free", data, base_dir, "--padding_free", "true"))
    padded = next(iter(padded_trainer.get_train_dataloader()))
    free = next(iter(free_trainer.get_train_dataloader()))

    keep = padded["attention_mask"].bool()
    assert "attention_mask" not in free and free["input_ids"].shape == (1, int(keep.sum()))
    assert torch.equal(free["input_ids"][0], padded["input_ids"][keep])
    assert torch.equal(free["labels"][0], padded["labels"][keep])  # row starts are prompt tokens: -100 either way
    lengths = keep.sum(1).tolist()
    assert torch.equal(free["position_ids"][0], torch.cat([torch.arange(n) for n in lengths]))
    torch.testing.assert_close(free["pixel_values"], padded["pixel_values"])

    model = free_trainer.model.eval()
    with torch.no_grad():
        expected = _hand_loss(model, padded)
        got = free_trainer.compute_loss(model, {k: v for k, v in free.items()})
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert free_trainer.args.padding_free  # the saved training_args.bin records it


@pytest.mark.parametrize("packing", [False, True])
def test_padding_free_trains_like_the_padded_run(base_dir, data, tmp_path, packing):
    """`--padding_free` alone, or with `--packing` (TRL's bfd packing is padding-free too): same losses as without."""
    extra = ["--packing"] if packing else []
    reference = _build(*_argv(tmp_path / "ref", data, base_dir, *extra))
    reference.train()
    free = _build(*_argv(tmp_path / "free", data, base_dir, *extra, "--padding_free", "true"))
    free.train()
    torch.testing.assert_close(_losses(free), _losses(reference), rtol=1e-5, atol=1e-5)


def _streamed_order(base_dir, data, folder, *seeds):
    trainer = _build(*_argv(folder, data, base_dir, "--dataset_streaming", "--shuffle_dataset",
                            "--shuffle_buffer_size", "8", *seeds))
    return [row["sample_id"] for row in trainer.train_dataset]


def test_data_seed_orders_a_shuffled_stream_as_it_orders_the_sampler(base_dir, data, tmp_path):
    """`data_seed` is the seed of the data order (transformers: `seed` when unset); a stream is shuffled by the kit,
    not by the Trainer's sampler, so the kit must use it."""
    by_data_seed = _streamed_order(base_dir, data, tmp_path / "a", "--seed", "0", "--data_seed", "5")
    by_seed = _streamed_order(base_dir, data, tmp_path / "b", "--seed", "5")
    default = _streamed_order(base_dir, data, tmp_path / "c", "--seed", "0")
    assert by_data_seed == by_seed
    assert sorted(by_data_seed) == sorted(default) and by_data_seed != default


def test_a_relative_image_path_without_image_root_names_the_folder_it_was_looked_up_in(data, tmp_path, monkeypatch):
    """A TRL user's `images: ["images/0.png"]` next to the data file, run from elsewhere without `--image_root`."""
    row = {"id": "rel", "messages": [{"role": "user", "content": "<image>What shape?"},
                                     {"role": "assistant", "content": "A circle."}], "images": ["images/0.png"]}
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadSampleError) as error:
        to_sft_sample(row, "messages")
    assert error.value.kind == "missing_image" and error.value.sample_id == "rel"
    assert str(tmp_path) in str(error.value) and "set --image_root" in str(error.value)
    assert to_sft_sample(row, "messages", image_root=str(data)).images[0]["path"] == str(data / "images" / "0.png")
    with pytest.raises(BadSampleError) as error:  # a root was given: the path alone says where it was looked for
        to_sft_sample(row, "messages", image_root=str(tmp_path))
    assert "--image_root" not in str(error.value)
