"""Length-grouped batching (finetune.batching) and the speed switches of the recipe."""

from __future__ import annotations

import itertools
import math
import random

import datasets
import pytest
import torch
from accelerate import Accelerator
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, RandomSampler

from finetune.data.batching import LengthGroupedShuffledSampler, example_lengths, train_loader
from finetune.config.recipe import RecipeError, TrainingSection, load_recipe
from finetune.training.speed import prepare_model

_RNG = random.Random(7)
LENGTHS = [_RNG.randint(1, 100) for _ in range(1000)]  # 1000 = 31 full batches of 32 + 8


def order(seed: int, lengths=LENGTHS, batch_size: int = 32) -> list[int]:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return list(LengthGroupedShuffledSampler(lengths, batch_size, generator))


def batches_of(indices: list[int], batch_size: int = 32) -> list[list[int]]:
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


def padded_tokens(batches: list[list[int]]) -> int:
    return sum(max(LENGTHS[i] for i in b) * len(b) for b in batches)


@pytest.mark.parametrize("size", [1, 31, 32, 33, 1000])
def test_every_index_exactly_once_per_epoch(size):
    assert sorted(order(0, LENGTHS[:size])) == list(range(size))


def test_only_the_last_batch_is_partial():
    sizes = [len(b) for b in batches_of(order(0))]
    assert sizes[:-1] == [32] * 31 and sizes[-1] == 1000 - 31 * 32


def test_batches_are_length_grouped():
    grouped = padded_tokens(batches_of(order(0)))
    shuffled = list(range(len(LENGTHS)))
    random.Random(0).shuffle(shuffled)
    at_random = padded_tokens(batches_of(shuffled))
    real = sum(LENGTHS)
    # Mega-batches of 1000 // (32 * 4) = 7 batches: lengths 1..100 spread over ~7 batches each.
    assert grouped < 0.75 * at_random and grouped < 1.25 * real
    spreads = [max(LENGTHS[i] for i in b) - min(LENGTHS[i] for i in b) for b in batches_of(order(0))]
    assert sum(spreads) / len(spreads) < 25  # about 99 for random batches


def test_batch_order_is_random_not_a_length_curriculum():
    longest = [max(LENGTHS[i] for i in b) for b in batches_of(order(0))[:-1]]
    # transformers' LengthGroupedSampler would go long-to-short within each mega-batch.
    falling = sum(a >= b for a, b in zip(longest, longest[1:]))
    assert 0.25 * len(longest) < falling < 0.75 * len(longest)


def test_deterministic_per_seed_and_different_across_seeds_and_epochs():
    assert order(3) == order(3)
    assert order(3) != order(4)  # seed + epoch: the next epoch is seed + 1
    generator = torch.Generator()
    generator.manual_seed(3)
    sampler = LengthGroupedShuffledSampler(LENGTHS, 32, generator)
    assert list(sampler) != list(sampler)  # an unseeded second pass continues the stream


def test_two_processes_train_on_the_global_batches_of_one_process():
    """As train_loader sets it up: groups of one global batch (2 x 8), Accelerate deals the 8s to the processes."""
    shards = []
    for rank in range(2):
        generator = torch.Generator()
        generator.manual_seed(5)
        batch_sampler = BatchSampler(LengthGroupedShuffledSampler(LENGTHS, 16, generator), 8, drop_last=False)
        shards.append(list(BatchSamplerShard(batch_sampler, num_processes=2, process_index=rank, even_batches=False)))
    seen = [i for shard in shards for batch in shard for i in batch]
    assert sorted(seen) == list(range(len(LENGTHS)))
    one_process = batches_of(order(5, batch_size=16), 16)  # 62 global batches of 16 + one of 8
    assert [a + b for a, b in zip(*shards)] == one_process[: len(shards[1])]
    assert shards[0][len(shards[1]):] == one_process[len(shards[1]):]


def _loader(group_by_length: bool, size: int = 200):
    rng = random.Random(1)
    ds = datasets.Dataset.from_dict({"input_ids": [[1] * rng.randint(1, 40) for _ in range(size)],
                                     "labels": list(range(size))})

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        return {"input_ids": torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows]),
                "labels": torch.tensor([r["labels"] for r in rows])}

    generator = torch.Generator()
    cfg = TrainingSection(batch_size=16, group_by_length=group_by_length)
    return ds, generator, train_loader(ds, cfg, collate, generator)


