"""The test suite. Its folders mirror the packages; shared fixtures are in ``conftest.py``, shared helpers in
``engine_helpers.py``, ``serve_helpers.py`` and ``scorer_process.py``."""
