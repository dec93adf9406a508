"""Offline lm-eval zero-shot: task YAML generation, data conversion, the in-memory LM's scoring."""
import bz2
import json

import pytest
import torch
import yaml

from atom_lab.data import DataError
from atom_lab.errors import HarnessError
from atom_lab.eval.lm import InMemoryLM
from atom_lab.eval.zeroshot import (LOCAL_TASK_PREFIX, SOURCE_FILES, TASK_METRICS, evaluate_zeroshot,
                                    hellaswag_records, piqa_records, prepare_local_tasks,
                                    render_task_yaml, setup_tasks, task_data_file,
                                    zeroshot_metrics)
from atom_lab.models import embedded_tokenizer, tiny_random_llama

ALL_TASKS = list(TASK_METRICS)
ITEMS = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270,
         "hellaswag": 10042, "winogrande": 1267}


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return tiny_random_llama(seed=0, vocab_size=len(tokenizer))


@pytest.fixture(scope="module")
def prepared(data_root, tmp_path_factory):
    cache = tmp_path_factory.mktemp("zs_cache")
    include = tmp_path_factory.mktemp("zs_tasks")
    return prepare_local_tasks(ALL_TASKS, data_root, include, cache)


def test_rendered_yaml_points_at_existing_local_files(prepared):
    include, files = prepared
    for task in ALL_TASKS:
        spec = yaml.safe_load((include / f"{task}.yaml").read_text())
        assert spec["task"] == LOCAL_TASK_PREFIX + task and spec["dataset_path"] == "json"
        (path,) = spec["dataset_kwargs"]["data_files"].values()
        assert path == str(files[task])
        lines = sum(1 for _ in open(path, encoding="utf-8"))
        assert lines == ITEMS[task]  # counts of lm-eval's splits


def test_render_keeps_paths_with_quotes_and_spaces(tmp_path):
    odd = tmp_path / 'dir with "quote"' / "a.jsonl"
    spec = yaml.safe_load(render_task_yaml("boolq", odd))
    assert spec["dataset_kwargs"]["data_files"]["validation"] == str(odd)


def test_piqa_labels_merged_in_order(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"goal": "g0", "sol1": "a", "sol2": "b"}\n'
                                      '{"goal": "g1", "sol1": "c", "sol2": "d"}\n')
    (tmp_path / "l.lst").write_text("1\n0\n")
    assert [r["label"] for r in piqa_records(tmp_path / "q.jsonl", tmp_path / "l.lst")] == [1, 0]
    (tmp_path / "l.lst").write_text("1\n")
    with pytest.raises(DataError, match="1 labels"):
        piqa_records(tmp_path / "q.jsonl", tmp_path / "l.lst")


def test_hellaswag_six_line_items_cleaned(tmp_path):
    item = ["Act: a man [title] runs  fast. he", "2", "e0", "e1 [header]", "e2", "e3"]
    path = tmp_path / "h.txt.bz2"
    path.write_bytes(bz2.compress("\n".join(item * 2).encode()))
    records = hellaswag_records(path)
    assert len(records) == 2
    assert records[0] == {"query": "Act: a man. runs fast. he", "gold": 2,
                          "choices": ["e0", "e1 ", "e2", "e3"]}  # as lm-eval: no final strip
    path.write_bytes(bz2.compress("\n".join(item[:5]).encode()))
    with pytest.raises(DataError, match="not a multiple of 6"):
        hellaswag_records(path)


