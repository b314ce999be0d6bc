import os

import pytest


# Tests never reach a hub: everything is built from configs in-process.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups off the items
def pytest_collection_modifyitems(config, items):
    """Put the tests that read one two-process launch in one xdist group.

    A `distributed` test's module-scoped fixtures each launch a run under torchrun and share its results. Under
    `--dist loadgroup` (the README's test command) the tests of a group go to one worker, so each launch runs once;
    under plain `load` every worker that drew one of them ran it again. An indirect parameter of the fixture (a part
    of a launch) is part of the group's name.
    """
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None or item.get_closest_marker("distributed") is None:
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        launches = sorted(
            f"{name}[{params[name]}]" if name in params else name
            for name, defs in info.name2fixturedefs.items()
            if defs[-1].scope == "module"
        )
        if launches:
            item.add_marker(pytest.mark.xdist_group("+".join(launches)))
