"""Shared fixtures: no network, and a tiny random LLaVA built once per session."""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import pytest

# huggingface_hub reads HF_HUB_OFFLINE once, when it is first imported, which may happen while
# test modules are collected (before any fixture runs): the session is offline from the start.
os.environ["HF_HUB_OFFLINE"] = "1"

TINY_CORPUS = [
    "Какого цвета круг?", "Сколько квадратов на картинке?", "Где находится треугольник?",
    "Есть ли на картинке синий круг?", "Ответь одним словом.", "да", "нет", "красный",
    "синий", "зелёный", "жёлтый", "слева", "справа", "посередине", "один", "два", "три",
    "На картинке два красных круга и синий квадрат.", "Круг красного цвета.",
    "Опиши, что изображено на картинке.", "Треугольник находится слева, он зелёный.",
    "Выбери правильный вариант ответа буквой.", "There are several options:", "A. B. C. D.",
]


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to open an internet connection fails the test."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise RuntimeError(f"tests must not use the network (tried {address!r})")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread, and far faster on a shared, busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """A random, untrained tiny LLaVA + processor saved with save_pretrained."""
    from core.demo.tiny_model import build_tiny_llava, train_tokenizer

    path = tmp_path_factory.mktemp("tiny-llava")
    tokenizer = train_tokenizer(TINY_CORPUS * 4)
    model, processor = build_tiny_llava(tokenizer, seed=0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_vlm_factory(tiny_vlm_dir):
    """Load a fresh VLM from the tiny model's folder through ``core.model.load_vlm``.

    Call it with ``load_vlm`` keyword arguments, e.g. ``tiny_vlm_factory(options=...)``; each
    call returns a new model, so a test may train or attach adapters to it.
    """
    from core.model import load_vlm

    def make(**kwargs):
        return load_vlm(tiny_vlm_dir, **kwargs)

    return make


@pytest.fixture(scope="session")
def tiny_vlm(tiny_vlm_factory):
    """One shared tiny VLM for read-only use (do not train it or attach adapters)."""
    return tiny_vlm_factory()


@pytest.fixture(scope="session")
def load_bench():
    """Loads a script of bench/ (not a package) as a module: ``load_bench("cuda_check")``."""
    return _load_bench


def _load_bench(name: str):
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
