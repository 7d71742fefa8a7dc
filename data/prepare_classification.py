"""Turn text-classification records into instruction records for fine-tuning by generation.

Input: JSON lines with ``text``, ``category`` (the candidate labels) and ``output`` (the right label), as in the
zh_cls_fudan-news set. Output: alpaca JSON lines whose user turn shows the text and the candidates.

    python data/prepare_classification.py train.jsonl data/classification_train.jsonl
"""

from __future__ import annotations

import argparse
import json


def convert(line: str) -> dict:
    record = json.loads(line)
    return {"instruction": f"文本:{record['text']},分类选项列表:{record['category']}", "output": record["output"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("target")
    args = parser.parse_args()
    with open(args.source, encoding="utf-8") as src, open(args.target, "w", encoding="utf-8") as dst:
        for line in src:
            if line.strip():
                dst.write(json.dumps(convert(line), ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
