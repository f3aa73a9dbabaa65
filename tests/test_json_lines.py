"""recipes.json_lines: the shared reader of the files runs append to survives a torn last line."""

import json
import logging

from recipes.json_lines import read_json_lines


def test_blank_and_torn_lines_are_skipped_and_the_torn_one_is_named(tmp_path, caplog):
    path = tmp_path / "log.jsonl"
    records = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25}]
    path.write_text(json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + '\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING):
        read = list(read_json_lines(path))
    assert [record for _, record in read] == records
    assert [json.loads(line) for line, _ in read] == records  # the line text is kept for rewriting
    assert "log.jsonl line 4 is not valid JSON" in caplog.text
