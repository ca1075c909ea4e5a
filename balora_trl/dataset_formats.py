"""Instruction datasets -> TRL prompt/completion (or conversational) rows, with the prompt template that was used.

BA-LoRA trains on the responses only (paper section 4.2). TRL does exactly that for *prompt/completion* data and,
with ``assistant_only_loss``, for conversations, so every supported format is turned into one of them:

========================  =====================================  ==================================================
format                    columns                                typical source
========================  =====================================  ==================================================
``prompt_completion``     ``prompt``, ``completion``             TRL's own format (strings or lists of messages)
``messages``              ``messages``                           TRL conversational (``role`` / ``content``)
``sharegpt``              ``conversations``                      ShareGPT, WizardLM-Evol-Instruct V2 (``from`` / ``value``)
``metamath``              ``query``, ``response``                meta-math/MetaMathQA
``codefeedback``          ``query``, ``answer``                  m-a-p/CodeFeedback-Filtered-Instruction
``alpaca``                ``instruction``, ``input``, ``output``  tatsu-lab/alpaca and its many copies
``pissa``                 ``instruction``, ``output``            fxmeng/pissa-dataset (the PiSSA / BA-LoRA release)
``gsm8k``                 ``question``, ``answer``               openai/gsm8k
========================  =====================================  ==================================================

The format is detected from the columns (first match in the order above) or named explicitly. The prompt template
(`balora_trl.prompts`) decides how an instruction becomes a prompt:

* instruction formats default to the Alpaca template the authors use (``prompts.DEFAULT``); the response becomes
  the completion, after one space so the completion starts on a token boundary (``space_before_completion=False``
  joins them as they are, as the authors' release does);
* conversations (``messages``, ``sharegpt``) default to ``prompts.CHAT``: TRL's conversational ``messages`` rows,
  rendered by the tokenizer's chat template, which TRL trains on *every* assistant turn with
  ``assistant_only_loss=True`` (the template's ``{% generation %}`` markers say which tokens are the assistant's;
  the main job turns it on). ``assistant_turns="last"`` instead makes the last assistant turn the completion of a
  conversational prompt/completion row, the turns before it the prompt;
* conversational ``prompt_completion`` stays as given (its completion is trained);
* plain-string ``prompt_completion`` defaults to ``RAW`` (the prompt is used exactly as given).

A text template applied to a conversation keeps its first exchange (first user turn -> the assistant reply that
follows), which is how the paper's WizardLM -> MT-Bench (first turn) setup prompts; ``CHAT`` applied to an
instruction format gives a one-turn conversation. Whatever was used is returned beside the dataset and is saved
as ``prompt_template.json`` with the adapter, so evaluation prompts the model the same way.

`tokenize_like_release` tokenizes text prompt/completion rows the way the authors' release (train.py) does, for the
``*_release`` recipes.
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .prompts import ALPACA_WITH_INPUT, CHAT, DEFAULT, FILENAME, PLACEHOLDER, PromptTemplate

# The prompt is used verbatim (TRL prompt/completion data that is already prompted).
RAW = PromptTemplate("raw", PLACEHOLDER)
NAMED_TEMPLATES = {"alpaca": DEFAULT, "chat": CHAT, "raw": RAW}

# The MetaMathQA-format GSM8K sample shipped with the package (the main job's embedded default).
SAMPLE_PATH = Path(__file__).resolve().parent / "data" / "metamath_gsm8k_sample.jsonl"

# How chat roles are spelled in the wild -> TRL's roles.
_ROLES = {
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "model": "assistant", "bot": "assistant",
    "system": "system",
}

_LOCAL_BUILDERS = {
    ".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json",
    ".parquet": "parquet", ".csv": "csv", ".csv.gz": "csv", ".tsv": "csv",
}


class DatasetFormatError(ValueError):
    """The dataset's columns or rows do not fit any supported format. A row's error carries ``row`` (its index in
    the converted dataset, from 0) and ``detail`` (the message without the row), so that a caller who knows where
    the rows came from can name the file and line instead (`locate_row`)."""

    def __init__(self, message: str, row: int | None = None, detail: str | None = None):
        super().__init__(message)
        self.row, self.detail = row, detail

    def __reduce__(self):  # keeps row and detail across `datasets.map(num_proc=...)`'s worker processes
        return type(self), (str(self), self.row, self.detail)


def _row_error(index: int, detail: str) -> DatasetFormatError:
    return DatasetFormatError(f"Row {index} (counted from 0): {detail}", row=index, detail=detail)


class DatasetLoadError(ValueError):
    """A dataset that cannot be read: a missing or empty local file, a line that is not JSON, or a name that is
    neither a local path nor loadable from the Hub."""


@dataclass(frozen=True)
class Format:
    name: str
    columns: tuple[str, ...]
    kind: str  # "instruction" | "conversation" | "prompt_completion"
    description: str
    # instruction formats: row -> (instruction, extra input or None, response)
    fields: Callable[[dict], tuple] | None = None
    conversation_column: str | None = None


def _cols(instruction: str, response: str, extra: str | None = None):
    return lambda row: (row[instruction], row[extra] if extra else None, row[response])


# Detection order: the first format whose columns are all present wins (alpaca before pissa: it is a superset).
FORMATS: dict[str, Format] = {
    f.name: f
    for f in [
        Format("prompt_completion", ("prompt", "completion"), "prompt_completion", "TRL prompt/completion"),
        Format("messages", ("messages",), "conversation", "TRL conversational", conversation_column="messages"),
        Format("sharegpt", ("conversations",), "conversation", "ShareGPT / WizardLM conversations",
               conversation_column="conversations"),
        Format("metamath", ("query", "response"), "instruction", "MetaMathQA", _cols("query", "response")),
        Format("codefeedback", ("query", "answer"), "instruction", "CodeFeedback", _cols("query", "answer")),
        Format("alpaca", ("instruction", "input", "output"), "instruction", "Alpaca",
               _cols("instruction", "output", extra="input")),
        Format("pissa", ("instruction", "output"), "instruction", "pissa-dataset", _cols("instruction", "output")),
        Format("gsm8k", ("question", "answer"), "instruction", "GSM8K", _cols("question", "answer")),
    ]
}


def supported_formats() -> str:
    """One line per format: name, columns, source (used in error messages and --help)."""
    return "\n".join(f"  {f.name:<18} columns {', '.join(f.columns):<30} ({f.description})" for f in FORMATS.values())


def _format_error(message: str, columns: Sequence[str]) -> DatasetFormatError:
    """One line: what is wrong, the columns found, and every supported format with its columns."""
    formats = "; ".join(f"{f.name} ({', '.join(f.columns)})" for f in FORMATS.values())
    return DatasetFormatError(
        f"{message} Columns found: {sorted(columns)}. Supported formats (set `dataset_format` to force one): "
        f"{formats}."
    )


def detect_format(column_names: Sequence[str]) -> str:
    """The name of the first format in `FORMATS` whose columns are all in ``column_names``."""
    present = set(column_names)
    for fmt in FORMATS.values():
        if set(fmt.columns) <= present:
            return fmt.name
    raise _format_error("Could not recognise the dataset format from its columns.", column_names)


def resolve_format(format: str, column_names: Sequence[str]) -> Format:
    """``format`` ('auto' or a name in `FORMATS`) checked against the dataset's columns."""
    if format in (None, "", "auto"):
        return FORMATS[detect_format(column_names)]
    if format not in FORMATS:
        raise _format_error(f"Unknown dataset format {format!r}.", column_names)
    fmt = FORMATS[format]
    missing = [c for c in fmt.columns if c not in column_names]
    if missing:
        raise _format_error(f"dataset_format={format!r} needs the column(s) {missing}, which the dataset lacks.",
                            column_names)
    return fmt


