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
from latentseg.diffusion.timesteps import uniform_timesteps

__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "DiffusionSchedule",
    "PREDICTION_TYPES",
    "PredictionType",
    "StepOutput",
    "ddim_jump",
    "evenly_spaced_timesteps",
    "make_sampler",
    "randn",
    "sample_loop",
    "uniform_timesteps",
]