@pytest.mark.parametrize("group_by_length", [True, False])
def test_resume_with_skip_first_batches_gives_the_remaining_batches(group_by_length):
    """What train.py does on resume: re-seed with seed + epoch, skip the batches already trained on."""
    _, generator, loader = _loader(group_by_length)
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(loader)
    generator.manual_seed(42 + 1)
    full = [b["labels"].tolist() for b in loader]
    generator.manual_seed(42 + 1)
    resumed = [b["labels"].tolist() for b in accelerator.skip_first_batches(loader, 5)]
    assert resumed == full[5:]
    assert sorted(i for b in full for i in b) == list(range(200))


def test_recipe_switch_chooses_the_sampler():
    ds, _, grouped = _loader(True)
    _, _, plain = _loader(False)
    assert isinstance(grouped.sampler, LengthGroupedShuffledSampler) and isinstance(plain.sampler, RandomSampler)
    assert grouped.sampler.lengths == [len(x) for x in ds["input_ids"]]


def test_example_lengths_of_multiple_choice_rows_is_the_longest_choice():
    ds = datasets.Dataset.from_dict({"input_ids": [[[1, 2], [1, 2, 3, 4]], [[1], [1]]]})
    assert example_lengths(ds) == [4, 1]
    assert example_lengths(datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [1]]})) == [3, 1]


