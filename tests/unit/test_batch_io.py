"""Batch job input reading (folders by content, tables) and the part-file output (atomic parts,
resume bookkeeping, one job per OUT), without models."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmembed.batch.inputs import InputError, read_inputs, resolve_ref
from mmembed.batch.local import read_local
from mmembed.batch.output import OutputError, PartWriter, Row, read_embeddings
from mmembed.errors import ApiError
from tests.media_util import make_image, make_video


def write(path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)


def test_folder_finds_media_by_content_not_name(tmp_path):
    root = tmp_path / "media"
    write(root / "a.png", make_image("PNG"))
    write(root / "deep" / "er" / "photo_without_suffix", make_image("JPEG"))
    write(root / "clip.bin", make_video("MP4", seconds=1.0))
    write(root / "fake.jpg", "not an image at all")
    write(root / "empty.png", b"")
    got = read_inputs([str(root)])
    by_id = {t.id: t for t in got.tasks}
    assert sorted(by_id) == ["a.png", "clip.bin", "deep/er/photo_without_suffix"]
    assert by_id["clip.bin"].kind == "video" and by_id["a.png"].kind == "image"
    assert by_id["a.png"].item == {"image": str((root / "a.png").resolve())}
    assert got.skipped_files == 2


def test_tables_csv_jsonl_parquet(tmp_path):
    write(tmp_path / "pics" / "x.png", make_image("PNG"))
    write(
        tmp_path / "t.csv",
        "id,text,image,other\n007,12,,z\nimg,,pics/x.png,z\nurl,,https://example.com/a.png,z\n"
        "none,,,z\n",
    )
    rows = [
        {"id": 1, "text": "from jsonl"},
        {"id": 2, "video": "data:video/mp4;base64,AAAA"},
        {"id": 3, "text": "a caption", "image": "/abs/p.png"},
    ]
    write(tmp_path / "t.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    pq.write_table(pa.table({"id": ["p1"], "image": ["file://pics/x.png"]}), tmp_path / "t.parquet")
    got = read_inputs([str(tmp_path / f) for f in ("t.csv", "t.jsonl", "t.parquet")])
    by_id = {t.id: t for t in got.tasks}
    assert by_id["007"].item == {"text": "12"}  # strings stay strings
    assert by_id["img"].item == {"image": str((tmp_path / "pics" / "x.png").resolve())}
    assert by_id["img"].source == "pics/x.png"
    assert by_id["url"].item == {"image": "https://example.com/a.png"}
    assert by_id["none"].error and by_id["none"].kind == "none"
    assert by_id["1"].item == {"text": "from jsonl"}
    assert by_id["2"].kind == "video"
    assert by_id["3"].kind == "vl"  # text and image in one row: one fused item
    assert by_id["p1"].item == {"image": str((tmp_path / "pics" / "x.png").resolve())}


def test_duplicate_ids_first_wins(tmp_path):
    write(tmp_path / "a.csv", "id,text\nk,first\nk,second\n")
    write(tmp_path / "b.jsonl", '{"id": "k", "text": "third"}\n{"id": "m", "text": "m"}\n')
    got = read_inputs([str(tmp_path / "a.csv"), str(tmp_path / "b.jsonl")])
    assert [(t.id, t.item["text"]) for t in got.tasks] == [("k", "first"), ("m", "m")]
    assert got.duplicates == 2


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.csv", "name,text\nx,y\n", "no 'id' column"),
        ("a.csv", "id,caption\nx,y\n", "none of the columns"),
        ("a.jsonl", '{"id": 1, "text": "ok"}\n{"text": "no id"}\n', "row 2 has no id"),
        ("a.jsonl", '{"id": 1, "text": "ok"}\nnot json\n', "line 2 is not JSON"),
        ("a.parquet", "not parquet", "cannot be read"),
        ("notes.txt", "hello", "not a folder, a table"),
    ],
)
def test_unreadable_inputs_are_refused_up_front(tmp_path, name, content, message):
    write(tmp_path / name, content)
    with pytest.raises(InputError, match=message):
        read_inputs([str(tmp_path / name)])
    with pytest.raises(InputError, match="no such file"):
        read_inputs([str(tmp_path / "missing")])


def test_resolve_ref_and_read_local(tmp_path):
    assert resolve_ref("data:image/png;base64,AA", tmp_path) == "data:image/png;base64,AA"
    assert resolve_ref("HTTPS://x.org/a", tmp_path) == "HTTPS://x.org/a"
    assert resolve_ref("a/../b.png", tmp_path) == str(tmp_path / "b.png")
    write(tmp_path / "f", b"12345")
    assert read_local(str(tmp_path / "f"), 5) == b"12345"
    with pytest.raises(ApiError) as big:
        read_local(str(tmp_path / "f"), 4)
    assert big.value.error.code == "BadRequest.TooLarge"
    with pytest.raises(ApiError) as missing:
        read_local(str(tmp_path / "nope"), 4)
    assert missing.value.error.code == "InvalidURL"


def rows(ids, dim=4):
    return [
        Row(i, "text", "s", np.full(dim, n, np.float32), input_tokens=n, image_tokens=0)
        for n, i in enumerate(ids)
    ]


def test_parts_are_written_atomically_and_resumed(tmp_path):
    out = tmp_path / "out"
    writer = PartWriter(out, "m", 4)
    writer.write(rows(["a", "b"]))
    writer.write([Row("c", "image", "p", None, error="InvalidURL: nope")])
    # a second job on the same OUT is refused while this one holds it
    with pytest.raises(OutputError, match="another"):
        PartWriter(out, "m", 4)
    writer.close()
    assert sorted(os.listdir(out)) == [
        ".mmembed-embed.lock",
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    write(out / ".part-00002.tmp", b"half a part from a killed job")

    again = PartWriter(out, "m", 4)
    assert again.done == {"a", "b", "c"} and again.next_part == 2
    assert not (out / ".part-00002.tmp").exists()
    again.write(rows(["d"]))
    again.close()

    table = read_embeddings(out)
    assert table.column("id").to_pylist() == ["a", "b", "c", "d"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    emb = table.column("embedding").to_pylist()
    assert emb[1] == [1.0] * 4 and emb[2] is None
    assert table.column("error").to_pylist()[2] == "InvalidURL: nope"

    with pytest.raises(OutputError, match="model m at dimension 4"):
        PartWriter(out, "m", 8)


def test_read_embeddings_keeps_the_first_copy_of_an_id(tmp_path):
    writer = PartWriter(tmp_path, "m", 4)
    writer.write(rows(["a", "b"]))
    writer.write(rows(["b", "c"])[::-1])  # b again, with other values
    writer.close()
    table = read_embeddings(tmp_path)
    assert table.column("id").to_pylist() == ["a", "b", "c"]
    assert table.column("embedding").to_pylist()[1] == [1.0] * 4


def test_progress_bar_on_a_terminal_and_log_lines_otherwise(caplog, capsys, monkeypatch):
    import logging

    from mmembed.batch.progress import Progress

    monkeypatch.setattr(logging.getLogger("mmembed"), "propagate", True)  # to caplog

    bar = Progress(4, tty=True)
    bar.update(2)
    bar.update(1, errors=1)
    bar.close()
    assert "3/4" in capsys.readouterr().err and bar.errors == 1

    caplog.set_level("INFO", logger="mmembed.batch")
    lines = Progress(10, interval_s=0.0, tty=False)
    lines.update(5, errors=2)
    assert "embedded 5/10 (50.0%)" in caplog.text and "items/s, ETA" in caplog.text
    assert "2 errors" in caplog.text
