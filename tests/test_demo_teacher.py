"""The demo's synthetic teacher: schema, arithmetic of the traces, error modes, labels, held-out split."""
import json
import random
import re
from collections import Counter

import pytest

from redi_megatron.demo import teacher as T

LINE = re.compile(r"^[a-z-]+: (\d)\+(\d)(?:\+(\d))?=(\d+), write (\d), carry (\d)\.$")
SCHEMA_FIELDS = {
    "problem": str, "solution": str, "answer": str, "problem_type": str, "question_type": str,
    "problem_is_valid": str, "solution_is_valid": str, "source": str, "synthetic": bool, "generations": list,
    "generations_count": int, "correctness": dict, "reparsed_answers": list,
}


@pytest.fixture(scope="module")
def rows_and_stats():
    return T.teacher_rows(400, seed=3, cfg=T.TaskConfig(min_digits=2, max_digits=4, error_rate=0.5))


def _columns_of(trace: str):
    return [LINE.match(line) for line in trace.split("\n") if LINE.match(line)]


def _boxed(trace: str) -> str:
    return re.search(r"\\boxed\{([^}]*)\}", trace).group(1)


def test_rows_follow_the_openr1_raw_schema(rows_and_stats):
    rows, _ = rows_and_stats
    for row in rows:
        for name, typ in SCHEMA_FIELDS.items():
            assert isinstance(row[name], typ), name
        n = len(row["generations"])
        assert row["generations_count"] == n == 4
        assert set(row["correctness"]) == {"llama_verification", "math_verify_answer", "math_verify_reparsed_answer"}
        assert all(len(v) == n for v in row["correctness"].values())
        assert row["problem_is_valid"] == "Yes" and row["synthetic"] is True
        assert row["reparsed_answers"] == [row["answer"]] * n
        a, b = T.operands(row)
        assert row["answer"] == str(a + b) and str(a) in row["problem"] and str(b) in row["problem"]
        json.dumps(row)  # plain JSON types only


def test_same_seed_same_rows_other_seed_other_rows():
    a, _ = T.teacher_rows(30, seed=7)
    b, _ = T.teacher_rows(30, seed=7)
    c, _ = T.teacher_rows(30, seed=8)
    assert a == b
    assert a != c


