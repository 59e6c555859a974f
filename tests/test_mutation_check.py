"""tools/mutation_check.py stays usable: every mutation still applies to the
code and aims at tests that exist, and a run of tests is judged by what ran.
(The check itself runs on demand, not here: see docs/testing.md.)"""

import ast
import re
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import once_in_jax_pass

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import mutation_check  # noqa: E402


@once_in_jax_pass
def test_every_mutation_applies_once_and_aims_at_existing_tests():
    mutations = mutation_check.MUTATIONS
    assert len({m.name for m in mutations}) == len(mutations) >= 20
    mutation_check.check_mutations(str(ROOT), mutations)  # exits if one is stale
    for m in mutations:
        path, *selection = m.tests
        source = (ROOT / path).read_text()
        names = {
            node.name for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test")
        }
        assert names, f"{m.name}: {path} holds no tests"
        if selection:
            words = set(re.findall(r"\w+", selection[1])) - {"and", "or", "not"}
            for word in words:
                assert any(word in name for name in names), (
                    f"{m.name}: -k {word!r} selects no test of {path}"
                )
        original = (ROOT / m.path).read_text()
        mutated = original.replace(m.old, m.new, 1)
        # A bug in the code: valid Python, not a change to a docstring.
        assert code_of(mutated) != code_of(original), f"{m.name} changes no code"


def code_of(source: str) -> str:
    """The syntax tree without docstrings (comments are not in it)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:]
    return ast.dump(tree)


@once_in_jax_pass
def test_a_mutation_that_no_longer_applies_is_named():
    stale = mutation_check.Mutation(
        "gone", "layers", "keras_aim/layers/mlp.py", "no such line", "x", ("tests/test_layers.py",)
    )
    with pytest.raises(SystemExit, match="gone: 'no such line' occurs 0 times"):
        mutation_check.check_mutations(str(ROOT), [stale])


@pytest.mark.parametrize(
    "code, summary, verdict",
    [
        (1, "1 failed, 2 passed in 3.0s", "killed"),
        (0, "3 passed in 3.0s", "SURVIVED"),
        (0, "2 skipped in 1.0s", "NO TESTS"),  # e.g. tests of another backend
        (5, "5 deselected in 1.0s", "NO TESTS"),
        (2, "1 error in 1.0s", "killed (collection error)"),
        (-1, "timeout", "killed (timeout)"),
        (4, "usage", "ERROR (pytest exit 4)"),
    ],
)
def test_outcome_is_judged_by_the_tests_that_ran(code, summary, verdict):
    assert mutation_check.outcome(code, summary) == verdict


@once_in_jax_pass
def test_mutations_touch_a_scratch_copy_only():
    mutation = mutation_check.MUTATIONS[0]
    before = (ROOT / mutation.path).read_text()
    scratch = Path(mutation_check.make_scratch_copy(str(ROOT)))
    try:
        original = mutation_check.apply(str(scratch), mutation)
        assert original == before
        assert mutation.new in (scratch / mutation.path).read_text()
        assert (ROOT / mutation.path).read_text() == before
    finally:
        shutil.rmtree(scratch)
