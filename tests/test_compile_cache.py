"""The command line's persistent compilation cache (jaxprefill/compile_cache.py): where it goes,
"off", a directory that cannot be made, and a cache directory JAX was already given."""

import jax
import pytest

from jaxprefill import compile_cache


@pytest.fixture
def no_jax_cache_dir():
    """The JAX setting cleared for the test (the test run sets one), restored after."""
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    jax.config.update("jax_compilation_cache_dir", before)


def test_cache_directory_from_the_environment_or_off(no_jax_cache_dir, tmp_path, capsys):
    assert compile_cache.enable({compile_cache.ENV: "off"}) is None
    assert compile_cache.enable({}, platform="gpu") is None  # opt-in on accelerators
    assert jax.config.jax_compilation_cache_dir is None
    where = tmp_path / "a" / "cache"
    assert compile_cache.enable({compile_cache.ENV: str(where)}) == where
    assert where.is_dir() and jax.config.jax_compilation_cache_dir == str(where)
    jax.config.update("jax_compilation_cache_dir", None)
    assert compile_cache.enable({compile_cache.ENV: str(where)}, platform="gpu") == where
    jax.config.update("jax_compilation_cache_dir", None)
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the directory would go
    assert compile_cache.enable({compile_cache.ENV: str(blocker / "cache")}) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: compilation cache off: cannot create" in err
    assert jax.config.jax_compilation_cache_dir is None


def test_a_directory_given_to_jax_is_kept(no_jax_cache_dir, tmp_path):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    assert compile_cache.enable({compile_cache.ENV: str(tmp_path / "other")}) == tmp_path / "mine"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
    assert not (tmp_path / "other").exists()


def test_the_platform_is_guessed_without_starting_jax_backends():
    assert compile_cache.likely_platform({"JAX_PLATFORMS": "cpu"}) == "cpu"
    assert compile_cache.likely_platform({"JAX_PLATFORMS": "cuda,cpu"}) == "accelerator"
    # the guess agrees with the backend JAX starts on this machine
    want = "cpu" if jax.default_backend() == "cpu" else "accelerator"
    assert compile_cache.likely_platform({}) == want
