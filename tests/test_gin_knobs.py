"""Every gin knob can take effect (issue 14): no caller silently overrides a binding, none is unread.

gin lets an explicit call argument win over a binding without a word. `gin_knobs` reads the package's source
and finds each call that passes a bindable parameter of a configurable; such a parameter must either leave
the configurable's bindable set (denylist, or no gin at all for library functions) or be declared by the
entry point that passes it (`gin_utils.sets_knobs`), so that the CLI rejects the binding with a message
naming the knob to set instead. The checks are tested on made-up modules, so they can fail.
"""

import ast
import os
import subprocess
import sys
import textwrap

import pytest

import gin_knobs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "rest_jax")

# Calls that build a configurable from a file's own description, where a binding still applies elsewhere.
EXEMPT = {
    # A converted checkpoint has the shape its config.json says; T5Config bindings still shape the policy.
    ("rest_jax/convert.py", "T5Config"),
    ("rest_jax/convert_lm.py", "DecoderOnlyConfig"),
}


def _declared_knobs(trees) -> set[str]:
    """Keys of every `gin_utils.sets_knobs(...)` in the package: callee parameters an entry passes itself.

    The argument is a dict literal, a module-level dict constant (`sets_knobs(rest.BC_KNOBS)`), or a literal
    that unpacks one (`{**BC_KNOBS, ...}`).
    """
    constants = {}
    for tree in trees.values():
        for node in tree.body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        constants[target.id] = node.value

    def keys_of(node) -> set[str]:
        if isinstance(node, (ast.Name, ast.Attribute)):
            name = node.id if isinstance(node, ast.Name) else node.attr
            return keys_of(constants[name]) if name in constants else set()
        if not isinstance(node, ast.Dict):
            return set()
        out = set()
        for k, v in zip(node.keys, node.values):
            out |= {k.value} if isinstance(k, ast.Constant) else keys_of(v) if k is None else set()
        return out

    keys = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "sets_knobs" \
                    and node.args:
                keys |= keys_of(node.args[0])
    return keys


def _trees(sources: dict[str, str]):
    trees = {}
    for module, text in sources.items():
        tree = ast.parse(textwrap.dedent(text))
        tree.filename = module.replace(".", "/") + ".py"
        trees[module] = tree
    return trees


def test_no_call_in_the_package_overrides_a_binding_undeclared():
    trees = gin_knobs.load(PACKAGE)
    declared = _declared_knobs(trees)
    left = []
    for o in gin_knobs.overridden_knobs(trees):
        if (o.where.split(":")[0], o.callee) in EXEMPT:
            continue
        undeclared = [p for p in o.params if f"{o.callee}.{p}" not in declared]
        if undeclared:
            left.append(f"{o.where}: passes {', '.join(undeclared)} to {o.callee}")
    assert not left, ("These calls override a gin binding of the callee, which would then do nothing. Denylist the "
                      "parameter (or drop gin from a library function), or declare it on the entry point with "
                      "gin_utils.sets_knobs:\n" + "\n".join(left))


def test_every_declared_knob_is_a_bindable_parameter():
    trees = gin_knobs.load(PACKAGE)
    bindable = {f"{c.gin_name}.{p}" for c in gin_knobs.configurables(trees).values() for p in c.bindable}
    stale = sorted(_declared_knobs(trees) - bindable)
    assert not stale, f"sets_knobs names parameters no binding could set (renamed or denylisted): {stale}"


def test_no_configurable_ignores_a_bindable_parameter():
    assert gin_knobs.unread_knobs(gin_knobs.load(PACKAGE)) == []


def test_every_configurable_is_reached_by_an_entry_point_a_registry_or_a_caller():
    # Before: `improve_loss.name = 'gold'` parsed and validated, but Improve never called improve_loss.
    from rest_jax import main  # pylint: disable=import-outside-toplevel

    entries = [sub.entry for sub in main.SUBCOMMANDS.values()]
    assert gin_knobs.unreferenced_configurables(gin_knobs.load(PACKAGE), entries) == []


def test_the_checks_find_overrides_and_unread_knobs_in_a_made_up_package():
    trees = _trees({
        "pkg.lib": """
            import gin

            @gin.configurable(denylist=["x"])
            def decode(x, temperature=1.0, top_k=0, width=4):
                return x * temperature + top_k + width

            @gin.configurable
            def unread(a=1, b=2):
                return a

            @gin.configurable
            class Shape:
                heads: int = 8
                dim: int = 64
            """,
        "pkg.stage": """
            import functools
            from pkg import lib
            from pkg.lib import decode

            def grow(x):
                decode(x, 0.5)                      # temperature, by position
                lib.decode(x, top_k=5)              # by keyword, through the module
                f = functools.partial(lib.decode, width=2)
                lib.Shape(heads=4)
                return decode(x) + f(x)             # x is denylisted: fine
            """,
    })
    found = sorted((o.where, o.callee, o.params) for o in gin_knobs.overridden_knobs(trees))
    assert found == [("pkg/stage.py:10", "Shape", ("heads",)), ("pkg/stage.py:7", "decode", ("temperature",)),
                     ("pkg/stage.py:8", "decode", ("top_k",)), ("pkg/stage.py:9", "decode", ("width",))]
    assert gin_knobs.unread_knobs(trees) == ["pkg.lib.unread: b"]
    assert gin_knobs.unreferenced_configurables(trees, []) == ["pkg.lib.unread"]
    assert gin_knobs.unreferenced_configurables(trees, ["pkg.lib:unread"]) == []


def _dry_run(*flags):
    argv = [sys.executable, "-m", "rest_jax.main", *flags, "--dry_run"]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flags, binding, instead", [
    (["rest", "--gin_file=experiments/demo.gin", "--gin.MODEL_DIR='/tmp/unused'", "--gin.train.seed=3"],
     "train.seed", "run_rest.seed"),
    (["rest", "--gin_file=experiments/demo.gin", "--gin.MODEL_DIR='/tmp/unused'",
      "--gin.improve_step.feature_lengths={'inputs': 8, 'targets': 8}"],
     "improve_step.feature_lengths", "run_rest.feature_lengths"),
    (["rest", "--gin_file=experiments/demo.gin", "--gin.MODEL_DIR='/tmp/unused'",
      "--gin.train_vocabulary.vocab_size=100"], "train_vocabulary.vocab_size", "run_rest.vocab_size"),
])
def test_a_binding_the_entry_overrides_is_rejected_naming_the_knob_to_set(flags, binding, instead):
    # Before: the dry run passed and the run used run_rest's value, whatever the binding said.
    proc = _dry_run(*flags)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{binding} has no effect" in proc.stderr and instead in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_decoding_knobs_belong_to_the_entry_points():
    # Before: `generate.*`, `sample.*` and `beam_search.*` were configurable and every caller passed them.
    proc = _dry_run("eval", "--gin_file=models/tiny.gin", "--gin.CHECKPOINT='c'", "--gin.VOCABULARY='v'",
                    "--gin.TASK='demo_synthetic'", "--gin.EVAL_OUTPUT_DIR='o'", "--gin.sample.temperature=0.5")
    assert proc.returncode == 2 and "sample" in proc.stderr, proc.stderr[-2000:]
    proc = _dry_run("eval", "--gin_file=models/tiny.gin", "--gin.CHECKPOINT='c'", "--gin.VOCABULARY='v'",
                    "--gin.TASK='demo_synthetic'", "--gin.EVAL_OUTPUT_DIR='o'", "--gin.evaluate.beam_size=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "evaluate.beam_size = 2" in proc.stdout
