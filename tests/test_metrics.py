"""Task metrics against values worked out by hand on small inputs, Chinese and English."""

from __future__ import annotations

import json
import math

import pytest

from trainer.metrics import (
    METRIC_NAMES,
    ConfusionMatrix,
    compute_metrics,
    contains_cjk,
    lcs_length,
    match_label,
    metrics_table,
    normalize_text,
    plot_confusion_matrix,
    resolve_metric_names,
    rouge_l_f1,
    rouge_tokens,
    side_by_side,
)


def values(name: str, predictions: list[str], references: list[str], **kwargs) -> tuple[float, list]:
    result = compute_metrics([name], predictions, references, **kwargs)
    return result.metrics[name].value, [row[name] for row in result.per_example]


@pytest.mark.parametrize("text, expected", [
    ("床前明月光", True), ("こんにちは", True), ("カタカナ", True), ("안녕하세요", True), ("Hello，world", True),
    ("「quote」", True), ("ＡＢＣ", True), ("𠀀", True),  # fullwidth comma, CJK brackets, fullwidth letters, Ext B
    ("Hello, world!", False), ("café naïve Ωμέγα", False), ("", False),
])
def test_cjk_detection(text, expected):
    assert contains_cjk(text) is expected


def test_exact_match_normalises_whitespace_only():
    assert normalize_text("  a \t b\n\nc  ") == "a b c"
    assert normalize_text("明月光\u3000地上霜\n") == "明月光 地上霜"  # the ideographic space is whitespace
    predictions = ["  床前明月光\n", "a  b\tc", "Paris", "床前 明月光", "ＡＢＣ", "春眠不觉晓\u3000处处闻啼鸟"]
    references = ["床前明月光", "a b c", "paris", "床前明月光", "ABC", "春眠不觉晓 处处闻啼鸟"]
    value, scores = values("exact_match", predictions, references)
    # kept: case, spaces inside CJK text, fullwidth forms
    assert scores == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert value == pytest.approx(3 / 6)


def test_lcs_is_a_subsequence_not_a_greedy_or_bag_match():
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook pair (BCBA, BDAB, ...)
    assert lcs_length("abc", "cab") == 2  # a greedy left-to-right match finds only "c" or "a"
    assert lcs_length("", "abc") == 0 and lcs_length("abc", "abc") == 3


def test_rouge_l_chinese_is_character_level_without_punctuation():
    reference = "春眠不觉晓，处处闻啼鸟。"
    prediction = "春眠不觉晓，处处闻鸟啼声。"
    # Tokens (punctuation dropped): reference 春眠不觉晓处处闻啼鸟 = 10, prediction 春眠不觉晓处处闻鸟啼声 = 11.
    # LCS = 春眠不觉晓处处闻 (8) + one of 啼/鸟 (their order is swapped) = 9.
    # F1 = 2 * 9 / (10 + 11) = 18/21 = 6/7. (Counting the two commas and stops: 2 * 11 / 25 = 0.88; a bag of
    # characters, which ignores the swap: 2 * 10 / 21 = 0.952.)
    assert rouge_tokens(reference) == list("春眠不觉晓处处闻啼鸟")
    assert rouge_l_f1(prediction, reference) == pytest.approx(6 / 7)


def test_rouge_l_english_is_word_level_lowercased():
    # reference: the cat sat on the mat (6); prediction: a cat sat quietly on the mat (7)
    # LCS = cat sat on the mat = 5; F1 = 2 * 5 / 13 = 10/13. Case and "!" make no difference.
    assert rouge_tokens("A Cat sat quietly on the mat!") == ["a", "cat", "sat", "quietly", "on", "the", "mat"]
    value, scores = values("rouge_l", ["A Cat sat quietly on the mat!", "春眠不觉晓，处处闻鸟啼声。", "!!!"],
                           ["the cat sat on the mat", "春眠不觉晓，处处闻啼鸟。", "..."])
    assert scores == pytest.approx([10 / 13, 6 / 7, 0.0])  # no tokens on a side: 0
    assert value == pytest.approx((10 / 13 + 6 / 7 + 0.0) / 3)  # corpus value: the mean of per-example F1


def test_rouge_l_mixed_text_scores_cjk_by_character_and_latin_by_word():
    assert rouge_tokens("我爱Python 3！") == ["我", "爱", "python", "3"]
    # 我 爱 pyton vs 我 爱 python: LCS 2 of 3 and 3 -> 2*2/6
    assert rouge_l_f1("我爱Pyton", "我爱Python") == pytest.approx(2 / 3)


