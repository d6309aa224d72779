"""The shape of the public API: a small top level of modules, the maths in one functional namespace."""
import inspect

import pytest

import setperm
import setperm.functional as SF
from setperm import LinAssign, PairwiseCost, PermutationOptimization, PermutationSetEncoder


def test_top_level_holds_the_modules_and_the_functional_namespace():
    assert setperm.__all__ == ["PermutationSetEncoder", "PermutationOptimization", "LinAssign", "PairwiseCost",
                               "PermutationMonitor", "functional"]
    assert setperm.functional is SF


def test_functional_namespace_holds_functions_only():
    assert set(SF.__all__) == {"pairwise_cost", "sinkhorn", "permutation_cost", "permutation_cost_gradient",
                               "optimize_permutation", "apply_permutation", "hungarian", "permutation_matrix",
                               "permutation_entropy"}
    for name in SF.__all__:
        assert inspect.isfunction(getattr(SF, name)), name


def test_one_steps_default():
    default = inspect.signature(SF.optimize_permutation).parameters["steps"].default
    assert PermutationOptimization(3).steps == default == PermutationSetEncoder(3, 4).po.steps == 4


@pytest.mark.parametrize("build", [
    lambda: PermutationOptimization(3, 16),
    lambda: LinAssign(3, 5, 4),
    lambda: PairwiseCost(3, 8, 2),
    lambda: PermutationSetEncoder(3, 4, "po-u", True),
])
def test_constructors_take_keywords_after_the_first_few(build):
    with pytest.raises(TypeError):
        build()
