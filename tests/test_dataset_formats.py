"""balora_trl.dataset_formats: every format -> TRL prompt/completion, on real GSM8K rows or small hand-written ones."""

import json

import pytest
from conftest import gsm8k_rows
from datasets import Dataset
from trl.data_utils import is_conversational

from balora_trl.dataset_formats import (
    FORMATS,
    RAW,
    SAMPLE_PATH,
    DatasetFormatError,
    DatasetLoadError,
    detect_format,
    load_dataset_any,
    load_sample,
    resolve_template,
    to_prompt_completion,
)
from balora_trl.prompts import ALPACA, CHAT, DEFAULT, PromptTemplate

GSM = gsm8k_rows("train", 12)


def alpaca_prompt(instruction):
    return ALPACA.replace("{instruction}", instruction)


# ------------------------------------------------------------------------------------------------------------------
# detection
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("columns,expected", [
    (["prompt", "completion"], "prompt_completion"),
    (["messages"], "messages"),
    (["conversations", "idx"], "sharegpt"),
    (["query", "response", "type", "original_question"], "metamath"),  # MetaMathQA's columns
    (["query", "answer", "resource", "lang"], "codefeedback"),  # CodeFeedback-Filtered-Instruction's
    (["instruction", "input", "output"], "alpaca"),
    (["instruction", "output", "type"], "pissa"),  # pissa-dataset's
    (["question", "answer"], "gsm8k"),
])
def test_detect_format_from_the_columns(columns, expected):
    assert detect_format(columns) == expected


def test_unknown_columns_error_lists_columns_found_and_formats_supported():
    with pytest.raises(DatasetFormatError) as info:
        to_prompt_completion(Dataset.from_list([{"text": "a", "label": 1}]))
    message = str(info.value)
    assert "\n" not in message and "['label', 'text']" in message
    for name, fmt in FORMATS.items():
        assert name in message and ", ".join(fmt.columns) in message


def test_explicit_format_with_missing_columns_names_them():
    rows = Dataset.from_list([{"query": "q", "answer": "a"}])
    with pytest.raises(DatasetFormatError) as info:
        to_prompt_completion(rows, format="metamath")
    assert "['response']" in str(info.value) and "['answer', 'query']" in str(info.value)
    with pytest.raises(DatasetFormatError, match="Unknown dataset format 'metamathqa'"):
        to_prompt_completion(rows, format="metamathqa")


def test_explicit_format_overrides_detection():
    # Both query/response and question/answer are present: detection takes MetaMathQA, the override GSM8K.
    rows = Dataset.from_list([{"query": "Q1", "response": "R1", "question": "Q2", "answer": "A2"}])
    auto, _ = to_prompt_completion(rows)
    forced, _ = to_prompt_completion(rows, format="gsm8k")
    assert auto[0]["prompt"] == alpaca_prompt("Q1") and forced[0]["prompt"] == alpaca_prompt("Q2")
    assert forced[0]["completion"] == " A2"


# ------------------------------------------------------------------------------------------------------------------
# instruction formats on real GSM8K text
# ------------------------------------------------------------------------------------------------------------------

def test_metamath_sample_shipped_with_the_package():
    sample = load_sample()
    assert len(sample) == 2000 and {"query", "response"} <= set(sample.column_names)
    converted, template = to_prompt_completion(sample.select(range(20)))
    assert template == DEFAULT and converted.column_names == ["prompt", "completion"]
    for row, src in zip(converted, sample.select(range(20))):
        assert row["prompt"] == alpaca_prompt(src["query"])
        assert row["completion"] == " " + src["response"]
        assert row["prompt"].endswith("### Response:")


