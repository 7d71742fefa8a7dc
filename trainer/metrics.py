"""Task metrics: score a model's generations against references, for ``evaluate.py`` and in-training evaluation.

Loss says little about whether a fine-tuned model writes the right poem line or picks the right class, so the
generations themselves are scored. :func:`compute_metrics` runs any of the registered metrics over one list of
predictions and references and returns, per metric, the corpus value in [0, 1] and the number of examples, plus
per-example scores aligned with the inputs (so the worst examples can be looked at):

- ``exact_match``: the share of predictions equal to their reference after :func:`normalize_text`.
- ``accuracy``: classification by generation; each prediction is mapped to one label of a label set by
  :func:`match_label`, or to none. Also reports ``no_label_rate`` and a :class:`ConfusionMatrix`.
- ``rouge_l``: ROUGE-L F1 over :func:`rouge_tokens` (a character per CJK character, a word per run of other
  letters/digits), the mean over examples.
- ``bleu4`` and ``chrf``: sacreBLEU's corpus BLEU-4 and chrF2, divided by 100.

Chinese, Japanese and Korean text have no spaces between words, so word-level metrics see a whole line as one
"word"; :func:`contains_cjk` decides where characters are scored instead. Nothing here imports torch or
transformers: the module is cheap to import from a command-line tool, and matplotlib and sacrebleu are imported
only by the functions that need them.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer import markdown

NO_LABEL = "(none)"  # the confusion matrix's column for predictions that name no label

# ------------------------------------------------------------------ text rules

# What counts as CJK text, by code point. A string "contains CJK" when any one character falls in these ranges.
CJK_RANGES: tuple[tuple[int, int], ...] = (
    (0x1100, 0x11FF),  # Hangul Jamo
    (0x3000, 0x303F),  # CJK Symbols and Punctuation: 、。「」《》〇, the ideographic space U+3000
    (0x3040, 0x309F),  # Hiragana
    (0x30A0, 0x30FF),  # Katakana
    (0x3130, 0x318F),  # Hangul Compatibility Jamo
    (0x31F0, 0x31FF),  # Katakana Phonetic Extensions
    (0x3400, 0x4DBF),  # CJK Unified Ideographs Extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xAC00, 0xD7AF),  # Hangul Syllables
    (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
    (0xFE30, 0xFE4F),  # CJK Compatibility Forms (vertical punctuation)
    (0xFF00, 0xFFEF),  # Halfwidth and Fullwidth Forms: ，！？（）：； fullwidth letters, halfwidth kana and hangul
    (0x20000, 0x3FFFF),  # Supplementary and Tertiary Ideographic Planes: Extensions B-H, compatibility supplement
)
_CJK_CLASS = "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in CJK_RANGES)
_CJK = re.compile(f"[{_CJK_CLASS}]")
# One token per CJK letter (an ideograph, kana or hangul; CJK punctuation is not a word character), one per run of
# other word characters. Punctuation and whitespace only separate.
_TOKEN = re.compile(f"(?=\\w)[{_CJK_CLASS}]|[^\\W{_CJK_CLASS}]+")


def contains_cjk(text: str) -> bool:
    """Whether any character of ``text`` is in :data:`CJK_RANGES` (ideographs, kana, hangul, CJK punctuation)."""
    return _CJK.search(text) is not None


def normalize_text(text: str) -> str:
    """``text`` with leading and trailing whitespace removed and every inner run of whitespace made one space.

    Whitespace is what ``str.split()`` splits on: spaces, tabs, newlines, the ideographic space U+3000, no-break
    space, ... Nothing else changes: case is kept ("Paris" != "paris"), punctuation is kept, no Unicode
    normalisation (fullwidth "Ａ" != "A"), and spaces inside CJK text stay ("床前 明月光" != "床前明月光").
    Case is kept because exact match asks whether the model reproduced the answer, and anything parsing the
    output sees the difference too; callers who want case-insensitive scores can lowercase both sides first.
    """
    return " ".join(text.split())


def rouge_tokens(text: str) -> list[str]:
    """The tokens ROUGE-L compares: each CJK letter alone, each run of other letters/digits/underscores as one word.

    Lowercased; punctuation (ASCII, CJK and fullwidth) and whitespace separate tokens and are dropped, so a poem
    gets no credit for its commas. Text with CJK is thereby scored character by character and Latin text word by
    word ("The cat's mat." -> the, cat, s, mat); a mixed line gets both.
    """
    return _TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one pair: 2 * LCS / (prediction tokens + reference tokens); 0 when either has no token."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return 0.0
    return 2 * lcs_length(pred, ref) / (len(pred) + len(ref))


def _is_word_char(char: str) -> bool:
    """A character that glues onto a Latin-script label: a letter, digit or underscore that is not CJK."""
    return (char.isalnum() or char == "_") and not _CJK.match(char)


def _occurrences(text: str, label: str) -> list[tuple[int, int]]:
    """Spans of ``label`` in ``text`` that do not run into a neighbouring word ("no" is not in "know")."""
    spans = []
    start = text.find(label)
    while start != -1:
        end = start + len(label)
        glued_before = start > 0 and _is_word_char(label[0]) and _is_word_char(text[start - 1])
        glued_after = end < len(text) and _is_word_char(label[-1]) and _is_word_char(text[end])
        if not (glued_before or glued_after):
            spans.append((start, end))
        start = text.find(label, start + 1)
    return spans


def match_label(prediction: str, labels: Sequence[str]) -> tuple[str | None, str]:
    """The label ``prediction`` names, and how: ``(label, "exact" | "prefix" | "contains")`` or ``(None, why)``.

    The prediction and the labels are compared after :func:`normalize_text` (so case-sensitively):

    1. ``exact``: the prediction is a label.
    2. ``prefix``: the prediction starts with a label ("Space. The article is about..." -> Space).
    3. ``contains``: exactly one label occurs anywhere in it ("I think it is Space" -> Space).
    4. otherwise ``(None, "ambiguous")`` when several labels occur and none starts it, ``(None, "none")`` when none
       occurs.

    An occurrence must not be glued to a neighbouring letter or digit where the label's own edge is one ("Space" is
    not in "Spaceship", "no" not in "know"); CJK characters have no word boundaries, so "体育" is in "体育新闻".
    A label found only inside an occurrence of a longer label does not count: with labels "体育" and "体育新闻",
    "体育新闻类" is 体育新闻, and with "no" and "not sure", "not sure" is not also "no".
    """
    text = normalize_text(prediction)
    labels = [label for label in map(normalize_text, labels) if label]
    if text in labels:
        return text, "exact"
    spans = [(start, end, label) for label in labels for start, end in _occurrences(text, label)]
    kept = [(s, e, lab) for s, e, lab in spans
            if not any(s2 <= s and e <= e2 and e2 - s2 > e - s for s2, e2, _ in spans)]
    for start, _, label in kept:
        if start == 0:  # at most one kept span starts at 0: of two there, the shorter lies inside the longer
            return label, "prefix"
    found = {label for _, _, label in kept}
    if len(found) == 1:
        return found.pop(), "contains"
    return None, "ambiguous" if found else "none"


# ------------------------------------------------------------------ results


@dataclass(frozen=True)
class MetricValue:
    """One metric over a corpus: ``value`` in [0, 1] over ``count`` examples; ``details`` says how it was computed."""

    name: str
    value: float
    count: int
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ConfusionMatrix:
    """``counts[i][j]``: examples whose reference is ``labels[i]`` predicted as ``columns[j]`` (the last: no label)."""

    labels: list[str]
    counts: list[list[int]]

    @property
    def columns(self) -> list[str]:
        return [*self.labels, NO_LABEL]

    def to_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "columns": self.columns, "counts": [list(row) for row in self.counts]}


@dataclass(frozen=True)
class MetricsResult:
    """What :func:`compute_metrics` returns.

    ``metrics`` maps each requested name to its :class:`MetricValue`; ``per_example[i]`` holds example ``i``'s
    scores by metric name (exact_match, accuracy, rouge_l, bleu4, chrf, each in [0, 1]), with accuracy's
    ``predicted_label`` and ``label_match`` (see :func:`match_label`); ``confusion`` is set when accuracy ran.
    """

    metrics: dict[str, MetricValue]
    per_example: list[dict[str, Any]]
    confusion: ConfusionMatrix | None = None

    def values(self) -> dict[str, float]:
        """Flat ``{name: value}`` for logging; accuracy adds ``no_label_rate``."""
        flat = {}
        for name, metric in self.metrics.items():
            flat[name] = metric.value
            if "no_label_rate" in metric.details:
                flat["no_label_rate"] = metric.details["no_label_rate"]
        return flat

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable (``json.dumps(result.to_dict(), ensure_ascii=False)``)."""
        return {
            "metrics": {name: metric.to_dict() for name, metric in self.metrics.items()},
            "per_example": [dict(scores) for scores in self.per_example],
            "confusion": self.confusion.to_dict() if self.confusion else None,
        }


