"""Data preparation on CPU: read -> chat template -> tokenise with assistant-only labels -> pack into rows of 2048.

Run from the repo root on a quiet machine (the defaults are a measurement: 1,000,000 conversations; on 2 cores a TRL
run takes over half an hour, extrapolated from small runs)::

    python bench/prepare.py --contenders ours,trl              # 1M conversations, 3 alternated repeats
    python bench/prepare.py --contenders ours,legacy --n 50000 --out bench/results/DATE-cpu-prepare-n50k.json
    python bench/prepare.py --n 3000 --repeats 1 --max-load 0 --out /tmp/smoke   # smoke test: a minute or two

``legacy`` does not fit 1M conversations in memory on a 24 GB machine (it reads every token into Python lists before
packing: ~240 bytes per token, ~0.18 MB per conversation of this corpus); give it 50k-100k, or let --max-memory-gib
stop it (reported as failed) before the kernel's OOM killer picks a victim.

Every contender gets the same JSON-lines corpus of conversations (OpenAI ``messages`` format) and the same tokenizer
folder (a byte-level BPE trained on a sample of the corpus, ChatML template with ``{% generation %}`` markers around
each assistant answer and its ``<|im_end|>``), and must produce packed rows of ``--max-length`` (2048) token ids with
labels only on what the assistant says. Each run is a fresh subprocess with fresh, empty caches; runs alternate between
contenders (order forward on even repeats, reversed on odd ones: a b c c b a ..., which cancels a linear drift of the
machine), and medians over the repeats are reported.

Synthetic corpus (cached by seed and n in ``--workdir``; generation is streamed, memory stays bounded): assistant
answers log-normal in length (median about 250 tokens, long tail to a few thousand), user turns shorter (median about
45 tokens, long tail of pasted text), a third of the conversations multi-turn (2-5 turns), 20% with a system prompt;
text is made of sentences over a Zipf-distributed pseudo-vocabulary of 6,000 random words with numbers, punctuation,
paragraphs and list items, and about 10% of the sentences are Chinese (CJK characters, also Zipf), so that the BPE
tokenizer behaves as on real text. The corpus shape measured with the tokenizer (token medians, share over
--max-length) goes into the report.

Contenders:

* ``ours``: ``python trainer/prepare.py --model_name_or_path TOKENIZER --dataset CORPUS.jsonl --template auto
  --max_length 2048 --packing true --report_to none`` (plus ``--preprocessing_num_workers N`` unless its --num-proc
  is ``auto``, and ``--ours-args``) with
  ``SFT_CACHE_DIR`` a fresh empty folder. The last line of its stdout is the prepared folder; its ``manifest.json``
  gives ``train_examples``, ``tokens``, ``label_tokens``, ``rows`` and ``efficiency`` (missing keys are tolerated:
  the rows are then counted from the folder when it is a saved ``datasets`` dataset). Fails cleanly, with a message,
  while ``trainer/prepare.py`` does not exist.
* ``trl``: ``trl.SFTTrainer``'s own dataset preparation (``_prepare_dataset``, run by its ``__init__``) with
  ``SFTConfig(assistant_only_loss=True, packing=True, packing_strategy="bfd", max_length=2048, dataset_num_proc=2)`` on
  ``datasets.load_dataset("json", data_files=CORPUS, split="train")``; the trainer is built around a 1-layer random
  Llama with the tokenizer's vocabulary, whose creation is not timed. ``HF_DATASETS_CACHE`` is a fresh folder per run,
  so nothing is reused between repeats.
* ``legacy``: this project's pipeline as it was at commit 7801736 (before the rewrite), run from a git worktree of that
  commit in ``--workdir``: ``read_records`` + ``build_datasets(records, None, tokenizer, tokenizer.chat_template,
  max_length=2048, on_overlong="truncate", val_size=0, packing=True, seed=0, num_proc=2, cache_dir=None)``.

Worker processes (``--num-proc``) are each contender's fastest on 2 cores, measured: ours in one process (what it
chooses itself there), trl and legacy with 2 (legacy with 1: 203 s against 176 s at 50k).

What is reported per run (medians per contender):

* ``wall s``: the contender's process from start to exit (Python start-up and imports included: what a user waits),
  minus what the benchmark adds inside it (the tiny model for TRL, the final row count for trl/legacy);
* ``conv/s``: conversations in the corpus / wall s; ``tok/s``: tokens in the packed rows / wall s;
* ``peak RSS``: the largest sum of resident memory over the contender's whole process tree (it and every worker it
  starts), polled at 5 Hz; the proportional set size (PSS, shared pages split between the processes that share them,
  so forked workers are not counted twice) is polled beside it, and ``ru_maxrss`` (the largest single process, exact)
  is kept in the JSON;
* ``rows``, ``tokens`` (in the packed rows, after truncation to --max-length), ``label tokens`` and packing
  ``efficiency`` = tokens / (rows * max_length); ``prep s``: the preparation alone as timed inside the process
  (trl: load_dataset + SFTConfig + SFTTrainer construction; legacy: read_records + build_datasets; ours: n/a);
* CPU utilisation (CPU s of the process tree / wall s; 2 cores can give at most 2) and the 1-minute load average
  before, at most during, and after each run. Before each run the script waits up to --max-wait s for the load to
  drop below --max-load. Preparation has serial phases, so a low CPU utilisation is not by itself a sign of
  contention: read the load columns.

Results: ``<out>/<date>-cpu-prepare.json`` (every repeat, machine, versions, load averages, corpus shape) and ``.md``
(the tables). ``--from-json`` pools the runs of saved results and redoes the tables.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import add_quiet_options, machine, pooled_report, wait_for_quiet

# whose versions the report records
PACKAGES = ("torch", "transformers", "datasets", "tokenizers", "trl", "pyarrow", "psutil")
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CONTENDERS = ("ours", "trl", "legacy")
DEFAULT_WORKERS = "ours=auto,trl=2,legacy=2"
LEGACY_COMMIT = "7801736"
IGNORE_INDEX = -100
MiB = 1024 * 1024

# --------------------------------------------------------------------------------------------------------------------
# Synthetic corpus
# --------------------------------------------------------------------------------------------------------------------

GENERATOR_VERSION = 1  # bump when the corpus changes: it is part of the cache file names
CHUNK = 10_000  # conversations per generator chunk (each chunk has its own RNG stream)
N_WORDS = 6_000
N_LATIN_SENTENCES = 50_000
N_CJK_SENTENCES = 8_000
N_SYSTEM_PROMPTS = 64
CJK_SHARE = 0.10  # of sentences
SYSTEM_SHARE = 0.20  # of conversations
MULTI_TURN_SHARE = 1 / 3  # of conversations; those have 2-5 turns
# lengths in sentences (a Latin sentence is ~15 tokens): log-normal median and sigma, clipped
ASSISTANT_SENTENCES = (15.0, 0.85, 500)
USER_SENTENCES = (3.0, 1.0, 300)

ONSETS = ["", "", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br", "ch",
          "cl", "dr", "fl", "gr", "kr", "pl", "pr", "sh", "sl", "st", "str", "th", "tr", "qu"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ia", "io", "oo", "ou", "y"]
CODAS = ["", "", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "rk", "rt", "st", "x", "ck"]


class Pools:
    """Sentences the corpus is made of, JSON-escaped once (so a record is built by concatenation, not json.dumps).

    ``full[i]`` is sentence i with its trailing separator (space, paragraph break, line break, list item), ``bare[i]``
    the sentence alone, for the end of a message. Latin sentences come first, then the CJK ones.
    """

    def __init__(self, seed: int):
        import numpy as np

        rng = np.random.default_rng([seed, GENERATOR_VERSION, 0xC0DE])
        words = self._words(rng)
        numbers = [str(int(x)) for x in rng.lognormal(3.0, 2.0, 800)] + [f"{x:.1f}" for x in rng.lognormal(1, 1, 300)]
        numbers += [f"{int(x)}%" for x in rng.uniform(1, 100, 100)] + [f"{int(x):,}" for x in rng.lognormal(8, 2, 200)]
        zipf = 1.0 / (np.arange(N_WORDS) + 3.0) ** 1.05
        lengths = np.clip(np.rint(rng.lognormal(math.log(12), 0.45, N_LATIN_SENTENCES)), 2, 45).astype(int)
        ids = np.split(rng.choice(N_WORDS, size=int(lengths.sum()), p=zipf / zipf.sum()), np.cumsum(lengths)[:-1])
        latin = [self._latin(rng, words, numbers, i) for i in ids]
        chars = [chr(c) for c in rng.choice(np.arange(0x4E00, 0x9FA6), size=2_500, replace=False)]
        czipf = 1.0 / (np.arange(len(chars)) + 5.0)
        lengths = np.clip(np.rint(rng.lognormal(math.log(16), 0.5, N_CJK_SENTENCES)), 4, 60).astype(int)
        ids = np.split(rng.choice(len(chars), size=int(lengths.sum()), p=czipf / czipf.sum()), np.cumsum(lengths)[:-1])
        cjk = [self._cjk(rng, chars, i) for i in ids]
        sentences = latin + cjk
        self.full = [_escape(s + sep) for s, sep in sentences]
        self.bare = [_escape(s) for s, _ in sentences]
        self.n_latin, self.n_cjk = len(latin), len(cjk)
        self.systems = [_escape(" ".join(latin[int(i)][0] for i in rng.integers(0, len(latin), int(k))))
                        for k in rng.integers(1, 5, N_SYSTEM_PROMPTS)]

    @staticmethod
    def _words(rng) -> list[str]:
        """N_WORDS distinct pseudo-words, roughly shortest first (frequent words are short, as in real language)."""
        seen: set[str] = set()
        words: list[str] = []
        while len(words) < N_WORDS:
            syllables = int(rng.choice([1, 2, 3, 4], p=[0.3, 0.4, 0.2, 0.1]))
            w = "".join(ONSETS[rng.integers(len(ONSETS))] + VOWELS[rng.integers(len(VOWELS))]
                        + CODAS[rng.integers(len(CODAS))] for _ in range(syllables))
            if w not in seen:
                seen.add(w)
                words.append(w)
        noise = rng.normal(0, 2.0, len(words))
        return [w for _, w in sorted(zip((len(w) + e for w, e in zip(words, noise)), words))]

    @staticmethod
    def _latin(rng, words: list[str], numbers: list[str], ids) -> tuple[str, str]:
        """A sentence of the words ``ids``: capitalised, a few numbers, names and commas, an end mark, a separator."""
        n = len(ids)
        u = rng.random((n, 3)).tolist()
        out = []
        for k, (i, r) in enumerate(zip(ids.tolist(), u)):
            w = numbers[int(r[0] * 1e6) % len(numbers)] if r[0] < 0.02 else words[i]
            if k == 0 or r[1] < 0.03:
                w = w[:1].upper() + w[1:]
            if r[2] < 0.07 and k < n - 1:
                w += ","
            out.append(w)
        end, sep = rng.random(2)
        end = "." if end < 0.82 else "?" if end < 0.92 else "!" if end < 0.96 else ":"
        sep = " " if sep < 0.78 else "\n\n" if sep < 0.92 else "\n" if sep < 0.96 else "\n- "
        return " ".join(out) + end, sep

    @staticmethod
    def _cjk(rng, chars: list[str], ids) -> tuple[str, str]:
        """A Chinese sentence of the characters ``ids`` with commas, an end mark and a separator."""
        n = len(ids)
        text = [chars[i] for i in ids.tolist()]
        for pos in sorted(rng.integers(2, n, n // 8).tolist(), reverse=True):
            text.insert(pos, "，")
        end, sep = rng.random(2)
        end = "。" if end < 0.85 else "？" if end < 0.95 else "！"
        sep = "" if sep < 0.6 else " " if sep < 0.8 else "\n\n"
        return "".join(text) + end, sep


def _escape(text: str) -> str:
    """``text`` as the inside of a JSON string."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def chunk_lines(pools: Pools, seed: int, index: int, size: int) -> str:
    """``size`` conversations as JSON lines; chunk ``index`` always draws from the same RNG stream."""
    import numpy as np

    rng = np.random.default_rng([seed, GENERATOR_VERSION, index])
    turns = np.where(rng.random(size) < MULTI_TURN_SHARE, rng.integers(2, 6, size), 1)
    system = np.where(rng.random(size) < SYSTEM_SHARE, rng.integers(0, len(pools.systems), size), -1)
    n_turns = int(turns.sum())
    lengths = np.empty(2 * n_turns, dtype=np.int64)  # user, assistant, user, assistant, ...
    for k, (median, sigma, top) in enumerate((USER_SENTENCES, ASSISTANT_SENTENCES)):
        lengths[k::2] = np.clip(np.rint(rng.lognormal(math.log(median), sigma, n_turns)), 1, top)
    total = int(lengths.sum())
    ids = rng.integers(0, pools.n_latin, total)
    cjk = rng.random(total) < CJK_SHARE
    ids[cjk] = pools.n_latin + rng.integers(0, pools.n_cjk, int(cjk.sum()))
    ids = ids.tolist()
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    full, bare, systems = pools.full.__getitem__, pools.bare, pools.systems
    heads = ('{"role": "user", "content": "', '{"role": "assistant", "content": "')
    out = []
    m = 0
    for n, s in zip(turns.tolist(), system.tolist()):
        messages = [f'{{"role": "system", "content": "{systems[s]}"}}'] if s >= 0 else []
        for _ in range(2 * n):
            a, b = bounds[m], bounds[m + 1]
            messages.append(heads[m % 2] + "".join(map(full, ids[a : b - 1])) + bare[ids[b - 1]] + '"}')
            m += 1
        out.append('{"messages": [' + ", ".join(messages) + "]}\n")
    return "".join(out)


