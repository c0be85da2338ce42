"""Mixed-adapter batching (issue 35): LoRA adapter models on one base answer in shared forward passes, each input
with its own model's adapter, and get exactly what each model answers alone."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.models.predictor import Predictor

TEXTS = ["a gripping, beautiful film", "dull", "thanks, I love it so much more than the other one", "no",
         "far too long, and the jokes fall flat every time"]


def adapter_folder(checkpoint: Path, target: Path, seed: int, labels: list[str] | None,
                   task: str = "classification") -> Path:
    """A saved LoRA adapter model on `checkpoint` with a seeded head and LoRA weights that really change the
    encoder's outputs (peft starts lora_B at zero, which would leave every adapter's encoder the base's)."""
    from finetune.config.recipe import AdapterSection, ModelSection
    from finetune.models.adapters import add_adapter, adapter_settings, base_reference, weights_digest
    from finetune.models.modeling import ModelInfo, build_model, save_model_dir
    from finetune.models.pretrained import resolve_checkpoint
    from finetune.tasks import get_task

    torch.manual_seed(seed)
    model, tokenizer = build_model(resolve_checkpoint(str(checkpoint)), ModelSection(checkpoint=str(checkpoint)),
                                   get_task(task), labels)
    digest = weights_digest(model)
    cfg = AdapterSection(r=4)
    model = add_adapter(model, cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    info = ModelInfo(task=task, label_names=labels, text_pair=False, max_length=64,
                     adapter=adapter_settings(model, cfg, base_reference(str(checkpoint), None, checkpoint, "local",
                                                                         digest)))
    return save_model_dir(target, model, tokenizer, info, "name: mixed\n")


@pytest.fixture(scope="module")
def folders(tiny_checkpoints, tmp_path_factory):
    """Per family: three two-label adapters on one tiny base (a, b, c) and a three-label one (d)."""
    root = tmp_path_factory.mktemp("mixed")
    made = {}
    for family in ("bert", "roberta", "distilbert", "deberta-v2"):
        base = tiny_checkpoints[family]
        made[family] = {name: adapter_folder(base, root / family / name, seed, labels) for name, seed, labels in (
            ("a", 1, ["negative", "positive"]), ("b", 2, ["bad", "good"]), ("c", 3, ["no", "yes"]),
            ("d", 4, ["low", "mid", "high"]))}
    return made


def alone(folder: Path, texts=TEXTS) -> np.ndarray:
    return Predictor.from_dir(folder).logits(texts, None)


def load(folders: dict[str, Path], names: str):
    from serving.loading import load_models, parse_model_specs

    return load_models(parse_model_specs([f"{n}={folders[n]}" for n in names]))


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_a_mixed_batch_gives_each_adapter_its_own_outputs(folders, family):
    """BERT's pooler and RoBERTa's classification head are heads peft will not mix rows in; DistilBERT's are plain
    Linear layers. Rows alternate between the three adapters within one batch."""
    want = {n: alone(folders[family][n]) for n in "abc"}
    first, named = load(folders[family], "abc")
    shared = named["a"].shared
    assert shared is not None and named["b"].shared is shared and named["c"].shared is shared
    assert shared.names == ["a", "b", "c"] and first is named["a"]
    features = named["a"].predictor.encode(TEXTS, None)[0]
    rows = [(f, n, i) for i, f in enumerate(features) for n in "abc"]  # a, b, c, a, b, c, ...
    assert len(rows) <= named["a"].predictor.batch_size  # one forward pass
    got = shared.outputs([f for f, _, _ in rows], [n for _, n, _ in rows])
    for out, (_, name, i) in zip(got, rows):
        np.testing.assert_allclose(out, want[name][i], atol=1e-5, err_msg=f"{name} row {i}")
    # The adapters really differ (else this test could not fail), beyond what float noise could explain.
    assert min(np.abs(want["a"] - want["b"]).max(), np.abs(want["b"] - want["c"]).max()) > 1e-3
    # Each model alone still answers as before: the first holds the others' adapters, inactive.
    for name in "abc":
        np.testing.assert_allclose(named[name].predictor.logits(TEXTS, None), want[name], atol=1e-6)


def test_the_shared_model_holds_each_adapter_once_and_the_base_once(folders):
    _, named = load(folders["bert"], "ab")
    shared = named["a"].shared
    mine = dict(shared.model.named_parameters(remove_duplicate=False))
    theirs = dict(named["b"].predictor.model.named_parameters())
    lora = next(k for k in theirs if k.endswith("layer.0.attention.self.query.lora_B.default.weight"))
    head = next(k for k in theirs if k.endswith("classifier.modules_to_save.default.weight"))
    for key in (lora, head):
        assert mine[key.replace(".default.", ".shared1.")] is theirs[key]  # the tensors b loaded, not copies
    base = next(k for k in theirs if k.endswith("layer.0.attention.self.query.base_layer.weight"))
    assert mine[base] is theirs[base]
    per_adapter = sum(p.numel() * p.element_size() for k, p in theirs.items() if ".default." in k)
    assert shared.adapter_bytes() == per_adapter


def test_different_label_counts_run_apart_and_answer_alone(folders):
    want = {n: alone(folders["bert"][n]) for n in "abd"}
    _, named = load(folders["bert"], "abd")
    assert named["a"].shared is named["b"].shared is not None
    assert named["d"].shared is None and "d" not in named["a"].shared.names
    for name in "abd":
        np.testing.assert_allclose(named[name].predictor.logits(TEXTS, None), want[name], atol=1e-6)


def test_a_family_whose_mixed_batch_is_not_row_by_row_runs_apart(folders, caplog):
    """DeBERTa-v2 runs its relative positions through the adapted query and key projections once for the whole
    batch: no row can have its own adapter there. The check at load time finds it, and each model runs alone."""
    want = {n: alone(folders["deberta-v2"][n]) for n in "ab"}
    with caplog.at_level(logging.WARNING, logger="serving.loading"):
        _, named = load(folders["deberta-v2"], "ab")
    assert named["a"].shared is None and named["b"].shared is None
    assert "models a, b answer in forward passes of their own" in caplog.text
    assert set(named["a"].predictor.model.peft_config) == {"default"}  # the failed attempt was undone
    for name in "ab":
        np.testing.assert_allclose(named[name].predictor.logits(TEXTS, None), want[name], atol=1e-6)


def test_the_server_answers_concurrent_requests_for_two_adapters_in_one_pass(folders, caplog, monkeypatch):
    """Requests for a and b sent at once (the batcher waits 300 ms for company) run in one forward pass, each
    answered as its model alone answers; c (another label count) keeps its own batcher."""
    from starlette.testclient import TestClient

    from finetune.models.adapters import SharedAdapters
    from serving.app import Settings, create_app

    bert = {**folders["bert"], "c": folders["bert"]["d"]}  # c: three labels
    want = {n: Predictor.from_dir(bert[n]).predict(TEXTS) for n in "abc"}
    first, named = load(bert, "abc")
    passes: list[list[str]] = []
    original = SharedAdapters.outputs

    def counted(self, features, names):
        passes.append(list(names))
        return original(self, features, names)

    monkeypatch.setattr(SharedAdapters, "outputs", counted)
    app = create_app(first, Settings(max_wait_ms=300, batch_wait="fixed"), named)
    with caplog.at_level(logging.INFO, logger="serving.app"), TestClient(app, base_url="http://127.0.0.1") as client:
        assert "models a, b share one base pass (LoRA adapters of " in caplog.text
        passes.clear()  # the warm-up's
        got: dict[str, list] = {}
        barrier = threading.Barrier(3)

        def ask(name: str) -> None:
            barrier.wait()
            response = client.post(f"/v1/models/{name}/predict", json={"inputs": TEXTS})
            assert response.status_code == 200, response.text
            got[name] = response.json()["predictions"]

        workers = [threading.Thread(target=ask, args=(n,)) for n in "abc"]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=60)
        default = client.post("/v1/predict", json={"inputs": TEXTS[:2]}).json()["predictions"]
        metrics = client.get("/metrics").text
        tokenising = sum(t.name.startswith("tokenise_") for t in threading.enumerate())
    assert set(got) == {"a", "b", "c"}
    for name in "abc":
        assert [g["label"] for g in got[name]] == [w["label"] for w in want[name]]
        for g, w in zip(got[name], want[name]):
            assert list(g["scores"].values()) == pytest.approx(list(w["scores"].values()), abs=1e-5)
    assert [d["label"] for d in default] == [w["label"] for w in want["a"][:2]]  # /v1/predict: a, through the group
    assert tokenising == 2  # a and b (inputs encoded alike) share one tokenising thread; c has its own
    assert any(set(p) == {"a", "b"} and len(p) == 2 * len(TEXTS) for p in passes), passes  # one pass held both
    assert all("c" not in p for p in passes)
    sizes = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
             if line.startswith("finetune_batch_size_") and " " in line}
    assert sizes["finetune_batch_size_bucket{le=\"8.0\"}"] < sizes["finetune_batch_size_count"]  # a batch over 8