# ------------------------------------------------------------------ the metrics


@dataclass
class _Scored:
    value: MetricValue
    per_example: list[dict[str, Any]] | None = None
    confusion: ConfusionMatrix | None = None


def _exact_match(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str] | None) -> _Scored:
    scores = [float(normalize_text(p) == normalize_text(r)) for p, r in zip(predictions, references)]
    value = MetricValue("exact_match", sum(scores) / len(scores), len(scores))
    return _Scored(value, [{"exact_match": s} for s in scores])


def _label_set(references: Sequence[str], labels: Sequence[str] | None) -> list[str]:
    """The labels, normalised and deduplicated in order; the sorted distinct references when none are given."""
    given = labels is not None
    names = [normalize_text(x) for x in (labels if given else references)]
    if "" in names:
        raise ValueError(f"accuracy: an empty {'label' if given else 'reference'} cannot be a class label")
    if not given:
        return sorted(set(names))
    known = list(dict.fromkeys(names))
    unknown = sorted({normalize_text(r) for r in references} - set(known))
    if unknown:
        raise ValueError(f"accuracy: references not in the label set {known}: {unknown[:5]}"
                         + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    return known


def _accuracy(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str] | None) -> _Scored:
    label_set = _label_set(references, labels)
    index = {label: i for i, label in enumerate(label_set)}
    counts = [[0] * (len(label_set) + 1) for _ in label_set]
    per_example = []
    for prediction, reference in zip(predictions, references):
        predicted, how = match_label(prediction, label_set)
        reference = normalize_text(reference)
        counts[index[reference]][len(label_set) if predicted is None else index[predicted]] += 1
        per_example.append({"accuracy": float(predicted == reference), "predicted_label": predicted,
                            "label_match": how})
    n = len(per_example)
    value = MetricValue("accuracy", sum(e["accuracy"] for e in per_example) / n, n,
                        {"no_label_rate": sum(e["predicted_label"] is None for e in per_example) / n,
                         "labels": label_set})
    return _Scored(value, per_example, ConfusionMatrix(label_set, counts))