def corpus_path(workdir: Path, seed: int, n: int) -> Path:
    return workdir / f"corpus-g{GENERATOR_VERSION}-seed{seed}-n{n}.jsonl"


def ensure_corpus(workdir: Path, seed: int, n: int) -> Path:
    """The corpus of ``n`` conversations for ``seed``, generated once (streamed to disk) and reused afterwards."""
    path = corpus_path(workdir, seed, n)
    if path.exists():
        return path
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pools = Pools(seed)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for index in range(math.ceil(n / CHUNK)):
            f.write(chunk_lines(pools, seed, index, min(CHUNK, n - index * CHUNK)))
            if index % 10 == 9:
                print(f"corpus: {(index + 1) * CHUNK:,} / {n:,} conversations", flush=True)
    tmp.rename(path)
    print(f"corpus: {n:,} conversations, {path.stat().st_size / MiB:,.0f} MiB in {time.perf_counter() - start:.0f} s "
          f"-> {path}", flush=True)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------

BOS, EOS, PAD, IM_START = "<|endoftext|>", "<|im_end|>", "<|pad|>", "<|im_start|>"
# ChatML. TRL's assistant_only_loss needs `{% generation %}` markers (it checks with a regex, has_generation_markers,
# and else swaps in a training template of its own), and warns unless the last masked token of an assistant turn is
# an *added* token (is_chat_template_stop_token_trained): the answer and its <|im_end|> sit inside the markers, the
# newline after it outside (it is never generated: the model stops at <|im_end|>).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def tokenizer_dir(workdir: Path, seed: int, vocab_size: int, sample: int) -> Path:
    return workdir / f"tokenizer-g{GENERATOR_VERSION}-seed{seed}-v{vocab_size}-s{sample}"