def test_speed_switches_parse_validate_and_default(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {checkpoint: x}\ndata: {files: {train: t.csv}}\ntask: {type: classification}\n")
    loaded = load_recipe(recipe)
    assert loaded.training.group_by_length is True and loaded.training.compile is False
    changed = load_recipe(recipe, ["training.group_by_length=false", "training.compile=true"])
    assert changed.training.group_by_length is False and changed.training.compile is True
    with pytest.raises(RecipeError, match="training.group_by_length"):
        load_recipe(recipe, ["training.group_by_length=sometimes"])
    with pytest.raises(RecipeError, match="training.compile cannot be used with model.attention_type block_sparse"):
        load_recipe(recipe, ["training.compile=true", "model.attention_type=block_sparse"])
    bf16 = load_recipe(recipe, ["training.mixed_precision=bf16", "model.attention_type=block_sparse"])
    assert bf16.training.mixed_precision == "bf16"


def test_block_sparse_bigbird_follows_auto_precision_like_any_model(tmp_path, monkeypatch):
    from finetune.training import preflight, speed

    monkeypatch.setattr(preflight, "cpu_computes_bf16", lambda: True)
    monkeypatch.setattr(preflight, "cpu_bf16_speedup", lambda: 1.5)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {checkpoint: x}\ndata: {files: {train: t.csv}}\ntask: {type: classification}\n")
    half = "bf16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "fp16"
    assert speed.precision(load_recipe(recipe, ["model.attention_type=block_sparse"])) == half
    assert speed.precision(load_recipe(recipe, ["model.attention_type=original_full"])) == half
    monkeypatch.setattr(preflight, "cpu_bf16_speedup", lambda: 0.6)
    if not torch.cuda.is_available():
        assert speed.precision(load_recipe(recipe, ["model.attention_type=block_sparse"])) == "no"


def test_compile_switch_compiles_in_place():
    model = torch.nn.Linear(2, 2)
    assert prepare_model(model, TrainingSection(compile=False))._compiled_call_impl is None
    compiled = prepare_model(model, TrainingSection(compile=True))
    assert compiled is model and model._compiled_call_impl is not None
    assert list(model.state_dict()) == ["weight", "bias"]  # checkpoints and save_pretrained see the plain keys


def test_groups_are_one_global_batch():
    ds, generator, _ = _loader(True)
    loader = train_loader(ds, TrainingSection(batch_size=16), lambda rows: rows, generator, num_processes=2)
    assert loader.sampler.batch_size == 32 and loader.batch_size == 16


def test_auto_precision_on_a_cpu_follows_its_bf16_support_and_speed(monkeypatch):
    from finetune.training import preflight

    if torch.cuda.is_available():
        pytest.skip("the CPU rule applies only without a GPU")
    monkeypatch.setattr(preflight, "cpu_computes_bf16", lambda: False)
    assert preflight.choose_mixed_precision("auto") == "no"
    monkeypatch.setattr(preflight, "cpu_computes_bf16", lambda: True)
    monkeypatch.setattr(preflight, "cpu_bf16_speedup", lambda: 1.36)  # AMD Zen 4
    assert preflight.choose_mixed_precision("auto") == "bf16"
    monkeypatch.setattr(preflight, "cpu_bf16_speedup", lambda: 0.74)  # an Intel Xeon with AVX512-BF16, no AMX
    assert preflight.choose_mixed_precision("auto") == "no", "bf16 the CPU computes slowly is not chosen"
    assert preflight.choose_mixed_precision("bf16") == "bf16", "asked for, it is used"
    assert preflight.choose_mixed_precision("no") == "no"
    with pytest.raises(RecipeError, match="fp16 needs a CUDA GPU"):
        preflight.choose_mixed_precision("fp16")


def test_the_bf16_measurement_is_a_ratio_and_leaves_the_random_state_alone():
    from finetune.training import preflight

    state = torch.random.get_rng_state()
    measured = preflight.measure_cpu_bf16_speedup()
    assert torch.equal(state, torch.random.get_rng_state())
    # Only ordering and sign: the ratio itself is the CPU's (2.0x on AMX, 0.55x on AVX-512 without it, 0.05x on an
    # AVX2-only EPYC, where bf16 is emulated).
    assert 0 < measured.low <= measured.median <= measured.high and math.isfinite(measured.high)


class _Quiet:
    def __init__(self, busy: float = 0.0):
        self.busy = busy

    def others(self):
        return self.busy


def _scripted_cpu(bf16_factor: float, busy: range, slowdown: float = 4.0):
    """A trial clock: fp32 takes 1 unit, bf16 `bf16_factor` units; trials whose index is in `busy` run
    `slowdown` times slower (a neighbour busy for part of the measurement). Returns the trial and its log."""
    log: list[bool] = []

    def trial(bf16: bool) -> float:
        log.append(bf16)
        seconds = bf16_factor if bf16 else 1.0
        return seconds * (slowdown if len(log) - 1 in busy else 1.0)

    return trial, log


def test_a_neighbour_busy_for_part_of_the_bf16_measurement_does_not_tip_it():
    """On the Intel Xeon, bf16 trains at 0.54x of fp32; a busy moment over the first half of the old measurement
    (all fp32 trials first) made it read as faster. Interleaved pairs keep the ratio."""
    from finetune.training import preflight

    trial, log = _scripted_cpu(bf16_factor=1 / 0.55, busy=range(0, 14))  # warm-ups and the first five pairs
    measured = preflight.measure_cpu_bf16_speedup(pairs=11, trial=trial, sampler=_Quiet())
    assert measured.median == pytest.approx(0.55)
    assert measured.clear and measured.median < preflight.BF16_MIN_SPEEDUP
    measured_trials = log[4:]
    assert measured_trials.count(True) == measured_trials.count(False) == 11
    assert all(measured_trials[i] != measured_trials[i + 1] for i in range(0, 22, 2)), "each pair has one of each"

    fast, _ = _scripted_cpu(bf16_factor=1 / 1.5, busy=range(10, 30))  # AMD Zen 4-like, busy in the middle
    measured = preflight.measure_cpu_bf16_speedup(pairs=11, trial=fast, sampler=_Quiet())
    assert measured.median == pytest.approx(1.5) and measured.clear


def test_an_unclear_bf16_measurement_is_used_conservatively_and_not_kept(tmp_path, monkeypatch):
    from finetune.training import preflight

    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path))
    calls = []
    busy = preflight.Bf16Measurement(median=1.3, low=0.8, high=1.6, others_busy=1.0)
    straddling = preflight.Bf16Measurement(median=1.15, low=0.95, high=1.3, others_busy=0.0)
    assert not busy.clear and not straddling.clear
    assert not preflight.Bf16Measurement(median=1.5, low=1.4, high=1.6, others_busy=0.9).clear, "other load"
    assert preflight.Bf16Measurement(median=0.6, low=0.55, high=0.65, others_busy=None).clear
    monkeypatch.setattr(preflight, "measure_cpu_bf16_speedup", lambda: calls.append(1) or (busy, straddling)[len(calls) - 1])
    preflight.cpu_bf16_speedup.cache_clear()
    try:
        assert preflight.cpu_bf16_speedup() == 0.95, "measured twice, the lower quartile of the second"
        assert calls == [1, 1] and not (tmp_path / preflight.BF16_SPEEDUP_FILE).exists()
        assert preflight.choose_mixed_precision("auto") == "no"
    finally:
        preflight.cpu_bf16_speedup.cache_clear()