def resolve_template(spec: str | PromptTemplate | None) -> PromptTemplate | None:
    """A prompt template from its spec; None for 'auto' (the format's default).

    ``spec`` is a `PromptTemplate`, 'auto', a name ('alpaca', 'chat', 'raw'), a folder or file holding a saved
    ``prompt_template.json``, or a literal template containing ``{instruction}`` exactly once.
    """
    if spec is None or isinstance(spec, PromptTemplate):
        return spec
    if spec in ("", "auto"):
        return None
    if spec in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[spec]
    if os.path.isdir(spec) or (os.path.isfile(spec) and os.path.basename(spec) == FILENAME):
        directory = spec if os.path.isdir(spec) else os.path.dirname(spec) or "."
        template = PromptTemplate.load(directory)
        if template is None:
            raise ValueError(f"prompt_template={spec!r}: that folder holds no {FILENAME}.")
        return template
    if PLACEHOLDER in spec:
        return PromptTemplate("custom", spec)
    raise ValueError(
        f"prompt_template={spec!r} is not understood: use 'auto', one of {sorted(NAMED_TEMPLATES)}, a folder with a "
        f"{FILENAME}, or a template string containing {PLACEHOLDER} exactly once."
    )


# ----------------------------------------------------------------------------------------------------------------
# row converters
# ----------------------------------------------------------------------------------------------------------------


