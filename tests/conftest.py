import os

import pytest

MICRO = os.path.join(os.path.dirname(__file__), "..", "tiny_configs", "micro.toml")


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """One micro run of every stage, shared by the tests that need a run directory."""
    import train
    out = str(tmp_path_factory.mktemp("micro") / "run")
    train.main([MICRO, f"--train.out_dir={out}"])
    return out