def _rouge_l(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str] | None) -> _Scored:
    scores = [rouge_l_f1(p, r) for p, r in zip(predictions, references)]
    value = MetricValue("rouge_l", sum(scores) / len(scores), len(scores))  # the mean of per-example F1
    return _Scored(value, [{"rouge_l": s} for s in scores])


def _unit(score: float) -> float:
    """A sacreBLEU score (0-100) as a fraction, clipped against float excess (100.00000000000001)."""
    return min(max(score / 100.0, 0.0), 1.0)


def bleu_tokenizer(references: Sequence[str]) -> str:
    """sacreBLEU's ``zh`` tokenizer (one token per Chinese character) when any reference contains CJK, else ``13a``."""
    return "zh" if any(contains_cjk(r) for r in references) else "13a"


def _bleu4(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str] | None) -> _Scored:
    from sacrebleu.metrics import BLEU

    tokenize = bleu_tokenizer(references)
    # Corpus: sacreBLEU's defaults (exp smoothing, all four orders), the signature papers report.
    corpus = BLEU(tokenize=tokenize)
    score = corpus.corpus_score(list(predictions), [list(references)])
    # Per example: sentence_bleu's defaults (exp smoothing and effective order, so a line under 4 tokens can score).
    sentence = BLEU(tokenize=tokenize, effective_order=True)
    scores = [_unit(sentence.sentence_score(p, [r]).score) for p, r in zip(predictions, references)]
    value = MetricValue("bleu4", _unit(score.score), len(scores),
                        {"tokenize": tokenize, "signature": str(corpus.get_signature())})
    return _Scored(value, [{"bleu4": s} for s in scores])


