from habana_frameworks import WEIGHT_PERMUTE_PASS, record


def mark_step():
    record('mark_step')


def is_enabled_weight_permute_pass():
    return WEIGHT_PERMUTE_PASS[0]
