"""A model under a changed config keeps its weights: :func:`convert` builds the new model, carries every tensor that
still applies, takes the tensors a conversion derived (pruned, factorised, ...) and initialises the rest, and says
which of the three each tensor was and what was dropped (:class:`Report`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import RetrofitError
from ..model import Model, _init_rule


@dataclass
class Report:
    """What a conversion did to the weights.

    carried: tensors copied unchanged (same name, same shape); derived: name -> how it was computed from the source
    (``"q_proj rows of heads [0, 2]"``, ``"joint SVD of k_proj/v_proj, rank 64"``); initialised: name -> rule for
    tensors the source has nothing for (``"normal(0, 0.02)"``, ``"ones"``); dropped: source tensors the new model
    does not use (a sharing layer's k_proj, pruned heads' rows...). ``technique`` names the conversion and its
    options; ``notes`` say what is exact and what is approximate.
    """

    technique: str
    source: str
    target: str
    carried: list[str] = field(default_factory=list)
    derived: dict[str, str] = field(default_factory=dict)
    initialised: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One line: counts of carried / derived / initialised / dropped tensors."""
        return (f"{self.technique}: {len(self.carried)} tensors carried, {len(self.derived)} derived, "
                f"{len(self.initialised)} initialised, {len(self.dropped)} dropped")


@dataclass(frozen=True)
class Derived:
    """A tensor a conversion computed for the new model: its value, how (the Report's text) and the source tensors it
    was computed from (they count as used, not dropped)."""

    value: torch.Tensor
    how: str
    sources: tuple[str, ...]


@dataclass
class Converted:
    """A converted model and its :class:`Report`."""

    model: Model
    report: Report


def convert(model: Model, config: ModelConfig, derived: dict[str, Derived] | None = None,
            technique: str = "convert", init_std: float = 0.02, seed: int = 0) -> Converted:
    """``model`` rebuilt under ``config`` (validated), on the same device and dtype.

    Every tensor of the new model is, in this order: given in ``derived`` (name -> :class:`Derived`); carried from
    ``model`` when the name exists there with the same shape; or initialised as :meth:`Model.from_config` does
    (normal(0, ``init_std``) matrices, declared ones/zeros for norms and gates), seeded by ``seed``. Source tensors
    used by neither are reported as dropped. A derived tensor of the wrong shape, or naming a source the model does
    not have, is a RetrofitError naming it.
    """
    config.validate()
    derived = derived or {}
    p = next(model.parameters())
    with torch.device("meta"):
        new = Model(config)
    new.to_empty(device=p.device)
    new.to(p.dtype).eval()
    init_rules = _init_rules(new, init_std)
    gen = torch.Generator().manual_seed(seed)
    params = dict(new.named_parameters())
    src = dict(model.state_dict())
    report = Report(technique, model.config.name, config.name)
    used: set[str] = set()
    with torch.no_grad():
        for name, t in new.state_dict().items():
            if name in derived:
                d = derived[name]
                if tuple(d.value.shape) != tuple(t.shape):
                    raise RetrofitError(f"{technique}: derived tensor {name!r} has shape {list(d.value.shape)}, the "
                                        f"converted model expects {list(t.shape)}")
                missing = [s for s in d.sources if s not in src]
                if missing:
                    raise RetrofitError(f"{technique}: derived tensor {name!r} names source(s) {missing} the model "
                                        "does not have")
                t.copy_(d.value)
                report.derived[name] = d.how
                used.update(d.sources)
            elif name in src and tuple(src[name].shape) == tuple(t.shape):
                t.copy_(src[name])
                report.carried.append(name)
                used.add(name)
            elif name in params:
                rule = init_rules[name]
                if rule.startswith("normal"):
                    t.copy_(torch.randn(t.shape, generator=gen) * init_std)
                else:
                    t.fill_(1.0 if rule == "ones" else 0.0)
                report.initialised[name] = rule
            else:
                raise RetrofitError(f"{technique}: buffer {name!r} of the converted model has no source; the "
                                    "conversion must derive it")
    unknown = set(derived) - set(new.state_dict())
    if unknown:
        raise RetrofitError(f"{technique}: derived tensors {sorted(unknown)} do not exist in the converted model")
    report.dropped = [n for n in src if n not in used]
    new.train(model.training)
    return Converted(new, report)


def _init_rules(model: Model, std: float) -> dict[str, str]:
    rules = {}
    for mod_name, mod in model.named_modules():
        for n, _ in mod.named_parameters(recurse=False):
            rule = _init_rule(mod, n)
            rules[f"{mod_name}.{n}" if mod_name else n] = f"normal(0, {std})" if rule == "normal" else rule
    return rules
