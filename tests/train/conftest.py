"""Small local corpora in the Hub datasets' own schemas, written by the tests."""
import json
import random

import pytest

WORDS = ("the little fox ran to the big red house and saw a happy dog under a green tree "
         "she said hello then they played all day in the sun").split()


def story(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 80))) + "."


@pytest.fixture(scope="session")
def corpus_txt(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "stories.txt"
    path.write_text("\n\n".join(story(rng) for _ in range(400)))
    return path


@pytest.fixture(scope="session")
def tiny_txt(tmp_path_factory):
    """Five sentences: with --batch-size 4 --seq-len 32 (128 tokens a step) every step is an epoch."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.txt"
    path.write_text("\n\n".join(f"the little fox ran {i} times to the big red house." for i in range(5)))
    return path


@pytest.fixture(scope="session")
def lines_txt(tmp_path_factory):
    """~200 KB of one sentence per line and no blank line (many corpora come so)."""
    rng = random.Random(5)
    path = tmp_path_factory.mktemp("lines") / "sentences.txt"
    path.write_text("\n".join(story(rng) for _ in range(650)) + "\n")
    return path


@pytest.fixture(scope="session")
def tinystories_parquet(tmp_path_factory):
    """roneneldan/TinyStories' schema: one `text` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(1)
    path = tmp_path_factory.mktemp("tinystories") / "train-00000-of-00001.parquet"
    pq.write_table(pa.table({"text": [story(rng) for _ in range(300)]}), path)
    return path


@pytest.fixture(scope="session")
def codesearchnet_jsonl(tmp_path_factory):
    """code_search_net's schema: docstring and code columns (and the others it carries)."""
    rng = random.Random(2)
    path = tmp_path_factory.mktemp("csn") / "python_train.jsonl"
    with open(path, "w") as f:
        for i in range(200):
            name = f"f{i}"
            row = {"repository_name": "x/y", "func_path_in_repository": "a.py", "func_name": name, "language": "python",
                   "func_documentation_string": f"Return {rng.choice(WORDS)} plus {i}.",
                   "func_code_string": f"def {name}(x):\n    return x + {i}\n", "whole_func_string": ""}
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="session")
def chats_jsonl(tmp_path_factory):
    """Conversations: the assistant always answers 'the <color> fox' to a question about a color."""
    rng = random.Random(3)
    colors = ["red", "green", "blue", "yellow", "black", "white"]
    path = tmp_path_factory.mktemp("chat") / "chats.jsonl"
    with open(path, "w") as f:
        for _ in range(200):
            c = rng.choice(colors)
            msgs = [{"role": "system", "content": "You answer briefly."},
                    {"role": "user", "content": f"Which fox is {c}?"},
                    {"role": "assistant", "content": f"The {c} fox is {c}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path