def test_inputs_encode_alike_for_adapters_of_one_base_whatever_their_calibration(folders):
    """`Predictor.encoding_key` (which models may share a tokenising thread) ignores what only reads outputs (a
    temperature, a threshold) and tells apart what changes the encoding (max_length, the tokenizer)."""
    import copy
    import dataclasses

    a, b = (Predictor.from_dir(folders["bert"][n]) for n in "ab")
    assert a.encoding_key() == b.encoding_key() is not None
    calibrated = copy.copy(b)
    calibrated.settings = type(b.settings).of({**b.settings.saved(), "temperature": 1.7, "threshold": 0.3})
    assert calibrated.encoding_key() == a.encoding_key()
    shorter = copy.copy(b)
    shorter.info = dataclasses.replace(b.info, max_length=32)
    assert shorter.encoding_key() != a.encoding_key()
    other = Predictor.from_dir(folders["roberta"]["a"])
    assert other.encoding_key() != a.encoding_key()


def test_an_adapter_model_served_alone_runs_merged(folders):
    """Served alone, an adapter model's adapter is folded into its base weights (it runs as a plain model: no LoRA
    products), with its own answers; two adapter models holding one base between them stay unmerged."""
    from peft.tuners.lora import LoraLayer

    from serving.loading import load_models

    want = {n: alone(folders["bert"][n]) for n in "ad"}
    first, _ = load_models([(None, str(folders["bert"]["a"]))])
    layers = [m for m in first.predictor.model.modules() if isinstance(m, LoraLayer)]
    assert first.merged and layers and all(m.merged for m in layers)
    np.testing.assert_allclose(first.predictor.logits(TEXTS, None), want["a"], atol=1e-5)
    _, named = load(folders["bert"], "ad")  # other label counts: no shared passes, but one base between them
    for name in "ad":
        assert not named[name].merged and named[name].shared is None
        assert not any(m.merged for m in named[name].predictor.model.modules() if isinstance(m, LoraLayer))
        np.testing.assert_allclose(named[name].predictor.logits(TEXTS, None), want[name], atol=1e-6)