def _text(value, what: str, index: int, allow_empty: bool = False) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise _row_error(index, f"{what} must be text, got {type(value).__name__}.")
    if not allow_empty and not value.strip():
        raise _row_error(index, f"empty {what}. Remove or fix the row.")
    return value


def _separated(completion: str) -> str:
    """The completion after a text prompt starts with whitespace, so it begins on a token boundary."""
    return completion if completion[:1].isspace() else " " + completion


def _as_given(completion: str) -> str:
    """The completion joined to the prompt as it is (the authors' release: ``source + target``)."""
    return completion


_FIELD = re.compile(r"\{(instruction|input)\}")


def _render_with_input(instruction: str, extra: str) -> str:
    # One pass, so a literal "{input}" inside the instruction is never substituted.
    values = {"instruction": instruction, "input": extra}
    return _FIELD.sub(lambda m: values[m.group(1)], ALPACA_WITH_INPUT)


def _one_turn(user: str, assistant: str) -> dict:
    return {"prompt": [{"role": "user", "content": user}], "completion": [{"role": "assistant", "content": assistant}]}


def _instruction_row(fmt: Format, template: PromptTemplate, row: dict, index: int, join=_separated) -> dict:
    instruction, extra, response = fmt.fields(row)
    instruction = _text(instruction, f"instruction ({fmt.columns[0]!r})", index)
    response = _text(response, f"completion ({fmt.columns[-1]!r})", index)
    extra = _text(extra, "input", index, allow_empty=True).strip() if extra is not None else ""
    if template.is_chat:
        content = f"{instruction}\n\n{extra}" if extra else instruction
        return _one_turn(content, response)
    if extra and template == DEFAULT:  # Alpaca's own layout for rows with an input
        prompt = _render_with_input(instruction, extra)
    else:
        prompt = template.render(f"{instruction}\n\n{extra}" if extra else instruction)
    return {"prompt": prompt, "completion": join(response)}


def _messages(turns, index: int) -> list[dict]:
    if not isinstance(turns, (list, tuple)) or not turns:
        raise _row_error(index, "the conversation is empty or not a list of turns.")
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise _row_error(index, f"a turn is {type(turn).__name__}, expected a dict.")
        # `or`, not a .get default: rows read through Arrow carry both spellings, the unused one as None.
        role = turn.get("role") or turn.get("from")
        content = turn.get("content") if turn.get("content") is not None else turn.get("value")
        mapped = _ROLES.get(str(role).lower())
        if mapped is None:
            raise _row_error(index, f"unknown role {role!r} (known: {sorted(_ROLES)}).")
        out.append({"role": mapped, "content": "" if content is None else str(content)})
    return out


