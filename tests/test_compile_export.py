"""A transformer converted with every preset (and with the quantized-embedding / fused-GELU
options) traces with torch.compile(fullgraph=True) and torch.export, giving eager's output."""
import copy

import pytest
import torch

import sparseq
from sparseq.recipes import PRESETS

transformers = pytest.importorskip("transformers")


def tiny_bert():
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    torch.manual_seed(0)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def batches():
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[0, 9:] = 0
    return [{"input_ids": torch.randint(0, 100, (4, 12), generator=gen), "attention_mask": mask} for _ in range(2)]


RECIPES = dict(PRESETS, **{"w8a8+int4 embeddings": [{"quantize": {"scheme": "w8a8", "embeddings": 4}}]})


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_converted_bert_compiles_and_exports(recipe):
    calib = batches()
    model = sparseq.compress(tiny_bert(), RECIPES[recipe], calib_data=calib, progress=False)
    inputs = calib[0]
    with torch.no_grad():
        eager = model(**inputs).last_hidden_state
        compiled = torch.compile(copy.deepcopy(model), fullgraph=True)  # inductor, as deployed
        torch.testing.assert_close(compiled(**inputs).last_hidden_state, eager, rtol=1e-5, atol=1e-5)
        csr = any(getattr(module, "format", None) == "csr" for module in model.modules())
        if csr and not sparseq.HAS_EXT:
            # Without the compiled ops, the CSR layers run sparseq._ref's Python loop over row
            # segments, whose bounds torch.export cannot trace; the compiled ops export (above).
            pytest.skip("torch.export of CSR layers needs the compiled sparseq ops")
        exported = torch.export.export(model, (), dict(inputs))
        torch.testing.assert_close(exported.module()(**inputs).last_hidden_state, eager, rtol=1e-5, atol=1e-5)