def test_a_merge_that_changes_the_outputs_is_undone(folders, monkeypatch, caplog):
    """A merge whose model no longer answers its example input as before is taken back (peft's unmerge), and the
    model answers unmerged, as before. Here the merged model is made to answer otherwise by a hook on its head that
    the unmerge removes."""
    from peft.tuners.lora import LoraLayer, LoraModel

    from serving.loading import load_models

    want = alone(folders["bert"]["a"])
    merge, unmerge, hooks = LoraModel.merge_adapter, LoraModel.unmerge_adapter, []

    def spoiled_merge(self, *args, **kwargs):
        merge(self, *args, **kwargs)
        head = next(m for n, m in self.named_modules() if n.endswith("classifier"))
        hooks.append(head.register_forward_hook(lambda module, inputs, output: output + 1.0))

    def unmerge_and_mend(self, *args, **kwargs):
        unmerge(self, *args, **kwargs)
        while hooks:
            hooks.pop().remove()

    monkeypatch.setattr(LoraModel, "merge_adapter", spoiled_merge)
    monkeypatch.setattr(LoraModel, "unmerge_adapter", unmerge_and_mend)
    with caplog.at_level(logging.WARNING, logger="finetune.models.adapters"):
        first, _ = load_models([(None, str(folders["bert"]["a"]))])
    assert not first.merged and "changed the model's outputs; it answers unmerged" in caplog.text
    assert not any(m.merged for m in first.predictor.model.modules() if isinstance(m, LoraLayer))
    np.testing.assert_allclose(first.predictor.logits(TEXTS, None), want, atol=1e-5)