def _conversation_row(turns, template: PromptTemplate, index: int, assistant_turns: str = "all",
                      join=_separated) -> dict:
    messages = _messages(turns, index)
    if template.is_chat:
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not replies:
            raise _row_error(index, "the conversation has no assistant turn to train on.")
        last = replies[-1]
        if not any(m["role"] == "user" for m in messages[:last]):
            raise _row_error(index, "no user turn precedes the last assistant turn.")
        if assistant_turns == "last":
            _text(messages[last]["content"], "completion (last assistant turn)", index)
            return {"prompt": messages[:last], "completion": [messages[last]]}
        for i in replies:  # every one of them is trained
            _text(messages[i]["content"], f"assistant turn (turn {i}, counted from 0)", index)
        return {"messages": messages}
    # A text template: the first exchange, user turn -> the assistant reply that follows it.
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    reply = None if first_user is None else next(
        (i for i in range(first_user + 1, len(messages)) if messages[i]["role"] == "assistant"), None)
    if reply is None:
        raise _row_error(index, "the conversation has no user turn followed by an assistant reply.")
    instruction = _text(messages[first_user]["content"], "instruction (first user turn)", index)
    response = _text(messages[reply]["content"], "completion (first assistant reply)", index)
    return {"prompt": template.render(instruction), "completion": join(response)}


def _prompt_completion_row(row: dict, template: PromptTemplate, index: int, join=_separated) -> dict:
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, (list, tuple)):  # conversational prompt/completion
        if not isinstance(completion, (list, tuple)):
            raise _row_error(index, "the prompt is a list of messages but the completion is not.")
        if not template.is_chat:
            return _conversation_row(list(prompt) + list(completion), template, index, join=join)
        prompt_msgs, completion_msgs = _messages(prompt, index), _messages(completion, index)
        _text("".join(m["content"] for m in completion_msgs), "completion", index)
        return {"prompt": prompt_msgs, "completion": completion_msgs}
    prompt = _text(prompt, "prompt", index)
    completion = _text(completion, "completion", index)
    if template == RAW:
        return {"prompt": prompt, "completion": completion}
    if template.is_chat:
        return _one_turn(prompt, completion)
    return {"prompt": template.render(prompt), "completion": join(completion)}


def _default_template(fmt: Format, dataset) -> PromptTemplate:
    if fmt.kind == "instruction":
        return DEFAULT
    if fmt.kind == "conversation":
        return CHAT
    first = dataset[0]["prompt"] if len(dataset) else ""
    return CHAT if isinstance(first, (list, tuple)) else RAW


ASSISTANT_TURNS = ("all", "last")


def to_prompt_completion(dataset, format: str = "auto", template: PromptTemplate | str | None = None, num_proc=None,
                         assistant_turns: str = "all", space_before_completion: bool = True):
    """Convert ``dataset`` (a `datasets.Dataset`) to TRL prompt/completion, or to TRL conversational ``messages`` rows
    for conversations with the chat template.

    Args:
        format: 'auto' (detect from the columns) or a name in `FORMATS`.
        template: a `PromptTemplate`, a spec understood by `resolve_template`, or None for the format's default
            (Alpaca for instruction formats, CHAT for conversations, RAW for string prompt/completion).
        assistant_turns: for conversations (``messages``, ``sharegpt``) with the chat template: 'all' keeps the
            whole conversation as a ``messages`` row, every assistant turn to be trained (TRL's
            ``assistant_only_loss=True``, which the caller must set: without it TRL trains the user turns too);
            'last' makes the last assistant turn the completion and the turns before it the prompt.
        space_before_completion: with a text template, start the completion with a space unless it starts with
            whitespace (so it begins on a token boundary); False joins prompt and response as they are.

    Returns:
        ``(dataset, template)``: only the ``prompt`` and ``completion`` columns (or only ``messages``), and the
        template actually used.

    Raises:
        DatasetFormatError: unknown or missing columns (the message lists the columns found and the formats
            supported), an empty completion or prompt (naming the row), a malformed conversation.
    """
    if assistant_turns not in ASSISTANT_TURNS:
        raise ValueError(f"assistant_turns={assistant_turns!r}: use one of {list(ASSISTANT_TURNS)}.")
    columns = list(dataset.column_names)
    fmt = resolve_format(format, columns)
    template = resolve_template(template)
    if template is None:
        template = _default_template(fmt, dataset)
    join = _separated if space_before_completion else _as_given

    if fmt.kind == "instruction":
        def convert(row, index):
            return _instruction_row(fmt, template, row, index, join)
    elif fmt.kind == "conversation":
        def convert(row, index):
            return _conversation_row(row[fmt.conversation_column], template, index, assistant_turns, join)
    else:
        def convert(row, index):
            return _prompt_completion_row(row, template, index, join)

    whole_conversations = template.is_chat and fmt.kind == "conversation" and assistant_turns == "all"
    style = "conversational" if template.is_chat else f"'{template.name}' template"
    target = "messages (every assistant turn)" if whole_conversations else f"prompt/completion ({style})"
    converted = dataset.map(
        convert,
        with_indices=True,
        remove_columns=columns,
        num_proc=num_proc,
        desc=f"{fmt.description} -> {target}",
    )
    return converted, template


