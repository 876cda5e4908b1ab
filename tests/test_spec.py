from dataclasses import dataclass

import pytest

from fxopt import spec
from fxopt.errors import SpecError
from fxopt.pass_manager import Pass, register, registered_passes


@register
@dataclass
class WithOptions(Pass):
    """A pass with one option of each kind, for round trips."""

    name = "test_with_options"
    depth: int = 1
    ratio: float = 0.5
    strict: bool = False
    mode: str = "auto"

    def run(self, gm, ctx):
        from collections import Counter

        return Counter()


SPEC = [
    "canonicalize",
    {"name": "test_with_options", "depth": 3, "ratio": 0.25, "strict": True, "mode": "a b,c"},
    {"fixpoint": ["fold_bn", {"name": "test_with_options", "depth": 2}], "max_iters": 4},
]
TEXT = 'canonicalize,test_with_options{depth=3,ratio=0.25,strict=true,mode="a b,c"},fixpoint{max_iters=4}(fold_bn,test_with_options{depth=2})'


def test_round_trip_list_text_toml():
    assert spec.normalize(SPEC) == SPEC
    assert spec.to_text(SPEC) == TEXT
    assert spec.from_text(TEXT) == SPEC
    assert spec.from_toml(spec.to_toml(SPEC)) == SPEC
    assert spec.resolve(TEXT).spec() == SPEC


def test_defaults_are_left_out_of_the_normal_form():
    assert spec.normalize([{"name": "test_with_options", "depth": 1}]) == ["test_with_options"]


def test_bare_word_option_value_is_a_string():
    assert spec.from_text("test_with_options{mode=fast}") == [{"name": "test_with_options", "mode": "fast"}]


@pytest.mark.parametrize("text, column", [("fold_bn,,canonicalize", 9), ("fold_bn{depth}", 14), ("fixpoint(fold_bn", 17)])
def test_malformed_text_says_where(text, column):
    with pytest.raises(SpecError, match=f"column {column}"):
        spec.from_text(text)


def test_option_type_is_checked():
    with pytest.raises(SpecError, match="option 'depth' must be int"):
        spec.resolve("test_with_options{depth=true}")
    spec.resolve("test_with_options{ratio=1}")  # an int is a fine float


def test_malformed_toml_says_the_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('description = "x"\npasses = [\n  "canonicalize",\n  {name = "fold_bn",\n]\n')
    with pytest.raises(SpecError, match=r"bad.toml: malformed pipeline TOML: .*line 4"):
        spec.resolve(str(path))


def test_unknown_pass_in_toml_says_the_line(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('passes = [\n  "canonicalize",\n  "fold_bm",\n]\n')
    with pytest.raises(SpecError, match=r"p.toml line 3: unknown pass 'fold_bm'"):
        spec.resolve(path)


def test_toml_needs_passes(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('pases = ["fold_bn"]\n')
    with pytest.raises(SpecError, match="needs a top-level `passes"):
        spec.resolve(path)


def test_named_pipelines():
    named = spec.named_pipelines()
    assert {"none", "default"} <= set(named)
    assert spec.resolve("none").spec() == []
    default = spec.resolve("default").spec()
    # merge_convs and lower_sparse_weights are opt-in: they decide by measuring on the target, which
    # would make every build slower and its result depend on timing noise; depth plans and
    # pipelines ask for them
    opt_in = {"merge_convs", "lower_sparse_weights"}
    builtin = {name for name, cls in registered_passes().items()
               if cls.__module__.startswith("fxopt.passes.") and cls.exact} - opt_in
    assert builtin <= _names(default), f"default pipeline misses exact passes {builtin - _names(default)}"


def _names(items) -> set[str]:
    names = set()
    for item in items:
        if isinstance(item, str):
            names.add(item)
        elif "fixpoint" in item:
            names |= _names(item["fixpoint"])
        else:
            names.add(item["name"])
    return names


def test_malformed_items():
    with pytest.raises(SpecError, match="needs a 'name'"):
        spec.normalize([{"fold_bn": 1}])
    with pytest.raises(SpecError, match="a pipeline is a list"):
        spec.build_pipeline("fold_bn")
    with pytest.raises(SpecError, match="fixpoint item has unknown option"):
        spec.normalize([{"fixpoint": ["fold_bn"], "depth": 2}])