@pytest.mark.parametrize("fmt,rename", [
    ("gsm8k", {"question": "question", "answer": "answer"}),
    ("metamath", {"question": "query", "answer": "response"}),
    ("codefeedback", {"question": "query", "answer": "answer"}),
    ("pissa", {"question": "instruction", "answer": "output"}),
])
def test_instruction_formats_on_gsm8k_rows(fmt, rename):
    rows = Dataset.from_list([{rename[k]: v for k, v in r.items()} for r in GSM])
    converted, template = to_prompt_completion(rows)
    assert template == DEFAULT and converted.column_names == ["prompt", "completion"]
    assert [r["prompt"] for r in converted] == [alpaca_prompt(r["question"]) for r in GSM]
    assert [r["completion"] for r in converted] == [" " + r["answer"] for r in GSM]
    assert detect_format(rows.column_names) == fmt


def test_alpaca_with_and_without_input():
    rows = Dataset.from_list([
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Print {input} literally.", "input": "x", "output": "{input}"},
    ])
    converted, template = to_prompt_completion(rows)
    assert template == DEFAULT
    assert converted[0]["prompt"] == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:"
    )
    assert converted[1]["prompt"] == alpaca_prompt("Say hi.")  # empty input: the no-input template
    assert "Print {input} literally." in converted[2]["prompt"] and converted[2]["completion"] == " {input}"
    # A custom template has one placeholder: the input is folded into the instruction.
    custom, used = to_prompt_completion(rows, template="Q: {instruction}\nA:")
    assert used == PromptTemplate("custom", "Q: {instruction}\nA:")
    assert custom[0]["prompt"] == "Q: Add the numbers.\n\n2 and 3\nA:" and custom[0]["completion"] == " 5"


def test_code_with_braces_survives():
    code = "def f(d):\n    return {k: v for k, v in d.items()}  # {instruction}"
    rows = Dataset.from_list([{"query": "Write f in {python}.", "answer": code}])
    converted, _ = to_prompt_completion(rows)
    assert converted[0]["prompt"] == alpaca_prompt("Write f in {python}.")
    assert converted[0]["completion"] == " " + code


def test_instruction_rows_with_the_chat_template_become_conversations():
    rows = Dataset.from_list([{"query": GSM[0]["question"], "response": GSM[0]["answer"]}])
    converted, template = to_prompt_completion(rows, template="chat")
    assert template == CHAT and is_conversational(converted[0])
    assert converted[0]["prompt"] == [{"role": "user", "content": GSM[0]["question"]}]
    assert converted[0]["completion"] == [{"role": "assistant", "content": GSM[0]["answer"]}]


# ------------------------------------------------------------------------------------------------------------------
# conversations
# ------------------------------------------------------------------------------------------------------------------

SHAREGPT = [
    {"idx": "a", "conversations": [
        {"from": "human", "value": GSM[0]["question"]},
        {"from": "gpt", "value": GSM[0]["answer"]},
        {"from": "human", "value": "And in June?"},
        {"from": "gpt", "value": "The same as in May."},
    ]},
    {"idx": "b", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": GSM[1]["question"]},
        {"from": "gpt", "value": GSM[1]["answer"]},
    ]},
]


def test_sharegpt_becomes_whole_conversations_every_assistant_turn():
    converted, template = to_prompt_completion(Dataset.from_list(SHAREGPT))
    assert template == CHAT and converted.column_names == ["messages"]
    assert is_conversational(converted[0])
    assert converted[0]["messages"] == [
        {"role": "user", "content": GSM[0]["question"]}, {"role": "assistant", "content": GSM[0]["answer"]},
        {"role": "user", "content": "And in June?"}, {"role": "assistant", "content": "The same as in May."},
    ]
    assert converted[1]["messages"][0] == {"role": "system", "content": "Be brief."}


def test_sharegpt_last_assistant_turn_only_is_prompt_completion():
    converted, template = to_prompt_completion(Dataset.from_list(SHAREGPT), assistant_turns="last")
    assert template == CHAT and converted.column_names == ["prompt", "completion"]
    first = converted[0]
    assert is_conversational(first)
    assert [m["role"] for m in first["prompt"]] == ["user", "assistant", "user"]
    assert first["prompt"][0]["content"] == GSM[0]["question"]
    assert first["completion"] == [{"role": "assistant", "content": "The same as in May."}]  # the last assistant turn
    assert converted[1]["prompt"][0] == {"role": "system", "content": "Be brief."}


