"""The patches of Faust's and aiokafka's internals are pinned to the versions they were written for."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from agents import faust_patches


@pytest.mark.parametrize(("package", "pinned"), sorted(faust_patches.PATCHED_VERSIONS.items()))
def test_the_installed_version_is_the_one_the_patches_were_written_for(package: str, pinned: str) -> None:
    installed = version(package)
    assert installed == pinned, (
        f"{package} {installed} is installed, but agents/faust_patches.py was written for {pinned}: "
        "read each patch against the new version's code, then update PATCHED_VERSIONS"
    )


def test_applying_twice_patches_once() -> None:
    from faust.transport.drivers import aiokafka as faust_aiokafka

    faust_patches.apply()
    first = faust_aiokafka.Consumer.perform_seek
    faust_patches.apply()
    assert faust_aiokafka.Consumer.perform_seek is first
    assert faust_aiokafka.Consumer.perform_seek.__name__ == "settled_seek"
