"""The one assembly: a `Task` (model, blocks, optimizers, loss, data, metrics) -> the sharded
state, the phase-following step, the input pipeline and the evaluator (`build` -> `Engine`)."""

from .assembly import Engine as Engine
from .assembly import build as build
from .evaluator import Evaluator as Evaluator
from .evaluator import make_eval_step as make_eval_step
from .phases import PhaseStep as PhaseStep
from .task import Task as Task
from .task import all_params as all_params
