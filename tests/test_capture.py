import pytest
import torch
from tiny import ARCHS, model
from transformers import DynamicCache

from headprof import capture
from headprof.models import with_cache


@pytest.mark.parametrize("arch", ARCHS + ["gpt_oss"])  # gpt-oss: a learned sink joins each row's softmax
def test_capture_rows_equal_eager_attention(arch):
    m = model(arch)
    capture.attach(m)
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(1))
    rows: dict[int, torch.Tensor] = {}
    with torch.no_grad(), capture.AttentionCapture(lambda layer, p: rows.__setitem__(layer, p), last_n=5):
        ours = m(ids).logits
    with torch.no_grad(), capture.implementation(m, "eager"):
        ref = m(ids, output_attentions=True)
    assert torch.allclose(ours, ref.logits, atol=1e-5)
    assert sorted(rows) == list(range(m.config.num_hidden_layers))
    for layer, att in enumerate(ref.attentions):
        assert rows[layer].shape == (1, m.config.num_attention_heads, 5, 40)
        assert torch.allclose(rows[layer], att[:, :, -5:, :].float(), atol=1e-6), f"layer {layer}"


@pytest.mark.parametrize("arch", ARCHS + ["gpt_oss"])
def test_capture_during_decode_with_cache(arch):
    m = model(arch)
    capture.attach(m)
    ids = torch.randint(0, 96, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # a full cache keeps key index == position, also on sliding-window layers
        cache = DynamicCache()
        m(ids[:, :-1], **with_cache(m, cache), use_cache=True)
        rows: dict[int, torch.Tensor] = {}
        with capture.AttentionCapture(lambda layer, p: rows.__setitem__(layer, p)):
            m(ids[:, -1:], **with_cache(m, cache), use_cache=True)
        with capture.implementation(m, "eager"):
            ref = m(ids, output_attentions=True)
    for layer, att in enumerate(ref.attentions):
        assert torch.allclose(rows[layer][0, :, 0], att[0, :, -1].float(), atol=1e-6), f"layer {layer}"


def test_no_capture_outside_context():
    m = model("llama")
    capture.attach(m)
    calls = []
    cap = capture.AttentionCapture(lambda layer, p: calls.append(layer))
    with torch.no_grad():
        m(torch.zeros(1, 4, dtype=torch.long))
    assert calls == []
    with torch.no_grad(), cap:
        m(torch.zeros(1, 4, dtype=torch.long))
    assert calls == [0, 1, 2]
