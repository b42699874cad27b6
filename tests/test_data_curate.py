"""redi-curate on synthetic OpenR1 rows built by the tests (real schema, realistic failure cases).

Counts are checked against hand-computed expectations from the fixture layout
(``redi_megatron.data.synthetic.RAW_LAYOUT``), and the selection/order against a plain re-implementation
of the authors' loop (clean_base_shuffled*.py) over ``datasets.Dataset.shuffle(seed=42)``.
"""
import json
import os

import datasets
import pytest

from redi_megatron.data.curate import CurationConfig, curate, main
from redi_megatron.data.synthetic import RAW_LAYOUT, openr1_220k_rows, raw_rows, raw_v1_rows, write_jsonl
from redi_megatron.data.templates import qwen_tokenizer_dir

LIMITS = dict(max_prompt_tokens=200, max_completion_tokens=400)  # the fixture's long texts exceed these

# Hand-computed from RAW_LAYOUT (294 rows):
EXPECTED = {
    "rows_read": 294,
    "bad_row": 20,
    "problem_not_valid": 30,  # 27 invalid + 3 invalid-and-cn_k12 (validity is checked first)
    "source_excluded": 20,
    "rows_passing": 224,  # 150 pair + 40 only_correct + 25 only_incorrect + 3 + 2 + 2 + 2
    "no_correct": 25,
    "correct_no_incorrect": 40,
    "positive_candidates": 199,  # 224 - 25
    "positives_kept": 192,  # - 2 control_token - 3 long prompts - 2 long chosen (length_filter="both")
    "positives_kept_authors": 197,  # length_filter="pairs" (the authors'): only the 2 control_token
    "positives_over_limits_kept": 5,  # 3 long prompts + 2 long chosen, kept under length_filter="pairs"
    "pair_candidates": 159,  # 150 + 3 + 2 + 2 + 2
    "pairs_kept": 150,  # - 2 control_token - 3 prompt_too_long - 4 completion_too_long
}


@pytest.fixture(scope="module")
def tok(qwen_tok):
    return qwen_tok


@pytest.fixture(scope="module")
def fixture_rows():
    rows, cats = raw_rows(seed=0)
    assert len(rows) == sum(RAW_LAYOUT.values()) == EXPECTED["rows_read"]
    return rows, cats


@pytest.fixture(scope="module")
def jsonl_run(tmp_path_factory, tok, fixture_rows):
    root = tmp_path_factory.mktemp("curate")
    write_jsonl(fixture_rows[0], str(root / "raw" / "train.jsonl"))
    cfg = CurationConfig(input=str(root / "raw"), output=str(root / "out"), tokenizer="unused", num_proc=1,
                         rows_per_chunk=50, progress=False, **LIMITS)
    return cfg, curate(cfg, tokenizer=tok)


def _authors_reference(rows, cats, seed=42):
    """The authors' loop (LandMV), over the HF-shuffled order; rows we flag as bad are skipped."""
    order = datasets.Dataset.from_dict({"i": list(range(len(rows)))}).shuffle(seed=seed)["i"]
    positives, pairs = [], []
    for i in order:
        item, cat = rows[i], cats[i]
        if cat.startswith("bad"):
            continue
        valid = item.get("problem_is_valid")
        if not (isinstance(valid, str) and valid.strip().lower() == "yes") or item.get("source") == "cn_k12":
            continue
        c = item["correctness"]
        land = [bool(a) and bool(b) for a, b in zip(c["llama_verification"], c["math_verify_reparsed_answer"])]
        if True in land:
            positives.append((i, land.index(True)))
            if False in land:
                pairs.append((i, land.index(True), land.index(False)))
    return positives, pairs


def _load(out, name, fmt="hf"):
    if fmt == "jsonl":
        with open(os.path.join(out, f"{name}.jsonl")) as f:
            return [json.loads(line) for line in f]
    return datasets.load_from_disk(os.path.join(out, name)).to_list()