def _chrf(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str] | None) -> _Scored:
    from sacrebleu.metrics import CHRF

    metric = CHRF()  # chrF2: character 1- to 6-grams, beta 2, whitespace ignored; language-independent
    score = metric.corpus_score(list(predictions), [list(references)])
    scores = [_unit(metric.sentence_score(p, [r]).score) for p, r in zip(predictions, references)]
    value = MetricValue("chrf", _unit(score.score), len(scores), {"signature": str(metric.get_signature())})
    return _Scored(value, [{"chrf": s} for s in scores])


_METRICS: dict[str, Callable[[Sequence[str], Sequence[str], Sequence[str] | None], _Scored]] = {
    "exact_match": _exact_match,
    "accuracy": _accuracy,
    "rouge_l": _rouge_l,
    "bleu4": _bleu4,
    "chrf": _chrf,
}
METRIC_NAMES: tuple[str, ...] = tuple(_METRICS)


def resolve_metric_names(names: str | Sequence[str]) -> list[str]:
    """Metric names from a list or a comma-separated string, deduplicated in order; unknown ones are an error."""
    items = names.split(",") if isinstance(names, str) else list(names)
    resolved = list(dict.fromkeys(n.strip() for n in items if n.strip()))
    unknown = [n for n in resolved if n not in _METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRIC_NAMES)}")
    if not resolved:
        raise ValueError(f"no metric named; known: {', '.join(METRIC_NAMES)}")
    return resolved


def compute_metrics(
    names: str | Sequence[str],
    predictions: Sequence[str],
    references: Sequence[str],
    labels: Sequence[str] | None = None,
) -> MetricsResult:
    """Score ``predictions[i]`` against ``references[i]`` with each metric in ``names`` (see :data:`METRIC_NAMES`).

    ``labels`` is accuracy's label set (the distinct references when None; ignored by the other metrics). Unknown
    names, no examples, lists of different lengths or non-string items are a ``ValueError``.
    """
    resolved = resolve_metric_names(names)
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; they must pair up")
    if not predictions:
        raise ValueError("no predictions to score")
    for kind, items in (("prediction", predictions), ("reference", references)):
        bad = next((i for i, x in enumerate(items) if not isinstance(x, str)), None)
        if bad is not None:
            raise ValueError(f"{kind} {bad} is {type(items[bad]).__name__}, not a string")
    metrics, per_example, confusion = {}, [{} for _ in predictions], None
    for name in resolved:
        scored = _METRICS[name](predictions, references, labels)
        metrics[name] = scored.value
        for row, scores in zip(per_example, scored.per_example or ()):
            row.update(scores)
        confusion = scored.confusion or confusion
    return MetricsResult(metrics, per_example, confusion)


# ------------------------------------------------------------------ reports