@pytest.mark.parametrize("prediction, expected", [
    ("Space", ("Space", "exact")),
    ("  Space \n", ("Space", "exact")),
    ("Sports. The text is about football", ("Sports", "prefix")),
    ("Military or Space", ("Military", "prefix")),  # the label it starts with wins over later ones
    ("I think it is Military", ("Military", "contains")),
    ("I would say Space or Sports", (None, "ambiguous")),
    ("Spaceship news", (None, "none")),  # "Space" glued to "ship" is not the label
    ("space", (None, "none")),  # case-sensitive
    ("", (None, "none")),
])
def test_label_matching_rules(prediction, expected):
    assert match_label(prediction, ["Sports", "Space", "Military"]) == expected


def test_label_matching_prefers_the_longer_of_nested_labels():
    assert match_label("体育新闻类", ["体育", "体育新闻", "财经"]) == ("体育新闻", "prefix")
    assert match_label("这篇是财经", ["体育", "体育新闻", "财经"]) == ("财经", "contains")  # no word boundaries in CJK
    assert match_label("体育和财经", ["体育", "体育新闻", "财经"]) == ("体育", "prefix")
    assert match_label("I know it", ["no", "not sure"]) == (None, "none")
    assert match_label("I am not sure", ["no", "not sure"]) == ("not sure", "contains")  # "no" only inside "not"
    assert match_label("maybe no", ["no", "not sure"]) == ("no", "contains")


def test_accuracy_no_label_rate_and_confusion_matrix():
    labels = ["Sports", "Space", "Military"]
    references = ["Space", "Sports", "Military", "Space", "Sports", "Military", "Space"]
    predictions = ["Space", "Sports. About football", "I think it is Military", "Military or Space",
                   "I would say Space or Sports", "Spaceship news", "space"]
    result = compute_metrics(["accuracy"], predictions, references, labels=labels)
    # correct: examples 0, 1, 2; wrong label: 3 (Military); no label: 4 (ambiguous), 5, 6
    assert [row["accuracy"] for row in result.per_example] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert [row["predicted_label"] for row in result.per_example] == [
        "Space", "Sports", "Military", "Military", None, None, None]
    assert result.metrics["accuracy"].value == pytest.approx(3 / 7)
    assert result.metrics["accuracy"].count == 7
    assert result.values() == pytest.approx({"accuracy": 3 / 7, "no_label_rate": 3 / 7})
    confusion = result.confusion
    assert confusion.labels == labels and confusion.columns == [*labels, "(none)"]
    assert confusion.counts == [
        # Sports Space Military (none)      reference
        [1, 0, 0, 1],                     # Sports: 1 right, 1 ambiguous
        [0, 1, 1, 1],                     # Space: 1 right, 1 as Military, 1 "space"
        [0, 0, 1, 1],                     # Military: 1 right, 1 "Spaceship"
    ]


def test_accuracy_label_set_from_references_and_unknown_references():
    result = compute_metrics(["accuracy"], ["科技？", "财经", "体育"], [" 科技 ", "体育", "体育"])
    assert result.confusion.labels == ["体育", "科技"]  # distinct normalised references, sorted
    assert result.confusion.counts == [[1, 0, 1], [0, 1, 0]]  # 财经 is no label here
    assert result.metrics["accuracy"].details["no_label_rate"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match=r"references not in the label set \['体育', '财经'\]: \['科技'\]"):
        compute_metrics(["accuracy"], ["体育", "科技"], ["体育", "科技"], labels=["体育", "财经"])


def test_bleu4_identical_is_one():
    for text in ("the quick brown fox jumps over the lazy dog", "床前明月光，疑是地上霜。"):
        value, scores = values("bleu4", [text], [text])
        assert value == pytest.approx(1.0) and scores == pytest.approx([1.0])


def test_bleu4_hand_computed_and_corpus_aggregated():
    predictions = ["the cat sat on the mat", "the cat sat down"]
    references = ["the cat sat on a mat", "the cat sat up"]
    # 1: matches 1-grams 5/6 (the x1 clipped, cat sat on mat), 2-grams 3/5, 3-grams 2/4, 4-grams 1/3; BP 1
    #    BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = (1/12) ** (1/4)
    # 2: 3/4, 2/3, 1/2, and 0/1 4-grams. The corpus BLEU uses sacreBLEU's default 'exp' smoothing: the k-th
    #    zero precision becomes 1 / (2**k * total) = 1/2 here, so (3/4 * 2/3 * 1/2 * 1/2) ** (1/4) = (1/8) ** (1/4).
    #    (No smoothing would give 0; 'floor' (0.1) would give 0.025 ** (1/4) = 0.398.)
    # corpus: n-gram counts are summed, not scores averaged: 8/10, 5/8, 3/6, 1/4 -> (1/16) ** (1/4) = 0.5
    result = compute_metrics(["bleu4"], predictions, references)
    assert [row["bleu4"] for row in result.per_example] == pytest.approx([(1 / 12) ** 0.25, (1 / 8) ** 0.25])
    assert result.metrics["bleu4"].value == pytest.approx(0.5)
    assert result.metrics["bleu4"].details["tokenize"] == "13a"
    assert "smooth:exp" in result.metrics["bleu4"].details["signature"]


