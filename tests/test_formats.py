"""Reading and writing every preference format, detection, and lossless round trips."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from PIL import Image

from vlmtune.cli import main
from vlmtune.data.formats import FORMATS, detect_format, iter_records, read_records
from vlmtune.data.writers import write_records
from vlmtune.data.records import PreferenceRecord
from vlmtune.errors import VlmtuneError

SEED_ROW = {
    "image_path": "images/aguanambi-1085.jpg",
    "prompt": "<|user|>\nPlease count the number of vehicles you see. <image>\n<|assistant|>\n",
    "chosen": "There are 2 cars, 3 motorcycles, 0 buss, 0 bicycles in the image.",
    "rejected": "There are 5 cars, 6 motorcycles, 3 buss, 9 bicycles in the image.",
}


def image(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return str(path)


def write_json(path: Path, rows, lines: bool = False) -> Path:
    if lines:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


def text(t: str) -> dict:
    return {"type": "text", "text": t}


IMG = {"type": "image"}


# ---------------------------------------------------------------- seed


def test_seed_record_parses_into_chat_messages(tmp_path):
    path = write_json(tmp_path / "train.json", [SEED_ROW])
    (record,) = read_records(path)
    assert record.id == "train-0"
    assert record.images == [str(tmp_path / "images" / "aguanambi-1085.jpg")]
    assert record.prompt == [{"role": "user", "content": [
        text("Please count the number of vehicles you see."), IMG]}]
    assert record.chosen == SEED_ROW["chosen"] and record.rejected == SEED_ROW["rejected"]
    assert "<|" not in json.dumps(record.prompt)


def test_seed_writer_reproduces_the_seed_prompt(tmp_path):
    (record,) = read_records(write_json(tmp_path / "in.jsonl", [SEED_ROW], lines=True))
    out = write_records([record], tmp_path / "out.jsonl", "seed")
    row = json.loads(out.read_text())
    assert row["prompt"] == SEED_ROW["prompt"]
    assert row["image_path"] == SEED_ROW["image_path"]


def test_seed_untagged_prompt_is_a_user_turn_with_the_image_first(tmp_path):
    row = {**SEED_ROW, "prompt": "How many cars?"}
    (record,) = read_records(write_json(tmp_path / "d.json", [row]))
    assert record.prompt == [{"role": "user", "content": [IMG, text("How many cars?")]}]


def test_seed_system_tag_and_image_list(tmp_path):
    row = {**SEED_ROW, "image_path": ["a.png", "/abs/b.png"],
           "prompt": "<|system|>\nYou count.\n<|user|>\n<image> then <image> compare.\n<|assistant|>\n"}
    (record,) = read_records(write_json(tmp_path / "d.json", [row]))
    assert record.images == [str(tmp_path / "a.png"), "/abs/b.png"]
    assert record.prompt == [
        {"role": "system", "content": [text("You count.")]},
        {"role": "user", "content": [IMG, text("then"), IMG, text("compare.")]},
    ]


@pytest.mark.parametrize("prompt, words", [
    ("intro <|user|>\nCount.<|assistant|>\n", "before its first role tag"),
    ("<|user|>\nCount.<|assistant|>\nThere are", "ends with assistant text"),
])
def test_seed_unreadable_tags_name_the_record(tmp_path, prompt, words):
    path = write_json(tmp_path / "d.jsonl", [SEED_ROW, {**SEED_ROW, "prompt": prompt}], lines=True)
    with pytest.raises(VlmtuneError, match=f"d.jsonl:2: .*{words}"):
        read_records(path)


# ---------------------------------------------------------------- TRL


def test_trl_conversational_vision_row(tmp_path):
    row = {"images": ["cat.png"],
           "prompt": [{"role": "user", "content": [IMG, text("What is this?")]}],
           "chosen": [{"role": "assistant", "content": [text("A cat.")]}],
           "rejected": [{"role": "assistant", "content": [text("A dog.")]}]}
    (record,) = read_records(write_json(tmp_path / "t.jsonl", [row], lines=True))
    assert detect_format(tmp_path / "t.jsonl") == "trl"
    assert record.prompt == row["prompt"] and record.images == [str(tmp_path / "cat.png")]
    assert (record.chosen, record.rejected) == ("A cat.", "A dog.")


def test_trl_string_contents_match_trl_own_preparation(tmp_path):
    """TRL's own `prepare_multimodal_messages` is the oracle for where images go."""
    from trl.data_utils import prepare_multimodal_messages

    prompt = [{"role": "system", "content": "Be exact."},
              {"role": "user", "content": "How many vehicles?"}]
    row = {"images": ["a.png", "b.png"], "prompt": prompt,
           "chosen": [{"role": "assistant", "content": "Two."}],
           "rejected": [{"role": "assistant", "content": "Nine."}]}
    (record,) = read_records(write_json(tmp_path / "t.json", [row]))
    expected = prepare_multimodal_messages(prompt, images=["a", "b"])
    for message in expected:
        message["content"] = [{k: v for k, v in p.items() if k != "image"} for p in message["content"]]
    assert record.prompt == expected
    assert (record.chosen, record.rejected) == ("Two.", "Nine.")


