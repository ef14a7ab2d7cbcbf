# A package, so `tests/e2e/test_host.py` and a unit test of the same name do not collide.