def test_bleu4_tokenises_chinese_by_character():
    # zh tokenizer: 床 前 明 月 vs 床 前 明 月 光: every n-gram of the prediction matches (4/4, 3/3, 2/2, 1/1);
    # brevity penalty exp(1 - 5/4). With 13a both lines are one "word" each and nothing would match.
    result = compute_metrics(["bleu4"], ["床前明月"], ["床前明月光"])
    assert result.metrics["bleu4"].details["tokenize"] == "zh"
    assert result.metrics["bleu4"].value == pytest.approx(math.exp(-0.25))
    assert result.per_example[0]["bleu4"] == pytest.approx(math.exp(-0.25))


def test_bleu4_corpus_needs_four_tokens_where_sentence_bleu_uses_the_orders_it_has():
    # corpus BLEU-4 on two tokens has no 3- or 4-grams: 0; per-example BLEU uses effective order: 1
    value, scores = values("bleu4", ["a b"], ["a b"])
    assert value == 0.0 and scores == pytest.approx([1.0])


def test_chrf_identical_one_disjoint_zero_and_hand_computed():
    # "ab" vs "abc": char 1-grams P 2/2 R 2/3, 2-grams P 1/1 R 1/2; no 3- to 6-grams in the prediction, so
    # (sacreBLEU's effective order) P = 1 and R = (2/3 + 1/2) / 2 = 7/12 are averaged over orders 1-2 and
    # chrF2 = (1 + 4) * P * R / (4 * P + R) = (35/12) / (55/12) = 7/11.
    line = "床前明月光，疑是地上霜。"
    value, scores = values("chrf", [line, "xyz", "ab"], [line, "abc", "abc"])
    assert scores == pytest.approx([1.0, 0.0, 7 / 11])
    assert 0.0 < value < 1.0


def test_all_metrics_together_are_aligned_and_json_serialisable():
    predictions = ["床前明月光", "the cat sat on the mat"]
    references = ["床前明月光", "the cat sat on a mat"]
    result = compute_metrics(",".join(METRIC_NAMES), predictions, references)
    assert list(result.metrics) == list(METRIC_NAMES)
    assert all(m.count == 2 and 0.0 <= m.value <= 1.0 for m in result.metrics.values())
    first, second = result.per_example
    assert first["exact_match"] == 1.0 and first["rouge_l"] == 1.0 and first["accuracy"] == 1.0
    assert second["exact_match"] == 0.0 and second["rouge_l"] == pytest.approx(10 / 12)
    data = json.loads(json.dumps(result.to_dict(), ensure_ascii=False))
    assert data["metrics"]["rouge_l"]["value"] == pytest.approx((1 + 10 / 12) / 2)
    assert data["per_example"][1]["rouge_l"] == pytest.approx(10 / 12)
    assert data["confusion"]["columns"][-1] == "(none)"
    assert data["metrics"]["bleu4"]["details"]["tokenize"] == "zh"  # one reference has CJK


def test_bad_requests_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown metric\(s\) bleu; known: exact_match, accuracy, rouge_l, bleu4"):
        compute_metrics(["rouge_l", "bleu"], ["a"], ["a"])
    with pytest.raises(ValueError, match="no metric named"):
        resolve_metric_names(" , ")
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_metrics(["exact_match"], ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions to score"):
        compute_metrics(["exact_match"], [], [])
    with pytest.raises(ValueError, match="prediction 1 is NoneType, not a string"):
        compute_metrics(["exact_match"], ["a", None], ["a", "b"])
    assert resolve_metric_names("rouge_l, bleu4,rouge_l") == ["rouge_l", "bleu4"]


def test_markdown_table_before_after_delta():
    before = {"rouge_l": 0.1, "accuracy": 0.5}
    after = {"rouge_l": 0.35, "accuracy": 0.25, "bleu4": 0.2}
    assert metrics_table(side_by_side(before=before, after=after)).splitlines() == [
        "| metric | before | after | delta |",
        "|---|---|---|---|",
        "| rouge_l | 0.1000 | 0.3500 | +0.2500 |",
        "| accuracy | 0.5000 | 0.2500 | -0.2500 |",
        "| bleu4 | n/a | 0.2000 | n/a |",
    ]
    assert metrics_table({"a|b": 1 / 3, "n": 7}, digits=2).splitlines() == [
        "| metric | value |", "|---|---|", "| a\\|b | 0.33 |", "| n | 7 |"]


def test_confusion_matrix_png(tmp_path):
    for labels in (["Sports", "Space"], ["体育", "财经"]):  # CJK labels may render as boxes but must not fail
        confusion = ConfusionMatrix(labels, [[3, 1, 0], [0, 2, 2]])
        path = plot_confusion_matrix(confusion, tmp_path / f"{labels[0]}.png", title="confusion")
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