# ---------------------------------------------------------------- LLaMA-Factory, ms-swift


def test_llamafactory_ranking_row_with_system(tmp_path):
    row = {"system": "You count vehicles.",
           "conversations": [{"from": "human", "value": "<image>How many cars?"}],
           "chosen": {"from": "gpt", "value": "Two."}, "rejected": {"from": "gpt", "value": "Five."},
           "images": ["img/x.jpg"]}
    path = write_json(tmp_path / "lf.json", [row])
    assert detect_format(path) == "llamafactory"
    (record,) = read_records(path)
    assert record.prompt == [{"role": "system", "content": [text("You count vehicles.")]},
                             {"role": "user", "content": [IMG, text("How many cars?")]}]
    assert record.images == [str(tmp_path / "img" / "x.jpg")]
    assert (record.chosen, record.rejected) == ("Two.", "Five.")


def test_swift_row_takes_the_last_turn_as_chosen(tmp_path):
    row = {"messages": [{"role": "user", "content": "<image>How many cars?"},
                        {"role": "assistant", "content": "Two."}],
           "rejected_response": "Five.", "images": ["x.jpg"]}
    path = write_json(tmp_path / "sw.jsonl", [row], lines=True)
    assert detect_format(path) == "swift"
    (record,) = read_records(path)
    assert record.prompt == [{"role": "user", "content": [IMG, text("How many cars?")]}]
    assert (record.chosen, record.rejected, record.id) == ("Two.", "Five.", "sw-0")


def test_swift_without_assistant_turn_is_refused(tmp_path):
    row = {"messages": [{"role": "user", "content": "hi"}], "rejected_response": "no"}
    with pytest.raises(VlmtuneError, match=r"sw.json\[0\]: .*end with the chosen assistant turn"):
        read_records(write_json(tmp_path / "sw.json", [row]))


# ---------------------------------------------------------------- HF datasets


def test_hf_parquet_with_nested_prompt_column(tmp_path):
    import datasets

    prompt = [{"role": "user", "content": [IMG, text("Count.")]}]
    ds = datasets.Dataset.from_list([{"id": "a", "images": ["p.png"], "prompt": prompt,
                                      "chosen": "1", "rejected": "2", "metadata": '{"k": 1}'}])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    (record,) = read_records(tmp_path / "d.parquet")
    assert record.prompt == prompt and record.metadata == {"k": 1}
    assert record.images == [str(tmp_path / "p.png")]


# ---------------------------------------------------------------- round trips


def sample_records(root: Path) -> list[PreferenceRecord]:
    inside = image(root / "out" / "imgs" / "a.png")
    outside = image(root / "elsewhere" / "b.png")
    return [
        PreferenceRecord("r1", [inside], [{"role": "user", "content": [IMG, text("Count the vehicles.")]}],
                         "There are 2 cars.", "There are 5 cars.",
                         {"counts": {"car": 2, "bus": 0}, "split": "train"}),
        PreferenceRecord("r2", [inside, outside], [
            {"role": "system", "content": [text("You count vehicles.")]},
            {"role": "user", "content": [text("Compare"), IMG, text("with"), IMG]},
            {"role": "assistant", "content": [text("Which one?")]},
            {"role": "user", "content": [text("Both, please.")]},
        ], "Three and one.", "One and three.", {}),
        PreferenceRecord("r3", [], [{"role": "user", "content": [text("No image here.")]}], "yes", "no",
                         {"note": "ünïcode"}),
    ]


SUFFIX = {"vlmtune": ".jsonl", "seed": ".json", "trl": ".jsonl", "llamafactory": ".json",
          "swift": ".jsonl", "hf": ".parquet"}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_round_trip_through_each_format_is_lossless(tmp_path, fmt):
    records = sample_records(tmp_path)
    out = write_records(records, tmp_path / "out" / f"data{SUFFIX[fmt]}", fmt)
    assert detect_format(out) == fmt
    assert read_records(out) == records


@pytest.mark.parametrize("source, target", list(itertools.permutations(FORMATS, 2)))
def test_convert_between_every_pair_keeps_the_records(tmp_path, source, target):
    records = sample_records(tmp_path)
    first = write_records(records, tmp_path / "out" / f"a{SUFFIX[source]}", source)
    second = write_records(read_records(first), tmp_path / "out" / f"b{SUFFIX[target]}", target)
    assert read_records(second, target) == records


