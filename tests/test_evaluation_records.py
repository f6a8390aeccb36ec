"""evaluation/records.py: deterministic sharding, append-only JSON-lines records that survive an interrupt, and a
resume that refuses another configuration."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from evaluation.records import RecordsError, RunRecords, fingerprint, gather_in_order, read_records, shard


@pytest.mark.parametrize("num_items", [0, 1, 5, 12, 13])
@pytest.mark.parametrize("num_processes", [1, 2, 3, 8])
def test_shards_are_contiguous_blocks_that_cover_every_item_once(num_items, num_processes):
    blocks = [list(shard(num_items, rank, num_processes)) for rank in range(num_processes)]
    expected = [list(block) for block in np.array_split(np.arange(num_items), num_processes)]  # an independent split
    assert blocks == expected
    assert sum(blocks, []) == list(range(num_items))


def test_a_bad_process_index_is_an_error():
    with pytest.raises(ValueError):
        shard(4, 2, 2)


def test_records_round_trip_and_a_resume_keeps_them(tmp_path):
    path = tmp_path / "records.jsonl"
    identity = {"model": "m", "methods": ["a", "b"], "seed": 0}
    records = RunRecords(path, identity, resume=False)
    records.append(0, {"prediction": "yes"})
    records.append("q7", {"prediction": "no", "seconds": 1.5})
    header, done = read_records(path)
    assert header["fingerprint"] == fingerprint(identity) and header["run"] == identity
    assert done == {"0": {"prediction": "yes"}, "q7": {"prediction": "no", "seconds": 1.5}}
    again = RunRecords(path, dict(identity), resume=True)
    assert again.done == done
    again.append(2, {"prediction": "two"})
    assert list(read_records(path)[1]) == ["0", "q7", "2"]
    fresh = RunRecords(path, identity, resume=False)  # without --resume: afresh
    assert fresh.done == {} and read_records(path)[1] == {}


def test_a_torn_last_line_is_dropped_and_that_item_runs_again(tmp_path):
    path = tmp_path / "records.jsonl"
    records = RunRecords(path, {"x": 1}, resume=False)
    records.append(0, {"p": 1})
    records.append(1, {"p": 2})
    path.write_bytes(path.read_bytes()[:-9])  # an interrupt in the middle of the last write
    resumed = RunRecords(path, {"x": 1}, resume=True)
    assert resumed.done == {"0": {"p": 1}}
    resumed.append(1, {"p": 2})  # the torn fragment is gone: the file reads back whole
    assert read_records(path)[1] == {"0": {"p": 1}, "1": {"p": 2}}


def test_resuming_with_another_configuration_names_the_first_difference(tmp_path):
    path = tmp_path / "records.jsonl"
    RunRecords(path, {"model": "m", "budget": 0.25, "seed": 0}, resume=False).append(0, {"p": 1})
    with pytest.raises(RecordsError, match=r"another configuration \(budget: 0.25 -> 0.35\)"):
        RunRecords(path, {"model": "m", "budget": 0.35, "seed": 0}, resume=True)
    assert read_records(path)[1] == {"0": {"p": 1}}  # untouched


def test_a_file_that_is_not_a_records_file_is_refused(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text(json.dumps({"hello": 1}) + "\n")
    with pytest.raises(RecordsError, match="not an evaluation records file"):
        RunRecords(path, {"x": 1}, resume=True)
    path.write_text("not json\n" + json.dumps({"hello": 1}) + "\n")
    with pytest.raises(RecordsError, match="line 1 is not JSON"):
        read_records(path)


def test_one_process_gathers_its_own_records_in_item_order():
    assert gather_in_order([(2, {"i": 2}), (0, {"i": 0}), (1, {"i": 1})]) == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_a_model_directory_is_fingerprinted_through_its_subfolders(tmp_path):
    from evaluation.records import model_identity

    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 100)
    first = model_identity(tmp_path)
    assert set(first) == {"model_fingerprint"}  # not the path: a copy elsewhere is the same model
    shutil.copytree(tmp_path, tmp_path.parent / "copy")
    assert model_identity(tmp_path.parent / "copy") == first
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\1" + b"\0" * 99)
    assert model_identity(tmp_path)["model_fingerprint"] != first["model_fingerprint"]  # retrained weights
    assert model_identity(None) == {"model": None}
    assert model_identity("Qwen/Qwen2.5-VL-7B-Instruct") == {"model": "Qwen/Qwen2.5-VL-7B-Instruct"}