def ensure_tokenizer(workdir: Path, seed: int, vocab_size: int, sample: int) -> Path:
    """A byte-level BPE trained on the first ``sample`` conversations of the seed's stream (the same for every n),
    saved as a Hugging Face tokenizer folder with the ChatML template; built once, then reused."""
    folder = tokenizer_dir(workdir, seed, vocab_size, sample)
    if (folder / "tokenizer.json").exists():
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    start = time.perf_counter()
    pools = Pools(seed)
    texts = []
    for index in range(math.ceil(sample / CHUNK)):
        for line in chunk_lines(pools, seed, index, min(CHUNK, sample - index * CHUNK)).splitlines():
            texts.extend(m["content"] for m in json.loads(line)["messages"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[BOS, IM_START, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=1 << 20)
    fast.chat_template = CHAT_TEMPLATE
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    fast.save_pretrained(tmp)
    check_tokenizer(tmp)
    tmp.rename(folder)
    print(f"tokenizer: vocab {len(fast):,}, trained on {len(texts):,} messages in {time.perf_counter() - start:.0f} s "
          f"-> {folder}", flush=True)
    return folder


def check_tokenizer(folder: Path) -> None:
    """The folder loads back, and the assistant mask covers each answer and its <|im_end|> (what TRL checks)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello, friend."}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "再见。"}]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    trained = tok.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    specials_ok = (tok.eos_token, tok.pad_token) == (EOS, PAD) and tok.bos_token
    if trained != f"Hello, friend.{EOS}再见。{EOS}" or not specials_ok:
        raise RuntimeError(f"tokenizer check failed: assistant-masked text {trained!r}")


def corpus_shape(corpus: Path, tokenizer: Path, max_length: int, sample: int = 2000) -> dict:
    """Token statistics of the first ``sample`` conversations, measured with the benchmark's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    conversations = []
    with corpus.open(encoding="utf-8") as f:
        for line in f:
            conversations.append(json.loads(line)["messages"])
            if len(conversations) == sample:
                break
    by_role: dict[str, list[str]] = {"system": [], "user": [], "assistant": []}
    for messages in conversations:
        for m in messages:
            by_role[m["role"]].append(m["content"])
    lengths = {role: sorted(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
               for role, texts in by_role.items() if texts}
    rendered = tok.apply_chat_template(conversations, tokenize=False)
    convo = sorted(len(ids) for ids in tok(rendered, add_special_tokens=False)["input_ids"])

    def q(xs: list[int], p: float) -> int:
        return xs[min(len(xs) - 1, int(p * len(xs)))]

    shape = {"sample_conversations": len(conversations), "vocab_size": len(tok),
             "multi_turn_share": sum(len([m for m in c if m["role"] == "user"]) > 1 for c in conversations)
             / len(conversations),
             "system_share": sum(c[0]["role"] == "system" for c in conversations) / len(conversations),
             "conversation_tokens": {"median": q(convo, 0.5), "p90": q(convo, 0.9), "p99": q(convo, 0.99),
                                     "max": convo[-1], "mean": round(sum(convo) / len(convo), 1),
                                     f"share_over_{max_length}": sum(x > max_length for x in convo) / len(convo)}}
    for role, xs in lengths.items():
        shape[f"{role}_tokens"] = {"median": q(xs, 0.5), "p90": q(xs, 0.9), "p99": q(xs, 0.99), "max": xs[-1]}
    shape["corpus_bytes"] = corpus.stat().st_size
    return shape


# --------------------------------------------------------------------------------------------------------------------
# Legacy worktree
# --------------------------------------------------------------------------------------------------------------------


def ensure_legacy_worktree(workdir: Path) -> Path:
    """A detached worktree of LEGACY_COMMIT in the work folder (never inside the repo), created once and reused."""
    folder = (workdir / f"legacy-{LEGACY_COMMIT}").resolve()
    if folder.is_relative_to(REPO):
        raise SystemExit(f"--workdir must not be inside the repository ({REPO}): the legacy worktree goes there")
    want = subprocess.run(["git", "-C", str(REPO), "rev-parse", LEGACY_COMMIT], capture_output=True, text=True,
                          check=True).stdout.strip()
    if (folder / ".git").exists():
        have = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        if have.strip() != want:
            raise SystemExit(f"{folder} is not a worktree of {LEGACY_COMMIT} (HEAD {have.strip()!r}); remove it")
        return folder
    if folder.exists():
        raise SystemExit(f"{folder} exists but is not a git worktree; remove it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["git", "-C", str(REPO), "worktree", "add", "--detach", str(folder), LEGACY_COMMIT]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 and "missing" in done.stderr:  # registered earlier, folder deleted since (/tmp cleaned)
        done = subprocess.run(cmd[:4] + ["-f"] + cmd[4:], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"git worktree add failed: {done.stderr.strip()}")
    print(f"legacy: worktree of {LEGACY_COMMIT} at {folder}", flush=True)
    return folder


# --------------------------------------------------------------------------------------------------------------------
# Children (trl and legacy run this file with --child; ours is its own CLI)
# --------------------------------------------------------------------------------------------------------------------


def count_rows(dataset) -> dict:
    """Rows, tokens, labelled tokens and packed examples of a packed ``datasets.Dataset``, in Arrow batches."""
    import pyarrow.compute as pc

    tokens = label_tokens = examples = longest = 0
    names = dataset.column_names
    columns = [c for c in ("input_ids", "labels", "seq_lengths", "position_ids") if c in names]
    for batch in dataset.select_columns(columns).with_format("arrow").iter(batch_size=10_000):
        lengths = pc.list_value_length(batch.column("input_ids"))
        tokens += pc.sum(lengths).as_py() or 0
        longest = max(longest, pc.max(lengths).as_py() or 0)
        if "labels" in columns:
            flat = pc.list_flatten(batch.column("labels"))
            label_tokens += pc.sum(pc.not_equal(flat, IGNORE_INDEX).cast("int64")).as_py() or 0
        if "seq_lengths" in columns:
            examples += pc.sum(pc.list_value_length(batch.column("seq_lengths"))).as_py() or 0
        elif "position_ids" in columns:
            examples += pc.sum(pc.equal(pc.list_flatten(batch.column("position_ids")), 0).cast("int64")).as_py() or 0
    return {"rows": len(dataset), "tokens": tokens, "label_tokens": label_tokens,
            "packed_examples": examples or None, "longest_row": longest}


def tiny_model(vocab_size: int):
    """A 1-layer random Llama: SFTTrainer needs a model, the benchmark only wants its data preparation."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
    return LlamaForCausalLM(config)


def run_trl(spec: dict) -> dict:
    start = time.perf_counter()
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    phases = {"import_s": time.perf_counter() - start}
    t = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    dataset = load_dataset("json", data_files=spec["corpus"], split="train")
    phases["read_s"] = time.perf_counter() - t
    t = time.perf_counter()
    model = tiny_model(len(tokenizer))
    model_s = time.perf_counter() - t
    t = time.perf_counter()
    config = SFTConfig(
        output_dir=spec["output_dir"], assistant_only_loss=True, packing=True, packing_strategy="bfd",
        max_length=spec["max_length"], dataset_num_proc=spec["num_proc"], report_to="none", use_cpu=True,
        bf16=False, fp16=False, save_strategy="no", disable_tqdm=True, seed=0,
    )
    prepare = [0.0]
    original = SFTTrainer._prepare_dataset

    def timed_prepare(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            prepare[0] += time.perf_counter() - t0

    SFTTrainer._prepare_dataset = timed_prepare
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    phases["init_s"] = time.perf_counter() - t
    phases["prepare_dataset_s"] = prepare[0]
    phases["prep_s"] = phases["read_s"] + phases["init_s"]
    t = time.perf_counter()
    counts = count_rows(trainer.train_dataset)
    count_s = time.perf_counter() - t
    notes = [f"SFTConfig(assistant_only_loss=True, packing=True, packing_strategy={config.packing_strategy!r}, "
             f"max_length={config.max_length}, dataset_num_proc={config.dataset_num_proc}, "
             f"shuffle_dataset={config.shuffle_dataset}); padding_free={trainer.padding_free}, "
             f"completion_only_loss={trainer.completion_only_loss}, training template swapped in: "
             f"{trainer.chat_template is not None}"]
    return {"examples_in": len(dataset), **counts, "phases": phases, "excluded_s": model_s + count_s,
            "excluded": {"model_s": model_s, "count_s": count_s}, "notes": notes}


def run_legacy(spec: dict) -> dict:
    start = time.perf_counter()
    from transformers import AutoTokenizer

    import trainer
    from trainer.data.build import build_datasets, read_records

    where = Path(trainer.__file__).resolve()
    if not where.is_relative_to(Path(spec["worktree"])):
        raise RuntimeError(f"legacy: imported trainer from {where}, not from the worktree {spec['worktree']}")
    phases = {"import_s": time.perf_counter() - start}
    t = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    records = read_records(spec["corpus"], data_dir=None, on_bad_record="error", system=None)
    phases["read_s"] = time.perf_counter() - t
    t = time.perf_counter()
    data = build_datasets(records, None, tokenizer, tokenizer.chat_template, max_length=spec["max_length"],
                          on_overlong="truncate", val_size=0, packing=True, seed=0, num_proc=spec["num_proc"],
                          cache_dir=None)
    phases["build_s"] = time.perf_counter() - t
    phases["prep_s"] = phases["read_s"] + phases["build_s"]
    t = time.perf_counter()
    counts = count_rows(data.train)
    count_s = time.perf_counter() - t
    report = data.report
    notes = [f"commit {LEGACY_COMMIT}: build_datasets(max_length={spec['max_length']}, on_overlong='truncate', "
             f"val_size=0, packing=True, seed=0, num_proc={spec['num_proc']}, cache_dir=None)"]
    return {"examples_in": len(records.conversations), **counts, "phases": phases, "excluded_s": count_s,
            "excluded": {"count_s": count_s},
            "tool": {"train_examples": report.train_examples, "tokens": report.tokens,
                     "label_tokens": report.label_tokens, "truncated": report.truncated,
                     "dropped_without_answer": report.dropped_without_answer,
                     "efficiency": (report.packing or {}).get("efficiency")},
            "notes": notes}


def child_main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    result = {"trl": run_trl, "legacy": run_legacy}[spec["contender"]](spec)
    Path(spec["result"]).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------------------------------
# Parent: one run in a fresh process, its whole process tree's memory polled
# --------------------------------------------------------------------------------------------------------------------


def _children_proc(pid: int) -> list[int]:
    """Descendants of ``pid`` from /proc (when psutil is missing)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def _anon(pid: int) -> int:
    """Anonymous resident memory (RssAnon) in bytes: what the process allocated itself, not the pages of files it
    maps (Arrow memory maps are file pages: the kernel drops them under pressure)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _rss_pss(pid: int) -> tuple[int, int | None] | None:
    """Resident and proportional set size of one process in bytes (PSS None when unreadable); None once it is gone."""
    try:
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return rss, int(line.split()[1]) * 1024
    except FileNotFoundError:
        return None
    except OSError:
        pass
    return rss, None


class TreeMemory:
    """Peak of the summed RSS (and PSS) of a process and all its descendants, sampled on every ``sample()``."""

    def __init__(self, pid: int):
        self.pid = pid
        try:
            import psutil

            self._root = psutil.Process(pid)
            self.source = f"psutil {psutil.__version__} + /proc"
        except (ImportError, Exception):
            self._root = None
            self.source = "/proc"
        self.peak_rss = self.peak_pss = self.peak_anon = 0
        self.pss_samples = 0  # samples where every process's PSS could be read
        self.now = 0
        self.max_processes = 0
        self.timeline: list[tuple[float, float, int]] = []  # (s since start, tree RSS MiB, processes), ~1 Hz
        self._start = time.perf_counter()
        self._samples = 0

    def _pids(self) -> list[int]:
        if self._root is not None:
            try:
                return [self.pid] + [c.pid for c in self._root.children(recursive=True)]
            except Exception:  # the root has exited
                return []
        return [self.pid] + _children_proc(self.pid)

    def sample(self) -> None:
        pids = self._pids()
        rss = pss = anon = 0
        pss_complete = True
        for pid in pids:
            anon += _anon(pid)
            sizes = _rss_pss(pid)
            if sizes is None:  # exited between listing and reading
                continue
            rss += sizes[0]
            if sizes[1] is None:  # e.g. a process in the middle of exec: this sample has no PSS
                pss_complete = False
            else:
                pss += sizes[1]
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_anon = max(self.peak_anon, anon)
        self.now = pss if pss_complete else rss  # what the tree holds now (PSS: shared pages counted once)
        if pss_complete:
            self.peak_pss = max(self.peak_pss, pss)
            self.pss_samples += 1
        self.max_processes = max(self.max_processes, len(pids))
        if self._samples % 5 == 0:
            self.timeline.append((round(time.perf_counter() - self._start, 1), round(rss / MiB, 1), len(pids)))
        self._samples += 1


MIN_AVAILABLE = 1024 * MiB  # a run is stopped when the machine's MemAvailable falls below this


def _meminfo(key: str) -> int:
    """A /proc/meminfo figure in bytes (0 when missing)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _mem_available() -> int:
    return _meminfo("MemAvailable") or 1 << 62


def parse_workers(text: str) -> dict[str, str]:
    """``2`` (every contender) or ``ours=auto,trl=2,legacy=2`` → worker count per contender (``auto``: ours only)."""
    if "=" not in text:
        found = dict.fromkeys(CONTENDERS, text)
    else:
        found = dict(part.split("=", 1) for part in DEFAULT_WORKERS.split(","))
        for part in text.split(","):
            name, _, value = part.partition("=")
            if name not in CONTENDERS:
                raise SystemExit(f"--num-proc: unknown contender {name!r} (one of {', '.join(CONTENDERS)})")
            found[name] = value
    for name, value in found.items():
        if not (value.isdigit() and int(value) >= 1) and not (name == "ours" and value == "auto"):
            raise SystemExit(f"--num-proc: {name}={value} is not a worker count" + " (or auto)" * (name == "ours"))
    return found


def _ours_workers(value: str) -> list[str]:
    return [] if value == "auto" else ["--preprocessing_num_workers", value]


def contender_command(name: str, args: argparse.Namespace, corpus: Path, tokenizer: Path, legacy: Path | None,
                      run_dir: Path) -> tuple[list[str], Path, dict, dict | None]:
    """Command line, working folder, extra environment and (for --child runs) the spec of one run."""
    if name == "ours":
        cli = REPO / "trainer" / "prepare.py"
        cmd = [sys.executable, str(cli), "--model_name_or_path", str(tokenizer), "--dataset", str(corpus),
               "--template", "auto", "--max_length", str(args.max_length), "--packing", "true", "--report_to", "none",
               *_ours_workers(args.workers["ours"]), *args.ours_args.split()]
        return cmd, REPO, {"PYTHONPATH": str(REPO)}, None
    spec = {"contender": name, "corpus": str(corpus), "tokenizer": str(tokenizer), "max_length": args.max_length,
            "num_proc": int(args.workers[name]), "output_dir": str(run_dir / "output"),
            "result": str(run_dir / "result.json"),
            "worktree": str(legacy) if legacy else None}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(run_dir / "spec.json")]
    if name == "legacy":
        return cmd, legacy, {"PYTHONPATH": str(legacy)}, spec
    return cmd, run_dir, {}, spec


def run_once(name: str, args: argparse.Namespace, corpus: Path, tokenizer: Path, legacy: Path | None,
             work: Path, run_id: str) -> dict:
    """One contender in a fresh process with fresh caches; memory of its process tree polled at ``--poll-hz``."""
    run_dir = work / run_id
    shutil.rmtree(run_dir, ignore_errors=True)
    for sub in ("hf", "sft-cache", "tmp"):
        (run_dir / sub).mkdir(parents=True)
    if name == "ours" and not (REPO / "trainer" / "prepare.py").exists():
        return {"error": f"{REPO / 'trainer' / 'prepare.py'} does not exist (yet): contender 'ours' skipped"}
    cmd, cwd, extra_env, spec = contender_command(name, args, corpus, tokenizer, legacy, run_dir)
    if spec is not None:
        (run_dir / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"OMP_NUM_THREADS": "2", "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "HF_DATASETS_CACHE": str(run_dir / "hf"), "SFT_CACHE_DIR": str(run_dir / "sft-cache"),
                "TMPDIR": str(run_dir / "tmp"), "PYTHONUNBUFFERED": "1", **extra_env})
    load_before = wait_for_quiet(args.max_load, args.max_wait)
    stdout, stderr = (run_dir / "stdout.txt").open("w"), (run_dir / "stderr.txt").open("w")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    memory = TreeMemory(proc.pid)
    load_max, status, usage, killed = load_before, None, None, None
    interval = 1.0 / args.poll_hz
    limit = args.max_memory_gib * 1024 * MiB
    while True:
        memory.sample()
        load_max = max(load_max, os.getloadavg()[0])
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - start > args.timeout:
            killed = f"timed out after {args.timeout:.0f} s"
        elif memory.now > limit:
            killed = f"killed: its processes held {memory.now / MiB / 1024:.1f} GiB > --max-memory-gib"
        elif _mem_available() < MIN_AVAILABLE:
            killed = f"killed: the machine had under {MIN_AVAILABLE / MiB / 1024:.0f} GiB available (its processes " \
                     f"held {memory.now / MiB / 1024:.1f} GiB)"
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)  # the process group of the child we started (before the OOM killer)
            _, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(interval)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout.close()
    stderr.close()
    out_text = (run_dir / "stdout.txt").read_text(errors="replace")
    err_text = (run_dir / "stderr.txt").read_text(errors="replace")
    base = {"wall_process_s": wall, "load_before": load_before, "load_max": load_max, "load_after": os.getloadavg()[0],
            "peak_rss_mib": memory.peak_rss / MiB, "peak_anon_mib": memory.peak_anon / MiB,
            "peak_pss_mib": memory.peak_pss / MiB if memory.pss_samples
            else None, "max_single_rss_mib": usage.ru_maxrss / 1024, "max_processes": memory.max_processes,
            "cpu_s": usage.ru_utime + usage.ru_stime, "memory_source": memory.source, "rss_timeline": memory.timeline}
    if killed or proc.returncode != 0:
        why = killed or f"exited {proc.returncode}"
        return {**base, "error": f"{run_id} {why}:\n{(out_text + err_text)[-3000:]}"}
    try:
        result = _ours_result(out_text) if name == "ours" else json.loads(
            (run_dir / "result.json").read_text())
    except Exception as err:  # a contender that ran but whose output cannot be read: reported, not fatal
        return {**base, "error": f"{run_id}: cannot read its result: {err}\n{out_text[-1500:]}"}
    wall_s = wall - result.get("excluded_s", 0.0)
    result.update(base, wall_s=wall_s, cpu_utilisation=base["cpu_s"] / wall)
    return result


def _ours_result(stdout: str) -> dict:
    """Counts of our CLI's run: manifest.json of the folder named by the last stdout line; rows counted if missing."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError("no output: the last stdout line should be the prepared folder")
    folder = Path(lines[-1])
    manifest_file = folder / "manifest.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.exists() else {}
    result = {"examples_in": None, "rows": manifest.get("rows"), "tokens": manifest.get("tokens"),
              "label_tokens": manifest.get("label_tokens"), "packed_examples": manifest.get("train_examples"),
              "tool": {k: manifest.get(k) for k in ("train_examples", "tokens", "label_tokens", "rows", "efficiency")},
              "prepared_folder": str(folder), "phases": {}, "excluded_s": 0.0,
              "notes": [] if manifest else [f"no manifest.json in {folder}"]}
    if result["rows"] is None or result["tokens"] is None:
        for candidate in (folder, folder / "train"):
            try:
                from datasets import load_from_disk

                counted = count_rows(load_from_disk(str(candidate)))
            except Exception:
                continue
            result.update({k: result[k] if result[k] is not None else counted[k]
                           for k in ("rows", "tokens", "label_tokens", "packed_examples")})
            result["notes"].append(f"rows/tokens counted from {candidate} (not in manifest.json)")
            break
    return result


# --------------------------------------------------------------------------------------------------------------------
# Summary and reports
# --------------------------------------------------------------------------------------------------------------------

FIGURES = ("wall_s", "conversations_per_s", "tokens_per_s", "peak_rss_mib", "peak_anon_mib", "peak_pss_mib", "rows",
           "tokens",
           "label_tokens", "efficiency", "prep_s", "cpu_utilisation", "load_before", "load_max")


def figures(run: dict, n: int, max_length: int) -> dict:
    """Per-run figures; None where a contender does not give one."""
    tokens, rows = run.get("tokens"), run.get("rows")
    return {
        "wall_s": run["wall_s"], "conversations_per_s": n / run["wall_s"],
        "tokens_per_s": tokens / run["wall_s"] if tokens else None, "peak_rss_mib": run["peak_rss_mib"],
        "peak_pss_mib": run.get("peak_pss_mib"), "peak_anon_mib": run.get("peak_anon_mib"), "rows": rows,
        "tokens": tokens,
        "label_tokens": run.get("label_tokens"),
        "efficiency": tokens / (rows * max_length) if tokens and rows else None,
        "prep_s": run.get("phases", {}).get("prep_s"), "cpu_utilisation": run["cpu_utilisation"],
        "load_before": run["load_before"], "load_max": run["load_max"],
    }


def summarise(report: dict) -> dict:
    n, max_length = report["config"]["n"], report["config"]["max_length"]
    out = {}
    for name, repeats in report["runs"].items():
        good = [r for r in repeats if "error" not in r]
        entry: dict = {"runs_ok": len(good), "runs": len(repeats),
                       "errors": sorted({r["error"].splitlines()[0] for r in repeats if "error" in r})}
        if good:
            per_run = [figures(r, n, max_length) for r in good]
            for key in FIGURES:
                values = [p[key] for p in per_run if p[key] is not None]
                entry[key] = ({"median": statistics.median(values), "min": min(values), "max": max(values)}
                              if values else None)
            entry["notes"] = good[0].get("notes", [])
            entry["phases"] = {k: statistics.median(r["phases"][k] for r in good)
                               for k in good[0].get("phases", {})}
        out[name] = entry
    return out


def ratios(summary: dict) -> list[dict]:
    """a / b on medians for tokens/s (higher is better), wall time and peak memory (lower is better)."""
    rows = []
    for a, b in (("ours", "trl"), ("ours", "legacy"), ("legacy", "trl")):
        if not (summary.get(a, {}).get("runs_ok") and summary.get(b, {}).get("runs_ok")):
            continue
        if a == "legacy" and summary.get("ours", {}).get("runs_ok"):
            continue  # only when ours did not run: the pair the table can still show
        row = {"pair": f"{a} / {b}"}
        for key in ("tokens_per_s", "conversations_per_s", "wall_s", "peak_rss_mib", "peak_anon_mib", "peak_pss_mib"):
            x, y = summary[a].get(key), summary[b].get(key)
            row[key] = x["median"] / y["median"] if x and y and y["median"] else None
        rows.append(row)
    return rows


def _fmt(entry: dict | None, key: str, spec: str, scale: float = 1.0) -> str:
    value = entry.get(key) if entry else None
    return "n/a" if value is None else format(value["median"] * scale, spec)


def markdown(report: dict) -> str:
    s, cfg, m, shape = report["summary"], report["config"], report["machine"], report.get("corpus", {})
    conv = shape.get("conversation_tokens", {})
    assistant, user = shape.get("assistant_tokens", {}), shape.get("user_tokens", {})
    over = conv.get(f"share_over_{cfg['max_length']}", 0)
    lines = [
        f"# CPU data preparation, {report['date']}",
        "",
        f"Machine: {m['nproc']} cores, {m['cpu']}, {m['memory_gib']} GiB; transformers {m['transformers']}, datasets "
        f"{m['datasets']}, tokenizers {m['tokenizers']}, trl {m['trl']}. Load average before/after: "
        f"{report['load_before']} / {report['load_after']}.",
        f"Setup: {cfg['n']:,} synthetic conversations (seed {cfg['seed']}, "
        f"{shape.get('corpus_bytes', 0) / MiB:,.0f} MiB of JSON lines), byte-level BPE of "
        f"{shape.get('vocab_size', 0):,} tokens, rows of {cfg['max_length']}, worker processes {cfg['num_proc']}, "
        f"{cfg['repeats']} alternated repeats (fresh process and caches each); medians.",
        f"Corpus shape (first {shape.get('sample_conversations', 0):,} conversations, this tokenizer): conversation "
        f"tokens median {conv.get('median')}, p90 {conv.get('p90')}, p99 {conv.get('p99')}, max {conv.get('max')}, "
        f"{over:.1%} over {cfg['max_length']}; assistant turn median {assistant.get('median')} (p99 "
        f"{assistant.get('p99')}), user turn median {user.get('median')}; {shape.get('multi_turn_share', 0):.0%} "
        f"multi-turn, {shape.get('system_share', 0):.0%} with a system prompt.",
        "",
        "| contender | wall s | conv/s | tok/s | peak RSS GiB (tree) | peak anon GiB | peak PSS GiB | rows "
        "| efficiency | label tokens | prep s (in-process) | CPU util | load before / max | runs ok |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    gib = 1 / 1024
    for name, e in s.items():
        if not e["runs_ok"]:
            lines.append(f"| {name} | failed: {e['errors'][0] if e['errors'] else '?'} |" + " |" * 12)
            continue
        load = f"{e['load_before']['median']:.2f} / {e['load_max']['max']:.2f}"
        lines.append(
            f"| {name} | {_fmt(e, 'wall_s', ',.1f')} | {_fmt(e, 'conversations_per_s', ',.0f')} | "
            f"{_fmt(e, 'tokens_per_s', ',.0f')} | {_fmt(e, 'peak_rss_mib', '.2f', gib)} | "
            f"{_fmt(e, 'peak_anon_mib', '.2f', gib)} | {_fmt(e, 'peak_pss_mib', '.2f', gib)} | "
            f"{_fmt(e, 'rows', ',.0f')} | {_fmt(e, 'efficiency', '.2%')} | "
            f"{_fmt(e, 'label_tokens', ',.0f')} | {_fmt(e, 'prep_s', ',.1f')} | {_fmt(e, 'cpu_utilisation', '.2f')} | "
            f"{load} | {e['runs_ok']}/{e['runs']} |")
    if report["ratios"]:
        lines += ["", "| ratio | tok/s (higher = faster) | wall (lower = faster) | peak RSS (lower = leaner) "
                  "| peak anon | peak PSS |", "|---|---:|---:|---:|---:|---:|"]
        for r in report["ratios"]:
            cells = [("n/a" if r.get(k) is None else f"{r[k]:.2f}x")
                     for k in ("tokens_per_s", "wall_s", "peak_rss_mib", "peak_anon_mib", "peak_pss_mib")]
            lines.append(f"| {r['pair']} | " + " | ".join(cells) + " |")
    lines += ["", "wall s: the contender's process, start-up and imports included (TRL's tiny model and the final row "
              "count excluded). tok/s: tokens in the packed rows (after truncation to the row length) per wall second. "
              "peak RSS: largest sum over the process tree (the contender and its workers), polled at "
              f"{cfg['poll_hz']:g} Hz; anon: without file pages (memory maps); "
              "PSS splits pages shared by forked workers. efficiency: tokens / (rows x "
              f"{cfg['max_length']}). prep s: read + tokenise + pack timed inside the process (n/a for ours).", ""]
    for name, e in s.items():
        for note in e.get("notes", []):
            lines.append(f"- {name}: {note}")
        if e.get("phases"):
            lines.append(f"- {name} phases (median s): "
                         + ", ".join(f"{k} {v:.1f}" for k, v in e["phases"].items()))
        for err in e.get("errors", []):
            lines.append(f"- {name}: FAILED {err}")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    """Summary, ratios, JSON and markdown; ``out`` is a folder, or a file name whose stem is used for both files."""
    report["summary"] = summarise(report)
    report["ratios"] = ratios(report["summary"])
    stem = out.with_suffix("") if out.suffix in (".json", ".md") else out / f"{report['date']}-cpu-prepare"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    text = markdown(report)
    stem.with_suffix(".md").write_text(text, encoding="utf-8")
    print(text)
    print(f"results: {stem}.json, {stem}.md")


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="conversations in the synthetic corpus (default 1,000,000;"
                   " a few thousand for a smoke test)")
    p.add_argument("--seed", type=int, default=0, help="corpus and tokenizer seed (default 0)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "sft-bench-prepare"),
                   help="cache of corpora (by seed and n), tokenizers (by seed and vocab size), the legacy worktree, "
                   "and the per-run folders (default /tmp/sft-bench-prepare; must be outside the repo). A 1M corpus "
                   "is ~3.6 GB, and a TRL run writes several times that into its (deleted afterwards) datasets cache")
    p.add_argument("--vocab-size", type=int, default=24_000, help="BPE vocabulary (default 24,000)")
    p.add_argument("--tokenizer-sample", type=int, default=20_000,
                   help="conversations the tokenizer is trained on: the first ones of the seed's stream, whatever --n")
    p.add_argument("--max-length", type=int, default=2048, help="packed row length (default 2048)")
    p.add_argument("--num-proc", default=DEFAULT_WORKERS,
                   help="worker processes: one number for every contender, or per contender (ours "
                   "--preprocessing_num_workers, where auto leaves the choice to it; TRL dataset_num_proc; legacy "
                   f"num_proc). Default {DEFAULT_WORKERS}: each at its fastest on 2 cores")
    p.add_argument("--repeats", type=int, default=3, help="runs per contender, alternated (default 3)")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma list of {', '.join(CONTENDERS)}")
    p.add_argument("--ours-args", default="", help="extra arguments appended to our CLI's command line")
    p.add_argument("--out", default=str(RESULTS),
                   help="folder for <date>-cpu-prepare.json/.md (default bench/results/), or a file name ending in "
                   ".json or .md whose stem names both files (e.g. bench/results/2026-12-02-cpu-prepare-n100k.json)")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds before a run is killed (default 4 h)")
    p.add_argument("--max-memory-gib", type=float, default=round(0.85 * _meminfo("MemTotal") / 1024**3, 1),
                   help="a run whose process tree holds more (PSS, else RSS) is killed and reported as failed, before "
                   "the kernel's OOM killer picks a victim; a run is also killed when the machine's available memory "
                   "falls under 1 GiB (default: 85%% of this machine's memory)")
    p.add_argument("--poll-hz", type=float, default=5.0, help="process-tree memory samples per second (default 5)")
    add_quiet_options(p)
    p.add_argument("--corpus-only", action="store_true", help="build the corpus and tokenizer, print the paths, exit")
    p.add_argument("--keep", action="store_true",
                   help="keep each run's folder (logs, caches, outputs) in --workdir/runs-* for inspection")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.workers = parse_workers(str(args.num_proc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return 0
    if args.from_json:
        report = pooled_report(args.from_json, same=("n", "seed"))
        write_report(report, Path(args.out))
        return 0
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONTENDERS))
    if unknown or not names:
        raise SystemExit(f"unknown contender(s) {unknown}; choose from {CONTENDERS}")
    workdir = Path(args.workdir).resolve()
    if workdir.is_relative_to(REPO):
        raise SystemExit(f"--workdir must be outside the repository ({REPO})")
    load_before = [round(x, 2) for x in os.getloadavg()]
    corpus = ensure_corpus(workdir, args.seed, args.n)
    tokenizer = ensure_tokenizer(workdir, args.seed, args.vocab_size, args.tokenizer_sample)
    if args.corpus_only:
        print(f"corpus: {corpus}\ntokenizer: {tokenizer}")
        return 0
    shape = corpus_shape(corpus, tokenizer, args.max_length)
    legacy = ensure_legacy_worktree(workdir) if "legacy" in names else None
    work = Path(tempfile.mkdtemp(prefix="runs-", dir=workdir))
    runs: dict[str, list[dict]] = {n: [] for n in names}
    try:
        for repeat in range(args.repeats):
            for name in names if repeat % 2 == 0 else names[::-1]:
                run_id = f"{name}-{repeat}"
                result = run_once(name, args, corpus, tokenizer, legacy, work, run_id)
                result["repeat"] = repeat
                runs[name].append(result)
                if "error" in result:
                    print(f"{run_id:>10}: FAILED {result['error']}", flush=True)
                else:
                    f = figures(result, args.n, args.max_length)
                    print(f"{run_id:>10}: wall {f['wall_s']:7.1f} s, {f['conversations_per_s']:8,.0f} conv/s, "
                          f"{f['tokens_per_s'] or 0:10,.0f} tok/s, peak RSS {f['peak_rss_mib'] / 1024:.2f} GiB, rows "
                          f"{f['rows']}, efficiency {f['efficiency'] or 0:.2%}, load {f['load_before']:.2f}->"
                          f"{result['load_after']:.2f}", flush=True)
                if not args.keep:
                    shutil.rmtree(work / run_id, ignore_errors=True)
    finally:
        if args.keep:
            print(f"run folders kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report = {"date": dt.date.today().isoformat(), "machine": machine(PACKAGES), "load_before": load_before,
              "load_after": [round(x, 2) for x in os.getloadavg()], "corpus": shape,
              "config": {**{k: v for k, v in vars(args).items() if k not in ("child", "out", "keep", "from_json",
                                                                            "corpus_only")},
                         "corpus_file": str(corpus), "tokenizer": str(tokenizer), "legacy_commit": LEGACY_COMMIT,
                         "order": "forward on even repeats, reversed on odd ones"},
              "runs": runs}
    write_report(report, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
