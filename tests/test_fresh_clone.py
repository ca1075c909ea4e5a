"""A user's clone has nothing beside it: no code reads ../shared, and what the tests and the harness need ships in
the repository with its license. (.ci/run runs the whole suite in such a clone.)"""

import json
import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "outputs", "__pycache__", ".pytest_cache"}
# A path built to the folder beside the repository: `parent / "shared"`, "../shared", '/work/shared', ...
SHARED_PATH = re.compile(r"""["']shared["']|\.\./shared\b|/work/shared\b|["']shared/""")


def python_files():
    """The repository's .py files, not descending into hidden folders, build outputs or virtual environments."""
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS
                   and not os.path.isfile(os.path.join(root, d, "pyvenv.cfg"))]
        for name in files:
            path = Path(root) / name
            if name.endswith(".py") and path != Path(__file__).resolve():
                yield path


def test_no_code_reads_the_folder_beside_the_repository():
    offenders = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
                 for path in python_files()
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if SHARED_PATH.search(line)]
    assert not offenders, "reads ../shared, which a user's clone does not have:\n" + "\n".join(offenders)


def test_the_pattern_catches_the_usual_spellings():
    for line in ('SHARED = REPO.parent / "shared" / "data"', "open('../shared/data/x.jsonl')",
                 'Path("/work/shared/data")', "root / 'shared/data'"):
        assert SHARED_PATH.search(line), line
    assert not SHARED_PATH.search("# a second thread on the shared 2-core machine")


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_shipped_gsm8k_data_with_its_license():
    from conftest import GSM8K_TRAIN_SAMPLE

    train = _jsonl(GSM8K_TRAIN_SAMPLE)
    assert len(train) == 1000 and all(set(r) == {"question", "answer"} and "\n#### " in r["answer"] for r in train)
    assert "Copyright (c) 2021 OpenAI" in (GSM8K_TRAIN_SAMPLE.parent / "GSM8K_LICENSE").read_text()

    test = _jsonl(REPO / "eval" / "data" / "gsm8k_test.jsonl")  # what `balora eval gsm8k` reads offline
    assert len(test) == 1319 and all(set(r) == {"question", "answer"} for r in test)
    license_text = (REPO / "eval" / "data" / "LICENSE").read_text()
    assert "gsm8k_test.jsonl" in license_text and "Copyright (c) 2021 OpenAI" in license_text