def loss_covers_user_turns(example: dict, assistant_only_loss: bool, completion_only_loss: bool | None) -> bool:
    """Whether TRL's SFTTrainer, with these settings, puts the loss (and so BA-LoRA's terms) on the user turns of
    this conversational ``example``: a ``messages`` / ShareGPT row without ``assistant_only_loss`` is trained on
    every token; a conversational prompt/completion row only when ``completion_only_loss=False`` too."""
    from trl.data_utils import is_conversational, is_conversational_from_value

    if assistant_only_loss or not (is_conversational(example) or is_conversational_from_value(example)):
        return False
    if "prompt" in example:
        return completion_only_loss is False
    return True


def tokenize_like_release(dataset, tokenizer, max_length: int | None, num_proc=None):
    """Text prompt/completion rows -> ``input_ids`` and ``labels``, built the way the authors' release (train.py)
    builds them, for TRL to take as they are (``dataset_kwargs={"skip_prepare_dataset": True}``).

    For a prompt p and a response r (joined as they are: ``to_prompt_completion(..., space_before_completion=False)``)
    and L = ``max_length``:

        ids    = tokenize(p + r + eos)[:L]
        labels = ids, with the first min(len(tokenize(p)), L) positions set to -100

    The joined example and the prompt are tokenized (with the tokenizer's special tokens) and truncated to L
    separately, and the prompt's own token count says where the labels start. TRL instead starts them where the
    tokenized prompt and prompt + completion stop agreeing, and drops a row whose prompt fills L; here such a row is
    kept without a label (it adds no loss, but counts among the rows and so the optimizer steps), as in the release.
    """
    if len(dataset) and not isinstance(dataset[0].get("prompt"), str):
        raise DatasetFormatError(
            "tokenization 'release' needs text prompt/completion rows (a text prompt template such as 'alpaca'); "
            "these rows are conversational."
        )
    eos = tokenizer.eos_token or ""
    cut = {} if max_length is None else {"max_length": max_length, "truncation": True}

    def tokenize(batch):
        examples = tokenizer([p + c + eos for p, c in zip(batch["prompt"], batch["completion"])], **cut)["input_ids"]
        prompts = tokenizer(list(batch["prompt"]), **cut)["input_ids"]
        labels = [[-100] * min(len(p), len(ids)) + ids[len(p):] for ids, p in zip(examples, prompts)]
        return {"input_ids": examples, "labels": labels}

    return dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, num_proc=num_proc,
                       desc="Tokenizing the authors' release's way (prompt and example truncated separately)")


# ----------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------


def _builder_for(path: str) -> str:
    lower = path.lower()
    for suffix in sorted(_LOCAL_BUILDERS, key=len, reverse=True):
        if lower.endswith(suffix):
            return _LOCAL_BUILDERS[suffix]
    raise ValueError(f"{path}: unsupported file type; use one of {sorted(_LOCAL_BUILDERS)}.")


def _local_split(split: str) -> str:
    """A single local file is one 'train' split; slicing ('train[:100]') is kept."""
    base = split.split("[", 1)[0]
    if base != "train":
        raise ValueError(
            f"A local file has a single split, 'train' (got {split!r}). To load several files as splits, pass "
            "data_files={'train': ..., 'test': ...}."
        )
    return split


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.lower().endswith(".gz") else open(path, encoding="utf-8")