def test_sharegpt_with_a_text_template_keeps_the_first_exchange():
    converted, template = to_prompt_completion(Dataset.from_list(SHAREGPT), template="alpaca")
    assert template == DEFAULT
    assert converted[0]["prompt"] == alpaca_prompt(GSM[0]["question"])
    assert converted[0]["completion"] == " " + GSM[0]["answer"]
    assert converted[1]["prompt"] == alpaca_prompt(GSM[1]["question"])  # the system turn is not the instruction


def test_messages_every_turn_or_the_last_assistant_turn():
    turns = [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "times 3?"}, {"role": "assistant", "content": "12"},
        {"role": "user", "content": "thanks"},  # nothing to learn after the last assistant turn
    ]
    rows = Dataset.from_list([{"messages": turns}])
    converted, template = to_prompt_completion(rows)
    assert template == CHAT and converted[0] == {"messages": turns}
    converted, template = to_prompt_completion(rows, assistant_turns="last")
    assert template == CHAT
    assert [m["content"] for m in converted[0]["prompt"]] == ["2+2?", "4", "times 3?"]
    assert converted[0]["completion"] == [{"role": "assistant", "content": "12"}]
    with pytest.raises(ValueError, match="assistant_turns='first'"):
        to_prompt_completion(rows, assistant_turns="first")


def test_prompt_completion_strings_are_kept_verbatim():
    rows = Dataset.from_list([{"prompt": "Q: 1+1=", "completion": "2"}])
    converted, template = to_prompt_completion(rows)
    assert template == RAW and converted[0] == {"prompt": "Q: 1+1=", "completion": "2"}
    assert RAW.render("anything") == "anything"
    templated, used = to_prompt_completion(rows, template="alpaca")
    assert used == DEFAULT and templated[0] == {"prompt": alpaca_prompt("Q: 1+1="), "completion": " 2"}


def test_conversational_prompt_completion():
    rows = Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}],
                               "completion": [{"role": "assistant", "content": "hello"}]}])
    converted, template = to_prompt_completion(rows)
    assert template == CHAT and is_conversational(converted[0])
    assert converted[0]["completion"] == [{"role": "assistant", "content": "hello"}]


# ------------------------------------------------------------------------------------------------------------------
# bad rows
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows,match", [
    ([{"query": "a", "response": "b"}, {"query": "c", "response": "d"}, {"query": "e", "response": "  "}],
     r"Row 2 \(counted from 0\): empty completion \('response'\)"),
    ([{"query": "a", "response": "b"}, {"query": "c", "response": None}],
     r"Row 1 \(counted from 0\): empty completion"),
    ([{"instruction": "", "input": "", "output": "x"}], r"Row 0 \(counted from 0\): empty instruction"),
    ([{"prompt": "p", "completion": ""}], r"Row 0 \(counted from 0\): empty completion"),
    ([{"conversations": [{"from": "human", "value": "hi"}]}],
     r"Row 0 \(counted from 0\): the conversation has no assistant turn"),
    ([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]}],
     r"Row 0 \(counted from 0\): empty assistant turn \(turn 1, counted from 0\)"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "},
                    {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}],
     r"Row 0 \(counted from 0\): empty assistant turn \(turn 1, counted from 0\)"),
    ([{"conversations": [{"from": "alien", "value": "hi"}]}], r"Row 0 \(counted from 0\): unknown role 'alien'"),
    ([{"messages": [{"role": "assistant", "content": "hi"}]}], r"Row 0 \(counted from 0\): no user turn precedes"),
])
def test_bad_rows_raise_naming_the_row(rows, match):
    with pytest.raises(DatasetFormatError, match=match):
        to_prompt_completion(Dataset.from_list(rows))


