"""The LLaVA benchmark's oracle (``scripts/bench_llava.py``): transformers' own Llama, split where the vision-token
count changes, sharing one copy of the benchmarked model's weights."""

from __future__ import annotations

import torch

from tests.script_loader import load_script


def test_the_oracle_split_into_groups_computes_what_the_whole_upstream_model_computes():
    from models.llava.modeling_llava import LlavaForConditionalGeneration
    from models.tiny.llava import tiny_llava_dir

    bench = load_script("bench_llava")
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir()).eval()
    oracle = bench.LlavaOracle(model)
    layers = model.config.text_config.num_hidden_layers
    assert oracle.groups([64] * 2 + [30] * 3 + [10] * (layers - 5)) == [(0, 2, 64), (2, 5, 30), (5, layers, 10)]
    embeds = torch.randn(2, 12 + 64, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.model.language_model(inputs_embeds=embeds).last_hidden_state
        split = oracle.language_model(embeds, 12, [64] * layers)  # one group
        assert torch.allclose(split, expected, atol=1e-5)
        # cut in two without dropping: the second part sees the first one's output rows (its own cache and positions)
        oracle.parts.clear()
        oracle.groups = lambda tokens: [(0, 3, 64), (3, layers, 64)]
        torch.testing.assert_close(oracle.language_model(embeds, 12, [64] * layers), expected, atol=1e-5, rtol=1e-5)
        dropped = bench.LlavaOracle(model).language_model(embeds, 12, [64] * 3 + [20] * (layers - 3))
    assert dropped.shape == (2, 12 + 20, model.config.text_config.hidden_size)
    assert oracle.full.layers[0].self_attn.q_proj.weight.data_ptr() != \
        model.model.language_model.layers[0].self_attn.q_proj.weight.data_ptr()  # a copy: the fork is not run
    assert type(oracle.full).__module__ == "transformers.models.llama.modeling_llama"