def test_lm_eval_reads_the_local_formats(data_root, tmp_path):
    from lm_eval.tasks import get_task_dict

    setup = setup_tasks(["winogrande", "arc_easy"], data_root, tmp_path / "tasks", tmp_path)
    tasks = get_task_dict(list(setup.names), setup.task_manager)
    wino = tasks[LOCAL_TASK_PREFIX + "winogrande"]
    doc = wino.eval_docs[0]
    assert wino.multiple_input == 2  # partial evaluation: two contexts, one continuation
    assert wino.doc_to_choice(doc) == doc["context_options"]
    assert wino.doc_to_text(doc) == doc["gold"]
    arc = tasks[LOCAL_TASK_PREFIX + "arc_easy"]
    doc = arc.eval_docs[0]
    assert arc.doc_to_text(doc) == doc["query"] + "\nAnswer:"
    assert arc.doc_to_target(doc) == doc["gold"] and arc.doc_to_choice(doc) == doc["choices"]


def test_piqa_conversion_is_redone_when_only_the_labels_change(data_root, tmp_path):
    root = tmp_path / "data"
    (root / "zeroshot").mkdir(parents=True)
    questions, labels = SOURCE_FILES["piqa"]
    lines = (data_root / questions).read_text().splitlines()[:3]
    (root / questions).write_text("\n".join(lines) + "\n")
    (root / labels).write_text("0\n1\n0\n")
    first = task_data_file("piqa", root, tmp_path / "cache")
    (root / labels).write_text("1\n1\n0\n")
    second = task_data_file("piqa", root, tmp_path / "cache")
    assert first != second
    golds = [json.loads(line)["label"] for line in second.read_text().splitlines()]
    assert golds == [1, 1, 0]


def test_unknown_task_and_missing_file(tmp_path):
    with pytest.raises(HarnessError, match="'mmlu'"):
        prepare_local_tasks(["piqa", "mmlu"], tmp_path)
    with pytest.raises(DataError, match="boolq.jsonl"):
        prepare_local_tasks(["boolq"], tmp_path, tmp_path / "inc", tmp_path / "cache")


def test_metrics_use_atoms_metric_per_task_for_the_average():
    raw = {"atomlab_piqa": {"acc,none": 0.6, "acc_norm,none": 0.7},
           "atomlab_boolq": {"acc,none": 0.5}}
    names = {"atomlab_piqa": "piqa", "atomlab_boolq": "boolq"}
    metrics = zeroshot_metrics(raw, names)
    assert metrics == {"piqa/acc": 0.6, "piqa/acc_norm": 0.7, "boolq/acc": 0.5,
                       "avg": pytest.approx((0.7 + 0.5) / 2)}


def test_in_memory_lm_batched_scores_equal_direct_ones(tiny, tokenizer):
    lm = InMemoryLM(tiny, tokenizer, batch_size=3)
    pairs = [("Question: what is red?\nAnswer:", " an apple"), ("The sky is", " blue today"),
             ("Short", " x"), ("A longer context that spans several tokens of text", " yes")]
    requests = [(pair, *lm._encode_pair(*pair)) for pair in pairs]
    scored = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    for (_, ctx, cont), (logprob, greedy) in zip(requests, scored):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(tiny(input_ids=ids).logits[0].double(), -1)
        positions = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
        expected = sum(logp[p, t].item() for p, t in zip(positions, cont))
        assert logprob == pytest.approx(expected, abs=1e-3)
        assert greedy == all(logp[p].argmax().item() == t for p, t in zip(positions, cont))


def test_tiny_limit_run_offline(tiny, tokenizer, data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    result = evaluate_zeroshot(tiny, tokenizer, ["piqa", "winogrande"], data_root, limit=4,
                               batch_size=8, include_dir=tmp_path / "tasks",
                               cache_dir=tmp_path / "cache", progress=False)
    metrics = result["metrics"]
    assert set(metrics) == {"piqa/acc", "piqa/acc_norm", "winogrande/acc", "avg"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert all(v * 4 == round(v * 4) for k, v in metrics.items() if k != "avg")  # 4 items each
    assert metrics["avg"] == pytest.approx((metrics["piqa/acc_norm"] + metrics["winogrande/acc"]) / 2)
    assert result["samples"] == {"piqa": 4, "winogrande": 4}
    assert any(p.endswith("piqa_valid_labels.lst") for p in result["files"])