def test_counts_per_rule(jsonl_run):
    _, rep = jsonl_run
    assert rep["rows_read"] == EXPECTED["rows_read"]
    assert rep["removed_by_rule"] == {k: EXPECTED[k] for k in ("bad_row", "problem_not_valid", "source_excluded")}
    assert rep["rows_passing_row_filters"] == EXPECTED["rows_passing"]
    assert rep["rows_without_correct_generation"] == EXPECTED["no_correct"]
    assert rep["rows_with_correct_but_no_incorrect"] == EXPECTED["correct_no_incorrect"]
    pos, pairs = rep["outputs"]["positives"], rep["outputs"]["pairs"]
    assert (pos["candidates"], pos["kept"]) == (EXPECTED["positive_candidates"], EXPECTED["positives_kept"])
    assert pos["removed"] == {"control_token_in_text": 2, "prompt_too_long": 3, "completion_too_long": 2}
    assert pos["over_length_limits_but_kept"] == 0 and pos["token_lengths_kept"]["completion_tokens"]["max"] <= 400
    counts = rep["token_counts"]  # what training reads to check lengths before tokenizing (data/lengths.py)
    assert (counts["max_prompt_tokens"], counts["max_completion_tokens"]) == (200, 400)
    assert counts["length_filter_applied_to"] == ["positives", "pairs"] and counts["measure"] == "exact"
    assert counts["template"]["name"] == "qwen2.5-math" and len(counts["tokenizer_sha256"]) == 64
    assert (pairs["candidates"], pairs["kept"]) == (EXPECTED["pair_candidates"], EXPECTED["pairs_kept"])
    assert pairs["removed"] == {"control_token_in_text": 2, "prompt_too_long": 3, "completion_too_long": 4}
    assert pairs["token_lengths_kept"]["chosen_tokens"]["max"] <= 400
    assert pairs["token_lengths_before_length_filter"]["chosen_tokens"]["max"] > 400


def test_bad_rows_reported_by_index(jsonl_run, fixture_rows):
    _, rep = jsonl_run
    _, cats = fixture_rows
    assert sorted(b["index"] for b in rep["bad_rows"]) == [i for i, c in enumerate(cats) if c.startswith("bad")]
    assert all(b["file"] == "train.jsonl" and b["row"] == b["index"] for b in rep["bad_rows"])
    kinds = rep["bad_rows_by_reason"]
    assert kinds["correctness.llama_verification has # entries for # generations"] == 4  # misaligned
    assert kinds["empty generations list"] == 3 and kinds["generations[#] is empty"] == 2
    assert kinds["missing field problem"] == 2 and kinds["missing field source"] == 1
    removed = rep["outputs"]["pairs"]["removed_rows"]
    for rule, cat in (("prompt_too_long", ["long_prompt"]), ("control_token_in_text", ["control_token"]),
                      ("completion_too_long", ["long_chosen", "long_rejected"])):
        assert sorted(removed[rule]) == [i for i, c in enumerate(cats) if c in cat]


def test_selection_and_order_match_authors(jsonl_run, fixture_rows):
    cfg, rep = jsonl_run
    rows, cats = fixture_rows
    ref_pos, ref_pairs = _authors_reference(rows, cats)
    removed = rep["outputs"]["pairs"]["removed_rows"]
    dropped_pairs = {i for v in removed.values() for i in v}
    dropped_pos = {i for v in rep["outputs"]["positives"]["removed_rows"].values() for i in v}
    pos = _load(cfg.output, "positives")
    pairs = _load(cfg.output, "pairs")
    assert [(r["original_index"], r["gen_idx"]) for r in pos] == [p for p in ref_pos if p[0] not in dropped_pos]
    assert [(r["original_index"], r["chosen_gen_idx"], r["rejected_gen_idx"]) for r in pairs] == [
        p for p in ref_pairs if p[0] not in dropped_pairs]
    r = pairs[0]
    src = rows[r["original_index"]]
    assert r["problem"] == src["problem"] and r["chosen"] == src["generations"][r["chosen_gen_idx"]]
    assert r["rejected"] == src["generations"][r["rejected_gen_idx"]] and r["source"] == src["source"]
    assert [x["shuffle_rank"] for x in pairs] == sorted(x["shuffle_rank"] for x in pairs)
    saved = json.load(open(os.path.join(cfg.output, "curation_report.json")))
    assert saved["outputs"]["pairs"]["kept"] == len(pairs)


