"""Quality on real text, through the cache: perplexity, KL divergence against a reference, needle retrieval."""

from .corpus import Corpus, default_corpus, load_corpus
from .kl import KLResult, kl_divergence, kl_from_logits
from .needle import NeedleResult, needle_test, plot_needle
from .perplexity import EvalError, Perplexity, perplexity, perplexity_at, plan_windows, token_nll
from .variant import VariantError, share_weights, with_kv_quant, with_window

__all__ = ["Corpus", "EvalError", "KLResult", "NeedleResult", "Perplexity", "VariantError", "default_corpus",
           "kl_divergence", "kl_from_logits", "load_corpus", "needle_test", "perplexity", "perplexity_at",
           "plan_windows", "plot_needle", "share_weights", "token_nll", "with_kv_quant", "with_window"]
