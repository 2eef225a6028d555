"""Flow matching (forward process, targets, timesteps) and samplers as pure functions."""

from kino.diffusion.flow import (interpolate, logit_normal, predict_x0, sampling_timesteps, shift_for_tokens,
                                 shift_timesteps, velocity_target)
from kino.diffusion.samplers import SAMPLERS, STOCHASTIC, ddim_eta, dpm_solver_2m, euler, flow_edit, guided, unipc

__all__ = ["interpolate", "logit_normal", "predict_x0", "sampling_timesteps", "shift_for_tokens",
           "shift_timesteps", "velocity_target", "SAMPLERS", "STOCHASTIC", "ddim_eta", "dpm_solver_2m", "euler",
           "flow_edit", "guided", "unipc"]