def test_correct_traces_do_right_column_arithmetic():
    rng = random.Random(0)
    for _ in range(300):
        a, b = rng.randint(0, 99999), rng.randint(0, 999)
        trace = T.correct_trace(a, b)
        assert trace.error is None and trace.boxed == str(a + b)
        carry = 0
        cols = _columns_of(trace.text)
        for i, m in enumerate(cols):
            x, y, cin, s, digit, cout = (int(g) if g else 0 for g in m.groups())
            assert x == (a // 10**i) % 10 and y == (b // 10**i) % 10 and cin == carry
            assert s == x + y + cin and digit == s % 10 and cout == s // 10
            carry = cout
        assert len(cols) == max(len(str(a)), len(str(b)))
        assert f"Reading the digits from the left: {a + b}." in trace.text
        assert trace.text.startswith("<think>\n") and "\n</think>\n\n" in trace.text


def test_every_error_mode_appears_and_gives_a_wrong_answer(rows_and_stats):
    rows, stats = rows_and_stats
    modes = stats["traces_by_error_mode"]
    default_modes = {m for m, w in zip(T.ERROR_MODES, T.TaskConfig().error_weights) if w > 0}
    assert set(modes) == default_modes | {"correct"}
    rng = random.Random(1)
    cfg = T.TaskConfig(min_digits=3, max_digits=4, error_weights=(1.0,) * len(T.ERROR_MODES))
    seen = Counter()
    for _ in range(400):
        a, b = T._operand(rng, cfg), T._operand(rng, cfg)
        t = T.wrong_trace(a, b, rng, cfg)
        seen[t.error] += 1
        assert t.boxed == _boxed(t.text)
        if t.error == "comma_format":
            assert t.boxed == f"{a + b:,}" and t.boxed != str(a + b)
        elif t.error == "box_slip":  # the working and the reading are right, only the answer is misquoted
            assert f"Reading the digits from the left: {a + b}." in t.text and t.boxed != str(a + b)
        else:
            assert t.boxed != str(a + b), t.text
    assert set(seen) == set(T.ERROR_MODES)


def test_slips_are_carried_through_consistently():
    # 58 + 67: carry out of the units column; forgetting it must make every later line consistent.
    t = T._slip_trace(58, 67, random.Random(0), "carry_slip")
    cols = _columns_of(t.text)
    bad = [m for m in cols if int(m.group(4)) != sum(int(g or 0) for g in m.group(1, 2, 3))]
    assert not bad  # each line adds up what it states; the slip is in the carry, not the sum
    assert t.boxed != "125" and t.boxed in ("115", "25")
    lines, written = T._columns(58, 67, ("carry_out", 0))
    assert lines[0] == "ones: 8+7=15, write 5, carry 0." and lines[1] == "tens: 5+6=11, write 1, carry 1."
    assert written == [5, 1, 1]


def test_misread_digit_takes_a_neighbouring_place():
    rng = random.Random(4)
    for _ in range(50):
        a, b = rng.randint(100, 99999), rng.randint(100, 99999)
        t = T._slip_trace(a, b, rng, "misread_digit")
        if t is None:
            continue
        width = max(len(str(a)), len(str(b)))
        da, db = T._digits(a, width), T._digits(b, width)
        used = [(int(m.group(1)), int(m.group(2))) for m in _columns_of(t.text)]
        wrong = [(i, x, y) for i, (x, y) in enumerate(used) if (x, y) != (da[i], db[i])]
        assert len(wrong) == 1, t.text
        i, x, y = wrong[0]
        digits, got = (da, x) if x != da[i] else (db, y)
        assert got in [digits[j] for j in (i - 1, i + 1) if 0 <= j < width]


def test_labels_agree_mostly_and_disagree_sometimes(rows_and_stats):
    rows, stats = rows_and_stats
    agreement = stats["judge_vs_math_verify"]
    total = sum(agreement.values())
    assert agreement["agree"] / total > 0.85
    assert agreement["disagree"] > 0
    for row in rows:
        for gen, rep in zip(row["generations"], row["correctness"]["math_verify_reparsed_answer"]):
            assert rep == (_boxed(gen) == row["answer"])  # the exact check is exact
        for gen, ans, rep in zip(row["generations"], row["correctness"]["math_verify_answer"],
                                 row["correctness"]["math_verify_reparsed_answer"]):
            assert not ans or rep  # the un-reparsed check only ever fails more


def test_held_out_problems_are_disjoint_and_load_in_redi_eval(tmp_path):
    from redi_megatron.eval.benchmarks import load_benchmark

    cfg = T.TaskConfig(min_digits=2, max_digits=2)
    out = T.write_teacher_data(str(tmp_path), 300, 100, seed=0, cfg=cfg)
    rows = [json.loads(x) for x in open(out.train_path)]
    train = {tuple(sorted(T.operands(r))) for r in rows}
    problems = load_benchmark(out.eval_path)
    assert len(problems) == 100 and len({p.id for p in problems}) == 100
    for p in problems:
        a, b = (int(x) for x in re.findall(r"\d+", p.problem))
        assert tuple(sorted((a, b))) not in train
        assert p.answers == (str(a + b),)
    meta = json.load(open(tmp_path / "teacher.json"))
    assert meta["num_train"] == 300 and meta["task"]["min_digits"] == 2


def test_too_many_problems_for_the_operand_space_is_a_value_error():
    with pytest.raises(ValueError, match="distinct problems"):
        T.teacher_rows(60, seed=0, cfg=T.TaskConfig(min_digits=1, max_digits=1))
    with pytest.raises(ValueError, match="error_rate"):
        T.TaskConfig(error_rate=1.5).validate()
    with pytest.raises(ValueError, match="error_weights"):
        T.TaskConfig(error_weights=(1.0,)).validate()


def test_redi_curate_reads_the_teacher_rows(tmp_path):
    """The data engineer's curation on the teacher's rows: the paper's rule picks what the labels say."""
    from redi_megatron.data.curate import CurationConfig, curate
    from redi_megatron.demo.tokenizer import build_tokenizer

    out = T.write_teacher_data(str(tmp_path / "teacher"), 120, 10, seed=2, cfg=T.TaskConfig(min_digits=2, max_digits=3))
    rows = [json.loads(x) for x in open(out.train_path)]
    expected_pos = expected_pairs = 0
    for r in rows:
        c = r["correctness"]
        ok = [bool(a) and bool(b) for a, b in zip(c["llama_verification"], c["math_verify_reparsed_answer"])]
        expected_pos += any(ok)
        expected_pairs += any(ok) and not all(ok)
    report = curate(CurationConfig(input=out.train_path, output=str(tmp_path / "cur"), tokenizer="",
                                   output_format="jsonl", num_proc=1, progress=False), tokenizer=build_tokenizer())
    assert report["outputs"]["positives"]["kept"] == expected_pos
    assert report["outputs"]["pairs"]["kept"] == expected_pairs
    assert report["bad_rows_listed"] == 0
    pairs = [json.loads(x) for x in open(tmp_path / "cur" / "pairs.jsonl")]
    assert all(_boxed(p["chosen"]) == p["answer"] for p in pairs)
