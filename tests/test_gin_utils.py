"""The few gin internals gin_utils reads, compared with gin's public API (an upgrade of gin that moves them fails).

gin has no public way to list configurables or parsed bindings; `rest_jax.gin_utils` reads them in four small
functions. Each is checked here against what gin's public calls (`gin.query_parameter`, `gin.get_configurable`)
say about the same throwaway configurables.
"""

import gin
import pytest

from rest_jax import gin_utils


@gin.configurable(module="gin_utils_probe")
def probe_fn(alpha: int = 1, beta: str = "b"):
    return alpha, beta


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_registry_accessors_agree_with_gin_public_api():
    selectors = dict(gin_utils._registered())  # pylint: disable=protected-access
    assert "gin_utils_probe.probe_fn" in selectors
    found = gin_utils._configurable("probe_fn")  # pylint: disable=protected-access
    assert found is selectors["gin_utils_probe.probe_fn"]
    assert found.wrapped is gin.get_configurable("gin_utils_probe.probe_fn").__wrapped__
    assert gin_utils._short_selector("gin_utils_probe.probe_fn") == "probe_fn"  # pylint: disable=protected-access
    assert gin_utils._configurable("no_such_probe") is None  # pylint: disable=protected-access
    assert gin_utils.parameter_names("probe_fn") == ["alpha", "beta"]


def test_parsed_bindings_agree_with_query_parameter():
    gin.parse_config(["PROBE = 7", "probe_fn.alpha = %PROBE", "outer/probe_fn.beta = 'x'"])
    bindings = {(scope, selector, param): value
                for scope, selector, params in gin_utils._parsed_bindings()  # pylint: disable=protected-access
                for param, value in params.items()}
    # A macro stays a reference in the config (resolved when the function is called), in both views.
    assert bindings[("", "gin_utils_probe.probe_fn", "alpha")].scopes == gin.query_parameter("probe_fn.alpha").scopes
    assert bindings[("", "gin_utils_probe.probe_fn", "alpha")].scopes == ["PROBE"]
    assert bindings[("outer", "gin_utils_probe.probe_fn", "beta")] == gin.query_parameter("outer/probe_fn.beta")
    assert bindings[("PROBE", "gin.macro", "value")] == gin.query_parameter("%PROBE") == 7
    assert gin_utils.macro_value("PROBE") == 7 and gin_utils.macro_references()["PROBE"] == ["probe_fn.alpha"]
    assert probe_fn() == (7, "b")


def test_bound_setting_is_what_the_call_receives():
    # The reference is the configurable itself: called with no arguments, gin passes it exactly the values
    # `bound_setting` reads without calling it (macros through another macro, unbound parameters at default).
    gin.parse_config(["BASE = 7", "PROBE = %BASE", "probe_fn.alpha = %PROBE"])
    assert (gin_utils.bound_setting("probe_fn.alpha", probe_fn), gin_utils.bound_setting("probe_fn.beta", probe_fn)
            ) == probe_fn() == (7, "b")
    gin.clear_config()
    gin.parse_config(["probe_fn.beta = 'z'"])
    assert (gin_utils.bound_setting("probe_fn.alpha", probe_fn), gin_utils.bound_setting("probe_fn.beta", probe_fn)
            ) == probe_fn() == (1, "z")
    assert gin_utils.bound_setting("probe_fn.gamma", probe_fn, fallback=3) == 3  # no such parameter
