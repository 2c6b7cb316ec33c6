"""Diffusion maths: schedules, forward process, parameterizations and samplers. Owns no network."""

from latentseg.diffusion.samplers import (
    DDIMSampler,
    DDPMSampler,
    StepOutput,
    ddim_jump,
    evenly_spaced_timesteps,
    make_sampler,
    randn,
    sample_loop,
)
from latentseg.diffusion.schedule import PREDICTION_TYPES, DiffusionSchedule, PredictionType
from latentseg.diffusion.staged import StagedResult, Stages, middle_timesteps, staged_sample, staged_timesteps
from latentseg.diffusion.timesteps import ImportanceTimesteps, uniform_timesteps

__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "DiffusionSchedule",
    "ImportanceTimesteps",
    "PREDICTION_TYPES",
    "PredictionType",
    "Stages",
    "StagedResult",
    "StepOutput",
    "ddim_jump",
    "evenly_spaced_timesteps",
    "make_sampler",
    "randn",
    "middle_timesteps",
    "sample_loop",
    "staged_sample",
    "staged_timesteps",
    "uniform_timesteps",
]
