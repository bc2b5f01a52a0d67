"""Analytic FLOPs against DiT's published GMACs and against torch's FLOP counter."""

from __future__ import annotations

import os

import pytest
from numerics import measured_macs

import model
from model.flops import flops_per_image

# DiT paper, Table 4: forward GMACs at 256 px (latent 32x32x4).
PUBLISHED_GMACS = {"S": 6.06, "B": 23.01, "L": 80.71, "XL": 118.64}


@pytest.mark.parametrize("size", list(PUBLISHED_GMACS))
def test_forward_flops_match_dit_paper(size: str) -> None:
    flops = flops_per_image(model.make_config(f"DiT-{size}/2"), train=False)
    expected = 2 * PUBLISHED_GMACS[size] * 1e9
    assert abs(flops - expected) / expected < 0.01, f"DiT-{size}/2: {flops / 2e9:.2f} GMACs"


def test_training_flops_structure() -> None:
    dit = model.make_config("DiT-XL/2")
    assert flops_per_image(dit, train=True) == 3 * flops_per_image(dit, train=False)
    sd = model.make_config("SD-DiT-XL/2")
    # Same backbone, so the same inference cost; training adds heads and a forward teacher.
    assert flops_per_image(sd, train=False) == flops_per_image(dit, train=False)
    assert flops_per_image(sd, train=True) > flops_per_image(dit, train=True) * 0.9
    masked = model.make_config("DiT-XL/2", mask_ratio=0.5)
    assert flops_per_image(masked, train=True) < 0.6 * flops_per_image(dit, train=True)




@pytest.mark.parametrize("name, overrides", [
    ("DiT-tiny", {}),
    ("SD-DiT-tiny", {}),
    ("MaskDiT-tiny", {}),
    ("SD-DiT-tiny", dict(separate_decoder=True, decoder_width=64, decoder_num_heads=2)),
])
def test_analytic_count_matches_torch_flop_counter(name: str, overrides: dict) -> None:
    # 'math' attention: its einsums are counted on CPU, where SDPA's kernel is not.
    net = model.build(name, attention="math", input_size=16, hidden_size=64, depth=6,
                      num_heads=2, **overrides)
    assert flops_per_image(net, train=False) / 2 == measured_macs(net, train=False)
    # Training: the one deviation is the patch convolution's input gradient (not computed).
    measured = measured_macs(net, train=True)
    assert abs(flops_per_image(net, train=True) / 2 - measured) / measured < 0.005


def test_method_table_is_computed_and_in_the_method_card() -> None:
    from model.flops import format_method_table, method_table

    rows = method_table()
    assert [r["model"] for r in rows] == [f"{m}-{s}" for m in model.METHODS
                                          for s in ("S/2", "B/2", "XL/2")]
    by_name = {r["model"]: r for r in rows}
    assert abs(by_name["DiT-XL/2"]["forward_gflops"] - 2 * 118.64) / (2 * 118.64) < 0.01
    assert round(by_name["MaskDiT-XL/2"]["params_m"], 1) == 730.1
    for r in rows:
        cfg = model.make_config(r["model"])
        assert r["train_gflops"] == flops_per_image(cfg, train=True) / 1e9
        assert r["encoder_tokens"] == model.encoder_patches(cfg)
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "method.md")
    with open(path) as f:
        card = f.read()
    table = card.split("<!-- method-table:begin -->\n")[1].split("\n<!-- method-table:end -->")[0]
    assert table == format_method_table(rows), "docs/method.md is stale: run python -m model"