def test_a_tagged_batcher_hands_each_input_its_tag_also_one_by_one():
    from serving.batcher import Batcher

    seen: list[list[str]] = []

    def run(features, tags):
        seen.append(list(tags))
        if len(features) > 1 and "boom" in [f["text"] for f in features]:
            raise RuntimeError("a bad input in the batch")
        return [f"{t}:{f['text']}" for f, t in zip(features, tags)]

    async def go():
        batcher = Batcher(run, max_wait=0.05, tagged=True)
        batcher.start()
        a, b = batcher.for_tag("a"), batcher.for_tag("b")
        futures = a.submit([{"input_ids": [1], "text": "x"}]) + b.submit([{"input_ids": [1], "text": "y"}])
        first = await asyncio.gather(*futures)
        futures = a.submit([{"input_ids": [1], "text": "boom"}]) + b.submit([{"input_ids": [1], "text": "z"}])
        second = await asyncio.gather(*futures)
        await batcher.stop()
        return first, second

    first, second = asyncio.run(go())
    assert first == ["a:x", "b:y"] and second == ["a:boom", "b:z"]
    assert seen == [["a", "b"], ["a", "b"], ["a"], ["b"]]


def _peft_rows(model, batch, names):
    """The reference: peft's own row-by-row way (`adapter_names`) on every LoRA layer, heads routed as ours (the
    switch bench/adapters.py's mixed-peft server runs with)."""
    from finetune.models import adapter_rows

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(adapter_rows.WAY_VARIABLE, "peft")
        patch.setattr(adapter_rows, "_stack_of", lambda layer: pytest.fail("a stack was built"))
        with adapter_rows.rows_of_adapters(model, names):
            return model(**batch).logits


