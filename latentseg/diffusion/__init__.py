"""Diffusion maths: schedules, forward process, parameterizations and samplers. Owns no network."""

from latentseg.diffusion.samplers import (
    ChainSampler,
    DDIMSampler,
    DDPMSampler,
    Denoise,
    LatentSampler,
    StepOutput,
    as_batch,
    ddim_jump,
    evenly_spaced_timesteps,
    make_sampler,
    randn,
    sample_loop,
)
from latentseg.diffusion.schedule import PREDICTION_TYPES, DiffusionSchedule, PredictionType
from latentseg.diffusion.staged import (
    StagedResult,
    StagedSampler,
    StagedTimesteps,
    Stages,
    middle_timesteps,
    staged_timesteps,
)
from latentseg.diffusion.timesteps import (
    ImportanceTimesteps,
    TimestepDraw,
    TimestepRule,
    UniformTimesteps,
    uniform_timesteps,
)

__all__ = [
    "ChainSampler",
    "DDIMSampler",
    "DDPMSampler",
    "Denoise",
    "DiffusionSchedule",
    "ImportanceTimesteps",
    "LatentSampler",
    "PREDICTION_TYPES",
    "PredictionType",
    "StagedResult",
    "StagedSampler",
    "StagedTimesteps",
    "Stages",
    "StepOutput",
    "TimestepDraw",
    "TimestepRule",
    "UniformTimesteps",
    "as_batch",
    "ddim_jump",
    "evenly_spaced_timesteps",
    "make_sampler",
    "middle_timesteps",
    "randn",
    "sample_loop",
    "staged_timesteps",
    "uniform_timesteps",
]