def test_json_and_jsonl_picked_by_suffix_and_hf_folder(tmp_path):
    records = sample_records(tmp_path)
    array = write_records(records, tmp_path / "out" / "d.json", "trl")
    assert isinstance(json.loads(array.read_text()), list)
    lines = write_records(records, tmp_path / "out" / "d.jsonl", "trl").read_text().splitlines()
    assert len(lines) == 3
    folder = write_records(records, tmp_path / "out" / "ds", "hf")
    assert folder.is_dir() and detect_format(folder) == "hf" and read_records(folder) == records
    with pytest.raises(VlmtuneError, match=r"\.json .* or \.jsonl"):
        write_records(records, tmp_path / "out" / "d.txt", "seed")


def test_written_paths_are_relative_under_the_output_folder_else_absolute(tmp_path):
    records = sample_records(tmp_path)
    out = write_records(records, tmp_path / "out" / "d.jsonl", "vlmtune")
    row = json.loads(out.read_text().splitlines()[1])
    assert row["images"] == ["imgs/a.png", str(tmp_path / "elsewhere" / "b.png")]


def test_relative_image_paths_resolve_against_the_data_file(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    path = write_json(tmp_path / "data" / "d.json", [{**SEED_ROW, "image_path": "../pics/x.jpg"}])
    monkeypatch.chdir(tmp_path / "data")
    (record,) = read_records("d.json")
    assert record.images == [str(tmp_path / "pics" / "x.jpg")]


# ---------------------------------------------------------------- detection, streaming, errors


def test_unknown_format_names_every_expected_format(tmp_path):
    path = write_json(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}], lines=True)
    with pytest.raises(VlmtuneError) as e:
        detect_format(path)
    message = str(e.value)
    assert "odd.jsonl" in message and "['answer', 'question']" in message
    for name in FORMATS:
        assert name in message


def test_jsonl_is_streamed_and_stops_at_the_first_bad_line(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(SEED_ROW) + "\n\n{not json\n" + json.dumps(SEED_ROW) + "\n")
    stream = iter_records(path)
    assert next(stream).id == "d-0"  # read before the bad line is reached
    with pytest.raises(VlmtuneError, match=r"d.jsonl:3: line 3 is not valid JSON"):
        next(stream)
    kept = read_records(path, skip_bad=True)
    assert [r.id for r in kept] == ["d-0", "d-2"]
    assert "skipped " + str(path) + ":3" in caplog.text


def test_skip_bad_says_what_it_skipped(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(SEED_ROW) + "\n" + json.dumps({"image_path": "x"}) + "\n")
    assert len(read_records(path, skip_bad=True)) == 1
    logged = caplog.text
    assert "skipped" in logged and "d.jsonl:2" in logged and "missing key(s) prompt, chosen, rejected" in logged


def test_format_that_does_not_fit_the_path_is_refused(tmp_path):
    path = write_json(tmp_path / "d.json", [SEED_ROW])
    with pytest.raises(VlmtuneError, match="format hf means a datasets folder or a .parquet file"):
        read_records(path, "hf")
    with pytest.raises(VlmtuneError, match="unknown format 'csv'"):
        read_records(path, "csv")


def test_corrupt_parquet_is_a_clear_error(tmp_path):
    good = write_records(sample_records(tmp_path), tmp_path / "out" / "d.parquet", "hf")
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(VlmtuneError, match="cut.parquet: cannot read it as Parquet"):
        read_records(cut)


# ---------------------------------------------------------------- CLI


def test_cli_convert_and_detects_the_source(tmp_path, capsys):
    image(tmp_path / "images" / "aguanambi-1085.jpg")
    src = write_json(tmp_path / "seed.json", [SEED_ROW])
    assert main(["data", "convert", str(src), str(tmp_path / "lf.json"), "--to", "llamafactory"]) == 0
    assert "wrote 1 records" in capsys.readouterr().out
    row = json.loads((tmp_path / "lf.json").read_text())[0]
    assert row["conversations"] == [{"from": "human",
                                     "value": "Please count the number of vehicles you see.<image>"}]
    assert row["images"] == ["images/aguanambi-1085.jpg"]
    assert read_records(tmp_path / "lf.json") == read_records(src)


def test_cli_convert_refuses_bad_input_with_exit_2(tmp_path, capsys):
    src = write_json(tmp_path / "odd.json", [{"q": 1}])
    assert main(["data", "convert", str(src), str(tmp_path / "o.jsonl"), "--to", "vlmtune"]) == 2
    err = capsys.readouterr().err
    assert "cannot tell the data format" in err and "Traceback" not in err
    assert not (tmp_path / "o.jsonl").exists()