def test_mixed_rows_take_one_stacked_update_per_layer_and_match_peft_row_by_row(folders, monkeypatch):
    """The three adapters' LoRA updates run as one stacked product per layer: peft's per-adapter path is never
    entered, and the outputs are peft's row by row (fp32 and bf16 autocast); the stack follows weights written in
    place."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear as LoraLinear

    from finetune.models import adapter_rows

    _, named = load(folders["bert"], "abc")
    shared, predictor = named["a"].shared, named["a"].predictor
    model = shared.model
    names = ["shared2", "default", "shared1", "shared1", "default"]
    batch = predictor.collator(predictor.encode(TEXTS, None)[0])
    with torch.inference_mode():
        want = _peft_rows(model, batch, names)

        def refuse(*args, **kwargs):
            raise AssertionError("peft's row-by-row path ran")

        monkeypatch.setattr(LoraLinear, "_mixed_batch_forward", refuse)
        with adapter_rows.rows_of_adapters(model, names):
            got = model(**batch).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        assert layers and all(adapter_rows._STACKS[m].spans == (("default", 0, 4), ("shared1", 4, 8),
                                                                ("shared2", 8, 12)) for m in layers)
        assert all("forward" not in m.__dict__ for m in layers)  # the layers are peft's again afterwards
        with torch.autocast("cpu", dtype=torch.bfloat16), adapter_rows.rows_of_adapters(model, names):
            low = model(**batch).logits
        torch.testing.assert_close(low.float(), want, atol=5e-2, rtol=5e-2)

        # A weight written in place (a reload, a training step) is seen: the stack is built again.
        with torch.no_grad():
            layers[0].lora_B["shared1"].weight.mul_(3)
        monkeypatch.undo()
        want = _peft_rows(model, batch, names)
        with adapter_rows.rows_of_adapters(model, names):
            got = model(**batch).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            layers[0].lora_B["shared1"].weight.div_(3)


def test_a_layer_the_stack_cannot_express_takes_peft_row_by_row(folders):
    """A LoRA layer with a bias on B (peft's lora_bias) is not a plain low-rank update: that layer keeps peft's
    path, the others are stacked, and the rows still get their own adapters."""
    from peft.tuners.lora import LoraLayer

    from finetune.models import adapter_rows

    _, named = load(folders["distilbert"], "ab")
    model, predictor = named["a"].shared.model, named["a"].predictor
    names = ["shared1", "default", "shared1", "default", "default"]
    batch = predictor.collator(predictor.encode(TEXTS, None)[0])
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    with torch.no_grad():
        layer.lora_B["shared1"].bias = torch.nn.Parameter(torch.full((layer.out_features,), 3.0))
    assert adapter_rows._stack_of(layer) is None
    with torch.inference_mode():
        want = _peft_rows(model, batch, names)
        with adapter_rows.rows_of_adapters(model, names):
            got = model(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    a, b = (Predictor.from_dir(folders["distilbert"][n]).logits(TEXTS, None) for n in "ab")
    np.testing.assert_allclose(got[[1, 3, 4]].numpy(), a[[1, 3, 4]], atol=1e-5)  # a's rows: a's own outputs
    assert np.abs(got[[0, 2]].numpy() - b[[0, 2]]).max() > 1e-4  # b's rows: moved by the bias on b's B (noise: 1e-7)


def test_multiple_choice_rows_take_their_inputs_adapter(tiny_checkpoints, tmp_path):
    """Multiple choice scores each (context, choice) pair as a row of its own: in a mixed batch every choice's row
    gets its input's adapter in the stacked update, and each model's scores are its own."""
    from finetune.models.adapters import SharedAdapters, shared_pass_key

    folders = {n: adapter_folder(tiny_checkpoints["bert"], tmp_path / n, seed, None, "multiple_choice")
               for n, seed in (("a", 1), ("b", 2))}
    predictors = {n: Predictor.from_dir(f) for n, f in folders.items()}
    assert shared_pass_key(predictors["a"]) == shared_pass_key(predictors["b"]) is not None
    inputs = [{"context": "The man lit the fire.", "choices": ["It got warm.", "It started to snow.", "Nothing."]},
              {"context": "She dropped the glass.", "choices": ["It broke.", "It sang."]},
              {"context": "Rain fell all day.", "choices": ["The street was wet.", "The sun shone.", "Birds."]}]
    want = {n: p.outputs(p.encode_inputs(inputs).features) for n, p in predictors.items()}
    shared = SharedAdapters(predictors)
    encoded = predictors["a"].encode_inputs(inputs)
    per_input = ["b", "a", "b"]
    names = [per_input[i] for i in encoded.owner]  # every choice of an input with the input's model
    assert len(names) == 8
    got = shared.outputs(encoded.features, names)
    for j, (out, name) in enumerate(zip(got, names)):
        np.testing.assert_allclose(out, want[name][j], atol=1e-5, err_msg=f"{name} pair {j}")
    assert max(np.abs(want["a"][j] - want["b"][j]).max() for j in range(8)) > 1e-3  # the adapters really differ