def test_a_bad_row_keeps_its_index_through_worker_processes():
    """The job names the file's line from the error's ``row``: it must survive `map(num_proc=2)`'s pickling."""
    rows = [{"query": f"q{i}", "response": "" if i == 7 else f"r{i}"} for i in range(10)]
    with pytest.raises(DatasetFormatError) as caught:
        to_prompt_completion(Dataset.from_list(rows), num_proc=2)
    assert (caught.value.row, caught.value.detail) == (7, "empty completion ('response'). Remove or fix the row.")


def test_last_turn_only_checks_the_last_reply():
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]}]
    with pytest.raises(DatasetFormatError,
                       match=r"Row 0 \(counted from 0\): empty completion \(last assistant turn\)"):
        to_prompt_completion(Dataset.from_list(rows), assistant_turns="last")


def test_completion_starts_on_a_token_boundary(tokenizer):
    """TRL masks the prompt by tokenizing it alone: it must be a prefix of the tokenized prompt + completion."""
    converted, _ = to_prompt_completion(Dataset.from_list([{"query": r["question"], "response": r["answer"]} for r in GSM]))
    for row in converted:
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        full_ids = tokenizer(row["prompt"] + row["completion"])["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids)


# ------------------------------------------------------------------------------------------------------------------
# templates
# ------------------------------------------------------------------------------------------------------------------

def test_resolve_template(tmp_path):
    assert resolve_template("auto") is None and resolve_template(None) is None
    assert resolve_template("alpaca") == DEFAULT and resolve_template("chat") == CHAT and resolve_template("raw") == RAW
    saved = PromptTemplate("mine", "<s>{instruction}</s>")
    saved.save(str(tmp_path))
    assert resolve_template(str(tmp_path)) == saved
    assert resolve_template(str(tmp_path / "prompt_template.json")) == saved
    with pytest.raises(ValueError, match="not understood"):
        resolve_template("alpacca")
    with pytest.raises(ValueError, match="exactly once"):
        resolve_template("{instruction} {instruction}")


# ------------------------------------------------------------------------------------------------------------------
# loading: local files of every type, folders, Hub ids
# ------------------------------------------------------------------------------------------------------------------

def _write(path, rows):
    import pandas as pd

    frame = pd.DataFrame(rows)
    suffix = "".join(path.suffixes)
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".parquet":
        frame.to_parquet(path)
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        frame.to_csv(path, index=False, sep="\t")
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv", ".tsv"])
def test_local_files_load(tmp_path, suffix):
    path = _write(tmp_path / f"gsm8k{suffix}", GSM)
    loaded = load_dataset_any(str(path))
    assert loaded.to_list() == GSM
    converted, _ = to_prompt_completion(loaded)
    assert converted[3]["completion"] == " " + GSM[3]["answer"]
    assert len(load_dataset_any(str(path), split="train[:5]")) == 5


def test_local_file_has_only_a_train_split(tmp_path):
    path = _write(tmp_path / "rows.jsonl", GSM)
    with pytest.raises(ValueError, match="single split, 'train'"):
        load_dataset_any(str(path), split="test")


def test_folders_load(tmp_path):
    Dataset.from_list(GSM).save_to_disk(str(tmp_path / "saved"))
    assert load_dataset_any(str(tmp_path / "saved")).to_list() == GSM
    (tmp_path / "files").mkdir()
    _write(tmp_path / "files" / "train.jsonl", GSM)
    assert load_dataset_any(str(tmp_path / "files")).to_list() == GSM
    assert load_dataset_any(None, data_files=str(tmp_path / "files" / "train.jsonl")).to_list() == GSM


def test_hub_id_offline_says_why(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetLoadError, match="Hugging Face Hub.*HF_HUB_OFFLINE=1"):
        load_dataset_any("balora-trl-tests/no-such-dataset")


# ------------------------------------------------------------------------------------------------------------------
# unreadable files: one line naming the file (and the line), never a bare StopIteration or pyarrow's row count
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,text", [("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.json", ""),
                                       ("empty.csv", ""), ("empty.parquet", "")])
