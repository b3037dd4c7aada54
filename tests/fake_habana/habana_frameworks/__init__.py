"""Test double of Habana's SDK (habana_frameworks), which cannot be installed off Gaudi.

It implements only the calls the device layer makes, and records each one in CALLS so tests can
check what our code asked the bridge to do, and in which order.
"""
CALLS = []
WEIGHT_PERMUTE_PASS = [False]  # what htcore.is_enabled_weight_permute_pass() answers


def record(name, **details):
    CALLS.append((name, details) if details else name)