@pytest.mark.parametrize("precision,train_dtype", [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_cpu_bf16_trains_in_bf16_and_evaluates_in_fp32(tiny_checkpoints, monkeypatch, precision, train_dtype):
    """Only the training forward is autocast: evaluation sees the fp32 model, exactly as serving does."""
    from finetune.training import speed, train
    from finetune.config.recipe import Recipe
    from tests.conftest import tiny_recipe

    if torch.cuda.is_available():
        pytest.skip("on a GPU Accelerate's mixed precision applies")
    seen: dict[str, set] = {"train": set(), "eval": set()}
    plain_prepare = speed.prepare_model

    def spying_prepare(model, cfg):
        model.register_forward_hook(lambda m, args, out: seen["train" if m.training else "eval"].add(out.logits.dtype))
        return plain_prepare(model, cfg)

    monkeypatch.setattr(speed, "prepare_model", spying_prepare)
    result = train.main(Recipe.model_validate(tiny_recipe(
        tiny_checkpoints["bert"], training={"max_steps": 3, "batch_size": 8, "mixed_precision": precision},
        tracking={"log_model": False, "system_metrics": False})))
    assert seen == {"train": {train_dtype}, "eval": {torch.float32}}
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(result.best_dir / "model.safetensors").values()} == {torch.float32}


def test_the_bf16_measurement_is_kept_per_cpu(tmp_path, monkeypatch):
    from finetune.training import preflight

    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path))
    calls = []
    clear = preflight.Bf16Measurement(median=0.7, low=0.65, high=0.75, others_busy=0.0)
    monkeypatch.setattr(preflight, "measure_cpu_bf16_speedup", lambda: calls.append(1) or clear)
    preflight.cpu_bf16_speedup.cache_clear()
    try:
        assert preflight.cpu_bf16_speedup() == 0.7
        preflight.cpu_bf16_speedup.cache_clear()  # a new process
        assert preflight.cpu_bf16_speedup() == 0.7 and calls == [1], "measured once, then read"
        assert (tmp_path / preflight.BF16_SPEEDUP_FILE).is_file()
    finally:
        preflight.cpu_bf16_speedup.cache_clear()


def test_prediction_batches_cut_where_the_padding_saved_pays_for_another_pass():
    from finetune.data.batching import least_padding_batches
    from finetune.models.bigbird import plan_batches

    def cost(batches, lengths, overhead=96, multiple=1):
        return sum(overhead + len(b) * -(-max(lengths[i] for i in b) // multiple) * multiple for b in batches)

    # One request of short and long inputs: two passes, not one padded to 60 for all.
    mixed = [60, 5, 60, 5, 5, 60, 5, 5]
    assert least_padding_batches(mixed, 16) == [[1, 3, 4, 6, 7], [0, 2, 5]]
    # Inputs of one length: full batches (the cut only adds passes), whatever the overhead.
    assert sorted(len(b) for b in least_padding_batches([12] * 40, 16)) == [8, 16, 16]
    assert len(least_padding_batches([12] * 40, 16, overhead=0)) == 3
    # Never past batch_size, every input once, shortest first, and no cheaper cut exists than the one chosen
    # (checked against every cut of a small case).
    rng = random.Random(3)
    for _ in range(20):
        lengths = [rng.randint(1, 80) for _ in range(9)]
        batches = least_padding_batches(lengths, 4, multiple=8)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(9)) and all(len(b) <= 4 for b in batches)
        assert [lengths[i] for i in flat] == sorted(lengths)
        order = sorted(range(9), key=lambda i: lengths[i])
        cheapest = min(cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, 9))], lengths, multiple=8)
                       for k in range(0, 9) for cuts in itertools.combinations(range(1, 9), k)
                       if all(b - a <= 4 for a, b in zip((0, *cuts), (*cuts, 9))))
        assert cost(batches, lengths, multiple=8) == cheapest
    assert least_padding_batches([], 16) == []
    assert plan_batches(mixed, 16) == least_padding_batches(mixed, 16)  # what Predictor.outputs runs