def test_parquet_dir_parallel_jsonl_output(tmp_path, tok, fixture_rows, jsonl_run):
    """Two parquet files, 2 worker processes, JSONL output: same pairs as the JSONL run; with
    length_filter="pairs" (the authors' choice) the over-long positives are kept."""
    rows, cats = fixture_rows
    keep = [i for i, c in enumerate(cats) if c not in ("bad:generations_str", "bad:label_str")]  # not Arrow-typable
    sub = [rows[i] for i in keep]
    (tmp_path / "raw" / "data").mkdir(parents=True)
    half = len(sub) // 2
    for k, part in enumerate((sub[:half], sub[half:])):
        datasets.Dataset.from_list(part).to_parquet(str(tmp_path / "raw" / "data" / f"train-{k:05d}-of-00002.parquet"))
    cfg = CurationConfig(input=str(tmp_path / "raw"), output=str(tmp_path / "out"), tokenizer="unused",
                         num_proc=2, rows_per_chunk=64, output_format="jsonl", progress=False,
                         length_filter="pairs", **LIMITS)
    rep = curate(cfg, tokenizer=tok)
    assert rep["rows_read"] == len(sub) and rep["removed_by_rule"]["bad_row"] == EXPECTED["bad_row"] - 4
    assert rep["outputs"]["pairs"]["kept"] == EXPECTED["pairs_kept"]
    pos = rep["outputs"]["positives"]
    assert pos["kept"] == EXPECTED["positives_kept_authors"] and pos["removed"] == {"control_token_in_text": 2}
    assert pos["over_length_limits_but_kept"] == EXPECTED["positives_over_limits_kept"]
    assert rep["token_counts"]["length_filter_applied_to"] == ["pairs"]
    got = [(keep[r["original_index"]], r["chosen_gen_idx"]) for r in _load(cfg.output, "pairs", "jsonl")]
    ref = {(r["original_index"], r["chosen_gen_idx"]) for r in _load(jsonl_run[0].output, "pairs")}
    assert set(got) == ref
    assert {r["source_file"] for r in _load(cfg.output, "positives", "jsonl")} == {
        "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"}


def test_strict_and_empty_are_errors(tmp_path, tok, fixture_rows):
    rows, cats = fixture_rows
    first_bad = next(i for i, c in enumerate(cats) if c.startswith("bad"))
    path = write_jsonl(rows, str(tmp_path / "raw.jsonl"))
    with pytest.raises(ValueError, match=f"bad row {first_bad} "):
        curate(CurationConfig(input=path, output=str(tmp_path / "o1"), tokenizer="", strict=True, num_proc=1,
                              progress=False), tokenizer=tok)
    invalid = write_jsonl([r for r, c in zip(rows, cats) if c == "invalid"], str(tmp_path / "invalid.jsonl"))
    with pytest.raises(ValueError, match="no positives and no pairs"):
        curate(CurationConfig(input=invalid, output=str(tmp_path / "o2"), tokenizer="", num_proc=1,
                              progress=False), tokenizer=tok)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()  # failed runs leave nothing
    (tmp_path / "existing").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        curate(CurationConfig(input=path, output=str(tmp_path / "existing"), tokenizer="", num_proc=1),
               tokenizer=tok)


def test_other_schemas(tmp_path, tok):
    v1 = raw_v1_rows(n=40)
    rep = curate(CurationConfig(input=write_jsonl(v1, str(tmp_path / "v1.jsonl")), output=str(tmp_path / "o1"),
                                tokenizer="", num_proc=1, progress=False), tokenizer=tok)
    mv = [[bool(v) for v in r["correctness_math_verify"]] for r in v1]
    keep = [(r["problem_is_valid"] or "").strip().lower() == "yes" and r["source"] != "cn_k12" for r in v1]
    assert rep["schema"] == "openr1-raw-v1" and rep["correctness_rule"] == "math_verify"
    assert rep["outputs"]["positives"]["kept"] == sum(k and any(m) for k, m in zip(keep, mv))
    assert rep["outputs"]["pairs"]["kept"] == sum(k and any(m) and not all(m) for k, m in zip(keep, mv))

    r220 = openr1_220k_rows(n=40)
    rep = curate(CurationConfig(input=write_jsonl(r220, str(tmp_path / "220k.jsonl")), output=str(tmp_path / "o2"),
                                tokenizer="", num_proc=1, progress=False), tokenizer=tok)
    assert rep["schema"] == "openr1-220k" and rep["removed_by_rule"]["problem_not_valid"] == 0
    usable = [[bool(m) for m, ok in zip(r["correctness_math_verify"], r["is_reasoning_complete"]) if ok] for r in r220]
    assert rep["incomplete_generations_skipped"] == sum(not ok for r in r220 for ok in r["is_reasoning_complete"])
    assert rep["outputs"]["positives"]["kept"] == sum(any(u) for u in usable)
    assert rep["outputs"]["pairs"]["kept"] == sum(any(u) and not all(u) for u in usable)
    with pytest.raises(ValueError, match="needs labels"):
        curate(CurationConfig(input=str(tmp_path / "v1.jsonl"), output=str(tmp_path / "o3"), tokenizer="",
                              correctness_rule="llama_and_reparsed"), tokenizer=tok)


