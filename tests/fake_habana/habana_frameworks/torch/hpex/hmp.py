import contextlib

from habana_frameworks import record


def convert(opt_level='O2', bf16_file_path='', fp32_file_path='', isVerbose=False):
    record('hmp.convert', opt_level=opt_level, bf16_file_path=bf16_file_path,
           fp32_file_path=fp32_file_path, isVerbose=isVerbose)


@contextlib.contextmanager
def disable_casts():
    record('hmp.disable_casts:enter')
    yield
    record('hmp.disable_casts:exit')