def side_by_side(**columns: Mapping[str, float]) -> dict[str, dict[str, float | None]]:
    """``{name: {column: value}}`` from one ``{name: value}`` per column, e.g. ``side_by_side(before=base.values(),
    after=tuned.values())``; a name missing from a column gets None there."""
    names = list(dict.fromkeys(name for values in columns.values() for name in values))
    return {name: {col: values.get(name) for col, values in columns.items()} for name in names}


def metrics_table(
    rows: Mapping[str, float | int | None | Mapping[str, float | int | None]],
    digits: int = 4,
    first_header: str = "metric",
) -> str:
    """A markdown table of ``{name: value}`` (one ``value`` column) or ``{name: {column: value}}``.

    Columns appear in the order first seen. When there are ``before`` and ``after`` columns and no ``delta``, a
    ``delta`` column (after - before, signed) is added. Floats get ``digits`` decimals, ints stay ints, a missing
    value is ``n/a``; pipes and newlines in names are escaped so each row stays one row.
    """
    table_rows = {name: value if isinstance(value, Mapping) else {"value": value} for name, value in rows.items()}
    columns = list(dict.fromkeys(col for values in table_rows.values() for col in values))
    add_delta = "before" in columns and "after" in columns and "delta" not in columns

    def number(value: Any, signed: bool = False) -> str:
        if value is None:
            return "n/a"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:+d}" if signed else str(value)
        if isinstance(value, float):
            return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
        return str(value)

    header = [first_header, *columns, *(["delta"] if add_delta else [])]
    rows_out = []
    for name, values in table_rows.items():
        cells = [name, *(number(values.get(col)) for col in columns)]
        if add_delta:
            before, after = values.get("before"), values.get("after")
            both = isinstance(before, (int, float)) and isinstance(after, (int, float))
            cells.append(number(after - before, signed=True) if both else "n/a")
        rows_out.append(cells)
    return "\n".join(markdown.table(header, rows_out))


# Fonts with CJK glyphs, tried in order when a label needs one; without any, CJK labels render as boxes.
_CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans SC", "Source Han Sans SC",
              "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "SimHei", "Microsoft YaHei", "PingFang SC",
              "Hiragino Sans GB", "AR PL UMing CN", "Arial Unicode MS")


def plot_confusion_matrix(confusion: ConfusionMatrix, path: str | Path, title: str | None = None) -> Path:
    """The confusion matrix as a PNG: rows the reference labels, columns the predicted ones and ``(none)``.

    Cells show counts, shaded by the share of their row. Drawn on a bare matplotlib ``Figure`` (the Agg
    renderer, no pyplot, no display needed). CJK labels use an installed CJK font when one of :data:`_CJK_FONTS`
    is there; otherwise they render as boxes, with matplotlib's missing-glyph warnings silenced.
    """
    from matplotlib import font_manager, rc_context
    from matplotlib.figure import Figure

    path = Path(path)
    installed = {font.name for font in font_manager.fontManager.ttflist}
    fonts = [name for name in _CJK_FONTS if name in installed] if any(map(contains_cjk, confusion.labels)) else []
    n_rows, n_cols = len(confusion.labels), len(confusion.columns)
    totals = [max(sum(row), 1) for row in confusion.counts]
    shares = [[count / total for count in row] for row, total in zip(confusion.counts, totals)]
    with rc_context({"font.family": [*fonts, "DejaVu Sans"]}), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from", category=UserWarning)
        fig = Figure(figsize=(max(4.0, 1.0 + 0.7 * n_cols), max(3.0, 1.0 + 0.6 * n_rows)), dpi=100)
        ax = fig.add_subplot()
        ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
        for i, row in enumerate(confusion.counts):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center",
                        color="white" if shares[i][j] > 0.5 else "black", fontsize=9)
        ax.set_xticks(range(n_cols), confusion.columns, rotation=45 if n_cols > 4 else 0,
                      ha="right" if n_cols > 4 else "center")
        ax.set_yticks(range(n_rows), confusion.labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("reference")
        if title:
            ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, format="png")
    return path