def test_cli_and_authors_length_measure(tmp_path, fixture_rows):
    rows, cats = fixture_rows
    path = write_jsonl([r for r, c in zip(rows, cats) if c == "pair"][:20], str(tmp_path / "raw.jsonl"))
    out = tmp_path / "out"
    argv = ["--input", path, "--output", str(out), "--tokenizer", qwen_tokenizer_dir(), "--num-proc", "1",
            "--outputs", "pairs", "--format", "jsonl", "--no-progress"]
    assert main(argv) == 0
    exact = {r["original_index"]: r for r in _load(str(out), "pairs", "jsonl")}
    assert main(argv + ["--overwrite", "--length-measure", "authors"]) == 0
    authors = {r["original_index"]: r for r in _load(str(out), "pairs", "jsonl")}
    assert len(exact) == 20 and exact.keys() == authors.keys()
    for i, r in exact.items():
        # authors: prompt without "<|im_start|>assistant\n" (3 tokens) + 1; completion inside its own
        # conversation: + system turn (20 tokens) + "<|im_start|>assistant\n" (3) - EOS + 1
        assert authors[i]["prompt_tokens"] == r["prompt_tokens"] - 2
        assert authors[i]["chosen_tokens"] == r["chosen_tokens"] + 23
    assert main(["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o"), "--tokenizer", "x"]) == 2


def test_overwrite_never_loses_data(tmp_path, fixture_rows, capsys):
    """The probes of issue 13: an output that contains the input, and --overwrite with a bad tokenizer."""
    rows, cats = fixture_rows
    proj = tmp_path / "proj"
    path = write_jsonl([r for r, c in zip(rows, cats) if c == "pair"][:10], str(proj / "data" / "raw.jsonl"))
    raw = open(path, "rb").read()
    base = ["--input", path, "--tokenizer", qwen_tokenizer_dir(), "--num-proc", "1", "--format", "jsonl",
            "--no-progress"]
    for out in (proj, proj / "data", tmp_path):  # contains the input (or is its folder's parent)
        assert main(base + ["--output", str(out), "--overwrite"]) == 2
        assert "overlaps the input" in capsys.readouterr().err
        assert open(path, "rb").read() == raw
    out = tmp_path / "curated"
    assert main(base + ["--output", str(out)]) == 0
    before = sorted(p.name for p in out.iterdir())
    bad_tok = base[:2] + ["--tokenizer", str(tmp_path / "no_tokenizer")] + base[4:]
    assert main(bad_tok + ["--output", str(out), "--overwrite"]) == 2
    assert sorted(p.name for p in out.iterdir()) == before  # the old output is untouched
    assert main(base + ["--output", str(out), "--overwrite"]) == 0  # a good rerun replaces it
    assert sorted(p.name for p in out.iterdir()) == before and not list(tmp_path.glob(".curated.*"))


def test_a_text_file_named_parquet_is_one_line_naming_it(tmp_path, capsys):
    bad = tmp_path / "raw.parquet"
    bad.write_text("this is not parquet\n")
    assert main(["--input", str(bad), "--output", str(tmp_path / "o"), "--tokenizer", qwen_tokenizer_dir(),
                 "--num-proc", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "raw.parquet: not a readable parquet file" in err and "Traceback" not in err
