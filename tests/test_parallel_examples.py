"""`loop run` under torchrun: questions a strategy passes explicitly reach the serving processes.

Benchmark records travel as ids (every process loaded them); a strategy's own questions, such
as context distillation's training questions, are in no process's benchmark data, so they
travel whole, with their images, and every process shards and answers the same questions.
"""

from __future__ import annotations

import pickle

from PIL import Image

from core.data import load_image
from core.distributed import _fingerprint, shard
from loop.parallel import _Server, questions_message


class _NoModel:
    """A serving process's model, of which these tests use only the adapter switch."""

    def set_adapter(self, name):
        self.active = name


def _records():
    img = Image.new("RGB", (8, 8), (200, 10, 10))
    return [{"benchmark": "gqa_ru", "id": f"t{i}", "imageId": f"img{i // 2}", "question": "Что?",
             "answer": "да", "_image": lambda im=img: im} for i in range(4)]


def _server(records):
    server = _Server()
    server.vlm = _NoModel()
    server.by_id = {"gqa_ru": {r["id"]: r for r in records}, "mmbench_ru": {}}
    return server


def test_benchmark_records_travel_as_ids():
    records = _records()
    msg = questions_message(records[1:3], records)
    assert msg == {"ids": ["t1", "t2"]}
    _, got = _server(records).prepare({"adapter": None, "benchmark": "gqa_ru", **msg})
    assert got == records[1:3]


def test_a_strategys_own_questions_travel_whole_with_their_images(tmp_path):
    records = _records()
    paths = []
    for k, colour in enumerate([(0, 0, 255), (0, 255, 0)]):
        paths.append(tmp_path / f"n{k}.png")
        Image.new("RGB", (8, 8), colour).save(paths[-1])
    own = [{"benchmark": "gqa_ru", "id": f"distill-short-n{k}{j}", "imageId": f"n{k}",
            "question": "Какого цвета круг?", "answer": "синий", "types": {"detailed": "c"},
            "_image": lambda p=str(paths[k]): p} for k in range(2) for j in range(2)]
    msg = questions_message(own, records)
    assert "ids" not in msg
    msg = pickle.loads(pickle.dumps({"adapter": None, "benchmark": "gqa_ru", **msg}))  # sent
    _, got = _server(records).prepare(msg)
    public = [{k: v for k, v in e.items() if not k.startswith("_")} for e in own]
    assert [{k: v for k, v in e.items() if not k.startswith("_")} for e in got] == public
    assert [load_image(e)[0].tobytes() for e in got] == [load_image(e)[0].tobytes() for e in own]
    # every process shards and fingerprints the same questions as rank 0
    assert shard(got, 2) == shard(own, 2) and _fingerprint(got) == _fingerprint(own)


def test_an_unreadable_image_of_an_own_question_is_missing_on_every_process(tmp_path):
    own = [{"benchmark": "gqa_ru", "id": "distill-x", "imageId": "x", "question": "Что?",
            "answer": "да", "_image": lambda: str(tmp_path / "absent.png")}]
    msg = pickle.loads(pickle.dumps(questions_message(own, [])))
    _, got = _server([]).prepare({"adapter": None, "benchmark": "gqa_ru", **msg})
    assert load_image(got[0]) == (None, False) == load_image(own[0])
