"""The kinds table (kvlab/kinds) is where a kind's name is written: a per-kind decision elsewhere (an engine's rule,
a diagram's colour or label, a retrofit's applicability, a default) reads the kind's record instead.

Every string constant of kvlab's code outside kvlab/kinds that equals a kind's name is counted, file by file, and
compared with the allow-list below, where each entry says why the name legitimately stays. A new one fails this test:
move the decision into the record (docs/adding-a-technique.md), or, if the name is data, add it here with the reason.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

from kvlab import kinds

ROOT = Path(__file__).resolve().parents[1] / "kvlab"

ALLOWED: dict[str, tuple[int, str]] = {  # file under kvlab/ -> (count, why the kind's name is written there)
    # presets are data: each names the kind of its layers (ZAYA1 with CCA; its GQA and MHA counterparts)
    "presets/zaya.py": (3, "zaya1-8b / -gqa / -mha name the kind of their layers"),
    # a family translates its checkpoint's layer types to kinds and back: that mapping is the family's own data
    "families/deepseek_v4.py": (10, "V4's layer_types <-> csa / hca / swa (which get a compressor, an indexer)"),
    "families/zaya.py": (2, "ZayaForCausalLM layers are cca, both directions"),
    "families/deepseek_v3.py": (1, "DeepseekV3ForCausalLM exports mla layers"),
    # a builder of one kind's layers (torch-free, for presets and families)
    "specs.py": (1, "mla_layer builds an mla LayerSpec"),
    # the MLA retrofit: "mla" is the retrofit's technique name (CLI option parser, its error prefixes, its module)
    # and the kind it converts to
    "retrofit/techniques.py": (4, "the 'mla' technique: its name and its option parser's error prefixes"),
    "retrofit/__init__.py": (1, "the lazily imported module kvlab/retrofit/mla.py"),
    "retrofit/mla.py": (3, "its technique name (Kind.retrofits) and the kind of the layers it writes"),
    # export writes a retrofitted model as a transformers architecture: Llama for plain gqa layers, DeepseekV3 for
    # mla; the choice of architecture is the exporter's (the families' to_hf_config), not a property of a kind
    "retrofit/export.py": (3, "which transformers architecture expresses the model"),
    # a word of the window-pattern grammar ('3swa+1global'), not the DeepSeek V4 kind
    "budget.py": (1, "'swa' as an alias of 'sliding' in a window pattern"),
    # (kvlab/config.py's default kind is kinds.DEFAULT; engines, diagrams, retrofits and the pre-flight read records)
}


def kind_name_constants(root: Path = ROOT) -> Counter[str]:
    """``{file: count}`` of string constants equal to a kind's name in ``root``'s code, outside kvlab/kinds."""
    names = set(kinds.KINDS)
    out: Counter[str] = Counter()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("kinds/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                out[rel] += 1
    return out


def test_kind_names_outside_the_table_are_only_the_allowed_ones():
    found = kind_name_constants()
    allowed = {f: n for f, (n, _) in ALLOWED.items()}
    grown = {f: (n, allowed.get(f, 0)) for f, n in found.items() if n > allowed.get(f, 0)}
    assert not grown, (f"kind names written outside kvlab/kinds (file: (found, allowed)): {grown}; read the kind's "
                       "record instead (tests/test_kind_names.py says how)")
    shrunk = {f: (found.get(f, 0), n) for f, n in allowed.items() if found.get(f, 0) < n}
    assert not shrunk, f"fewer kind names than allowed (file: (found, allowed)), lower the allow-list: {shrunk}"


def test_the_count_sees_a_kind_name_written_in_code(tmp_path):
    """The counter is not blind: a rule keyed on a kind's name in a new file is found (and a docstring or a longer
    string holding the name is not a rule)."""
    (tmp_path / "rule.py").write_text('"""Speaks of mla."""\n\ndef f(x):\n    return x.attention == "mla" or "cca full"\n')
    (tmp_path / "kinds").mkdir()
    (tmp_path / "kinds" / "table.py").write_text('NAMES = ("gqa", "cca")\n')
    assert kind_name_constants(tmp_path) == Counter({"rule.py": 1})