def _check_not_empty(path: str) -> None:
    """An empty (or blank) file: `datasets` would fail on it with a bare ``StopIteration`` from its JSON reader."""
    if os.path.getsize(path) > 0:
        if path.lower().endswith(".parquet"):
            return
        try:
            with _open_text(path) as f:
                for chunk in iter(lambda: f.read(1 << 16), ""):
                    if chunk.strip():
                        return
        except (UnicodeDecodeError, OSError):  # not text: the reader says what is wrong
            return
    raise DatasetLoadError(f"{path} is empty.")


def _json_problem(path: str) -> str | None:
    """The first thing in a JSON Lines (or JSON) file that `datasets` cannot read, as one line naming the file and
    the line, or None when the file is well-formed JSON. Only called after a load failed: `datasets` reads with
    pyarrow, whose messages ("changed from string to object in row 6") name neither the file nor the line."""
    try:
        with _open_text(path) as f:
            text = f.read()
    except UnicodeDecodeError as error:
        return f"{path} is not UTF-8 text (byte {error.start}: {error.reason})."
    lines = text.split("\n")  # not splitlines(): JSON strings may hold U+2028 and friends unescaped
    if not path.lower().endswith((".jsonl", ".jsonl.gz")):
        try:  # a .json file holds one document (an array of rows, however laid out), or is JSON Lines after all
            document = json.loads(text)
        except json.JSONDecodeError as error:
            try:
                json.loads(next((line for line in lines if line.strip()), ""))
            except json.JSONDecodeError:
                return f"{path}, line {error.lineno}: not valid JSON ({error.msg}, column {error.colno})."
        else:
            bad = next((i for i, row in enumerate(document) if not isinstance(row, dict)), None) if isinstance(
                document, list) else None
            if bad is None:
                return None
            return (f"{path}: item {bad} (counted from 0) of its JSON array is a JSON "
                    f"{type(document[bad]).__name__}, but each item must be one object (one row: "
                    '{"column": value, ...}).')
    try:
        for _ in json_lines(path, lines):
            pass
    except ValueError as error:
        return str(error)
    return None


