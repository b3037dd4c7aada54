import os

from habana_frameworks import record

record('hccl_registered', ID=os.environ.get('ID'), LOCAL_RANK=os.environ.get('LOCAL_RANK'))