def test_empty_file_is_named(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DatasetLoadError) as info:
        load_dataset_any(str(path))
    assert str(info.value) == f"{path} is empty."
    with pytest.raises(DatasetLoadError, match="is empty"):  # through data_files as well
        load_dataset_any(None, data_files=[str(path)])


def test_file_with_a_header_and_no_rows(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("query,response\n")
    with pytest.raises(DatasetLoadError, match="header.csv holds no rows"):
        load_dataset_any(str(path))


ROWS = [json.dumps({"query": f"q{i}", "response": f"r{i}"}) for i in range(10)]


@pytest.mark.parametrize("line6,what", [
    ('{"query": "q5", "response": "r5"', r"not valid JSON \(Expecting ',' delimiter, column 33\)"),  # cut short
    ("this is not json", r"not valid JSON \(Expecting value, column 1\)"),
    (ROWS[5] + "}", r"not valid JSON \(Extra data, column 34\)"),
    ("[1, 2]", r"a JSON list, but each line must be one object"),
])
def test_bad_json_line_names_the_file_and_the_line(tmp_path, line6, what):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(ROWS[:5] + [line6] + ROWS[6:]) + "\n")
    with pytest.raises(DatasetLoadError, match=rf"^{path}, line 6: {what}") as info:
        load_dataset_any(str(path))
    assert "\n" not in str(info.value)


def test_bad_json_document_names_the_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text("[\n" + ROWS[0] + ",\n" + ROWS[1] + ",,\n]\n")
    with pytest.raises(DatasetLoadError, match=rf"^{path}, line 3: not valid JSON"):
        load_dataset_any(str(path))


@pytest.mark.parametrize("layout", ["[{}, 5]", "[\n{},\n5\n]\n"])
def test_a_json_array_item_that_is_not_a_row_is_named(tmp_path, layout):
    # A .json document is one array of rows however it is laid out; on one line it is not JSON Lines.
    path = tmp_path / "rows.json"
    path.write_text(layout.format(ROWS[0]))
    with pytest.raises(DatasetLoadError, match=rf"^{path}: item 1 \(counted from 0\) of its JSON array is a JSON int, "
                                               r"but each item must be one object"):
        load_dataset_any(str(path))


def test_missing_local_file_is_not_looked_up_on_the_hub(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DatasetLoadError, match=rf"^No such dataset file: {missing}$"):
        load_dataset_any(str(missing))
    with pytest.raises(DatasetLoadError, match=rf"^No such dataset file: {missing}$"):
        load_dataset_any(None, data_files=[str(missing)])


def test_sample_path_is_inside_the_package():
    assert SAMPLE_PATH.is_file() and SAMPLE_PATH.parent.parent.name == "balora_trl"


def test_sharegpt_file_with_both_role_spellings(tmp_path):
    """Through Arrow, `from`/`value` and `role`/`content` turns share one schema; the unused keys read as None."""
    rows = [{"conversations": [{"from": "human", "value": GSM[0]["question"]}, {"from": "gpt", "value": "a"}]},
            {"conversations": [{"role": "user", "content": GSM[1]["question"]}, {"role": "assistant", "content": "b"}]}]
    loaded = load_dataset_any(str(_write(tmp_path / "chats.jsonl", rows)))
    converted, _ = to_prompt_completion(loaded)
    assert [r["messages"] for r in converted] == [
        [{"role": "user", "content": GSM[i]["question"]}, {"role": "assistant", "content": reply}]
        for i, reply in enumerate("ab")]


# ------------------------------------------------------------------------------------------------------------------
# the authors' release's tokenization (the *_release recipes): prompt + response joined as they are, the example and
# the prompt truncated separately, every row kept
# ------------------------------------------------------------------------------------------------------------------

