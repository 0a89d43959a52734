"""The wire formats of batch jobs: OpenAI batch input lines and DashScope task tables read into
lines (a file that cannot be run names its line), and result lines in each format."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from mmembed.accounts.jobs import JobRecord
from mmembed.api.batch_kinds import DashScopeTasks, OpenAIBatches
from mmembed.batch.lines import MalformedInput

EMBED = "/v1/embeddings"
NATIVE = "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding"


def job(kind: str = "openai") -> JobRecord:
    return JobRecord(
        id="batch_x", kind=kind, key_id=None, key_name="k", upload_owner="o",
        endpoint=EMBED, created_at=0.0, expires_at=1.0,
    )  # fmt: skip


def write(tmp_path: Path, text: str | bytes, name: str = "in.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def line(cid: str, url: str = EMBED, **extra) -> str:
    body = {"model": "m", "input": ["a", "b"]}
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body} | extra)


def test_openai_lines_are_read_with_their_numbers_and_inputs(tmp_path):
    text = "\n".join(
        [line("a"), "", line("b", url=NATIVE), line("c", url="/compatible-mode/v1/embeddings")]
    )
    lines = OpenAIBatches(None).read(job(), write(tmp_path, text), 100)
    assert [(x.number, x.custom_id, x.payload.url, x.items) for x in lines] == [
        (1, "a", EMBED, 2),
        (3, "b", NATIVE, 2),
        (4, "c", "/compatible-mode/v1/embeddings", 2),
    ]


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        ("{not json", "invalid_json_line"),
        ("[1, 2]", "invalid_json_line"),
        (json.dumps({"method": "POST", "url": EMBED, "body": {}}), "invalid_custom_id"),
        (line("a"), "duplicate_custom_id"),
        (line("z", url="/v1/chat/completions"), "invalid_url"),
        (line("z", method="GET"), "invalid_method"),
        (
            json.dumps({"custom_id": "z", "method": "POST", "url": EMBED, "body": "x"}),
            "invalid_body",
        ),
    ],
)
def test_a_malformed_line_fails_the_file_naming_it(tmp_path, bad, code):
    text = "\n".join([line("a"), line("b"), bad, line("d")])
    with pytest.raises(MalformedInput) as caught:
        OpenAIBatches(None).read(job(), write(tmp_path, text), 100)
    assert caught.value.line == 3 and caught.value.code == code
    assert "line 3" in caught.value.message
    assert caught.value.wire()["line"] == 3


def test_empty_and_oversized_files(tmp_path):
    with pytest.raises(MalformedInput) as empty:
        OpenAIBatches(None).read(job(), write(tmp_path, "\n\n"), 10)
    assert empty.value.code == "empty_file"
    text = "\n".join(line(f"r{i}") for i in range(4))
    with pytest.raises(MalformedInput) as many:
        OpenAIBatches(None).read(job(), write(tmp_path, text), 3)
    assert many.value.code == "too_many_requests" and many.value.line == 4


def test_openai_result_lines():
    kind = OpenAIBatches(None)
    body = b'{"object":"list","data":[]}'
    out = orjson.loads(kind.output_line(job(), "r1", body, 200, "batch_x:1"))
    assert out["custom_id"] == "r1" and out["error"] is None
    assert out["id"].startswith("batch_req_")
    assert out["response"] == {
        "status_code": 200,
        "request_id": "batch_x:1",
        "body": {"object": "list", "data": []},
    }
    missing = orjson.loads(kind.missing_line(job(), "r2", "batch_cancelled", "gone"))
    assert missing["response"] is None
    assert missing["error"] == {"code": "batch_cancelled", "message": "gone"}
    assert missing["id"] != out["id"]


def test_dashscope_tables_jsonl_and_csv(tmp_path):
    kind = DashScopeTasks(None, None, None)  # type: ignore[arg-type]
    jsonl = "\n".join(
        json.dumps(r)
        for r in [
            {"id": "cat", "text": "a cat"},
            {"image": "https://example.com/x.png"},
            {"id": 7, "text": "t", "image": "https://example.com/y.png"},
            {"id": "m", "multi_images": ["https://a/1.png", "https://a/2.png"]},
        ]
    )
    lines = kind.read(job("dashscope"), write(tmp_path, jsonl), 100)
    assert [x.custom_id for x in lines] == ["cat", "1", "7", "m"]
    assert lines[2].payload == {"text": "t", "image": "https://example.com/y.png"}
    assert lines[3].items == 2
    csv = "id,text,image\na,hello,\nb,,https://example.com/z.png\n"
    rows = kind.read(job("dashscope"), write(tmp_path, csv, "in.csv"), 100)
    assert [(x.custom_id, x.payload) for x in rows] == [
        ("a", {"text": "hello"}),
        ("b", {"image": "https://example.com/z.png"}),
    ]


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}', "duplicate_id"),
        ("name,age\nx,1\n", "invalid_file"),
        (b"\xff\xfe\x00bad", "invalid_file"),
        ('{"id": "a", "text": "x"}\n{oops', "invalid_json_line"),
    ],
)
def test_dashscope_tables_that_cannot_run(tmp_path, text, code):
    with pytest.raises(MalformedInput) as caught:
        DashScopeTasks(None, None, None).read(job("dashscope"), write(tmp_path, text), 100)  # type: ignore[arg-type]
    assert caught.value.code == code


def test_dashscope_result_line_is_the_route_answer_with_the_id():
    kind = DashScopeTasks(None, None, None)  # type: ignore[arg-type]
    body = b'{"output":{"embeddings":[]},"usage":{"input_tokens":3},"request_id":"r"}'
    out = orjson.loads(kind.output_line(job("dashscope"), "row-1", body, 200, "r"))
    assert out == {
        "id": "row-1",
        "output": {"embeddings": []},
        "usage": {"input_tokens": 3},
        "request_id": "r",
    }
