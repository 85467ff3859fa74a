"""Pruner weights saved and loaded on their own."""

import pytest
import torch
from core_fixtures import inputs, make_batch, make_method, make_model

from lightning_lvp.adapter import TextDims
from lightning_lvp.io import load_pruners, save_pruners


def test_round_trip_gives_identical_outputs(tmp_path):
    model = make_model()
    save_pruners(model.method, tmp_path)
    assert (tmp_path / "pruners.safetensors").stat().st_size < 1_000_000
    loaded = load_pruners(tmp_path, model.dims)
    batch = make_batch([(3, 6, 0)])
    with torch.no_grad():
        a = model.forward_infer(**inputs(batch)).hidden
        model.method = loaded
        b = model.forward_infer(**inputs(batch)).hidden
    assert torch.equal(a, b)
    with pytest.raises(FileExistsError, match="already holds pruners"):
        save_pruners(model.method, tmp_path)
    save_pruners(model.method, tmp_path, overwrite=True)


def test_mismatched_model_is_a_clear_error(tmp_path):
    model = make_model(make_method())
    save_pruners(model.method, tmp_path)
    other = TextDims(64, 4, 4, 16, 64, 99)
    with pytest.raises(ValueError, match="hidden_size=32, but this LLaVA has hidden_size=64"):
        load_pruners(tmp_path, other)
    deeper = TextDims(32, 8, 4, 8, 64, 99)
    with pytest.raises(ValueError, match="num_layers=4, but this LLaVA has num_layers=8"):
        load_pruners(tmp_path, deeper)
    with pytest.raises(FileNotFoundError, match="pruners.json"):
        load_pruners(tmp_path / "missing", model.dims)


def test_pruners_for_another_base_name_both_folders(tmp_path):
    """PrunedLlava.from_pretrained: pruners trained for another LLM width fail naming the base and the pruners."""
    from lightning_lvp.model import PrunedLlava
    from lightning_lvp.tiny import TinyLlavaSpec, build_tiny_llava

    model = make_model()  # hidden 32
    save_pruners(model.method, tmp_path / "pruners")
    build_tiny_llava(TinyLlavaSpec(hidden_size=64, num_heads=4, num_kv_heads=4)).save_pretrained(tmp_path / "base64")
    with pytest.raises(ValueError) as err:
        PrunedLlava.from_pretrained(str(tmp_path / "base64"), pruners=str(tmp_path / "pruners"))
    message = str(err.value)
    assert str(tmp_path / "pruners") in message and str(tmp_path / "base64") in message and "hidden_size" in message