def _release_rows(tokenizer, rows, max_length, format="auto"):
    from balora_trl.dataset_formats import tokenize_like_release

    converted, _ = to_prompt_completion(Dataset.from_list(rows), format, space_before_completion=False)
    return converted, tokenize_like_release(converted, tokenizer, max_length)


def test_release_joins_prompt_and_response_as_they_are(tokenizer):
    """Against sequences built from their pieces: the byte-level pre-tokenizer splits at ':' | letter, so the joined
    text tokenizes as prompt tokens + response tokens, and the release puts no space between them."""
    rows = [{"query": r["question"], "response": r["answer"]} for r in GSM[:4]]
    converted, tokenized = _release_rows(tokenizer, rows, max_length=None)
    eos = tokenizer.eos_token_id
    for row, out in zip(rows, tokenized):
        prompt = tokenizer(alpaca_prompt(row["query"]))["input_ids"]
        response = tokenizer(row["response"])["input_ids"]
        assert out["input_ids"] == prompt + response + [eos]
        assert out["labels"] == [-100] * len(prompt) + response + [eos]
    # ours by default: a space first, so the response's first token differs (" Natalia" rather than "Natalia")
    spaced, _ = to_prompt_completion(Dataset.from_list(rows))
    assert [r["completion"] for r in converted] == [r["response"] for r in rows]
    assert [r["completion"] for r in spaced] == [" " + r["response"] for r in rows]
    assert tokenizer(" " + rows[0]["response"])["input_ids"][0] != tokenizer(rows[0]["response"])["input_ids"][0]


def test_release_truncates_prompt_and_example_separately_and_keeps_every_row(tokenizer):
    rows = [{"query": GSM[0]["question"], "response": GSM[0]["answer"]},
            {"query": GSM[1]["question"] * 4, "response": GSM[1]["answer"]}]  # this prompt alone is longer than L
    prompts = [tokenizer(alpaca_prompt(r["query"]))["input_ids"] for r in rows]
    pieces = [p + tokenizer(r["response"])["input_ids"] + [tokenizer.eos_token_id] for p, r in zip(prompts, rows)]
    max_length = len(prompts[0]) + 10
    assert len(prompts[1]) > max_length and len(pieces[0]) > max_length
    _, tokenized = _release_rows(tokenizer, rows, max_length)
    assert len(tokenized) == 2  # TRL would drop the second row (no label left); the release keeps it
    first, second = tokenized
    assert first["input_ids"] == pieces[0][:max_length] and tokenizer.eos_token_id not in first["input_ids"]
    assert first["labels"] == [-100] * len(prompts[0]) + pieces[0][len(prompts[0]):max_length]
    assert second["input_ids"] == prompts[1][:max_length] and second["labels"] == [-100] * max_length


def test_release_starts_the_labels_after_the_prompts_own_tokens(tokenizer):
    """Where the prompt's last token merges with the response ('... has 1' + '0 apples' -> ' 10'), TRL starts the
    labels where the two tokenizations part; the release masks as many tokens as the prompt alone has."""
    from trl.data_utils import common_prefix_length

    row = {"prompt": "She has 1", "completion": "0 apples"}
    prompt = tokenizer(row["prompt"])["input_ids"]
    full = tokenizer(row["prompt"] + row["completion"] + tokenizer.eos_token)["input_ids"]
    assert common_prefix_length(prompt, full) == len(prompt) - 1  # the case is real: ' 1' became ' 10'
    _, tokenized = _release_rows(tokenizer, [row], max_length=64)
    assert tokenized[0]["input_ids"] == full
    assert tokenized[0]["labels"] == [-100] * len(prompt) + full[len(prompt):]


def test_release_tokenization_needs_text_prompts(tokenizer):
    from balora_trl.dataset_formats import tokenize_like_release

    converted, _ = to_prompt_completion(Dataset.from_list(SHAREGPT))
    with pytest.raises(DatasetFormatError, match="tokenization 'release' needs text prompt/completion rows"):
        tokenize_like_release(converted, tokenizer, 64)
