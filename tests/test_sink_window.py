"""The bundled sink + sliding-window attention: what each token can see."""

from __future__ import annotations

import pytest
import torch

import tokenlean
from tokenlean.attention.sink_window import sink_window_mask
from tokenlean.testing import tiny_model

SINKS, WINDOW, LAYERS = 2, 4, 3  # receptive field of the last token: sinks + LAYERS * (WINDOW - 1) back


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def test_mask_pattern():
    positions = torch.arange(8)[None]
    mask = sink_window_mask(positions, positions, sink_tokens=1, window=3)[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 0, 1, 1, 1, 0, 0, 0],
            [1, 0, 0, 1, 1, 1, 0, 0],
            [1, 0, 0, 0, 1, 1, 1, 0],
            [1, 0, 0, 0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tokens_outside_sinks_and_window_are_invisible(attn):
    model = tiny_model("llama", attn_implementation=attn)
    ids = torch.randint(3, 100, (1, 20), generator=torch.Generator().manual_seed(1))
    last = ids.shape[1] - 1
    far = last - LAYERS * (WINDOW - 1) - 1  # beyond the last token's receptive field, not a sink
    assert far >= SINKS

    def perturbed(pos):
        out = ids.clone()
        out[0, pos] = (out[0, pos] + 7) % 100 + 3
        return out

    base = _logits(model, ids)[0, last]
    assert not torch.allclose(base, _logits(model, perturbed(far))[0, last]), "unpatched model should see it"
    with tokenlean.patch(model, "sink_window", sink_tokens=SINKS, window=WINDOW):
        ref = _logits(model, ids)[0, last]
        assert torch.allclose(ref, _logits(model, perturbed(far))[0, last], atol=1e-6)
        assert not torch.allclose(ref, _logits(model, perturbed(0))[0, last], atol=1e-4)  # a sink
        assert not torch.allclose(ref, _logits(model, perturbed(last - 1))[0, last], atol=1e-4)  # in window


def test_sdpa_and_eager_agree_under_patch():
    ids = torch.randint(3, 100, (2, 18), generator=torch.Generator().manual_seed(2))
    outs = []
    for attn in ("sdpa", "eager"):
        model = tiny_model("qwen2", attn_implementation=attn)
        with tokenlean.patch(model, "sink_window", sink_tokens=SINKS, window=WINDOW):
            outs.append(_logits(model, ids))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_left_padding_counts_positions_from_the_first_real_token():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 16), generator=torch.Generator().manual_seed(3))
    pad = 5
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], dim=1)
    batch = torch.cat([padded, torch.randint(3, 100, (1, 16 + pad))], dim=0)
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    with tokenlean.patch(model, "sink_window", sink_tokens=SINKS, window=WINDOW):
        alone = _logits(model, ids)[0]
        in_batch = _logits(model, batch, attention_mask=mask)[0, pad:]
    assert torch.allclose(alone, in_batch, atol=1e-5)


def test_incremental_decoding_matches_full_forward():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 10), generator=torch.Generator().manual_seed(4))
    with tokenlean.patch(model, "sink_window", sink_tokens=SINKS, window=WINDOW):
        generated = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
        )
        full = _logits(model, generated)
    # each generated token is the argmax of the full (uncached) forward at the step before it
    predicted = full[0, ids.shape[1] - 1 : -1].argmax(-1)
    assert torch.equal(predicted, generated[0, ids.shape[1] :])