def json_lines(path: str, lines):
    """The rows (dicts) of JSON Lines text ``lines``, skipping blank lines; the first bad line is a ``ValueError``
    naming ``path`` and its line number (shared with the evaluation harness's reader, eval/benchmark_rows.py)."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}, column {error.colno}).") from None
        if not isinstance(value, dict):
            raise ValueError(f"{path}, line {number}: a JSON {type(value).__name__}, but each line must be one "
                             'object (one row: {"column": value, ...}).')
        yield value


def locate_row(path: str, row: int) -> str:
    """Where row ``row`` (from 0) of the one local file ``path`` is, for a message: its line in a JSON Lines file
    (the reader skips blank lines: the row-th non-blank line), otherwise the row."""
    if _builder_for(path) == "json":
        with _open_text(path) as f:
            rows = ((n, line) for n, line in enumerate(f, 1) if line.strip())
            first = next(rows, (0, ""))
            try:  # JSON Lines when its first line is a whole row (as in _json_problem); a .json document has no lines
                one_per_line = isinstance(json.loads(first[1]), dict)
            except json.JSONDecodeError:
                one_per_line = False
            found = first if row == 0 else next(itertools.islice(rows, row - 1, None), None)
        if one_per_line and found:
            return f"{path}, line {found[0]}"
    return f"{path}, row {row} (counted from 0)"


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: " + " ".join(str(error).split())


def _load_files(builder: str, data_files, files: list[str], split: str, **kwargs):
    """`datasets.load_dataset` on local files, with one-line errors that name the file (and line) at fault."""
    import datasets

    for file in files:
        _check_not_empty(file)
    # Its JSON reader logs pyarrow's message ("... in row 5") before failing; ours below names the file and line.
    reader_log = logging.getLogger("datasets.packaged_modules.json.json")
    level = reader_log.level
    reader_log.setLevel(logging.CRITICAL)
    try:
        loaded = datasets.load_dataset(builder, data_files=data_files, split=split, **kwargs)
    except Exception as error:  # noqa: BLE001 - re-raised naming the file, and the line when it is JSON
        if builder == "json":
            for file in files:
                problem = _json_problem(file)
                if problem:
                    raise DatasetLoadError(problem) from error
        if "corresponds to no data" in str(error):  # datasets' words for a split with no rows (a CSV header only)
            raise DatasetLoadError(f"{', '.join(files)} holds no rows.") from error
        # datasets wraps the reader's own error in a generic DatasetGenerationError: report the reader's
        raise DatasetLoadError(f"Could not read {', '.join(files)}: {_one_line(error.__cause__ or error)}") from error
    finally:
        reader_log.setLevel(level)
    if len(loaded) == 0:
        raise DatasetLoadError(f"{', '.join(files)} holds no rows.")
    return loaded


def local_files(data_files) -> list[str]:
    """The local files among ``data_files`` (a path, a list, or a {split: path(s)} dict); a plain path that does not
    exist is an error, a glob pattern or URL is left to `datasets`."""
    values = data_files.values() if isinstance(data_files, dict) else [data_files]
    entries = [e for v in values for e in (v if isinstance(v, (list, tuple)) else [v])]
    files = []
    for entry in map(str, entries):
        if os.path.isfile(os.path.expanduser(entry)):
            files.append(os.path.expanduser(entry))
        elif not any(c in entry for c in "*?[") and "://" not in entry:
            raise DatasetLoadError(f"No such dataset file: {entry}")
    return files


def load_dataset_any(
    name_or_path: str | None,
    split: str = "train",
    config: str | None = None,
    data_dir: str | None = None,
    data_files: str | Sequence[str] | dict | None = None,
):
    """Load one split from a Hub dataset id, a local file (jsonl, json, parquet, csv, tsv), a local folder of such
    files, or a folder written by ``Dataset.save_to_disk``.

    Raises `DatasetLoadError` (a ValueError), in one line, for a missing or empty file, a JSON line that does not
    parse (the file and the line number), or a name neither on disk nor on the Hub."""
    import datasets

    if name_or_path is None and data_files is None:
        raise ValueError("Give a dataset: a Hub id, a local file or folder, or data_files.")
    path = None if name_or_path is None else os.path.expanduser(str(name_or_path))

    if path is not None and os.path.isfile(path):
        builder = _builder_for(path)
        kwargs = {"delimiter": "\t"} if path.lower().endswith(".tsv") else {}
        return _load_files(builder, path, [path], _local_split(split), **kwargs)
    if path is None:  # only data_files
        files = local_files(data_files)
        entries = data_files if isinstance(data_files, (list, tuple)) else (
            next(iter(data_files.values())) if isinstance(data_files, dict) else [data_files])
        first = entries[0] if isinstance(entries, (list, tuple)) else entries
        return _load_files(_builder_for(str(first)), data_files, files, split)
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_info.json", "dataset_dict.json")):
            loaded = datasets.load_from_disk(path)
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(path, name=config, data_dir=data_dir, data_files=data_files, split=split)
    if path.lower().endswith(tuple(_LOCAL_BUILDERS)):  # a file name, not a Hub id
        raise DatasetLoadError(f"No such dataset file: {path}")
    try:
        return datasets.load_dataset(path, name=config, data_dir=data_dir, data_files=data_files, split=split)
    except Exception as error:  # noqa: BLE001 - re-raised with what to check
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", "")
        hint = " The Hub is switched off here (HF_HUB_OFFLINE=1)." if offline else ""
        raise DatasetLoadError(
            f"Could not load dataset {name_or_path!r}: it is not a local file or folder, so it was looked up on the "
            f"Hugging Face Hub, which failed.{hint} ({_one_line(error)})"
        ) from error


def load_sample(n: int | None = None):
    """The shipped MetaMathQA-format sample (2000 GSM8K train rows), optionally its first ``n`` rows."""
    dataset = load_dataset_any(str(SAMPLE_PATH))
    return dataset if n is None else dataset.select(range(min(n, len(dataset))))
