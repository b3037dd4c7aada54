"""The library the scripts at the repository's top share: the training core, the device layer, the input
pipelines, the launchers' logic and what they write. No module here imports a script (train.py, main.py,
the demos, inference.py, plot_metrics.py, sample_data.py, utils.py); docs/layout.md has the import graph."""
import os

# The repository's top: the trainers, Habana's op lists and csrc/ sit there.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
