import os

from habana_frameworks import record


def load_habana_module():
    record('load_habana_module', PT_HPU_LAZY_MODE=os.environ.get('PT_HPU_LAZY_MODE'))
