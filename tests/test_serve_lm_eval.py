"""lm-evaluation-harness (`local-completions`) against the server: a multiple-choice task from a local
YAML over a local JSONL file. Its log-likelihood requests use `echo` + `logprobs` with `max_tokens=1`."""

from __future__ import annotations

import json
import os

import pytest

from lmforge.generate import score
from lmforge.pretrained import load_pretrained
from lmforge.serve import Models, RunningServer, ServeSettings, create_app

lm_eval = pytest.importorskip("lm_eval")

DOCS = [
    {"question": "The quick brown", "choices": [" fox", " dog", " box"], "answer": 0},
    {"question": "Pack my box with five dozen", "choices": [" liquor jugs", " cats", " emoji"], "answer": 0},
    {"question": "def add(a, b):", "choices": ["\n    return a + b", " pass", " 12345"], "answer": 0},
    {"question": "naïve café", "choices": [" déjà vu", " the lazy dog", " numbers"], "answer": 0},
    {"question": "日本語の", "choices": ["テキスト", " fox", " 67890"], "answer": 0},
    {"question": "The lazy", "choices": [" dog", " jugs"], "answer": 1},
]

TASK = """\
task: lmforge_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture
def task_dir(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCS))
    (tmp_path / "tiny_mc.yaml").write_text(TASK.format(data=data))
    return tmp_path


@pytest.mark.parametrize("tokenized", [True, False], ids=["token-ids", "strings"])
def test_lm_eval_local_completions_multiple_choice(checkpoints, task_dir, monkeypatch, tokenized):
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key-0123456789")
    folder = checkpoints["llama"][0]
    pre = load_pretrained(folder, device="cpu")
    settings = ServeSettings(api_keys=["test-key-0123456789"], max_batch=4)
    with RunningServer(create_app(Models(pre.model, pre.tokenizer, "tiny"), settings)) as server:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={
                "base_url": server.url + "/completions",
                "model": "tiny",
                "tokenizer": str(folder),
                "tokenizer_backend": "huggingface",
                "tokenized_requests": tokenized,
                "num_concurrent": 2,
                "max_retries": 1,
                "max_length": 128,
            },  # fmt: skip
            tasks=["lmforge_tiny_mc"],
            task_manager=TaskManager(include_path=str(task_dir)),
            batch_size=4,
            log_samples=True,
        )
        metrics = server.app.state.server.metrics
        assert metrics.get("errors_total", route="/v1/completions", status="400") == 0
    result = out["results"]["lmforge_tiny_mc"]
    assert "acc,none" in result
    # the accuracy the harness computed from the server's log-likelihoods = the one computed here
    tok = pre.tokenizer
    correct = 0
    for doc in DOCS:
        context = tok.encode(doc["question"])
        scores = []
        for choice in doc["choices"]:
            whole = tok.encode(doc["question"] + choice)
            logprobs, _ = score(pre.model, whole)
            scores.append(sum(logprobs[len(context) :]))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    assert result["acc,none"] == pytest.approx(correct / len(DOCS))
    samples = out["samples"]["lmforge_tiny_mc"]
    assert len(samples) == len(DOCS)
    assert all(len(s["resps"]) == len(DOCS[s["doc_id"]]["choices"]) for s in samples)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
