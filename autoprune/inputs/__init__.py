"""What a search is given: the model, the data, and the task that trains and scores it."""

from autoprune.inputs.task import CLASSIFICATION, Score, Task, load_task, validate
from autoprune.inputs.models import build_model, load_weights, read_state_dict
from autoprune.inputs.data import Data, from_splits, load_data

__all__ = ["CLASSIFICATION", "Score", "Task", "load_task", "validate", "build_model", "load_weights", "read_state_dict", "Data", "from_splits", "load_data"]
